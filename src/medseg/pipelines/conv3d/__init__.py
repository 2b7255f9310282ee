"""The `conv3d` pipeline: Conv3D models on 3D patches, sliding-window inference, evaluation."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
