"""The parameter schema: one typed section per `params:` input of a node.

Kedro validates a node's `params:` inputs against the Pydantic model or dataclass in the node's
signature (`kedro.validation`), when it builds the catalog: before any node runs and before
kedro-mlflow opens the run. Every section here is a Pydantic dataclass that is also a `dict`,
so nodes keep reading `unet["training"]["epochs"]`, JSON and the MLflow parameter log see
plain mappings, and a mistake is refused up front:

- an unknown key, with the valid names and a did-you-mean (`epoch` -> `epochs`);
- a wrong type (`batch_size=abc`) or a value out of range (`epochs=-1`), naming the key.

The defaults live in `conf/base/parameters_*.yml`, not here: every field is required, so the
YAML and the schema cannot drift apart silently (a test also checks the README's table).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Millimetres = Annotated[float, Field(gt=0.0)]
Probability = Annotated[float, Field(gt=0.0, lt=1.0)]
Determinism = Literal["auto"] | bool
Auto = Literal["auto"]  # the planner decides (medseg.kinds.sizes); plan.json records it

_STRICT = ConfigDict(extra="forbid")


class Section(dict):
    """A validated parameter section that reads like the dict Kedro would have passed."""

    def __post_init__(self) -> None:
        dict.update(self, {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @model_validator(mode="before")
    @classmethod
    def _known_keys_only(cls, values: Any) -> Any:
        # A nested section arrives as a dict; the top one as the keyword arguments of __init__.
        given = values.kwargs if isinstance(values, ArgsKwargs) else values
        if isinstance(given, dict):
            valid = list(cls.__dataclass_fields__)
            unknown = [key for key in given if key not in valid]
            if unknown:
                raise ValueError(f"unknown parameter {did_you_mean(unknown, valid)}; the valid names are {valid}")
        return values


def did_you_mean(unknown: list[Any], valid: list[str]) -> str:
    """`'epoch' (did you mean 'epochs'?), 'x'`: the unknown names, each with its closest valid one."""
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), valid, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return ", ".join(hints)


def _increasing(pair: tuple[float, float], name: str) -> None:
    if pair[0] > pair[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(pair)}")


# data ----------------------------------------------------------------------------------------
@dataclass(config=_STRICT)
class SyntheticParams(Section):
    """The phantoms' settings; where they are written is the catalog's `synthetic_phantoms`."""

    n_cases: Annotated[int, Field(ge=3)]
    in_plane_size: Annotated[int, Field(ge=16)]
    n_slices_range: tuple[Positive, Positive]
    in_plane_spacing_range: tuple[Millimetres, Millimetres]
    slice_spacing_range: tuple[Millimetres, Millimetres]
    n_lesions_range: tuple[Positive, Positive]
    n_classes: Annotated[int, Field(ge=1, le=3)]

    def __post_init__(self) -> None:
        for name in ("n_slices_range", "in_plane_spacing_range", "slice_spacing_range", "n_lesions_range"):
            _increasing(getattr(self, name), name)
        super().__post_init__()


@dataclass(config=_STRICT)
class PreprocessingParams(Section):
    target_spacing: tuple[Millimetres, Millimetres, Millimetres] | None
    interpolation_order: Literal[1, 3]
    normalization: Literal["zscore"]
    clip_percentiles: tuple[Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]] | None
    crop_to_nonzero: bool
    crop_margin: NonNegative

    def __post_init__(self) -> None:
        if self.clip_percentiles is not None and self.clip_percentiles[0] >= self.clip_percentiles[1]:
            raise ValueError(f"clip_percentiles must be [low, high] with low < high, got {list(self.clip_percentiles)}")
        super().__post_init__()


@dataclass(config=_STRICT)
class SplitParams(Section):
    train: Fraction
    val: Fraction
    test: Fraction

    def __post_init__(self) -> None:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train} + {self.val} + {self.test}")
        super().__post_init__()


@dataclass(config=_STRICT)
class DataParams(Section):
    source: Literal["synthetic", "msd", "dicom"]
    msd_dir: str | None
    dicom_dir: str | None
    channel: NonNegative | str | None
    label_mode: Literal["auto", "multiclass", "binary"]
    foreground_labels: list[Annotated[int, Field(ge=1, le=255)]] | None
    seed: NonNegative
    synthetic: SyntheticParams
    preprocessing: PreprocessingParams
    split: SplitParams

    def __post_init__(self) -> None:
        if self.source == "msd" and not self.msd_dir:
            raise ValueError("source=msd needs msd_dir, e.g. --params data.source=msd,data.msd_dir=/abs/Task04_Hippocampus")
        if self.source == "dicom" and not self.dicom_dir:
            raise ValueError("source=dicom needs dicom_dir, e.g. --params data.source=dicom,data.dicom_dir=/abs/studies "
                             "(one folder per case: its image series and a DICOM SEG)")
        if self.label_mode == "multiclass" and self.foreground_labels is not None:
            raise ValueError(
                "label_mode=multiclass makes each label that dataset.json lists a class; foreground_labels merges "
                "labels into one (binary mode): unset foreground_labels, or use label_mode=binary"
            )
        super().__post_init__()


# shared by the model pipelines ---------------------------------------------------------------
@dataclass(config=_STRICT)
class TrainingParams(Section):
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"]
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0)]
    loss: Literal["bce", "dice", "bce+dice", "ce", "ce+dice"]
    epochs: Positive | Auto
    batch_size: Positive | Auto
    steps_per_epoch: Positive | Auto
    validation_steps: Positive | Auto
    augment: bool
    early_stopping_patience: NonNegative
    deterministic: Determinism
    flip_axes: list[Annotated[int, Field(ge=0, le=2)]]
    precision: Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]
    distribute: Literal["none", "mirrored"]  # medseg.models.distribute; batch_size stays per replica


@dataclass(config=_STRICT)
class ReportingParams(Section):
    n_overlay_cases: Positive


# unet ----------------------------------------------------------------------------------------
@dataclass(config=_STRICT)
class UnetModelParams(Section):
    input_size: Annotated[int, Field(ge=8)] | Auto
    base_filters: Positive
    depth: Annotated[int, Field(ge=1, le=6)]

    def __post_init__(self) -> None:
        if self.input_size != "auto" and self.input_size % 2**self.depth:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by 2**depth={2**self.depth}: "
                "the skip connections would not line up"
            )
        super().__post_init__()


@dataclass(config=_STRICT)
class SliceSamplingParams(Section):
    foreground_fraction: Fraction
    samples_per_volume: Positive
    queue_length: Positive


Axis = Annotated[int, Field(ge=0, le=2)]


@dataclass(config=_STRICT)
class ExportParams(Section):
    registered_model_name: str | None


@dataclass(config=_STRICT)
class UnetInferenceParams(Section):
    threshold: Probability
    mirror_axes: list[Axis]
    keep_largest_component: bool


@dataclass(config=_STRICT)
class UnetParams(Section):
    seed: NonNegative
    model: UnetModelParams
    sampling: SliceSamplingParams
    training: TrainingParams
    inference: UnetInferenceParams
    reporting: ReportingParams
    export: ExportParams


# conv3d --------------------------------------------------------------------------------------
@dataclass(config=_STRICT)
class Conv3dModelParams(Section):
    kind: Literal["unet3d", "patch_classifier"]
    base_filters: Positive
    depth: Annotated[int, Field(ge=1, le=5)] | Auto
    configuration: Literal["fullres", "lowres", "cascade", "auto"] = "auto"


@dataclass(config=_STRICT)
class PatchSamplingParams(Section):
    patch_size: tuple[Positive, Positive, Positive] | Auto
    foreground_fraction: Fraction
    samples_per_volume: Positive
    queue_length: Positive


@dataclass(config=_STRICT)
class Conv3dInferenceParams(Section):
    overlap: Annotated[float, Field(ge=0.0, lt=1.0)]
    sigma_scale: Annotated[float, Field(gt=0.0)]
    threshold: Probability
    mirror_axes: list[Axis]
    keep_largest_component: bool


@dataclass(config=_STRICT)
class PatchEvaluationParams(Section):
    patches_per_case: Positive


@dataclass(config=_STRICT)
class Conv3dParams(Section):
    seed: NonNegative
    model: Conv3dModelParams
    sampling: PatchSamplingParams
    training: TrainingParams
    inference: Conv3dInferenceParams
    evaluation: PatchEvaluationParams
    reporting: ReportingParams
    export: ExportParams


# planning ------------------------------------------------------------------------------------
@dataclass(config=_STRICT)
class BudgetParams(Section):
    unet: Annotated[float, Field(gt=0.0)]
    conv3d: Annotated[float, Field(gt=0.0)]


@dataclass(config=_STRICT)
class PlanningParams(Section):
    """Budgets that are turned into sizes, shared by both models.

    memory_gb: GiB of activations that one training step may take (the planned training
        batch, `medseg.kinds.sizes.training_batch`); for inference, the predicting process's
        peak: the whole slices (unet) or windows (conv3d) per batch get what is left after
        the runtime and the scan's arrays (`medseg.patching.sliding_window.activation_budget_gb`).
    patch_voxels: the voxels a planned 3D patch holds (its shape follows the spacing).
    budget_minutes: training minutes per model that `auto` epochs and steps fill, timed on
        the machine that runs (`medseg.pipelines.modeling.plan_training_steps`).
    retime: re-time the first epoch of planned epochs and stop within 10 % over the budget
        when the steps run slower than timed (`medseg.models.training.TrainingBudget`).
    """

    memory_gb: Annotated[float, Field(gt=0.0, le=1024.0)]
    patch_voxels: Annotated[int, Field(ge=64)]
    budget_minutes: BudgetParams
    retime: bool = True


# compute -------------------------------------------------------------------------------------
SYNC = "sync"
_LOCAL_CLUSTER = re.compile(r"^local:(\d+)$")
_ADDRESS = re.compile(r"^(tcp|tls|inproc|ucx)://\S+$")


def check_scheduler(spec: str) -> str:
    """`spec` itself when it is `sync`, `local:N` (N >= 1) or a scheduler address
    (`tcp://host:port`); else a ValueError that says which forms are valid."""
    spec = str(spec).strip()
    if spec == SYNC or _ADDRESS.match(spec):
        return spec
    match = _LOCAL_CLUSTER.match(spec)
    if match and int(match.group(1)) >= 1:
        return spec
    raise ValueError(
        f"compute.scheduler='{spec}' is not one of 'sync', 'local:N' (N worker processes, N >= 1, e.g. 'local:2') "
        "or the address of a running Dask scheduler ('tcp://host:8786')"
    )



@dataclass(config=_STRICT)
class ComputeParams(Section):
    """Where per-case work runs (`medseg.runs.compute`).

    scheduler: `sync` (this process), `local:N` (a Dask LocalCluster of N worker processes)
        or the address of a running Dask scheduler (`tcp://host:8786`).
    """

    scheduler: str

    def __post_init__(self) -> None:
        check_scheduler(self.scheduler)
        super().__post_init__()


# cv ------------------------------------------------------------------------------------------
@dataclass(config=_STRICT)
class CvParams(Section):
    """Cross-validation and the choice of the best configuration (`medseg.pipelines.crossval`,
    `medseg.pipelines.selection`).

    folds: K folds over the training and validation cases (0: the single split only).
    registered_model_name: the MLflow registry name of the selection's champion; None names
        it `medseg-<dataset>` (the name in the dataset's `dataset.json`).
    """

    folds: NonNegative
    registered_model_name: str | None

    def __post_init__(self) -> None:
        if self.folds == 1:
            raise ValueError("cv.folds=1 is not a cross-validation: use 0 (off) or at least 2.")
        super().__post_init__()


# predict -------------------------------------------------------------------------------------
@dataclass(config=_STRICT)
class PredictParams(Section):
    """`kedro run --pipeline predict`: which model, which scans, where the masks go.

    model: `unet` or `conv3d` (this project's last trained model), `champion` or an MLflow
        model URI.
    mirror_axes, keep_largest_component: None keeps the model's own postprocessing.
    series_uid: the SeriesInstanceUID to segment in DICOM inputs that hold several series;
        None refuses such an input, listing its series.
    """

    model: str
    input_dir: str | None
    output_dir: str | None
    mirror_axes: list[Axis] | None
    keep_largest_component: bool | None
    series_uid: str | None = None


ROOTS: dict[str, type[Section]] = {
    "data": DataParams,
    "unet": UnetParams,
    "conv3d": Conv3dParams,
    "planning": PlanningParams,
    "predict": PredictParams,
    "compute": ComputeParams,
    "cv": CvParams,
}


def leaf_names(section: type[Section], prefix: str) -> list[str]:
    """Dotted names of every leaf parameter of a section, e.g. `unet.training.epochs`."""
    names = []
    for field in dataclasses.fields(section):
        kind = field.type if isinstance(field.type, type) else None
        resolved = section.__pydantic_fields__[field.name].annotation
        kind = resolved if isinstance(resolved, type) and issubclass(resolved, Section) else kind
        if isinstance(kind, type) and issubclass(kind, Section):
            names.extend(leaf_names(kind, f"{prefix}.{field.name}"))
        else:
            names.append(f"{prefix}.{field.name}")
    return names
