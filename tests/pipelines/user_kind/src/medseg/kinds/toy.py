"""A deliberately small 2D model kind: two convolutions, no pooling, over whole axial slices.

Everything a model kind needs is here: its typed parameter section, its planner, its network,
its training samples, its window, and its default training budget.
"""

from __future__ import annotations

from functools import partial
from typing import Annotated

import keras
from pydantic import Field
from pydantic.dataclasses import dataclass

from medseg.kinds import ModelKind, register_model_kind
from medseg.kinds.plans import ModelSettings, apply_plan, plan_model
from medseg.kinds.sizes import median_shape
from medseg.kinds.streams import sampled_dataset
from medseg.models import compile_segmentation_model
from medseg.parameters import (
    STRICT,
    Auto,
    ExportParams,
    InferenceParams,
    NonNegative,
    Positive,
    ReportingParams,
    Section,
    SliceSamplingParams,
    TrainingParams,
)
from medseg.patching import slice_stream


@dataclass(config=STRICT)
class ToyModelParams(Section):
    """The toy's network: two 3x3 convolutions."""

    input_size: Annotated[Positive | Auto, Field(description="Training slice size; `auto`: the median slice, at most 32.")]
    filters: Annotated[Positive, Field(description="Filters of the hidden convolution.")]


@dataclass(config=STRICT)
class ToyParams(Section):
    """`params:toy`: a two-convolution network over axial slices."""

    seed: Annotated[NonNegative, Field(description="The toy's own seed.")]
    model: ToyModelParams
    sampling: SliceSamplingParams
    training: TrainingParams
    inference: InferenceParams
    reporting: ReportingParams
    export: ExportParams


def plan_toy(case_geometry, dataset_fingerprint, toy, planning, timings):
    """The training slice: the median slice's larger in-plane side, at most 32 voxels."""
    size = int(min(32, max(median_shape(case_geometry)[:2])))
    settings, plan = apply_plan("toy", toy, {"model.input_size": size}, {"median_shape": median_shape(case_geometry)})
    return plan_model(TOY, settings, plan, dataset_fingerprint, planning, timings)


def build_toy(settings: dict, n_classes: int) -> keras.Model:
    settings = ModelSettings.of(settings)
    size, training = settings.input_size, settings.training
    inputs = keras.Input((size, size, 1))
    hidden = keras.layers.Conv2D(int(settings.model["filters"]), 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", dtype="float32")(hidden)
    return compile_segmentation_model(
        keras.Model(inputs, outputs), optimizer=training.optimizer, learning_rate=training.learning_rate, loss=training.loss
    )


def toy_samples(settings: dict, load_case):
    settings = ModelSettings.of(settings)
    size = settings.input_size
    return partial(sampled_dataset, slice_stream, load_case, (size, size), (size, size, 1), settings.sampling)


def toy_network_for_slices(model: keras.Model, settings: dict) -> keras.Model:
    inputs = keras.Input((None, None, 1))
    outputs = inputs
    for layer in model.layers[1:]:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs)


TOY = register_model_kind(ModelKind(
    name="toy",
    params=ToyParams,
    plan=plan_toy,
    build=build_toy,
    sample_stream=toy_samples,
    segmenter_window=lambda settings: {"window": "slice", "depth": 0, "patch_size": None, "overlap": 0.0,
                                       "sigma_scale": 0.125, "features_per_voxel": 8.0},
    network=lambda settings: "toy",
    display_name=lambda settings: "Toy",
    training_samples="sampled 2D slices",
    segmenter_network=toy_network_for_slices,
    budget_minutes=0.05,
))
