"""The `data` pipeline: ingestion or synthesis, validation, preprocessing and the split."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
