"""Inference profiles: the candidates a model has, their measurement, and the choice."""

from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import slice_plan
from medseg.errors import ConfigurationError
from medseg.imaging.io import Volume
from medseg.inference import Segmenter, SegmenterPlan
from medseg.inference.engines import ONNXRUNTIME, PASSED, TENSORFLOW, ParityRecord
from medseg.inference.ensemble import load_for_profile
from medseg.inference.parity import export_with_parity
from medseg.inference.profiles import (
    ACCURATE_DICE,
    BALANCED_DICE,
    FAST_DICE,
    InferenceSetting,
    candidate_settings,
    choose_profiles,
    measure_settings,
    pareto_front,
)


def _plan(**overrides) -> SegmenterPlan:
    return slice_plan(**{**dict(overlap=0.5, memory_gb=2.0), **overrides})


def _above_mean() -> keras.Model:
    """Foreground: every voxel above the case's mean, sigmoid(10 z)."""
    inputs = keras.Input((None, None, 1))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.full((1, 1, 1, 1), 10.0, np.float32), np.zeros(1, np.float32)])
    return model


def _row(label: str, seconds: float, dice: float) -> dict:
    return {"label": label, "seconds": seconds, "dice": dice}


def test_profiles_are_the_best_dice_and_the_quickest_within_each_margin():
    rows = [
        _row("slow best", 10.0, 0.900),
        _row("best by rounding, slower", 14.0, 0.900 + ACCURATE_DICE / 20),
        _row("quick within balanced", 4.0, 0.900 - BALANCED_DICE + 1e-4),
        _row("quicker within fast", 2.0, 0.900 - FAST_DICE + 1e-4),
        _row("quickest but too coarse", 1.0, 0.900 - FAST_DICE - 1e-3),
        _row("as good as the best, slower", 12.0, 0.900),
    ]
    chosen = choose_profiles(rows)
    assert {name: row["label"] for name, row in chosen.items()} == {
        "accurate": "slow best", "balanced": "quick within balanced", "fast": "quicker within fast"}
    assert pareto_front(rows) == [True, True, True, True, True, False]
    assert choose_profiles([]) == {}


def test_candidates_are_only_what_the_model_has():
    slices = Segmenter(_above_mean(), _plan(lateralized=[1]))
    settings = candidate_settings(slices)
    # whole slices: no overlap, z never changes a slice, and left-right is off for a lateralized class
    assert {s.mirror_axes for s in settings} == {(), (1,)}
    assert {s.overlap for s in settings} == {None} and {s.engine for s in settings} == {TENSORFLOW}
    assert len(settings) == 2 * 2  # mirroring x largest component

    keras.utils.set_random_seed(0)
    from medseg.models.conv3d import build_unet3d

    patches = Segmenter(build_unet3d((8, 8, 8, 1), base_filters=2, depth=1),
                        _plan(model_key="conv3d", window="patch", depth=0, patch_size=(8, 8, 8), overlap=0.4))
    patches.onnx, patches.parity = b"export", ParityRecord(PASSED)
    settings = candidate_settings(patches)
    assert {s.overlap for s in settings} == {0.25, 0.4, 0.5} and {s.engine for s in settings} == {TENSORFLOW, ONNXRUNTIME}
    assert {s.mirror_axes for s in settings} == {(), (0, 1, 2)}
    patches.parity = ParityRecord("failed", "below 0.999")
    assert {s.engine for s in candidate_settings(patches)} == {TENSORFLOW}


def test_measured_dice_is_against_the_labels_and_the_segmenter_is_left_as_it_was():
    segmenter = Segmenter(_above_mean(), _plan())
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 12, 5)).astype(np.float32)
    exact = (image >= 0).astype(np.uint8)  # what the network predicts on a z-scored image
    half = exact.copy()
    half[:8] = 0  # a reference that agrees on the other half only
    rows = measure_settings(segmenter, {"a": (lambda: image, lambda: exact), "b": (lambda: image, lambda: half)},
                            [InferenceSetting((), None, False, TENSORFLOW), InferenceSetting((0, 1), None, False, TENSORFLOW)])
    in_half = int(exact[8:].sum())
    expected_b = 2 * in_half / (int(exact.sum()) + in_half)
    assert rows[0]["dice"] == pytest.approx((1.0 + expected_b) / 2)
    assert rows[1]["dice"] == pytest.approx(rows[0]["dice"])  # flipping a 1x1 network changes nothing
    assert all(row["seconds"] > 0 for row in rows) and rows[1]["label"] == "mirror 0,1 · tensorflow"
    assert segmenter.engine == TENSORFLOW and segmenter.plan.mirror_axes == [] and segmenter.plan.overlap == 0.5


def test_a_profile_sets_the_knobs_and_engine_saved_and_loaded(tmp_path: Path):
    segmenter = Segmenter(_above_mean(), _plan())
    scan = Volume(np.random.default_rng(1).normal(100, 20, size=(16, 12, 5)).astype(np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    export_with_parity(segmenter, {"a": lambda: segmenter.preprocess(scan)[0]})
    fast = InferenceSetting((), None, False, ONNXRUNTIME).to_dict()
    accurate = InferenceSetting((0, 1), None, True, TENSORFLOW).to_dict()
    segmenter.plan.profiles = {"fast": {**fast, "seconds": 1.0, "dice": 0.9}, "balanced": {**fast, "seconds": 1.0, "dice": 0.9},
                               "accurate": {**accurate, "seconds": 2.0, "dice": 0.91}}
    segmenter.save(tmp_path / "segmenter")

    loaded, engine, profile = load_for_profile(tmp_path / "segmenter", "fast", None)
    assert (engine, profile, loaded.model) == (ONNXRUNTIME, "fast", None)  # no TensorFlow network loaded
    loaded, engine, _ = load_for_profile(tmp_path / "segmenter", "accurate", None)
    assert engine == TENSORFLOW and loaded.plan.mirror_axes == [0, 1] and loaded.plan.keep_largest_component
    _, engine, _ = load_for_profile(tmp_path / "segmenter", "accurate", ONNXRUNTIME)  # an explicit engine wins
    assert engine == ONNXRUNTIME
    plain, engine, profile = load_for_profile(tmp_path / "segmenter", None, None)
    assert (engine, profile, plain.plan.mirror_axes) == (TENSORFLOW, "plan", [])


def test_a_model_without_profiles_or_an_unknown_one_is_refused(tmp_path: Path):
    Segmenter(_above_mean(), _plan()).save(tmp_path / "segmenter")
    with pytest.raises(ConfigurationError, match="has no inference profiles.*predict.profile null"):
        load_for_profile(tmp_path / "segmenter", "fast", None)
    with pytest.raises(ConfigurationError, match="'turbo' is not one of"):
        Segmenter(_above_mean(), _plan()).apply_profile("turbo")
