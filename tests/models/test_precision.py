"""Mixed precision: what `auto` picks, and a bfloat16 model keeps float32 probabilities."""

import keras
import numpy as np
import pytest

from medseg.models import build_unet2d, compile_segmentation_model
from medseg.models.precision import cpu_has_bfloat16, resolve_precision

AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16\n"
PLAIN_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2\n"


def test_cpu_bfloat16_is_read_from_the_flags():
    assert cpu_has_bfloat16(AMX_CPU) and not cpu_has_bfloat16(PLAIN_CPU)
    assert not cpu_has_bfloat16("")


@pytest.mark.parametrize(
    "setting, kind, cpuinfo, gpu, expected",
    [
        ("auto", "unet", AMX_CPU, False, "mixed_bfloat16"),  # measured faster for the 2D U-Net
        ("auto", "unet3d", AMX_CPU, False, "float32"),  # no gain measured for the 3D U-Net on CPU
        ("auto", "unet", PLAIN_CPU, False, "float32"),
        ("auto", "unet3d", PLAIN_CPU, True, "mixed_bfloat16"),  # an Ampere or newer GPU
        ("float32", "unet", AMX_CPU, True, "float32"),  # explicit settings win
        ("mixed_float16", "unet", PLAIN_CPU, False, "mixed_float16"),
    ],
)
def test_auto_precision(setting, kind, cpuinfo, gpu, expected):
    assert resolve_precision(setting, kind, cpuinfo=cpuinfo, gpu_bf16=gpu) == expected


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="training.precision"):
        resolve_precision("float8", "unet", cpuinfo=PLAIN_CPU, gpu_bf16=False)


def test_a_bfloat16_unet_computes_in_bfloat16_and_outputs_float32():
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        model = compile_segmentation_model(build_unet2d((16, 16, 1), 4, 2), "adam", 1e-2, "bce+dice")
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    assert keras.mixed_precision.dtype_policy().name == previous.name
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == "bfloat16" and conv.variable_dtype == "float32"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 16, 16, 1)).astype("float32")
    y = (x > 0.5).astype("float32")
    loss = lambda: float(np.ravel(model.train_on_batch(x, y))[0])  # noqa: E731
    first = loss()
    for _ in range(20):
        last = loss()
    prediction = model.predict_on_batch(x)
    assert prediction.dtype == np.float32  # the head and the losses stay float32
    assert np.isfinite(last) and last < first


@pytest.mark.parametrize("cpu, gpu", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("kind, model_key, section", [
    ("unet", "unet", {"model": {}}),
    ("unet3d", "conv3d", {"model": {"kind": "unet3d"}}),
    ("patch_classifier", "conv3d", {"model": {"kind": "patch_classifier"}}),
])
def test_the_plan_decides_the_precision_once_from_the_probe(cpu, gpu, kind, model_key, section):
    """Both answers of the probe on every machine: the plan records what `auto` chose and hands
    training the resolved policy; an explicit policy is kept whatever the hardware."""
    from conftest import bfloat16_hardware

    from medseg.kinds.planning import ModelPlan, plan_precision

    expected = "mixed_bfloat16" if gpu or (cpu and kind == "unet") else "float32"
    with bfloat16_hardware(cpu=cpu, gpu=gpu):
        settings, plan = plan_precision(kind, model_key, {**section, "training": {"precision": "auto"}}, ModelPlan(model_key, {}))
        assert settings["training"]["precision"] == expected
        assert plan.precision == {"given": "auto", "used": expected}
        settings, plan = plan_precision(kind, model_key, {**section, "training": {"precision": "float32"}}, ModelPlan(model_key, {}))
        assert settings["training"]["precision"] == "float32" and plan.precision["used"] == "float32"


def test_the_cpu_probe_reads_the_hosts_cpuinfo_through_one_function(monkeypatch):
    import medseg.models.precision as precision
    from conftest import CPUINFO_WITH_BF16, CPUINFO_WITHOUT_BF16, _REAL_PROBES

    real = _REAL_PROBES["cpu"]
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: CPUINFO_WITH_BF16)
    assert real() is True
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: CPUINFO_WITHOUT_BF16)
    assert real() is False
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: "")  # no /proc/cpuinfo: not Linux
    assert real() is False
    assert precision.machine_description()["cpu"]  # falls back to the platform's name


def test_a_test_that_asks_the_host_fails_saying_what_to_pin():
    with pytest.raises(AssertionError, match="pin training.precision"):
        resolve_precision("auto", "unet")
