"""The grid a model trains and predicts on: the training grid that the data pipeline made, or
the same cases preprocessed again at the coarser spacing that the model's plan chose
(`conv3d.model.configuration: lowres`, nnU-Net's `3d_lowres`).

A second preprocessing plan, not a second copy of the code: `plan_grid` is the data
pipeline's `plan_preprocessing` at the planned spacing, and `preprocess_grid` its
`preprocess_cases`, with the same incremental keys, so an unchanged case is not made twice
(the keys hold the spacing, so a new spacing remakes every case). The segmenter takes the
grid's spacing as its target spacing: it resamples a new scan to it and maps the mask back to
the scan's own geometry, as at full resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from medseg.imaging.geometry import PreprocessingPlan
from medseg.imaging.io import Volume
from medseg.parameters import DataParams
from medseg.pipelines.data.nodes import plan_preprocessing, preprocess_cases
from medseg.kinds.plans import ModelSettings

Partitions = dict[str, Callable[[], Volume]]


def _is_lowres(settings: dict[str, Any]) -> bool:
    return ModelSettings.of(settings).grid.get("configuration") == "lowres"


def plan_grid(
    settings: dict[str, Any], case_fingerprints: pd.DataFrame, case_geometry: PreprocessingPlan, dataset_fingerprint: dict,
    data: DataParams,
) -> PreprocessingPlan:
    """Each case's geometry on the model's grid: `case_geometry` itself at full resolution,
    else the preprocessing plan at the grid's spacing (`settings.grid`)."""
    if not _is_lowres(settings):
        return case_geometry
    preprocessing = {**data["preprocessing"], "target_spacing": list(ModelSettings.of(settings).grid["spacing"])}
    return plan_preprocessing(case_fingerprints, dataset_fingerprint, preprocessing)


def preprocess_grid(
    intermediate_images: Partitions,
    intermediate_labels: Partitions,
    case_fingerprints: pd.DataFrame,
    grid_geometry: PreprocessingPlan,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
) -> tuple[dict, dict]:
    """The cases preprocessed on a low-resolution grid (`<model>.lowres_images` and
    `.lowres_labels`, made lazily and incrementally); none at full resolution, where the
    primary layer is the grid."""
    if not _is_lowres(settings):
        return {}, {}
    return preprocess_cases(intermediate_images, intermediate_labels, case_fingerprints, grid_geometry, dataset_fingerprint, data)


def select_grid(
    settings: dict[str, Any], primary_images: Partitions, primary_labels: Partitions, lowres_images: Partitions,
    lowres_labels: Partitions,
) -> tuple[Partitions, Partitions]:
    """The cases the model trains and predicts on: the primary layer, or the low-resolution one."""
    return (lowres_images, lowres_labels) if _is_lowres(settings) else (primary_images, primary_labels)
