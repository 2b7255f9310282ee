"""Evaluation of segmentations: numpy metrics on hard masks, the reports built on them, and
interactive viewer pages of a scan with its masks."""

from medseg.evaluation.metrics import (
    classification_metrics,
    dice_score,
    evaluate_case,
    evaluate_case_per_class,
    hausdorff_distance_95,
    hausdorff_distance_95_penalized,
    hd95_miss_penalty_mm,
    iou_score,
    normalized_surface_dice,
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
    per_case_table,
    plot_case_metrics,
    plot_overlays,
    plot_training_curves,
    summarize_metrics,
    summarize_per_class,
)
from medseg.evaluation.viewer import viewer_page, write_viewer_page

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
    "normalized_surface_dice",
    "per_case_table",
    "plot_case_metrics",
    "plot_overlays",
    "plot_training_curves",
    "precision_score",
    "recall_score",
    "summarize_metrics",
    "summarize_per_class",
    "viewer_page",
    "volume_ml",
    "write_viewer_page",
]
