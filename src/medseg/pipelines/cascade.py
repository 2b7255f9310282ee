"""A cascade's low-resolution stage (`conv3d.model.configuration: cascade`, nnU-Net's
`3d_cascade_fullres`): the networks and the probabilities that the full-resolution network
takes after the image.

The training cases are split into `settings.cascade["folds"]` folds. Each fold's network
is the model kind's own (`kind.build`, `kind.sample_stream`, the one training skeleton
`train_model`) on the fold's cases, resampled to the planned low resolution. The context a
training case gets comes from the network that did not train on it, so that the second stage
does not learn from predictions on cases the first one memorized; the validation and test
cases, and every new scan, get the mean of all of them. The networks become the segmenter's
`context` stage; the per-case context stays in memory (float16) for the second stage's
training only.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pandas as pd

from medseg.errors import ConfigurationError
from medseg.imaging.geometry import PreprocessingPlan, resample_label_map
from medseg.imaging.io import Volume
from medseg.inference import Segmenter
from medseg.inference.cascade import context_channels, context_shape, fold_cases, resample_to
from medseg.kinds import ModelKind
from medseg.kinds.plans import ModelSettings
from medseg.parameters import DataParams, PlanningParams
from medseg.pipelines.training import segmenter_plan, train_model
from medseg.cases.split import cases_in_split

logger = logging.getLogger(__name__)

Partitions = dict[str, Callable[[], Volume]]


def train_context(
    grid_images: Partitions,
    grid_labels: Partitions,
    splits: pd.DataFrame,
    grid_geometry: PreprocessingPlan,
    case_fingerprints: pd.DataFrame,
    dataset_fingerprint: dict,
    data: DataParams,
    settings: dict[str, Any],
    planning: PlanningParams,
    backup_root: str,
    *,
    kind: ModelKind,
) -> tuple[list[Segmenter], dict[str, np.ndarray], dict[str, Any]]:
    """Train the low-resolution folds and give every case its context.

    Each fold keeps its crash-recovery backup, and its network once trained, under
    `backup_root/fold<i>` (`<model>.context_backup`, apart from the full-resolution
    network's backup, which deletes what it does not own): a run resumed after a later node
    failed loads the finished folds instead of training them again.

    Returns:
        (context_models, context, decided): the fold networks as segmenters at the low
        resolution; {case_id: (X, Y, Z, C) float16 probabilities on the training grid}; what
        each fold's training decided, as `<model>.context<i>.training.*` MLflow parameters.
        All empty unless the plan chose the cascade.
    """
    cascade = ModelSettings.of(settings).cascade
    if not cascade:
        return [], {}, {}
    stage, spacing = cascade["stage"], tuple(cascade["spacing"])
    grid_spacing = tuple(grid_geometry.target_spacing)
    training_cases = cases_in_split(splits, "train")
    if len(training_cases) < int(cascade["folds"]):
        raise ConfigurationError(
            f"conv3d.model.configuration=cascade trains {cascade['folds']} low-resolution folds, but the split has "
            f"{len(training_cases)} training case(s). Add cases, or use configuration lowres or fullres."
        )
    folds = fold_cases(training_cases, int(cascade["folds"]), int(data["seed"]))
    n_classes = kind.class_count(stage, dataset_fingerprint)

    def load_low(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        image, label = grid_images[case_id]().data, grid_labels[case_id]().data
        shape = context_shape(image.shape, grid_spacing, spacing)
        return resample_to(image, shape), resample_label_map(label, shape)

    stage_plan = segmenter_plan(kind, case_fingerprints, SimpleNamespace(target_spacing=spacing), dataset_fingerprint, data,
                                stage, planning)
    models: list[Segmenter] = []
    decided: dict[str, Any] = {}
    for index, cases in enumerate(folds):
        fold_splits = pd.concat([
            pd.DataFrame({"case_id": cases, "split": "train"}),
            splits[splits["split"] == "val"][["case_id", "split"]],
        ], ignore_index=True)
        logger.info("%s: cascade fold %d of %d, low resolution %s mm, on %d training cases.", kind.name, index + 1,
                    len(folds), spacing, len(cases))
        model, _, fold_decided = train_model(
            kind.name, lambda: kind.build(stage, n_classes), kind.sample_stream(stage, load_low), fold_splits, grid_geometry,
            dataset_fingerprint, data, stage, f"{backup_root}/fold{index}", metric_prefix=f"context{index}.", keep=True,
        )
        prefix = f"{kind.name}."
        decided.update({f"{prefix}context{index}.{key.removeprefix(prefix)}": value for key, value in fold_decided.items()})
        models.append(Segmenter(kind.segmenter_network(model, stage), stage_plan))
    context = {}
    for case_id in sorted(grid_images):
        image = grid_images[case_id]().data
        # A training case gets only the networks that did not see it; the others all of them.
        held_out = [m for m, cases in zip(models, folds) if case_id not in cases]
        context[case_id] = context_channels(held_out, image, grid_spacing).astype(np.float16)
    return models, context, decided
