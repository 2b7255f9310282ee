"""Training loop, crash recovery keyed by a fingerprint, reproducibility, and whole-volume 2D
inference, shared by the model pipelines."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medseg.patching.sliding_window import sliding_window_predict, unet_features_per_voxel, windows_per_batch

logger = logging.getLogger(__name__)

BACKUP_METADATA = "training_metadata.json"  # written by keras.callbacks.BackupAndRestore
BACKUP_OWNER = "owner.json"


def training_fingerprint(**parts: Any) -> str:
    """A short hash of everything that decides what a training run computes.

    Args:
        parts: JSON-serialisable values (parameters, the split, the preprocessing plan); keys
            are sorted, so the order of arguments and of dict keys does not matter.

    Returns:
        16 hex characters (64 bits of SHA-256).
    """
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ResumeState:
    """Where a run keeps its crash-recovery backup, and what it found there.

    Attributes:
        backup_dir: `<backup_root>/<fingerprint>`; `BackupAndRestore` writes each finished
            epoch there and deletes the folder when training ends.
        resumed_epoch: the epochs already done by an interrupted run with the same
            fingerprint (0: a fresh start).
        previous_owner: what the interrupted run recorded about itself (e.g. its MLflow run
            id), or {}.
        discarded: fingerprints of backups made with other parameters or data, deleted.
    """

    backup_dir: Path
    resumed_epoch: int = 0
    previous_owner: dict = field(default_factory=dict)
    discarded: list[str] = field(default_factory=list)


def _finished_epochs(backup_dir: Path) -> int:
    try:
        return int(json.loads((backup_dir / BACKUP_METADATA).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def prepare_backup(backup_root: str | Path, fingerprint: str, epochs: int, owner: Mapping[str, Any]) -> ResumeState:
    """Choose the backup of this run: resume only a backup with the same fingerprint.

    Backups made with another fingerprint (other parameters, split or preprocessing plan) are
    deleted, never resumed. A backup that already holds `epochs` or more epochs (a run killed
    between its last epoch and the clean-up) is deleted too: resuming it would train nothing.

    Args:
        backup_root: the model's backup folder (`data/06_models/<model>/backup`).
        fingerprint: `training_fingerprint(...)` of this run.
        epochs: the epochs this run asks for.
        owner: recorded in the backup (`owner.json`) so that a later run that resumes it
            can tell which run it continues; the previous owner is returned.

    Returns:
        The :class:`ResumeState`.
    """
    root = Path(backup_root)
    root.mkdir(parents=True, exist_ok=True)
    state = ResumeState(root / fingerprint)
    for child in sorted(root.iterdir()):
        if child.name != fingerprint:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
            state.discarded.append(child.name)
    done = _finished_epochs(state.backup_dir)
    if done >= int(epochs):
        shutil.rmtree(state.backup_dir, ignore_errors=True)
        done = 0
    if done:
        try:
            state.previous_owner = json.loads((state.backup_dir / BACKUP_OWNER).read_text())
        except (OSError, ValueError):
            state.previous_owner = {}
    elif state.backup_dir.exists():
        shutil.rmtree(state.backup_dir)  # weights without a finished epoch: nothing to resume
    state.resumed_epoch = done
    state.backup_dir.mkdir(parents=True, exist_ok=True)
    (state.backup_dir / BACKUP_OWNER).write_text(json.dumps(dict(owner)))
    return state


def derive_seed(*seeds: int) -> int:
    """One 31-bit seed from several (e.g. `data.seed` and a model's seed), order-sensitive."""
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0] % (2**31 - 1))


def wants_determinism(setting: bool | str) -> bool:
    """`training.deterministic`: true, false, or "auto" (on when TensorFlow sees no GPU).

    On CPU, deterministic ops cost little; on GPU some kernels (e.g. cuDNN convolutions'
    fastest algorithms) are non-deterministic, and the deterministic ones are slower.
    """
    if isinstance(setting, str):
        if setting.lower() != "auto":
            raise ValueError(f"training.deterministic must be true, false or 'auto', got '{setting}'.")
        import tensorflow as tf

        return not tf.config.list_physical_devices("GPU")
    return bool(setting)


PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Model kinds that bfloat16 makes faster on a CPU with bfloat16 units: the 2D U-Net trained 2.3x
# and inferred 1.3x faster (128x128, batch 16, 2-core AVX-512 BF16 CPU); the 3D U-Net at
# 32x32x16 gained nothing, so `auto` keeps it in float32 there. On a GPU both gain.
BF16_FASTER_ON_CPU = frozenset({"unet"})


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none (not Linux): the one place the
    precision probe and `machine_description` read the host's CPU from (tests replace it)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU has bfloat16 units (`avx512_bf16` or `amx_bf16` in /proc/cpuinfo's flags).

    Args:
        cpuinfo: the text of /proc/cpuinfo; read with `read_cpuinfo` when None. Without a
            `flags` line (not Linux, or an emulator that hides them) the answer is False.
    """
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def gpu_has_bfloat16() -> bool:
    """Whether TensorFlow sees an NVIDIA GPU of compute capability 8.0 or higher (Ampere on)."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability") or (0, 0)
        if tuple(capability) >= (8, 0):
            return True
    return False


def resolve_precision(setting: str, model_kind: str, cpuinfo: str | None = None, gpu_bf16: bool | None = None) -> str:
    """`training.precision`: a Keras mixed-precision policy name, or "auto".

    "auto" picks `mixed_bfloat16` where the hardware has bfloat16 (an NVIDIA GPU of compute
    capability >= 8.0, or a CPU with `avx512_bf16`/`amx_bf16`) and where it was measured
    faster for the model kind (`BF16_FASTER_ON_CPU` on a CPU); otherwise `float32`.

    Args:
        setting: "auto", "float32", "mixed_bfloat16" or "mixed_float16".
        model_kind: "unet" (2D), "unet3d" or "patch_classifier".
        cpuinfo, gpu_bf16: for tests; read from the machine when None.
    """
    if setting != "auto":
        if setting not in PRECISIONS:
            raise ValueError(f"training.precision must be 'auto' or one of {list(PRECISIONS)}, got '{setting}'.")
        return setting
    if gpu_has_bfloat16() if gpu_bf16 is None else gpu_bf16:
        return "mixed_bfloat16"
    if model_kind in BF16_FASTER_ON_CPU and cpu_has_bfloat16(cpuinfo):
        return "mixed_bfloat16"
    return "float32"


@contextlib.contextmanager
def dtype_policy(precision: str):
    """Build layers under a Keras mixed-precision policy, then put the previous one back:
    a model keeps the policy its layers were built with."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def machine_description() -> dict[str, Any]:
    """What a training-step timing depends on besides the model: CPU, cores, GPUs, TensorFlow."""
    import platform

    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    for line in read_cpuinfo().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpus = [tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in tf.config.list_physical_devices("GPU")]
    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "tensorflow": tf.__version__}


def seconds_per_training_step(model: keras.Model, batch_size: int, steps: int = 3, seed: int = 0) -> float:
    """Time of one training step of a compiled model on this machine: the median of `steps`
    steps on random inputs of the model's shape, after one step that traces the graph.

    The time of a step does not depend on the values, so random inputs and all-background
    labels measure what the real batches will cost (the input pipeline runs ahead of it).

    The steps run through `model.fit`, as training runs them, so a model built under a
    `tf.distribute` strategy (`medseg.models.distribute`) is timed as it will train: one step
    of all replicas together, each on its share of `batch_size` and with the gradient
    all-reduce. (`train_on_batch` would hand every replica the whole batch.)

    Args:
        model: a compiled model, built in the strategy's scope if it will train under one.
        batch_size: samples per step, the global batch (per replica × replicas).
        steps: timed steps, after the traced one.
        seed: of the random inputs.

    Returns:
        Seconds per step.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(int(batch_size), *model.input_shape[1:])).astype(np.float32)
    out_shape = model.output_shape
    y = np.zeros((int(batch_size), 1) if len(out_shape) == 2 else (int(batch_size), *out_shape[1:-1], 1), np.float32)
    ends: list[float] = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # Keras hands a batch-end callback the step's logs as Python numbers, so the step
            # has finished when this runs: the clock does not stop early.
            ends.append(time.perf_counter())

    model.fit(
        tf.data.Dataset.from_tensors((x, y)).repeat(), epochs=1, steps_per_epoch=1 + int(steps),
        callbacks=[StepClock()], shuffle=False, verbose=0,
    )
    return float(np.median(np.diff(ends)))  # the first end closes the traced step: not counted


def make_reproducible(seed: int, deterministic: bool) -> None:
    """Seed Python's `random`, NumPy and Keras/TensorFlow, and turn on TF op determinism.

    With determinism on, two runs with the same seed, data and parameters give bit-identical
    weights on the same machine and TensorFlow build (a test checks it). TF cannot turn op
    determinism off again in the same process.
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


def fit_model(
    model: keras.Model,
    train_data,
    val_data,
    *,
    epochs: int,
    steps_per_epoch: int,
    validation_steps: int,
    backup_dir: str | Path,
    patience: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Train with early stopping (best weights restored) and crash recovery.

    Args:
        model: a compiled model.
        train_data, val_data: endless `tf.data` datasets of (image, label) batches.
        epochs: maximum epochs; `steps_per_epoch` and `validation_steps` batches each.
        backup_dir: `BackupAndRestore` keeps the last finished epoch (weights, optimizer
            state, epoch number) there while training runs and deletes it at the end, so a
            killed run resumes from its last finished epoch. Use `prepare_backup` to choose
            it: a backup is only valid for the parameters and data that wrote it.
        patience: epochs without a lower validation loss before stopping. The weights of
            the best epoch are restored at the end, whether training stopped early or not.
            After a resume, "best" is among the epochs of the resumed run.
        callbacks: extra callbacks (e.g. per-epoch metric logging).

    Returns:
        The Keras history as plain floats: {"loss": [...], "val_loss": [...], ...}, one value
        per epoch trained by this call (a resumed run starts at its resumed epoch).
    """
    history = model.fit(
        train_data,
        validation_data=val_data,
        epochs=int(epochs),
        steps_per_epoch=int(steps_per_epoch),
        validation_steps=int(validation_steps),
        callbacks=[
            keras.callbacks.BackupAndRestore(str(backup_dir)),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(patience), restore_best_weights=True),
            *callbacks,
        ],
        # The streams are shuffled by their own bounded queues; Keras' default shuffle=True
        # means nothing for a tf.data input and only warns.
        shuffle=False,
        verbose=2,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def with_input_shape(model: keras.Model, input_shape: Sequence[int]) -> keras.Model:
    """The same fully convolutional model, weights shared by copy, for another input size."""
    clone = keras.models.clone_model(model, input_tensors=keras.Input(tuple(input_shape)))
    clone.set_weights(model.get_weights())
    return clone


PredictSlices = Callable[[np.ndarray], np.ndarray]


def slice_predictor(model: keras.Model) -> PredictSlices:
    """A 2D model as `predict_batch` for `sliding_window_predict` with axial-slice windows.

    The forward pass is traced once (`tf.function` with a (None, None, None, 1) signature), for
    every batch size and slice size, rather than called eagerly: an eager Keras call keeps every
    layer's output alive until it returns, 0.87 GiB per 512×512 slice for the 32-filter U-Net,
    where the traced graph frees each one when its last consumer has run (about 1/8 of that,
    measured; see `medseg.patching.sliding_window.ACTIVATION_BYTES_PER_FEATURE`). The outputs
    were identical, bit for bit, in a side-by-side run on CPU.

    Args:
        model: maps (B, H, W, 1) to (B, H, W, C) probabilities for any H and W (see
            `with_input_shape(model, (None, None, 1))`); C is 1 (sigmoid) or K + 1 (softmax).

    Returns:
        A callable mapping windows (B, H, W, 1, 1) to probabilities (B, H, W, 1, C).
    """
    import tensorflow as tf

    forward = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec((None, None, None, 1), tf.float32)],
    )

    def predict(windows: np.ndarray) -> np.ndarray:
        return forward(windows[:, :, :, 0, :]).numpy()[:, :, :, None, :]

    return predict


def axial_window(slice_shape: Sequence[int], multiple: int) -> tuple[int, int, int]:
    """The window of whole-slice inference: one axial slice, padded up to a multiple.

    Args:
        slice_shape: (X, Y) of the volume, voxels.
        multiple: 2**depth of the U-Net, so that every pooling halves an even size.

    Returns:
        (X', Y', 1) with X' and Y' the smallest multiples of `multiple` >= X and Y.
    """
    nx, ny = (int(n) for n in slice_shape[:2])
    return (int(math.ceil(nx / multiple) * multiple), int(math.ceil(ny / multiple) * multiple), 1)


def slices_per_batch(
    slice_shape: Sequence[int],
    multiple: int,
    base_filters: int,
    depth: int,
    memory_gb: float,
    n_slices: int | None = None,
) -> int:
    """Whole axial slices per forward pass of a 2D U-Net, from a memory budget.

    `windows_per_batch` of the padded slice `axial_window(slice_shape, multiple)` with the
    U-Net's width `unet_features_per_voxel(base_filters, depth, 2)`: the batch shrinks as the
    slices grow, so a CT scan's 512×512 slices and a phantom's 96×96 ones cost the same memory.

    Args:
        slice_shape: (X, Y) of the volume, voxels.
        multiple: 2**depth.
        base_filters, depth: the U-Net's (`unet.model.*`).
        memory_gb: the budget for the forward pass, GiB (`planning.memory_gb`).
        n_slices: the volume's slices (Z), if known: the batch never exceeds it.

    Returns:
        Slices per batch, >= 1. 1 GiB, 32 filters, depth 3: 4 slices of 512×512 (240 MiB
        each), 121 of 96×96 (at most Z).
    """
    width = unet_features_per_voxel(base_filters, depth, 2)
    return windows_per_batch(axial_window(slice_shape, multiple), width, memory_gb, n_slices)


def predict_axial_slices(
    model: keras.Model | PredictSlices, volume: np.ndarray, multiple: int, batch_size: int
) -> np.ndarray:
    """Foreground probabilities of a whole volume from a 2D model, slice by slice along Z.

    Whole slices are predicted at once (the model is fully convolutional): each slice is
    zero-padded at its end to a multiple of `multiple` (2**depth) and cropped back, so no
    in-plane context is lost to tiling. It is `sliding_window_predict` with one window per
    slice, `axial_window(...)`, no overlap and constant weights, so each voxel's probability is
    the model's output, unblended: the result does not depend on `batch_size`.

    Memory: the volume, the output, and one batch of slices through the model (choose
    `batch_size` with `slices_per_batch`); no padded copy of the volume.

    Args:
        model: a 2D model mapping (B, H, W, 1) to (B, H, W, 1) probabilities for any H and W
            (see `with_input_shape(model, (None, None, 1))`), or `slice_predictor(model)`; pass
            the latter to trace the model once for several volumes.
        volume: (X, Y, Z) float32, preprocessed.
        multiple: the padded in-plane size is a multiple of this.
        batch_size: slices per forward pass, >= 1.

    Returns:
        (X, Y, Z) float32 foreground probabilities, or (X, Y, Z, K + 1) class probabilities
        for a multi-class model.
    """
    predict = slice_predictor(model) if isinstance(model, keras.Model) else model
    return sliding_window_predict(
        volume,
        predict,
        axial_window(volume.shape, multiple),
        overlap=0.0,
        batch_size=batch_size,
        weighting="constant",
        padding="end",
    )
