"""medseg: Kedro pipelines for medical image segmentation, tracked with MLflow."""

__version__ = "0.1.0"
