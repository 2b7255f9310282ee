"""A Kedro dataset that saves a Keras model's weights alone (`.weights.h5`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from medseg.storage.publishing import atomic_path


class KerasWeightsDataset(AbstractDataset[Any, None]):
    """Saves `model.save_weights(...)` atomically (`medseg.storage.publishing.atomic_path`). Write-only: weights need their
    architecture to load, which the `.keras` model file carries."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        if not filepath.endswith(".weights.h5"):
            raise DatasetError(f"KerasWeightsDataset needs a '.weights.h5' file name, got '{filepath}'.")
        self._filepath = Path(filepath)
        self.metadata = metadata

    def load(self) -> None:
        raise DatasetError(f"{self._filepath}: weights alone cannot be loaded; load the .keras model instead.")

    def save(self, data: Any) -> None:
        with atomic_path(self._filepath, ".weights.h5") as tmp:
            data.save_weights(tmp)

    def _exists(self) -> bool:
        return self._filepath.exists()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}
