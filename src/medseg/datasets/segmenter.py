"""Kedro datasets of a trained segmenter: its folder on disk, and its MLflow pyfunc model.

kedro-mlflow's `MlflowModelTrackingDataset` logs a model object with fixed `save_args`; a
segmenter is a folder (plan and network) logged with medseg's code and a registry name that
a parameter chooses, so these two small datasets do it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

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


class MlflowSegmenterDataset(AbstractDataset[Any, None]):
    """Logs a segmenter to the active MLflow run as the pyfunc model `name`
    (`medseg.serving.SegmenterModel`), and registers it when the node asks.

    Saves a `medseg.pipelines.modeling.SegmenterExport`; write-only. Without an active run
    (MLflow off) nothing is logged.
    """

    def __init__(self, name: str, metadata: dict[str, Any] | None = None):
        self._name = name
        self.metadata = metadata
        self.model_uri: str | None = None

    def load(self) -> None:
        raise DatasetError(f"{self._name}: load the model with mlflow.pyfunc.load_model('runs:/<run_id>/{self._name}').")

    def save(self, data: Any) -> None:
        import tempfile

        import mlflow

        from medseg.serving import log_segmenter

        if mlflow.active_run() is None:
            return
        with tempfile.TemporaryDirectory(prefix="medseg-segmenter-") as folder:
            data.segmenter.save(Path(folder) / "segmenter")
            info = log_segmenter(Path(folder) / "segmenter", self._name, data.registered_model_name)
        self.model_uri = info.model_uri

    def _describe(self) -> dict[str, Any]:
        return {"name": self._name}
