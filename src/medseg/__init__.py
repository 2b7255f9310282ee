"""medseg: Kedro pipelines for medical image segmentation, tracked with MLflow."""

import os

# TensorFlow's C++ log level, set before anything imports TensorFlow (Kedro imports this
# package first, for its settings): without it a plain `kedro run` prints TensorFlow's INFO
# and WARNING lines (CPU features, memory patches). A value the user exported wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow 3 sends usage telemetry unless told not to; medseg keeps it off (as `.telemetry` does
# for Kedro's). Set here, before anything imports MLflow, which reads it at import and on every
# call. A value the user exported wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from medseg.runs.console import quiet_tensorflow_import, quiet_third_party_warnings  # noqa: E402

quiet_tensorflow_import()
quiet_third_party_warnings()

__version__ = "0.1.0"
