"""The `unet` pipeline: 2D U-Net on axial slices, from raw data to report."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
