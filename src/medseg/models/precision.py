"""Which floating-point precision a model trains and predicts in, from what the machine has.

`resolve_precision` turns `training.precision` ("auto" or a Keras mixed-precision policy) into
a policy once, from the hardware probes here (`read_cpuinfo`, `cpu_has_bfloat16`,
`gpu_has_bfloat16`); `dtype_policy` builds a model under it; `machine_description` records the
hardware a timing was made on.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import keras

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# Model kinds that bfloat16 makes faster on a CPU with bfloat16 units, as measured (the README
# gives the figures): the 2D U-Net's training and inference gain; the 3D models on their small
# patches do not, so `auto` keeps them in float32 on a CPU. On a GPU every kind gains.
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
