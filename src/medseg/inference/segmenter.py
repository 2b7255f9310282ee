"""The segmenter: a trained network bundled with the plan it was trained on.

nnU-Net keeps a trained model beside its plans and runs inference from that pair alone; this
is the same idea. A :class:`Segmenter` holds the Keras network and a :class:`SegmenterPlan`
(target spacing, crop, interpolation, clipping, classes, threshold, window, postprocessing), so
a new scan goes through exactly the preprocessing of training, the one inference engine
(`medseg.patching.sliding_window.sliding_window_predict`: whole axial slices for the 2D U-Net,
Gaussian-weighted windows for the 3D models), the inverse geometry and the postprocessing,
and comes back as a label map on the scan's own grid.

The plan is read from the training run's files (`geometry.json`, `fingerprint.json`,
parameters), never recomputed from the new scans. The evaluation of the training pipelines goes
through the same object, so what is scored on the test split is what `predict` and the MLflow
model return.

On disk a segmenter is a folder: `segmenter.json` (the plan) and `model.keras`, and where the
network was exported, `model.onnx` with its parity record `onnx.json`
(`medseg.inference.engines`). A segmenter loaded for the `onnxruntime` engine reads only the
latter two and imports no TensorFlow.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import ConfigurationError, CorruptFileError, DatasetNotFoundError, InvalidGeometryError
from medseg.imaging.geometry import (
    CaseGeometry,
    nonzero_bounding_box,
    plan_case_geometry,
    to_canonical,
)
from medseg.imaging.io import Volume, read_volume
from medseg.storage.limits import describe, limits
from medseg.imaging.laterality import safe_flip_axes
from medseg.imaging.normalization import image_to_training_grid
from medseg.inference.postprocessing import (
    LabelMapper,
    keep_largest_component,
    predict_with_mirroring,
    probabilities_on_source_grid,
    probabilities_to_label_map,
    volumes_ml,
)
from medseg.inference.cascade import context_channels, with_context
from medseg.inference.qc import assess_prediction
from medseg.inference.temperature import apply_temperature, temperature_threshold
from medseg.inference.profiles import profile_setting
from medseg.inference.engines import ONNXRUNTIME, PASSED, TENSORFLOW, OnnxNetwork, ParityRecord, check_engine
from medseg.inference.windows import Network, WindowStrategy, window_predictor, window_strategy  # noqa: F401 (window_predictor re-exported)
from medseg.patching.sliding_window import (
    GIB,
    MIN_ACTIVATION_GB,
    RUNTIME_GB,
    activation_budget_gb,
    case_arrays_bytes,
)
from medseg.storage.publishing import apply_umask, staged_folder

if TYPE_CHECKING:
    import keras

logger = logging.getLogger(__name__)

PLAN_FILE = "segmenter.json"
MODEL_FILE = "model.keras"
ONNX_FILE = "model.onnx"
PARITY_FILE = "onnx.json"
CONTEXT_FOLDER = "context"  # a cascade's low-resolution stage: one segmenter folder per network
FORMAT_VERSION = 1

# Variant names of `Segmenter.variants`, for the with/without comparison of the evaluation.
PLAIN = "plain"
MIRRORED = "mirroring"
LARGEST = "largest_component"


@dataclass
class SegmenterPlan:
    """Everything a trained network needs to segment a scan it has never seen.

    Attributes:
        model_key: the pipeline that trained it, `unet` or `conv3d`.
        display_name: the model's name in run names (`UNet`, `UNet3D`, `Conv3DClassifier`).
        window: the name of the window strategy that covers a volume
            (`medseg.inference.windows`): `slice` (a 2D model: whole axial slices, padded to a
            multiple of 2**depth), `patch` (a 3D model: sliding windows of `patch_size`), or
            one a model kind registers.
        target_spacing: the training grid's spacing in mm along RAS axes.
        interpolation_order: spline order of the image resampling (1 or 3).
        clip_percentiles: (low, high) percentiles clipped before the z-score, or None.
        crop_margin: voxels around the image's nonzero box when cropping, or None (no crop).
        channel: the channel of a 4-D (X, Y, Z, C) scan with C > 1, or None.
        label_mode: `binary` or `multiclass`.
        classes: {label value (text): name} of the foreground classes, in the order of the
            model's channels 1..K; masks hold these values (1 in binary mode).
        lateralized: label values whose structures keep to one side of the body: no
            left-right mirroring.
        threshold: probability at or above which a voxel is foreground (one sigmoid channel).
        depth: poolings of a 2D U-Net (slices are padded to a multiple of 2**depth); 0 for a
            patch model.
        patch_size: the window of a patch model, voxels; None for a slice model.
        overlap, sigma_scale: sliding-window overlap and Gaussian sigma (patch models).
        features_per_voxel: the model's width for the memory budget
            (`medseg.patching.sliding_window.unet_features_per_voxel`).
        memory_gb: GiB of activations per forward pass (`planning.memory_gb`).
        mirror_axes: test-time mirroring axes (RAS), empty for none.
        keep_largest_component: keep each class's largest connected region only.
        provenance: where it came from (MLflow run id, parameter hash); informative.
        data_spacing: the spacing of the training grid the model's data came from, where the
            model runs on a coarser one (`conv3d.model.configuration: lowres`); None: the
            target spacing. A scan's voxel size is checked against it.
        context_stages: a cascade's low-resolution networks, saved in `context/0..n-1`
            (set by :class:`Segmenter` from its `context`); 0 for one network.
        qc: the training data's ranges and the QC flags' thresholds
            (`medseg.inference.qc.QualityReference`); empty: no QC (a model trained before it).
        temperature: the logits are divided by it before the sigmoid or softmax
            (`medseg.evaluation.calibration`), fitted on held-out cases after training; 1.0:
            the network's own probabilities. The masks do not depend on it.
        profiles: {`fast` | `balanced` | `accurate`: its setting (mirroring axes, overlap,
            largest component, engine) with the seconds and Dice it measured}
            (`medseg.inference.profiles`); empty: none were chosen.
    """

    model_key: str
    display_name: str
    window: str
    target_spacing: tuple[float, float, float]
    interpolation_order: int
    clip_percentiles: tuple[float, float] | None
    crop_margin: int | None
    channel: int | None
    label_mode: str
    classes: dict[str, str]
    lateralized: list[int]
    threshold: float
    depth: int
    patch_size: tuple[int, int, int] | None
    overlap: float
    sigma_scale: float
    features_per_voxel: float
    memory_gb: float
    mirror_axes: list[int] = field(default_factory=list)
    keep_largest_component: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    data_spacing: tuple[float, float, float] | None = None
    context_stages: int = 0
    temperature: float = 1.0
    qc: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def class_values(self) -> tuple[int, ...]:
        return tuple(int(value) for value in self.classes)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], source: str = "segmenter.json") -> SegmenterPlan:
        if int(record.get("format_version", 0)) != FORMAT_VERSION:
            raise ConfigurationError(
                f"{source}: segmenter format {record.get('format_version')} is not {FORMAT_VERSION}, the one this "
                "medseg reads. Train the model again with this version, or predict with the medseg that trained it."
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{key: value for key, value in record.items() if key in known})


class Segmenter:
    """A trained network and its plan: scan in, label map on the scan's grid out.

    Args:
        model: the Keras network. A slice model must take (None, None, 1) inputs
            (`medseg.models.with_input_shape`); a patch model takes its patch, with 1 + C
            channels in a cascade.
        plan: see :class:`SegmenterPlan`.
        context: a cascade's low-resolution stage (`conv3d.model.configuration: cascade`):
            segmenters whose mean class probabilities (`medseg.inference.cascade`) the
            network takes after the image. Saved in `context/<n>/` of the segmenter's folder.
        onnx: the network's ONNX export (`medseg.models.onnx_export`), or None.
        parity: the export's record (`medseg.inference.engines.ParityRecord`), or None.
        network: what runs on the `onnxruntime` engine (set by `load(..., engine=...)` or
            `use_engine`); None: the Keras `model` on TensorFlow.

    Attributes:
        model: the Keras network; None for a segmenter loaded for onnxruntime only.
        engine: `tensorflow` or `onnxruntime`, the engine its network runs on.
    """

    def __init__(self, model: keras.Model | None, plan: SegmenterPlan, context: Sequence[Segmenter] = (),
                 onnx: bytes | None = None, parity: ParityRecord | None = None, network: OnnxNetwork | None = None):
        self.model = model
        self.context = list(context)
        self.plan = plan if plan.context_stages == len(self.context) else replace(plan, context_stages=len(self.context))
        window_strategy(self.plan.window)  # an unknown window is refused here, not at the first scan
        self.onnx, self.parity = onnx, parity
        self.engine = ONNXRUNTIME if network is not None else TENSORFLOW
        # Each engine's network and its `predict_batch`, made once: switching back and forth (the
        # parity check, the profiles' timings) neither opens a session nor traces a graph again.
        self._networks: dict[str, Network] = {ONNXRUNTIME: network} if network is not None else {}
        self._session_of = onnx if network is not None else None  # the export the onnxruntime session runs
        if model is not None:
            self._networks[TENSORFLOW] = model
        self._predictors: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self._warned_budget = False
        self._logged_shapes: set[tuple[int, ...]] = set()

    def __getstate__(self) -> dict[str, Any]:
        """What a copy or a Dask worker gets: everything but the onnxruntime session, the
        inference network (the model with its normalizations folded) and the traced predictors,
        which are made again on first use."""
        state = dict(self.__dict__)
        state["_networks"] = {TENSORFLOW: self.model} if self.model is not None else {}  # folded again on first use
        state["_predictors"], state["_session_of"] = {}, None
        return state

    # -- the engine -------------------------------------------------------------------------
    def use_engine(self, engine: str) -> Segmenter:
        """Run the network (and a cascade's stages) on `engine` from now on; itself.

        Raises:
            ConfigurationError: onnxruntime for a network with no export, or one whose parity
                with TensorFlow failed (the record's reason), or TensorFlow for a segmenter
                loaded for onnxruntime only.
        """
        check_engine(engine)
        stages = [self, *self.context]
        for stage in stages:  # every network made (or refused) before any stage changes engine
            stage._network_on(engine)
        for stage in stages:
            stage.engine = engine
        return self

    def _network_on(self, engine: str) -> Network:
        """This segmenter's network on `engine`, made once (an onnxruntime session of the export)."""
        if engine == TENSORFLOW:
            if TENSORFLOW not in self._networks:
                raise ConfigurationError(f"{self.plan.model_key}: loaded for onnxruntime only; load it again with engine "
                                         "tensorflow.")
            if self._networks[TENSORFLOW] is self.model:  # folded once, on first use
                from medseg.models.normalization import inference_network

                self._networks[TENSORFLOW] = inference_network(self.model)
            return self._networks[TENSORFLOW]
        export = onnx_export_of(self.plan.model_key, self.onnx, self.parity)  # checked every time: the record may change
        if self._session_of is not export:
            self._networks[ONNXRUNTIME] = OnnxNetwork(export)
            self._predictors.pop(ONNXRUNTIME, None)
            self._session_of = export
        return self._networks[ONNXRUNTIME]

    def apply_profile(self, name: str, engine: str | None = None) -> Segmenter:
        """Run with the setting of profile `name` (`plan.profiles`): its mirroring, overlap,
        largest component and engine (`engine` overrides the last); itself.

        Raises:
            ConfigurationError: an unknown profile, or a model without profiles.
        """
        setting = profile_setting(self.plan.profiles, name, self.plan.model_key)
        self.use_engine(engine or setting.engine)  # first: a refused engine leaves the setting as it was
        self.configure(setting.mirror_axes, setting.keep_largest_component)
        if setting.overlap is not None:
            self.plan.overlap = setting.overlap
        return self

    # -- the parts --------------------------------------------------------------------------
    def preprocess(self, volume: Volume, name: str = "the scan") -> tuple[np.ndarray, CaseGeometry]:
        """A scan (any orientation, spacing; 3-D) onto the training grid, as in training.

        Args:
            volume: the scan.
            name: its file, for the messages.

        Returns:
            The z-scored float32 image on the training grid, and the geometry that maps a
            prediction back to `volume`'s grid.

        Raises:
            InvalidGeometryError: a voxel size far from the training spacing
                (`MEDSEG_MAX_SPACING_RATIO`), or a training grid above `MEDSEG_MAX_VOXELS`;
                checked before anything is resampled.
        """
        plan = self.plan
        check_spacing_against_plan(volume.spacing, plan.data_spacing or plan.target_spacing, name)
        canonical = to_canonical(volume)
        crop_box = nonzero_bounding_box(canonical.data, margin=plan.crop_margin) if plan.crop_margin is not None else None
        geometry = plan_case_geometry(volume.data.shape, volume.affine, tuple(plan.target_spacing), crop_box)
        bounds = limits()
        grid = int(np.prod(geometry.preprocessed_shape, dtype=np.int64))
        if grid > bounds.max_voxels:
            raise InvalidGeometryError(
                f"{name}: on the model's grid ({tuple(plan.target_spacing)} mm) it would be {tuple(geometry.preprocessed_shape)} "
                f"voxels ({describe(grid)}), above MEDSEG_MAX_VOXELS ({describe(bounds.max_voxels)}). Refused before "
                "resampling; check the voxel size in its header, or raise the limit for a scan this large."
            )
        image = image_to_training_grid(canonical, geometry, plan.interpolation_order, plan.clip_percentiles)
        return image.data, geometry

    def predict_volume(self, image: np.ndarray) -> np.ndarray:
        """Probabilities of a preprocessed (X, Y, Z) image through the one inference engine.

        Returns:
            (X, Y, Z) float32 foreground probabilities, or (X, Y, Z, K + 1) class probabilities.
        """
        return self._predict_network_input(self._network_input(image))

    def _network_input(self, image: np.ndarray) -> np.ndarray:
        """What the network's windows are cut from: the image, and in a cascade the
        low-resolution stage's probabilities after it, (X, Y, Z, 1 + C); computed once per
        scan (mirroring flips it whole, as nnU-Net flips the previous stage's segmentation)."""
        if self.context and self.windows.takes_context:
            return with_context(image, context_channels(self.context, image, self.plan.target_spacing))
        return image

    def activation_budget(self, shape: Sequence[int], in_channels: int = 1, mirrored: bool | None = None) -> float:
        """GiB left for one batch's activations on a training-grid volume of `shape`:
        `planning.memory_gb` less the runtime and the case's arrays
        (`medseg.patching.sliding_window.activation_budget_gb`)."""
        if mirrored is None:
            mirrored = bool(self.effective_mirror_axes())
        out_channels = 1 if len(self.plan.classes) == 1 else len(self.plan.classes) + 1
        held = case_arrays_bytes(shape, in_channels, out_channels, mirrored)
        budget = activation_budget_gb(self.plan.memory_gb, held)
        if budget <= MIN_ACTIVATION_GB and not self._warned_budget:
            self._warned_budget = True
            logger.warning(
                "%s: planning.memory_gb=%s leaves no room for the network on a %s volume (runtime %.2f GiB, arrays "
                "%.2f GiB): predicting one window at a time. Raise planning.memory_gb.", self.plan.model_key,
                self.plan.memory_gb, "x".join(str(int(n)) for n in shape[:3]), RUNTIME_GB, held / GIB,
            )
        return budget

    @property
    def windows(self) -> WindowStrategy:
        """How the network covers a volume (`plan.window`, `medseg.inference.windows`)."""
        return window_strategy(self.plan.window)

    def _log_batch(self, shape: Sequence[int], batch: int, what: str, window: Sequence[int], budget: float) -> None:
        key = tuple(int(n) for n in shape)
        if key not in self._logged_shapes:
            self._logged_shapes.add(key)
            logger.info("%s: %d %s of %s per batch (%.2f GiB of activations within planning.memory_gb=%g, volume %s).",
                        self.plan.model_key, batch, what, "x".join(str(int(n)) for n in window), budget, self.plan.memory_gb,
                        "x".join(str(n) for n in key[:3]))

    def _predict_network_input(self, image: np.ndarray) -> np.ndarray:
        windows = self.windows
        if self.engine not in self._predictors:
            self._predictors[self.engine] = windows.predictor(self._network_on(self.engine))
        budget = self.activation_budget(image.shape[:3], 1 if image.ndim == 3 else int(image.shape[-1]))
        return windows.predict(
            self._predictors[self.engine], image, self.plan, budget,
            lambda batch, what, window: self._log_batch(image.shape, batch, what, window, budget),
        )

    def _mirrored(self, image: np.ndarray, axes: Sequence[int]) -> tuple[np.ndarray, np.ndarray | None]:
        plain, mirrored = predict_with_mirroring(self._predict_network_input, self._network_input(image), axes)
        return self.calibrated(plain), None if mirrored is None else self.calibrated(mirrored)

    def calibrated(self, probability: np.ndarray) -> np.ndarray:
        """`probability` at the plan's temperature (itself when it is 1)."""
        temperature = float(self.plan.temperature)
        return probability if temperature == 1.0 else apply_temperature(probability, temperature, probability.ndim == 3)

    def quality(self, volume: Volume, probability: np.ndarray) -> dict[str, Any]:
        """The QC columns of a scan (`medseg.inference.qc.assess`) from the scan and its
        calibrated probabilities on the model's grid; {} for a plan without QC."""
        voxel_ml = float(np.prod(self.plan.target_spacing)) / 1000.0
        return assess_prediction(self.plan.qc, volume.data, volume.affine, probability, self.mask_threshold,
                                 list(self.plan.classes), voxel_ml)

    @property
    def mask_threshold(self) -> float:
        """The threshold on calibrated probabilities that gives the masks of `plan.threshold`
        on the network's own: calibration never changes a mask."""
        return temperature_threshold(float(self.plan.threshold), float(self.plan.temperature))

    def effective_mirror_axes(self, mirror_axes: Sequence[int] | None = None) -> tuple[int, ...]:
        """The mirroring axes that apply: the plan's (or `mirror_axes`), without left-right
        when a class is lateralized, and without those that cannot change the window
        strategy's prediction (z for whole axial slices, each predicted alone)."""
        axes = safe_flip_axes(self.plan.mirror_axes if mirror_axes is None else mirror_axes, self.plan.lateralized)
        return self.windows.mirror_axes(axes)

    def label_map(self, probability: np.ndarray, geometry: CaseGeometry) -> np.ndarray:
        """uint8 label map on the source grid (:func:`probabilities_to_label_map`)."""
        return probabilities_to_label_map(probability, geometry, self.mask_threshold, self.plan.class_values)

    # -- whole scans ----------------------------------------------------------------------------
    def segment_preprocessed(
        self,
        image: np.ndarray,
        geometry: CaseGeometry,
        mirror_axes: Sequence[int] | None = None,
        largest_component: bool | None = None,
    ) -> np.ndarray:
        """Label map (source grid, uint8) of a preprocessed image, with the plan's
        postprocessing unless `mirror_axes` or `largest_component` override it."""
        return self.label_mapper(largest_component)(self.probabilities(image, mirror_axes), geometry)

    def probabilities(self, image: np.ndarray, mirror_axes: Sequence[int] | None = None) -> np.ndarray:
        """The network's part of `segment_preprocessed`: probabilities on the training grid,
        averaged over the mirrored copies when mirroring is on."""
        plain, mirrored = self._mirrored(image, self.effective_mirror_axes(mirror_axes))
        return plain if mirrored is None else mirrored

    def label_mapper(self, largest_component: bool | None = None) -> LabelMapper:
        """The rest of `segment_preprocessed`, without the network (it pickles small, so a Dask
        worker can map probabilities back to the scan's grid and write the mask)."""
        keep = self.plan.keep_largest_component if largest_component is None else largest_component
        return LabelMapper(self.mask_threshold, self.plan.class_values, bool(keep))

    def variants(self, image: np.ndarray, geometry: CaseGeometry) -> dict[str, np.ndarray]:
        """Label maps with and without each postprocessing option the plan turns on.

        Keys: `plain` (neither), `mirroring`, `largest_component`, and
        `mirroring+largest_component`, only those the plan enables. Mirroring costs one pass
        per flip; the plain prediction is the unflipped pass, so it costs nothing more.
        """
        plain, mirrored = self._mirrored(image, self.effective_mirror_axes())
        out = {PLAIN: self.label_map(plain, geometry)}
        if mirrored is not None:
            out[MIRRORED] = self.label_map(mirrored, geometry)
        if self.plan.keep_largest_component:
            for name in list(out):
                key = LARGEST if name == PLAIN else f"{name}+{LARGEST}"
                out[key] = keep_largest_component(out[name], self.plan.class_values)
        return out

    def segment(self, volume: Volume, name: str = "the scan") -> Volume:
        """A scan's label map, uint8, on exactly its grid (shape and affine); `name` (its file)
        is for the messages."""
        image, geometry = self.preprocess(volume, name)
        return Volume(self.segment_preprocessed(image, geometry), np.asarray(volume.affine, dtype=np.float64))

    def source_probabilities(self, volume: Volume, name: str = "the scan") -> np.ndarray:
        """The scan's probabilities on its own grid (each channel resampled back linearly), with
        the plan's mirroring: what an ensemble averages (`medseg.inference.ensemble`)."""
        image, geometry = self.preprocess(volume, name)
        return probabilities_on_source_grid(self.probabilities(image), geometry)

    def network_part(self, volume: Volume, name: str = "the scan") -> tuple[np.ndarray, CaseGeometry]:
        """The part of `segment` with the network (the driver's): probabilities on the training
        grid and the geometry back to the scan's."""
        image, geometry = self.preprocess(volume, name)
        return self.probabilities(image), geometry

    def finisher(self) -> Callable[[tuple[np.ndarray, CaseGeometry]], Volume]:
        """The part without the network, which pickles (a Dask worker runs it):
        `finisher()(network_part(...))` is `segment(...)`."""
        return self.label_mapper().from_parts

    def configure(self, mirror_axes: Sequence[int] | None = None, keep_largest_component: bool | None = None) -> None:
        """Override the plan's postprocessing (`predict.mirror_axes`, `keep_largest_component`)."""
        if mirror_axes is not None:
            self.plan.mirror_axes = [int(a) for a in mirror_axes]
        if keep_largest_component is not None:
            self.plan.keep_largest_component = bool(keep_largest_component)

    def read_scan(self, path: str | os.PathLike) -> Volume:
        """Read and check a scan as training did (float32; NaN, a zero spacing, a wrong number
        of dimensions are refused naming the file); a 4-D scan gives the plan's channel."""
        return read_volume(path, role="image", channel=self.plan.channel)

    def volumes_ml(self, mask: Volume) -> dict[str, float]:
        """`volume_ml` (all foreground) and, with several classes, `volume_ml_<name>`."""
        return volumes_ml(mask, self.plan.classes)

    # -- on disk --------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> None:
        """Write `segmenter.json` and `model.keras` (and `model.onnx` with `onnx.json` where the
        network was exported) into `folder`, replacing it only once all are written
        (:func:`medseg.storage.publishing.staged_folder`: a staging folder beside it, then a
        rename)."""
        if self.model is None:
            raise ConfigurationError(f"{self.plan.model_key}: loaded for onnxruntime only, so it has no Keras network to "
                                     "save; copy its folder instead.")
        with staged_folder(folder) as staging:
            self.model.save(staging / MODEL_FILE)
            (staging / PLAN_FILE).write_text(json.dumps(self.plan.to_dict(), indent=2))
            if self.onnx is not None:
                (staging / ONNX_FILE).write_bytes(self.onnx)
            if self.parity is not None:
                (staging / PARITY_FILE).write_text(json.dumps(self.parity.to_dict(), indent=2))
            for path in staging.iterdir():
                apply_umask(path)
            for index, stage in enumerate(self.context):
                stage.save(staging / CONTEXT_FOLDER / str(index))

    @classmethod
    def load(cls, folder: str | os.PathLike, engine: str = TENSORFLOW) -> Segmenter:
        """Read a segmenter folder written by :meth:`save`, for `engine`: `tensorflow` loads
        the Keras network (and keeps the ONNX export, if any, for a later `use_engine`);
        `onnxruntime` loads only the ONNX export, and no TensorFlow.

        Raises:
            DatasetNotFoundError: the folder or one of its files is missing (train first).
            CorruptFileError: a file cannot be read.
            ConfigurationError: onnxruntime for a folder with no export, or one whose parity
                failed (the record's reason).
        """
        check_engine(engine)
        folder = Path(folder)
        plan = read_plan(folder)
        parity = read_parity(folder)
        onnx_path = folder / ONNX_FILE
        onnx = onnx_path.read_bytes() if onnx_path.is_file() else None
        model = network = None
        if engine == ONNXRUNTIME:
            network = OnnxNetwork(onnx_export_of(f"{folder}", onnx, parity), str(onnx_path))
        else:
            model = _load_network(_required_file(folder, MODEL_FILE))
        context = folder / CONTEXT_FOLDER
        stages = [path for path in context.iterdir() if path.name.isdigit()] if context.is_dir() else []
        stages.sort(key=lambda path: int(path.name))
        expected = int(plan.context_stages)
        if len(stages) != expected or [int(p.name) for p in stages] != list(range(expected)):
            raise CorruptFileError(
                f"{context}: {PLAN_FILE} names {expected} low-resolution stage(s), folders "
                f"{[str(i) for i in range(expected)]}, but the segmenter holds {[p.name for p in stages]}. Train the model again."
            )
        return cls(model, plan, [cls.load(stage, engine) for stage in stages], onnx, parity, network)


# The networks last loaded, by file: a training run loads its segmenter in three nodes (its
# evaluation, the postprocessing check, the pyfunc export), and each load of a Keras archive
# costs about a second. A file that changed (a new training writes a new folder) is a new key.
_LOADED_NETWORKS: OrderedDict[tuple, Any] = OrderedDict()
_LOADED_NETWORKS_KEPT = 4
_LOADED_NETWORKS_LOCK = threading.Lock()


def _load_network(path: Path) -> keras.Model:
    """`path`'s Keras network, loaded once while the file stays the same (path, inode, size and
    modification time). Nothing in medseg changes a loaded network: segmenters sharing one
    read it only.

    Raises:
        CorruptFileError: Keras cannot load the file.
    """
    import keras

    from medseg.models.convolution import NarrowConv3D  # noqa: F401 (registered for keras.models.load_model)
    from medseg.models.normalization import FusedBatchNormalization  # noqa: F401 (likewise)

    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    with _LOADED_NETWORKS_LOCK:
        if key in _LOADED_NETWORKS:
            _LOADED_NETWORKS.move_to_end(key)
            return _LOADED_NETWORKS[key]
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad archive
        raise CorruptFileError(f"{path}: cannot be loaded by Keras ({type(exc).__name__}: {exc}). Train the model again.") from exc
    with _LOADED_NETWORKS_LOCK:
        _LOADED_NETWORKS[key] = model
        while len(_LOADED_NETWORKS) > _LOADED_NETWORKS_KEPT:
            _LOADED_NETWORKS.popitem(last=False)
    return model


def check_spacing_against_plan(spacing: Sequence[float], target: Sequence[float], name: str) -> None:
    """Refuse a scan whose voxel size along some axis is more than `MEDSEG_MAX_SPACING_RATIO`
    times coarser or finer than the spacing the model was trained at (sorted, so that the
    orientation does not matter): resampling it would make an image the model never saw, and a
    forged 64 mm voxel would become a grid of billions."""
    ratio = limits().max_spacing_ratio
    scan, trained = sorted(float(s) for s in spacing), sorted(float(s) for s in target)
    worst = max(max(a / b, b / a) for a, b in zip(scan, trained))
    if worst > ratio:
        raise InvalidGeometryError(
            f"{name}: its voxel size {tuple(round(s, 4) for s in spacing)} mm is {worst:.1f}x away from the "
            f"{tuple(round(s, 4) for s in target)} mm this model was trained at (the limit is {ratio:g}x, "
            "MEDSEG_MAX_SPACING_RATIO). Check the header's voxel size; a scan this different needs a model trained "
            "on such scans."
        )


def _required_file(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path}: not found, so {folder} holds no trained segmenter. Train one first "
            "(`kedro run --pipeline unet` or `--pipeline conv3d`), or give an MLflow model URI."
        )
    return path


def read_parity(folder: str | os.PathLike) -> ParityRecord | None:
    """The ONNX export's parity record of a segmenter folder (`onnx.json`), or None."""
    path = Path(folder) / PARITY_FILE
    if not path.is_file():
        return None
    try:
        return ParityRecord.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{path}: not a readable ONNX parity record ({exc}). Train the model again.") from exc


# What a refusal of the onnxruntime engine tells the user to do instead, in predict and in serving.
USE_TENSORFLOW = ("Use the tensorflow engine (predict.engine: tensorflow; for a served model, its TensorFlow variant "
                  "`<model>_segmenter`)")


def onnx_export_of(where: str, onnx: bytes | None, parity: ParityRecord | None) -> bytes:
    """The ONNX export that the onnxruntime engine may run: one whose parity with TensorFlow
    passed. Refused, with the record's reason, otherwise."""
    if parity is None or parity.status == "off":
        raise ConfigurationError(
            f"{where}: the network has no ONNX export (trained with `<model>.export.onnx: false`, or before medseg "
            f"exported ONNX). {USE_TENSORFLOW}, or train it again with the export on."
        )
    if parity.status != PASSED:
        raise ConfigurationError(
            f"{where}: its ONNX export failed its parity check with TensorFlow ({parity.reason}), so onnxruntime may not "
            f"run it. {USE_TENSORFLOW}."
        )
    if onnx is None:
        raise ConfigurationError(
            f"{where}: {PARITY_FILE} records an ONNX export that passed, but {ONNX_FILE} is missing (a folder copied in "
            f"part?). Copy the whole segmenter folder again. {USE_TENSORFLOW} meanwhile."
        )
    return onnx


def read_plan(folder: str | os.PathLike) -> SegmenterPlan:
    """The plan of a segmenter folder (`segmenter.json`), without loading the network."""
    path = _required_file(Path(folder), PLAN_FILE)
    try:
        return SegmenterPlan.from_dict(json.loads(path.read_text()), str(path))
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise CorruptFileError(f"{path}: not a readable segmenter plan ({exc}). Train the model again.") from exc
