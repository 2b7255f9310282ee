"""Which floating-point precision a model trains and predicts in, measured on the machine.

`precision_candidates` turns `training.precision` ("auto" or a Keras mixed-precision policy)
into the policies worth measuring, from the hardware probes here (`read_cpuinfo`,
`cpu_has_bfloat16`, `gpu_has_bfloat16`). `measure_precision` times a model's training step and
inference batch in one policy and runs the quick Dice check; `choose_precision` keeps the
fastest policy that passes it, for training and for inference apart. `dtype_policy` builds a
model under a policy, `with_precision` copies a trained one into another, and
`machine_description` records the hardware a timing was made on.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medseg.models.cloning import clone_with_layers

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# The quick check: `CHECK_STEPS` training steps on a small batch of a task a U-Net learns in
# that many steps (smooth noise thresholded), from the same initial weights in every policy.
# A policy whose Dice on a second batch strays more than `DICE_TOLERANCE` from float32's is not
# chosen. 30 steps: at 12 the 3D U-Net's float32 and bfloat16 runs were still 0.013 apart on
# the way up (0.869 / 0.856); at 30 they were 0.004 apart (0.909 / 0.905), the 2D U-Net 0.0035.
CHECK_STEPS = 30
CHECK_BATCH = 4
DICE_TOLERANCE = 0.01
# A policy must be this much faster than float32 to be chosen: within it, two timings of the
# same kernels differ by noise, and float32 needs no check.
MIN_SPEEDUP = 1.05


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


def precision_candidates(setting: str, cpuinfo: str | None = None, gpu_bf16: bool | None = None) -> tuple[str, ...]:
    """The policies `training.precision` asks to measure: an explicit policy alone; for "auto",
    float32 and, where the hardware has bfloat16 units (an NVIDIA GPU of compute capability
    >= 8.0, or a CPU with `avx512_bf16`/`amx_bf16`), `mixed_bfloat16`. Without the units
    bfloat16 is emulated and never faster (11x slower in 2D on an AMD EPYC, README), so it is
    not timed. `mixed_float16` is never chosen by `auto`: it needs loss scaling and can
    overflow; set it explicitly.

    Args:
        setting: "auto", "float32", "mixed_bfloat16" or "mixed_float16".
        cpuinfo, gpu_bf16: for tests; read from the machine when None.
    """
    if setting != "auto":
        if setting not in PRECISIONS:
            raise ValueError(f"training.precision must be 'auto' or one of {list(PRECISIONS)}, got '{setting}'.")
        return (setting,)
    if (gpu_has_bfloat16() if gpu_bf16 is None else gpu_bf16) or cpu_has_bfloat16(cpuinfo):
        return ("float32", "mixed_bfloat16")
    return ("float32",)


@dataclass(frozen=True)
class PrecisionMeasurement:
    """One policy measured on one model (`measure_precision`).

    Attributes:
        train_seconds_per_step: median training step on the planned batch.
        infer_seconds_per_batch: median forward pass of the planned batch.
        train_check_dice: Dice on the check's held-out batch after `CHECK_STEPS` steps trained
            in this policy.
        infer_check_dice: Dice of the float32-trained check model run in this policy.
    """

    train_seconds_per_step: float
    infer_seconds_per_batch: float
    train_check_dice: float
    infer_check_dice: float

    def to_json(self) -> dict[str, float]:
        return {key: round(float(value), 6) for key, value in asdict(self).items()}


def check_batch(input_shape, output_shape, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch of a task any segmentation network learns in a few dozen steps: smooth noise
    (Gaussian, sigma 2 voxels), standardized, its voxels above 0.5 the foreground (about a
    third). A multi-class network gets one class per band (0.5, 1, 1.5, ...); a patch
    classifier one label per patch (whether its mean is positive)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(int(batch_size), *input_shape[1:])).astype(np.float32)
    x = ndimage.gaussian_filter(x, sigma=(0, *([2] * (len(input_shape) - 2)), 0))
    x = ((x - x.mean()) / x.std()).astype(np.float32)
    if len(output_shape) == 2:  # (B, 1): one probability per patch
        return x, (x.reshape(len(x), -1).mean(axis=1, keepdims=True) > 0).astype(np.float32)
    channels = int(output_shape[-1])
    bands = np.arange(1, max(channels, 2)) * 0.5
    return x, np.digitize(x[..., :1], bands).astype(np.float32)


def check_dice(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    """Mean Dice over the foreground classes of `model` on (x, y): sigmoid outputs at 0.5,
    softmax outputs by argmax, a classifier's per-patch labels as one mask."""
    out = np.asarray(model.predict_on_batch(x), dtype=np.float32)
    if out.shape[-1] == 1:
        labels, classes = (out >= 0.5).astype(np.int64), [1]
    else:
        labels, classes = out.argmax(axis=-1)[..., None], range(1, out.shape[-1])
    truth = y.astype(np.int64).reshape(labels.shape)
    scores = []
    for value in classes:
        a, b = labels == value, truth == value
        total = int(a.sum() + b.sum())
        scores.append(1.0 if total == 0 else 2.0 * float((a & b).sum()) / total)
    return float(np.mean(scores))


def seconds_per_inference_batch(model: keras.Model, x: np.ndarray, steps: int = 3) -> float:
    """Median time of `model.predict_on_batch(x)`, the call the segmenter makes per batch of
    windows (`medseg.inference.windows.window_predictor`), after one call that traces it."""
    model.predict_on_batch(x)
    times = []
    for _ in range(int(steps)):
        start = time.perf_counter()
        model.predict_on_batch(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_precision(
    precision: str,
    build_model: Callable[[], keras.Model],
    batch_size: int,
    initial_weights: list[np.ndarray] | None,
    float32_model: keras.Model | None,
) -> tuple[PrecisionMeasurement, keras.Model, list[np.ndarray]]:
    """Time `build_model()`'s training step and inference batch in `precision`, and run the
    quick check (module constants).

    Args:
        precision: the policy.
        build_model: a compiled model of the planned sizes; called under the policy.
        batch_size: the planned batch.
        initial_weights: float32's initial weights, so every policy starts from the same
            point; None for float32 itself.
        float32_model: the float32 check model, trained; its weights are run in `precision`
            for the inference check. None for float32 itself.

    Returns:
        (the measurement, the check model trained in `precision`, its initial weights).
    """
    from medseg.models.normalization import inference_network
    from medseg.models.training import seconds_per_training_step

    with dtype_policy(precision):
        model = build_model()
    if initial_weights is not None:
        model.set_weights(initial_weights)
    start_weights = model.get_weights()
    x, y = check_batch(model.input_shape, model.output_shape, batch_size, seed=0)
    train_seconds = seconds_per_training_step(model, batch_size, data=(x, y))
    # Inference is timed and checked on the network as the segmenter runs it: normalizations folded.
    infer_seconds = seconds_per_inference_batch(inference_network(model), x)
    model.set_weights(start_weights)
    x_check, y_check = check_batch(model.input_shape, model.output_shape, min(CHECK_BATCH, batch_size), seed=1)
    x_held, y_held = check_batch(model.input_shape, model.output_shape, min(CHECK_BATCH, batch_size), seed=2)
    for _ in range(CHECK_STEPS):
        model.train_on_batch(x_check, y_check)
    train_dice = check_dice(inference_network(model), x_held, y_held)
    if float32_model is None:
        infer_dice = train_dice
    else:
        infer_dice = check_dice(inference_network(with_precision(float32_model, precision)), x_held, y_held)
    return PrecisionMeasurement(train_seconds, infer_seconds, train_dice, infer_dice), model, start_weights


def choose_precision(measured: Mapping[str, PrecisionMeasurement]) -> dict[str, Any]:
    """The policies to train and to predict in: for each, the fastest whose check Dice is
    within `DICE_TOLERANCE` of float32's and which beats float32 by `MIN_SPEEDUP`; float32
    otherwise. One measured policy (an explicit one, or float32 alone) is chosen for both.

    Returns:
        {"training", "inference": the policies, "reason": in words, for the plan and the log}.
    """
    if "float32" not in measured:
        (only,) = measured
        return {"training": only, "inference": only, "reason": f"{only} was set explicitly"}
    base = measured["float32"]
    chosen, reasons = {}, []
    for purpose, seconds, dice in (
        ("training", "train_seconds_per_step", "train_check_dice"),
        ("inference", "infer_seconds_per_batch", "infer_check_dice"),
    ):
        best = "float32"
        for name, m in measured.items():
            speedup = getattr(base, seconds) / max(getattr(m, seconds), 1e-12)
            drift = abs(getattr(m, dice) - getattr(base, dice))
            if name == "float32":
                continue
            if drift > DICE_TOLERANCE:
                reasons.append(f"{purpose}: {name} {speedup:.2f}x but its check Dice strays {drift:.3f} from float32's")
            elif speedup < MIN_SPEEDUP:
                reasons.append(f"{purpose}: {name} only {speedup:.2f}x float32")
            elif getattr(m, seconds) < getattr(measured[best], seconds):
                best = name
                reasons.append(f"{purpose}: {name} {speedup:.2f}x float32, check Dice within {drift:.3f}")
        chosen[purpose] = best
    if len(measured) == 1:
        reasons.append("only float32 was measured (no bfloat16 units)")
    return {**chosen, "reason": "; ".join(reasons)}


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """A copy of a trained model computing in `precision`, with the same weights (mixed
    policies keep float32 variables). The output layer keeps its own policy: it is float32
    in every medseg network, so the probabilities and the losses are. The model itself when
    it already computes in `precision`."""
    head = model.layers[-1].name
    hidden = {layer.dtype_policy.name for layer in model.layers if layer.weights and layer.name != head}
    if hidden <= {precision}:
        return model

    def clone(layer):
        config = layer.get_config()
        if layer.name != head and not isinstance(layer, keras.layers.InputLayer) and "dtype" in config:
            config["dtype"] = precision
        return layer.__class__.from_config(config)

    return clone_with_layers(model, clone)


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
