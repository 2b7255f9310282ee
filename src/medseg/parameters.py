"""The parameter schema: one typed section per `params:` input of a node.

Kedro validates a node's `params:` inputs against the Pydantic model or dataclass in the node's
signature (`kedro.validation`), when it builds the catalog: before any node runs and before
kedro-mlflow opens the run. Every section here is a Pydantic dataclass that is also a `dict`,
so nodes keep reading `unet["training"]["epochs"]`, JSON and the MLflow parameter log see
plain mappings, and a mistake is refused up front:

- an unknown key, with the valid names and a did-you-mean (`epoch` -> `epochs`);
- a wrong type (`batch_size=abc`) or a value out of range (`epochs=-1`), naming the key.

The defaults live in `conf/base/parameters_*.yml`, not here: every field is required, so the
YAML and the schema cannot drift apart silently. What each parameter means is written once, as
its field's `description`; the reference page (`docs/reference/parameters.md`) is generated from
the schema (`python -m medseg.parameters_reference`, checked by a test).

This module holds the shared sections and the pieces the model kinds build theirs from; each
model kind's own section is defined beside the kind (`medseg.kinds.unet.UnetParams`), and
`medseg.kinds.parameter_roots` lists them all.
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
Auto = Literal["auto"]  # the planner decides (medseg.kinds.sizes); the model's plan records it
Axis = Annotated[int, Field(ge=0, le=2)]  # a RAS axis

STRICT = ConfigDict(extra="forbid")


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
@dataclass(config=STRICT)
class SyntheticParams(Section):
    """The phantoms that `data.source: synthetic` generates (`medseg.synthetic`); where they are
    written is the catalog's `synthetic_phantoms`."""

    n_cases: Annotated[int, Field(ge=3, description="Phantoms to generate.")]
    in_plane_size: Annotated[int, Field(ge=16, description="Voxels along x and y.")]
    n_slices_range: Annotated[tuple[Positive, Positive], Field(description="Voxels along z, [low, high].")]
    in_plane_spacing_range: Annotated[
        tuple[Millimetres, Millimetres], Field(description="In-plane voxel size in mm, [low, high].")
    ]
    slice_spacing_range: Annotated[tuple[Millimetres, Millimetres], Field(description="Slice spacing in mm, [low, high].")]
    n_lesions_range: Annotated[tuple[Positive, Positive], Field(description="Lesions per phantom, [low, high].")]
    n_classes: Annotated[int, Field(ge=1, le=3, description=(
        "Foreground classes (1-3): nested lesion shells, `rim` (1) to `core` (K); 1 is a single `lesion` class."))]

    def __post_init__(self) -> None:
        for name in ("n_slices_range", "in_plane_spacing_range", "slice_spacing_range", "n_lesions_range"):
            _increasing(getattr(self, name), name)
        super().__post_init__()


Percentile = Annotated[float, Field(ge=0, le=100)]


@dataclass(config=STRICT)
class PreprocessingParams(Section):
    """How every case is brought to the training grid (`medseg.imaging.geometry`,
    `medseg.imaging.normalization`); the planner records the result in the catalog's `case_geometry`."""

    target_spacing: Annotated[tuple[Millimetres, Millimetres, Millimetres] | None, Field(description=(
        "Voxel size in mm along the RAS axes that every case is resampled to; null: the dataset's median spacing."))]
    interpolation_order: Annotated[Literal[1, 3], Field(description=(
        "Interpolation of images when resampling: 1 linear, 3 cubic. Labels are always resampled as one-hot, "
        "linearly, then argmax."))]
    normalization: Annotated[Literal["zscore"], Field(description="Intensity normalization: `zscore`, per case.")]
    clip_percentiles: Annotated[tuple[Percentile, Percentile] | None, Field(description=(
        "Clip intensities to these percentiles before the z-score, e.g. `[0.5, 99.5]`; null: no clipping."))]
    crop_to_nonzero: Annotated[bool, Field(description="Crop each case to the box around its nonzero voxels.")]
    crop_margin: Annotated[NonNegative, Field(description="Voxels kept around that box.")]

    def __post_init__(self) -> None:
        if self.clip_percentiles is not None and self.clip_percentiles[0] >= self.clip_percentiles[1]:
            raise ValueError(f"clip_percentiles must be [low, high] with low < high, got {list(self.clip_percentiles)}")
        super().__post_init__()


@dataclass(config=STRICT)
class SplitParams(Section):
    """The split of the cases into training, validation and test, by case (`medseg.cases.split`)."""

    train: Annotated[Fraction, Field(description="Fraction of the cases that train the models.")]
    val: Annotated[Fraction, Field(description="Fraction of the cases that validate them (the best epoch, early "
                                            "stopping); above 0 for a run that trains: 0 is refused before any work.")]
    test: Annotated[Fraction, Field(description="Fraction of the cases that the reports score; the three sum to 1. "
                                             "0 holds none out, as nnU-Net users work: the test evaluation is skipped "
                                             "and says so, and with cv.folds the out-of-fold scores are the run's evaluation.")]

    def __post_init__(self) -> None:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train} + {self.val} + {self.test}")
        super().__post_init__()


@dataclass(config=STRICT)
class DataParams(Section):
    """`params:data`: where the cases come from, how they are read, preprocessed and split
    (`kedro run --pipeline data`)."""

    source: Annotated[Literal["synthetic", "msd", "dicom"], Field(description=(
        "`synthetic` (generated phantoms), `msd` (your MSD-layout folder, `data.msd_dir`) or `dicom` "
        "(`data.dicom_dir`: image series with DICOM SEG labels)."))]
    msd_dir: Annotated[str | None, Field(description=(
        "An MSD-layout folder (`dataset.json`, `imagesTr/`, `labelsTr/`), read only: a path (relative: from the "
        "project root) or an fsspec URL (`s3://bucket/Task04_Hippocampus`)."))]
    dicom_dir: Annotated[str | None, Field(description=(
        "`data.source: dicom`: one folder per case holding its image series and a DICOM SEG; read only."))]
    channel: Annotated[NonNegative | str | None, Field(description=(
        "The channel (an index, or a modality name of `dataset.json`) of multi-channel images; null: single-channel data."))]
    label_mode: Annotated[Literal["auto", "multiclass", "binary"], Field(description=(
        "`multiclass`: each label that `dataset.json` lists is a class; `binary`: the labels are merged into one; "
        "`auto`: multiclass when `dataset.json` lists more than one foreground label and `foreground_labels` is null."))]
    foreground_labels: Annotated[list[Annotated[int, Field(ge=1, le=255)]] | None, Field(description=(
        "Binary mode: the label values (1-255) that count as foreground; null: every value above 0."))]
    seed: Annotated[NonNegative, Field(description=(
        "The phantoms and the split, bit for bit; with each model's own seed, its training."))]
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


# the pieces of a model kind's section --------------------------------------------------------
@dataclass(config=STRICT)
class TrainingParams(Section):
    """How a model is trained (`medseg.models.training`); `auto` values are planned from the
    data and the budgets (`params:planning`) and recorded in the model's plan (`<model>.plan`)."""

    optimizer: Annotated[Literal["adam", "adamw", "sgd", "sgd_nesterov", "rmsprop"], Field(description=(
        "The Keras optimizer; `sgd_nesterov` is nnU-Net's SGD with Nesterov momentum 0.99 (without its weight "
        "decay), `sgd` plain SGD without momentum."))]
    learning_rate: Annotated[float, Field(gt=0.0, le=10.0, description="The optimizer's (initial) learning rate.")]
    loss: Annotated[Literal["bce", "dice", "bce+dice", "ce", "ce+dice"], Field(description=(
        "`bce`, `dice` or `bce+dice`; with several classes the cross-entropy is categorical (`ce` and `ce+dice` "
        "say so). A patch classifier always uses BCE."))]
    epochs: Annotated[Positive | Auto, Field(description=(
        "At most this many epochs (early stopping may end sooner); `auto`: as many as fill the model's "
        "`planning.budget_minutes`, at the speed timed on this machine."))]
    batch_size: Annotated[Positive | Auto, Field(description=(
        "Samples (slices or patches) per step, per replica; `auto`: as many as `planning.memory_gb` allows, at most 16."))]
    steps_per_epoch: Annotated[Positive | Auto, Field(description="Training steps per epoch; `auto`: from the time budget.")]
    validation_steps: Annotated[Positive | Auto, Field(description=(
        "Batches of validation samples per epoch; `auto`: a quarter of the training steps."))]
    augment: Annotated[bool, Field(description="Augment the training samples (flips along `flip_axes`, `intensity_augmentation` and `spatial_augmentation`).")]
    early_stopping_patience: Annotated[NonNegative, Field(description=(
        "Epochs without a lower validation loss before training stops; the best weights are kept."))]
    deterministic: Annotated[Determinism, Field(description=(
        "TensorFlow op determinism: `auto` (on without a GPU), `true` or `false`."))]
    flip_axes: Annotated[list[Axis], Field(description=(
        "RAS axes that augmentation flips; left-right (0) is never flipped when a class is lateralized."))]
    precision: Annotated[Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"], Field(description=(
        "The Keras dtype policy. `auto` measures: where the hardware has bfloat16 units, the planner times float32 "
        "and `mixed_bfloat16` on the planned model and batch and checks the Dice of a short training; for training "
        "and for inference apart it keeps the fastest policy that is at least 5 % faster than float32 and within "
        "0.01 Dice of it, else float32. The model's plan records the measurements and the reason."))]
    distribute: Annotated[Literal["none", "mirrored"], Field(description=(
        "`none` (one device) or `mirrored`: `tf.distribute.MirroredStrategy`, one replica per visible GPU (per "
        "logical CPU device without one); `batch_size` stays per replica and `learning_rate` is not scaled."))]
    lr_schedule: Annotated[Literal["constant", "poly"], Field(description=(
        "`constant`, or `poly`: nnU-Net's polynomial decay from `learning_rate` to 0 over the training's "
        "epochs × steps_per_epoch, learning_rate × (1 − step / steps) ** 0.9. Early stopping or the time budget may "
        "end training before the rate reaches 0."))] = "constant"
    intensity_augmentation: Annotated[Literal["jitter", "nnunet"], Field(description=(
        "With `augment`: `jitter` (the image scaled by 0.9–1.1 and shifted by ±0.1) or `nnunet`, nnU-Net's "
        "intensity transforms with its probabilities (Gaussian noise and blur, brightness, contrast, simulated low "
        "resolution, gamma; `medseg.patching.intensity`)."))] = "jitter"
    deep_supervision: Annotated[bool, Field(description=(
        "nnU-Net's deep supervision: a 1×1 head on each decoder stage of the U-Net, trained against the label "
        "downsampled to its resolution, the losses weighted 1, 1/2, 1/4, ... with the coarsest stage 0, normalized "
        "(`medseg.models.deep_supervision`). The heads are dropped after training: the network saved and served is "
        "the same. U-Nets only (not `conv3d.model.network: patch_classifier`)."))] = False
    spatial_augmentation: Annotated[Literal["none", "nnunet"], Field(description=(
        "With `augment`: `none`, or `nnunet`: nnU-Net's rotation (probability 0.2; ±30° about each axis for 3D "
        "patches, ±180° in-plane for 2D slices) and scaling (probability 0.2, 0.7–1.4), applied where each patch is "
        "cut, the label by nearest neighbour (`medseg.patching.spatial`). Training re-times its first epoch, so the "
        "time budget includes its cost."))] = "none"


@dataclass(config=STRICT)
class SliceSamplingParams(Section):
    """How 2D training slices are drawn (`medseg.patching.sampling`)."""

    foreground_fraction: Annotated[Fraction, Field(description=(
        "Share of the slices drawn through a foreground voxel (nnU-Net's 0.33)."))]
    samples_per_volume: Annotated[Positive, Field(description="Slices drawn from a case each time it is loaded.")]
    queue_length: Annotated[Positive, Field(description="Slices held in memory for shuffling.")]


@dataclass(config=STRICT)
class PatchSamplingParams(Section):
    """How 3D training patches are drawn (`medseg.patching.sampling`)."""

    patch_size: Annotated[tuple[Positive, Positive, Positive] | Auto, Field(description=(
        "Voxels (x, y, z) of a patch, divisible by 2**depth along each pooled axis; `auto`: planned "
        "(`planning.patch_voxels`, shaped by the spacing, with per-axis poolings)."))]
    foreground_fraction: Annotated[Fraction, Field(description="Share of the patches centred on a foreground voxel.")]
    samples_per_volume: Annotated[Positive, Field(description="Patches cut from a case each time it is loaded.")]
    queue_length: Annotated[Positive, Field(description="Patches held in memory for shuffling.")]


# kw_only: a kind's subclass adds fields without defaults after `profiles`, which has one.
@dataclass(config=STRICT, kw_only=True)
class InferenceParams(Section):
    """How the segmenter turns the network's probabilities into a mask (`medseg.inference`)."""

    threshold: Annotated[Probability, Field(description="Probability at or above which a voxel is foreground.")]
    mirror_axes: Annotated[list[Axis], Field(description=(
        "Test-time mirroring: predictions averaged over flips along these RAS axes (nnU-Net: `[0, 1, 2]`); "
        "left-right is dropped for lateralized classes; `[]`: off."))]
    keep_largest_component: Annotated[bool, Field(description="Keep only the largest connected region of each class.")]
    profiles: Annotated[bool, Field(description=(
        "After training, time and score every inference setting the model has (mirroring, overlap, largest component, "
        "engine) on the validation cases and record the profiles `fast`, `balanced` and `accurate` in `segmenter.json` "
        "(`predict.profile`; the front in `<model>/profiles.csv`). false: none (faster tests).")),
    ] = True
    profile_cases: Annotated[Positive, Field(description=(
        "At most this many validation cases are timed and scored for the profiles: each costs every setting's "
        "inference (a mirrored 3D setting is 8 passes, on each engine and overlap).")),
    ] = 3


@dataclass(config=STRICT)
class ReportingParams(Section):
    """What the model's report draws (`medseg.evaluation.reports`)."""

    n_overlay_cases: Annotated[Positive, Field(description="Test cases drawn in the report's overlays (`<model>.overlays`).")]
    n_viewer_cases: Annotated[NonNegative, Field(description=(
        "Test cases given an interactive viewer page (`<model>/viewer/<case>.html`: the scan with the reference and the "
        "prediction as switchable overlays, in 3 planes and 3D; offline, at most 10 MB); 0: none.")),
    ] = 2


@dataclass(config=STRICT)
class ExportParams(Section):
    """How the trained segmenter is published in MLflow."""

    registered_model_name: Annotated[str | None, Field(description=(
        "Also register the `<model>_segmenter` pyfunc model in the MLflow model registry under this name; null: not registered."))]
    onnx: Annotated[bool, Field(description=(
        "Export the trained network to ONNX and check on the test split that onnxruntime gives TensorFlow's masks "
        "(equal, Dice >= 0.999, or differing only on the mask's border, in at most 2 % of it, per case and class; "
        "`<model>.onnx_parity`, MLflow `onnx_*`); the onnxruntime engine "
        "(`predict.engine`) and the `<model>_segmenter_onnx` model need it. false: no export (faster tests).")),
    ] = True


# planning ------------------------------------------------------------------------------------
@dataclass(config=STRICT)
class PlanningParams(Section):
    """`params:planning`: the budgets that the planner turns into sizes, batches and steps, for
    every model kind (`medseg.kinds.sizes`, `medseg.kinds.plans`)."""

    memory_gb: Annotated[float, Field(gt=0.0, le=1024.0, description=(
        "GiB of activations that one training step may take (the planned batch); for inference, the predicting "
        "process's peak: each batch of whole slices or windows gets what is left after the runtime and the scan's arrays "
        "(`medseg.patching.sliding_window.activation_budget_gb`)."))]
    patch_voxels: Annotated[int, Field(ge=64, description=(
        "Voxels that a planned 3D patch holds; its shape follows the spacing."))]
    budget_minutes: Annotated[dict[str, Annotated[float, Field(gt=0.0)]], Field(description=(
        "Training minutes per model kind (`planning.budget_minutes.<model>`) that `auto` epochs and steps fill, at the "
        "speed timed on this machine; a kind that is not listed gets its own default (`ModelKind.budget_minutes`)."))]
    retime: Annotated[bool, Field(description=(
        "Re-time planned epochs by the first epoch and stop after the epochs that fit the budget plus 10 % when the "
        "steps run slower than timed; `false` keeps the planned epochs (bit-identical reruns under load)."))] = True


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



@dataclass(config=STRICT)
class ComputeParams(Section):
    """`params:compute`: where per-case work runs (`medseg.runs.compute`)."""

    scheduler: Annotated[str, Field(description=(
        "Where per-case work (validation, canonicalization, preprocessing, writing predicted masks) runs: `sync` (this "
        "process), `local:N` (a Dask LocalCluster of N worker processes, started and stopped by the run) or the "
        "address of a running Dask scheduler (`tcp://host:8786`)."))]

    def __post_init__(self) -> None:
        check_scheduler(self.scheduler)
        super().__post_init__()


# cv ------------------------------------------------------------------------------------------
@dataclass(config=STRICT)
class CvParams(Section):
    """`params:cv`: cross-validation and the choice of the best configuration
    (`medseg.pipelines.crossval`, `medseg.pipelines.selection`)."""

    folds: Annotated[NonNegative, Field(description=(
        "K >= 2 folds over the training and validation cases (the catalog's `folds`, kept across runs): each "
        "fold trains the model on the others and predicts its own cases; 0: the single split only."))]
    registered_model_name: Annotated[str | None, Field(description=(
        "The registry name that `select` registers its champion under; null: `medseg-<dataset>` (the name in "
        "`dataset.json`)."))]
    champion_alpha: Annotated[Probability, Field(description=(
        "`select` moves the `champion` alias to its new version only when the new choice's out-of-fold Dice beats the "
        "champion's on the same cases at this one-sided level (a paired bootstrap, `params:evaluation`)."))]
    champion_min_cases: Annotated[int, Field(ge=2, description=(
        "The fewest paired cases that can move the champion; with fewer, it stays unless `force_champion`."))]
    force_champion: Annotated[bool, Field(description=(
        "Move the `champion` alias to `select`'s new version whatever the comparison says (it is still reported)."))]

    def __post_init__(self) -> None:
        if self.folds == 1:
            raise ValueError("cv.folds=1 is not a cross-validation: use 0 (off) or at least 2.")
        super().__post_init__()


# evaluation ----------------------------------------------------------------------------------
@dataclass(config=STRICT)
class EvaluationParams(Section):
    """`params:evaluation`: how every evaluation scores and summarises cases (the test split, the
    cross-validation, `select`; `medseg.evaluation`)."""

    nsd_tolerance_mm: Annotated[float, Field(ge=0.0, le=100.0, description=(
        "The tolerance of the normalized surface Dice (`nsd`), in mm: a surface voxel within this distance of the "
        "other mask's surface agrees. Choose it as the error a reader would accept; 1 mm is about a voxel of most scans."))]
    bootstrap_resamples: Annotated[NonNegative, Field(le=100_000, description=(
        "Resampled sets of cases behind each mean's confidence interval (`ci_low`, `ci_high`); 0: no interval."))]
    bootstrap_seed: Annotated[NonNegative, Field(description=(
        "The seed of the bootstrap's generator, so that a summary's intervals are the same on every rerun."))]
    confidence_level: Annotated[Probability, Field(description=(
        "The confidence level of the intervals, e.g. 0.95 for a 95 % interval."))]


# predict -------------------------------------------------------------------------------------
@dataclass(config=STRICT)
class DicomWebParams(Section):
    """`predict.dicomweb`: scans from a DICOMweb server (a PACS), results back to it (`medseg.dicom.web`)."""

    url: Annotated[str, Field(description=(
        "The server's DICOMweb root, e.g. `http://pacs:8042/dicom-web` for Orthanc."))]
    credentials: Annotated[str | None, Field(description=(
        "The name of an entry of `conf/local/credentials.yml` holding `username` and `password` (basic) or `token` "
        "(bearer); never the secret itself. null: no authentication."))] = None
    study_uid: Annotated[str | None, Field(description=(
        "Segment this study's series (all of them, or `series_uid`'s). null: search with `query`."))] = None
    series_uid: Annotated[str | None, Field(description=(
        "Segment only this series of `study_uid`."))] = None
    query: Annotated[dict[str, str | int] | None, Field(description=(
        "A QIDO-RS series search by DICOM keyword, e.g. `{Modality: CT, StudyDate: 20240101-20241231}`. A query run is "
        "incremental: a series this model already answered, whose stored results the server still holds, is skipped; "
        "a series the reader refuses (a localizer, a gap) is skipped and listed."))] = None
    store: Annotated[bool, Field(description=(
        "Store each series' SEG back on the server (STOW-RS), as a new series in its study."))] = True
    timeout_s: Annotated[float, Field(gt=0.0, description="Seconds to wait for each answer of the server.")] = 60.0


@dataclass(config=STRICT)
class PredictParams(Section):
    """`params:predict`: `kedro run --pipeline predict`: which model, which scans, where the masks go."""

    model: Annotated[str, Field(description=(
        "A model kind's name (this project's last trained model of that kind, e.g. `unet`), `champion` (the "
        "selection's champion), or an MLflow model URI (`runs:/<run_id>/unet_segmenter`, `models:/<name>/<version>`)."))]
    input_dir: Annotated[str | None, Field(description=(
        "The scans to segment: NIfTI files (`<case>_0000.nii.gz` or `<case>.nii.gz`) or DICOM series; never written to. "
        "null with `dicomweb`."))]
    output_dir: Annotated[str | None, Field(description=(
        "Where the `<case>.nii.gz` masks (and DICOM SEGs for DICOM inputs) and `predictions.csv` go; not inside `input_dir`."))]
    mirror_axes: Annotated[list[Axis] | None, Field(description=(
        "Test-time mirroring axes; null: the model's own `inference.mirror_axes`."))]
    keep_largest_component: Annotated[bool | None, Field(description="null: the model's own `inference.keep_largest_component`.")]
    engine: Annotated[Literal["tensorflow", "onnxruntime"] | None, Field(description=(
        "What runs the network: `tensorflow` (the Keras network, in the precision training chose) or `onnxruntime` (its "
        "float32 ONNX export; refused for a model whose export failed its parity check or was off). Everything around "
        "the network (plan, windows, mirroring, temperature, QC, postprocessing) is the same code on both. null: the "
        "profile's engine, else tensorflow."))] = None
    profile: Annotated[Literal["fast", "balanced", "accurate"] | None, Field(description=(
        "An inference profile the model chose after training on its validation cases: `accurate` (its best Dice), "
        "`balanced` (the quickest within 0.005 of it), `fast` (the quickest within 0.02); each sets mirroring, overlap, "
        "largest component and engine, which `mirror_axes`, `keep_largest_component` and `engine` still override. null: "
        "the model's own setting."))] = None
    series_uid: Annotated[str | None, Field(description=(
        "The SeriesInstanceUID to segment where a DICOM input holds several series; null refuses such an input, listing them."))] = None
    generate_missing_uids: Annotated[bool, Field(description=(
        "Give a DICOM series whose Study, Series, SOP Instance or SOP Class UIDs are blank (as anonymisers leave them) new "
        "UIDs, derived from its voxels, so that its SEG can reference it; `predictions.csv` records which. false: such a "
        "series gets its NIfTI mask only, and its row says why."))] = False
    outputs: Annotated[list[Literal["nifti", "seg", "rtstruct"]], Field(min_length=1, description=(
        "What each scan gives, in any combination: `nifti` (`<case>.nii.gz`, the mask), `seg` (`<case>.seg.dcm`, a DICOM "
        "SEG over a DICOM input), `rtstruct` (`<case>.rtstruct.dcm`, an RT Structure Set: one ROI per class, contours "
        "on the source slices, holes by the even-odd rule). A scan that can give none of them is named in its row; "
        "the run fails before any work only when no scan can give any."))] = ("nifti", "seg")
    hash_uids: Annotated[bool, Field(description=(
        "Record the input's and outputs' UIDs as SHA-256 digests (`sha256:<hex>`) in each scan's audit record "
        "(`<case>.audit.json`) and in what MLflow keeps of the run; `predictions.csv` in `output_dir` keeps them as "
        "they are. The same UID gives the same digest, so records still link."))] = False
    seg_type: Annotated[Literal["binary", "labelmap"], Field(description=(
        "`binary`: a frame per slice and segment, what every viewer reads; `labelmap`: one frame per slice of segment "
        "numbers (DICOM 2024c), for viewers that show label maps."))] = "binary"
    viewer: Annotated[bool, Field(description=(
        "Also write `<case>.html` beside each mask: an offline viewer page of the scan with its mask as an overlay, in 3 "
        "planes and 3D (NiiVue, inlined; at most 10 MB). Needs `nifti` in `outputs`."))] = False
    dicomweb: Annotated[DicomWebParams | None, Field(description=(
        "Take the scans from a DICOMweb server instead of `input_dir`, and store the SEGs back (see its keys)."))] = None


# The sections every project has; each model kind adds its own (`medseg.kinds.parameter_roots`).
SHARED_ROOTS: dict[str, type[Section]] = {
    "data": DataParams,
    "planning": PlanningParams,
    "predict": PredictParams,
    "compute": ComputeParams,
    "cv": CvParams,
    "evaluation": EvaluationParams,
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
