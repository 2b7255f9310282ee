"""Mixed precision: what `auto` measures and picks, and a bfloat16 model keeps float32 probabilities."""

import keras
import numpy as np
import pytest

from medseg.models import build_unet2d, compile_segmentation_model
from medseg.models.precision import (
    DICE_TOLERANCE,
    PrecisionMeasurement,
    check_dice,
    choose_precision,
    cpu_has_bfloat16,
    precision_candidates,
    with_precision,
)

AMX_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16\n"
PLAIN_CPU = "processor\t: 0\nflags\t\t: fpu sse2 avx2\n"


def test_cpu_bfloat16_is_read_from_the_flags():
    assert cpu_has_bfloat16(AMX_CPU) and not cpu_has_bfloat16(PLAIN_CPU)
    assert not cpu_has_bfloat16("")


@pytest.mark.parametrize(
    "setting, cpuinfo, gpu, expected",
    [
        ("auto", AMX_CPU, False, ("float32", "mixed_bfloat16")),  # measured, then chosen
        ("auto", PLAIN_CPU, False, ("float32",)),  # emulated bfloat16 is not worth timing
        ("auto", PLAIN_CPU, True, ("float32", "mixed_bfloat16")),  # an Ampere or newer GPU
        ("float32", AMX_CPU, True, ("float32",)),  # explicit settings win, unmeasured
        ("mixed_float16", PLAIN_CPU, False, ("mixed_float16",)),
    ],
)
def test_auto_measures_what_the_hardware_offers(setting, cpuinfo, gpu, expected):
    assert precision_candidates(setting, cpuinfo=cpuinfo, gpu_bf16=gpu) == expected


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="training.precision"):
        precision_candidates("float8", cpuinfo=PLAIN_CPU, gpu_bf16=False)


def _measured(train_s: float, infer_s: float, train_dice: float = 0.9, infer_dice: float = 0.9) -> PrecisionMeasurement:
    return PrecisionMeasurement(train_s, infer_s, train_dice, infer_dice)


@pytest.mark.parametrize(
    "bf16, training, inference",
    [
        (_measured(0.5, 0.25), "mixed_bfloat16", "mixed_bfloat16"),  # 2x faster in both
        (_measured(0.98, 0.25), "float32", "mixed_bfloat16"),  # training gains 2 %: noise, not chosen
        (_measured(2.0, 0.25), "float32", "mixed_bfloat16"),  # slower to train, faster to predict
        (_measured(0.5, 0.25, train_dice=0.9 - DICE_TOLERANCE - 0.001), "float32", "mixed_bfloat16"),  # check fails for training only
        (_measured(0.5, 0.25, infer_dice=0.85), "mixed_bfloat16", "float32"),  # masks disagree at inference
    ],
)
def test_the_fastest_policy_that_passes_the_check_is_chosen_for_training_and_inference_apart(bf16, training, inference):
    chosen = choose_precision({"float32": _measured(1.0, 0.5), "mixed_bfloat16": bf16})
    assert (chosen["training"], chosen["inference"]) == (training, inference)
    assert chosen["reason"]  # the plan says why


def test_one_measured_policy_is_chosen_for_both():
    assert choose_precision({"float32": _measured(1.0, 0.5)})["training"] == "float32"
    chosen = choose_precision({"mixed_float16": _measured(1.0, 0.5)})
    assert (chosen["training"], chosen["inference"]) == ("mixed_float16", "mixed_float16")


def test_check_dice_against_a_hand_computed_case():
    class Fixed:
        def predict_on_batch(self, x):
            return x

    # 4 voxels predicted (p >= 0.5), 3 true, 2 shared: Dice = 2 * 2 / (4 + 3)
    probabilities = np.array([0.9, 0.6, 0.5, 0.7, 0.1, 0.2], np.float32).reshape(1, 6, 1)
    truth = np.array([1, 1, 0, 0, 1, 0], np.float32).reshape(1, 6, 1)
    assert check_dice(Fixed(), probabilities, truth) == pytest.approx(4 / 7)


def test_the_planners_measurement_trains_each_policy_from_the_same_start_and_learns():
    """The real measurement on a tiny 2D U-Net, in both policies on any machine (on a CPU
    without bfloat16 units the bfloat16 run is emulated, slow, but still correct): the check
    task is learned, and float32's inference check is its training check."""
    from medseg.kinds.plans import measure_precisions

    def build():
        return compile_segmentation_model(build_unet2d((32, 32, 1), 8, 2), "adam", 1e-3, "bce+dice")

    measured = measure_precisions(("float32", "mixed_bfloat16"), build, 4)
    assert set(measured) == {"float32", "mixed_bfloat16"}
    base, bf16 = measured["float32"], measured["mixed_bfloat16"]
    assert base.train_check_dice > 0.6  # smooth noise thresholded: learned in 30 steps
    assert base.infer_check_dice == base.train_check_dice
    assert abs(bf16.infer_check_dice - base.train_check_dice) < 0.05  # same weights, bfloat16 arithmetic
    assert min(base.train_seconds_per_step, base.infer_seconds_per_batch, bf16.train_seconds_per_step) > 0


def test_a_float32_model_predicts_in_bfloat16_with_its_own_weights():
    model = compile_segmentation_model(build_unet2d((16, 16, 1), 4, 2), "adam", 1e-2, "bce+dice")
    copy = with_precision(model, "mixed_bfloat16")
    assert {layer.dtype_policy.name for layer in copy.layers[1:-1] if layer.weights} == {"mixed_bfloat16"}
    assert copy.layers[-1].dtype_policy.name == "float32"  # the head keeps float32 probabilities
    for a, b in zip(copy.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype("float32")
    ours, theirs = np.asarray(copy.predict_on_batch(x)), np.asarray(model.predict_on_batch(x))
    assert ours.dtype == np.float32 and 0 < np.abs(ours - theirs).max() < 0.05  # bfloat16 arithmetic, same network
    assert with_precision(model, "float32") is model


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
    ("unet3d", "conv3d", {"model": {"network": "unet3d"}}),
    ("patch_classifier", "conv3d", {"model": {"network": "patch_classifier"}}),
])
def test_the_plan_decides_the_precision_once_by_measurement(cpu, gpu, kind, model_key, section):
    """Both answers of the probe on every machine, with the measurement's figures given: the
    plan records what `auto` measured and chose, hands training and inference their policies,
    and reuses the measurement on a rerun; an explicit policy is kept, unmeasured."""
    from conftest import bfloat16_hardware, measured_precision

    from medseg.kinds.plans import ModelPlan, plan_precision

    expected = "mixed_bfloat16" if gpu or cpu else "float32"
    never_built = lambda: pytest.fail("an explicit policy or a reused measurement builds nothing")  # noqa: E731
    auto = {**section, "batch_size": 4, "training": {"precision": "auto", "batch_size": 4}}
    with bfloat16_hardware(cpu=cpu, gpu=gpu), measured_precision(train_speedup=1.8, infer_speedup=2.8):
        settings, plan, timings = plan_precision(model_key, json_copy(auto), ModelPlan(model_key, {}), never_built, {})
        assert settings["training"]["precision"] == settings["inference"]["precision"] == expected
        assert (plan.precision["given"], plan.precision["used"], plan.precision["inference"]) == ("auto", expected, expected)
        if expected != "float32":
            assert plan.precision["measured"]["mixed_bfloat16"]["train_seconds_per_step"] == pytest.approx(1 / 1.8, abs=1e-6)
            assert plan.precision["reused"] is False and len(timings) == 1
    if expected != "float32":  # the rerun reads the measurement back, without measuring
        with bfloat16_hardware(cpu=cpu, gpu=gpu):
            _, again, _ = plan_precision(model_key, json_copy(auto), ModelPlan(model_key, {}), never_built, timings)
        assert again.precision["reused"] is True and again.precision["used"] == expected
    explicit = {**section, "training": {"precision": "float32", "batch_size": 4}}
    settings, plan, _ = plan_precision(model_key, explicit, ModelPlan(model_key, {}), never_built, {})
    assert settings["training"]["precision"] == settings["inference"]["precision"] == plan.precision["used"] == "float32"
    assert "measured" not in plan.precision


def json_copy(value):
    import json

    return json.loads(json.dumps(value))


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
        precision_candidates("auto")
