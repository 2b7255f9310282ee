"""The 2D U-Net: trained on axial slices, run over whole slices."""

from __future__ import annotations

from functools import partial
from collections.abc import Mapping
from typing import Annotated, Any

import keras
from pydantic import Field
from pydantic.dataclasses import dataclass

from medseg.kinds import ModelKind, register_model_kind
from medseg.imaging.geometry import PreprocessingPlan
from medseg.kinds.plans import ModelPlan, ModelSettings, apply_plan, plan_model
from medseg.kinds.streams import sampled_dataset
from medseg.models import build_unet2d, compile_segmentation_model
from medseg.models.unet import with_input_shape
from medseg.parameters import (
    STRICT,
    Auto,
    ExportParams,
    InferenceParams,
    NonNegative,
    PlanningParams,
    Positive,
    ReportingParams,
    Section,
    SliceSamplingParams,
    TrainingParams,
)
from medseg.patching import slice_stream
from medseg.patching.sliding_window import unet_features_per_voxel
from medseg.kinds.sizes import median_shape, plan_slices


@dataclass(config=STRICT)
class UnetModelParams(Section):
    """The 2D U-Net's network (`medseg.models.unet2d`): Conv2D, BatchNorm, ReLU twice per stage."""

    input_size: Annotated[Annotated[int, Field(ge=8)] | Auto, Field(description=(
        "Training slice size in voxels, divisible by 2**depth (inference runs whole slices); `auto`: 2.5 times the "
        "largest structure, up to the whole median slice, as large as `planning.memory_gb` allows."))]
    base_filters: Annotated[Positive, Field(description=(
        "Filters of the first stage, doubled at each pooling (32: 32-64-128 and a 256-filter bottleneck)."))]
    depth: Annotated[int, Field(ge=1, le=6, description="Pooling stages.")]

    def __post_init__(self) -> None:
        if self.input_size != "auto" and self.input_size % 2**self.depth:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by 2**depth={2**self.depth}: "
                "the skip connections would not line up"
            )
        super().__post_init__()


@dataclass(config=STRICT)
class UnetParams(Section):
    """`params:unet`: the 2D U-Net, trained on axial slices (`kedro run --pipeline unet`)."""

    seed: Annotated[NonNegative, Field(description="With `data.seed`: the weights, the sampling and the augmentation.")]
    model: UnetModelParams
    sampling: SliceSamplingParams
    training: TrainingParams
    inference: InferenceParams
    reporting: ReportingParams
    export: ExportParams


def plan_unet(
    case_geometry: PreprocessingPlan, dataset_fingerprint: dict, unet: UnetParams, planning: PlanningParams, timings: dict
) -> tuple[ModelPlan, dict, dict]:
    """Plan the 2D U-Net from the data: the training slice (the whole median axial slice at
    the target spacing, or 2.5 times the largest structure to segment when that is smaller,
    rounded to a multiple of 2**depth, as large as `planning.memory_gb` allows for two slices)
    and the batch (as many slices as fit the budget, at most 16).

    `unet.model.input_size` and `unet.training.batch_size` set to `auto` take these values;
    explicit values override them and are recorded as overrides. Then the precision and the
    training steps (`medseg.kinds.plans.plan_model`): epochs and steps set to `auto` fill
    `planning.budget_minutes.unet` at the speed timed on this machine, and
    `training.precision: auto` becomes the policy this machine trains fastest in.

    Args:
        case_geometry: the preprocessing plan (`geometry.json`: each case's training grid).
        dataset_fingerprint: `fingerprint.json` (the classes, for the model that is timed).
        unet: `params:unet`.
        planning: `params:planning` (memory_gb, budget_minutes).
        timings: `unet.timings`, the training-step timings of earlier runs.

    Returns:
        The plan (`unet.plan`), the settings the model is trained with (`unet.settings`:
        `params:unet` with the plan applied) and the timings.
    """
    median = median_shape(case_geometry)
    spacing = list(case_geometry.target_spacing)
    extent_mm = dataset_fingerprint.get("foreground_extent_mm") or [0.0, 0.0, 0.0]
    structure = max(extent_mm[0] / spacing[0], extent_mm[1] / spacing[1])
    model = unet["model"]
    planned = plan_slices(
        median, int(model["base_filters"]), int(model["depth"]), float(planning["memory_gb"]), structure_voxels=structure
    )
    inputs = {"median_shape": median, "target_spacing": spacing, "memory_gb": float(planning["memory_gb"]),
              "structure_extent_voxels": round(structure, 2)}
    settings, plan = apply_plan(
        "unet", unet, {"model.input_size": planned["input_size"], "training.batch_size": planned["batch_size"]}, inputs
    )
    return plan_model(UNET, settings, plan, dataset_fingerprint, planning, timings)


def build_unet(settings: Mapping[str, Any], n_classes: int) -> keras.Model:
    """The compiled 2D U-Net of `settings` (input (input_size, input_size, 1))."""
    settings = ModelSettings.of(settings)
    size, training = settings.input_size, settings.training
    return compile_segmentation_model(
        build_unet2d((size, size, 1), settings.base_filters, settings.depth, n_classes=n_classes),
        optimizer=training.optimizer,
        learning_rate=training.learning_rate,
        loss=training.loss,
        lr_schedule=training.lr_schedule,
        total_steps=training.total_steps,
    )


def slice_samples(settings: Mapping[str, Any], load_case):
    """Axial slices cropped or zero-padded to `model.input_size`, `sampling.foreground_fraction`
    of them through a foreground voxel (nnU-Net's 0.33), through a bounded queue."""
    settings = ModelSettings.of(settings)
    size = settings.input_size
    return partial(sampled_dataset, slice_stream, load_case, (size, size), (size, size, 1), settings.sampling)


def slice_window(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Whole axial slices, padded to a multiple of 2**depth."""
    settings = ModelSettings.of(settings)
    base_filters, depth = settings.base_filters, settings.depth
    return {"window": "slice", "depth": depth, "patch_size": None, "overlap": 0.0, "sigma_scale": 0.125,
            "features_per_voxel": unet_features_per_voxel(base_filters, depth, 2)}


def whole_slices(model: keras.Model, settings: dict[str, Any]) -> keras.Model:
    """The trained U-Net for slices of any size (it is fully convolutional)."""
    return with_input_shape(model, (None, None, 1))


UNET = register_model_kind(ModelKind(
    name="unet",
    params=UnetParams,
    plan=plan_unet,
    build=build_unet,
    sample_stream=slice_samples,
    segmenter_window=slice_window,
    network=lambda settings: "unet",
    display_name=lambda settings: "UNet",
    training_samples="sampled 2D slices",
    segmenter_network=whole_slices,
    budget_minutes=2.5,
    order=0,
))
