"""The Kedro dataset of a trained segmenter's folder on disk. Its MLflow pyfunc model is
logged by `medseg.serving.export.MlflowSegmenterDataset`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset

from medseg.inference import Segmenter
from medseg.inference.ensemble import ENSEMBLE_FILE, load_segmenter


class SegmenterDataset(AbstractDataset[Segmenter, Segmenter]):
    """A :class:`medseg.inference.Segmenter` as a folder: `segmenter.json` and `model.keras`.

    Saving replaces the folder only once both files are written.

    Example catalog entry::

        "{model}.segmenter":
          type: medseg.datasets.segmenter.SegmenterDataset
          path: <models folder>/{model}/segmenter
    """

    def __init__(self, path: str, optional: bool = False, metadata: dict[str, Any] | None = None):
        """`optional: true`: an output that a run may not make (the cross-validation's
        ensemble under `cv.folds: 0`): saving `{}` (Kedro refuses to save None) removes the
        folder, so it always holds the last run's, and a missing folder loads as None."""
        self._path = Path(path)
        self._optional = bool(optional)
        self.metadata = metadata

    def load(self) -> Segmenter | None:
        if self._optional and not self._exists():
            return None
        return load_segmenter(self._path)

    def save(self, data: Segmenter | dict) -> None:
        if isinstance(data, dict) and not data and self._optional:
            import shutil

            shutil.rmtree(self._path, ignore_errors=True)
            return
        data.save(self._path)

    def _exists(self) -> bool:
        return (self._path / "segmenter.json").is_file() or (self._path / ENSEMBLE_FILE).is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
