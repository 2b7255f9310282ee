"""A Kedro dataset for one case's class probabilities on its source grid (`.npz`): the
out-of-fold predictions of cross-validation, which the selection of the best configuration
averages and thresholds (nnU-Net keeps its validation softmax as `.npz` the same way)."""

from __future__ import annotations

import io
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np
from kedro.io.core import AbstractDataset, DatasetError, get_filepath_str, get_protocol_and_path

from medseg.imaging.io import Volume


class ProbabilityDataset(AbstractDataset[Volume, Volume]):
    """A :class:`Volume` of probabilities: float16 data ((X, Y, Z) or (X, Y, Z, K + 1)) and the
    affine, in a compressed `.npz`. float16 keeps 3 significant digits: far finer than any
    threshold decision needs, at half the size. Loads as float32."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        protocol, path = get_protocol_and_path(filepath)
        self._protocol, self._filepath = protocol, PurePosixPath(path)
        self._fs = fsspec.filesystem(protocol)
        self.metadata = metadata

    @property
    def _path(self) -> str:
        return get_filepath_str(self._filepath, self._protocol)

    def load(self) -> Volume:
        try:
            with self._fs.open(self._path, "rb") as handle, np.load(io.BytesIO(handle.read())) as record:
                return Volume(record["probability"].astype(np.float32), record["affine"].astype(np.float64))
        except (OSError, ValueError, KeyError) as exc:
            raise DatasetError(f"{self._path}: not a readable probability file ({exc}). Run the cross-validation again.") from exc

    def save(self, data: Volume) -> None:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, probability=np.asarray(data.data, dtype=np.float16), affine=np.asarray(data.affine))
        self._fs.makedirs(str(PurePosixPath(self._path).parent), exist_ok=True)
        with self._fs.open(self._path, "wb") as handle:
            handle.write(buffer.getvalue())

    def _exists(self) -> bool:
        return self._fs.exists(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "protocol": self._protocol}
