"""The Kedro dataset of a trained segmenter's folder on disk. Its MLflow pyfunc model is
logged by `medseg.segmenter_export.MlflowSegmenterDataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset

from medseg.inference import Segmenter


class SegmenterDataset(AbstractDataset[Segmenter, Segmenter]):
    """A :class:`medseg.inference.Segmenter` as a folder: `segmenter.json` and `model.keras`.

    Saving replaces the folder only once both files are written.

    Example catalog entry::

        "{model}.segmenter":
          type: medseg.datasets.segmenter.SegmenterDataset
          path: <models folder>/{model}/segmenter
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> Segmenter:
        return Segmenter.load(self._path)

    def save(self, data: Segmenter) -> None:
        data.save(self._path)

    def _exists(self) -> bool:
        return (self._path / "segmenter.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
