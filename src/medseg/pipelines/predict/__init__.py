"""The `predict` pipeline: a trained segmenter on a folder of new scans."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
