"""Slice and patch sampling for training, and sliding-window inference on whole volumes.

Numpy only at import time; TensorFlow is imported by `make_tf_dataset` when it is called.
"""

from medseg.patching.sampling import (
    Augmentation,
    EmptyLabelWarning,
    PatchQueue,
    extract_patch,
    make_tf_dataset,
    patch_stream,
    sample_patch_centers,
    slice_stream,
)
from medseg.patching.sliding_window import (
    extract_windows,
    gaussian_importance_map,
    pad_to_window,
    sliding_window_grid,
    sliding_window_predict,
    sliding_window_starts,
)

__all__ = [
    "Augmentation",
    "EmptyLabelWarning",
    "PatchQueue",
    "extract_patch",
    "extract_windows",
    "gaussian_importance_map",
    "make_tf_dataset",
    "pad_to_window",
    "patch_stream",
    "sample_patch_centers",
    "slice_stream",
    "sliding_window_grid",
    "sliding_window_predict",
    "sliding_window_starts",
]
