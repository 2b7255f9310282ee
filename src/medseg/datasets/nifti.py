"""A Kedro dataset for one NIfTI volume (kedro-datasets has none).

Use it through ``partitions.PartitionedDataset`` for a folder of cases: the partitioned dataset
hands nodes one load function per case, so nothing is read until a node asks for that case.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError, get_filepath_str, get_protocol_and_path

from medseg.imaging.io import Volume, read_volume, write_volume


class NiftiDataset(AbstractDataset[Volume, Volume]):
    """Loads and saves a :class:`medseg.imaging.io.Volume` as `.nii` / `.nii.gz`.

    Images load as float32 and labels as uint8 (``kind``), with the affine and header kept.
    Saving is atomic (temporary file, then rename). Local files only.

    Example catalog entry::

        primary_images:
          type: partitions.PartitionedDataset
          path: data/03_primary/images
          dataset:
            type: medseg.datasets.nifti.NiftiDataset
            kind: image
          filename_suffix: .nii.gz
    """

    def __init__(self, filepath: str, kind: str = "image", metadata: dict[str, Any] | None = None):
        protocol, path = get_protocol_and_path(filepath)
        if protocol != "file":
            raise DatasetError(f"NiftiDataset reads local files only, got '{filepath}'.")
        if kind not in ("image", "label"):
            raise DatasetError(f"NiftiDataset kind must be 'image' or 'label', got '{kind}'.")
        self._protocol = protocol
        self._filepath = PurePosixPath(path)
        self._kind = kind
        self.metadata = metadata

    def load(self) -> Volume:
        return read_volume(get_filepath_str(self._filepath, self._protocol), kind=self._kind)

    def save(self, data: Volume) -> None:
        write_volume(data, get_filepath_str(self._filepath, self._protocol))

    def _exists(self) -> bool:
        return Path(get_filepath_str(self._filepath, self._protocol)).exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "kind": self._kind}
