"""Evaluation of segmentations: numpy metrics on hard masks, and the reports built on them."""

from medseg.evaluation.metrics import (
    classification_metrics,
    dice_score,
    evaluate_case,
    evaluate_case_per_class,
    hausdorff_distance_95,
    hausdorff_distance_95_penalized,
    hd95_miss_penalty_mm,
    iou_score,
    precision_score,
    recall_score,
    volume_ml,
)
from medseg.evaluation.reports import (
    DEFAULT_SUMMARY_METRICS,
    OverlaySlice,
    choose_overlay_slice,
    flatten_class_means,
    flatten_summary,
    plot_overlays,
    plot_training_curves,
    summarize_metrics,
    summarize_per_class,
)

__all__ = [
    "DEFAULT_SUMMARY_METRICS",
    "OverlaySlice",
    "choose_overlay_slice",
    "classification_metrics",
    "dice_score",
    "evaluate_case",
    "evaluate_case_per_class",
    "flatten_class_means",
    "flatten_summary",
    "hausdorff_distance_95",
    "hausdorff_distance_95_penalized",
    "hd95_miss_penalty_mm",
    "iou_score",
    "plot_overlays",
    "plot_training_curves",
    "precision_score",
    "recall_score",
    "summarize_metrics",
    "summarize_per_class",
    "volume_ml",
]
