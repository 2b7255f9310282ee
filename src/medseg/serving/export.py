"""The catalog's `<model>.mlflow_segmenter`: a trained segmenter logged to the MLflow run as
medseg's pyfunc model (`medseg.serving.model.SegmenterModel`).

It lives beside serving, not in `medseg.datasets`: the I/O layer does not import the serving
layer, and `medseg.serving.model` itself imports no Kedro, so a served model needs none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from medseg.inference.engines import ONNXRUNTIME
from medseg.serving.model import log_segmenter, onnx_ready


class MlflowSegmenterDataset(AbstractDataset[Any, None]):
    """Logs a segmenter to the active MLflow run as the pyfunc model `name`
    (`SegmenterModel`), and registers it when the node asks; where its ONNX export passed its
    parity check, also as `<name>_onnx` on the onnxruntime engine (not registered). kedro-mlflow's
    `MlflowModelTrackingDataset` logs a model object with fixed `save_args`; a segmenter is a
    folder (plan and network) logged with medseg's code and a registry name that a parameter
    chooses.

    Saves a `medseg.pipelines.evaluation.SegmenterExport`; write-only. Without an active run
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

        if data is None or mlflow.active_run() is None:
            return  # nothing chosen (a selection without cross-validation), or MLflow off
        with tempfile.TemporaryDirectory(prefix="medseg-segmenter-") as folder:
            data.segmenter.save(Path(folder) / "segmenter")
            info = log_segmenter(Path(folder) / "segmenter", self._name, data.registered_model_name)
            if onnx_ready(data.segmenter):  # the TensorFlow-free variant, where the export passed its parity check
                log_segmenter(Path(folder) / "segmenter", f"{self._name}_onnx", engine=ONNXRUNTIME)
        self.model_uri = info.model_uri
        alias = getattr(data, "alias", None)
        if alias and data.registered_model_name:
            # The alias moves to the new version; the previous one keeps its number, so
            # `set_registered_model_alias(name, alias, <old version>)` undoes a promotion.
            mlflow.MlflowClient().set_registered_model_alias(data.registered_model_name, alias, info.registered_model_version)

    def _describe(self) -> dict[str, Any]:
        return {"name": self._name}
