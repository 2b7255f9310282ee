"""A Kedro dataset that saves a Keras model's weights alone (`.weights.h5`)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError


class KerasWeightsDataset(AbstractDataset[Any, None]):
    """Saves `model.save_weights(...)` atomically. Write-only: weights need their
    architecture to load, which the `.keras` model file carries."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        if not filepath.endswith(".weights.h5"):
            raise DatasetError(f"KerasWeightsDataset needs a '.weights.h5' file name, got '{filepath}'.")
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> None:
        raise DatasetError(f"{self._filepath}: weights alone cannot be loaded; load the .keras model instead.")

    def save(self, data: Any) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".weights.h5", dir=self._filepath.parent)
        os.close(fd)
        try:
            data.save_weights(tmp)
            os.replace(tmp, self._filepath)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
