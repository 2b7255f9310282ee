"""Inference batches from a memory budget, and sliding windows streamed batch by batch.

The batch sizes are checked against values worked out by hand from the documented estimate:
bytes per window = voxels × unet_features_per_voxel × ACTIVATION_BYTES_PER_FEATURE (16).
"""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

import medseg.patching.sliding_window as sw
from medseg.errors import ConfigurationError
from medseg.patching.sliding_window import (
    ACTIVATION_BYTES_PER_FEATURE,
    pad_to_window,
    sliding_window_grid,
    sliding_window_predict,
    unet_features_per_voxel,
    windows_per_batch,
)


def test_the_constant_is_the_documented_one():
    assert ACTIVATION_BYTES_PER_FEATURE == 16.0


@pytest.mark.parametrize(
    ("base_filters", "depth", "rank", "expected"),
    [
        (32, 3, 2, 60.0),  # 32 + 16 + 8 + 4: the default 2D U-Net
        (8, 2, 3, 10.5),  # 8 + 2 + 0.5: the default 3D U-Net
        (16, 1, 3, 20.0),  # 16 + 4: the patch classifier (Conv3D 16, pool, Conv3D 32)
        (5, 0, 2, 5.0),  # no pooling: one level
        (1, 1, 2, 1.5),
    ],
)
def test_features_per_voxel_by_hand(base_filters, depth, rank, expected):
    assert unet_features_per_voxel(base_filters, depth, rank) == expected


@pytest.mark.parametrize(
    ("window", "features", "memory_gb", "n_windows", "expected"),
    [
        # 512*512 voxels * 60 * 16 B = 251,658,240 B; 2**30 / that = 4.27
        ((512, 512, 1), 60.0, 1.0, None, 4),
        ((512, 512, 1), 60.0, 0.5, None, 2),  # 2.13
        ((512, 512, 1), 60.0, 0.2, None, 1),  # 0.85: one slice still runs, alone
        # 96*96 * 60 * 16 = 8,847,360 B; 2**30 / that = 121.4, capped by the volume's slices
        ((96, 96, 1), 60.0, 1.0, None, 121),
        ((96, 96, 1), 60.0, 1.0, 40, 40),
        # 32*32*16 * 10.5 * 16 = 2,752,512 B; 2**30 / that = 390.1
        ((32, 32, 16), 10.5, 1.0, None, 390),
        ((32, 32, 16), 10.5, 4.0, None, 1560),  # 1560.4
        ((32, 32, 16), 10.5, 1.0, 18259, 390),
    ],
)
def test_windows_per_batch_by_hand(window, features, memory_gb, n_windows, expected):
    assert windows_per_batch(window, features, memory_gb, n_windows) == expected


def test_the_batch_shrinks_as_the_window_or_the_model_grows():
    small = windows_per_batch((128, 128, 1), unet_features_per_voxel(32, 3, 2), 1.0)
    assert windows_per_batch((256, 256, 1), unet_features_per_voxel(32, 3, 2), 1.0) == small // 4
    assert windows_per_batch((128, 128, 1), unet_features_per_voxel(64, 3, 2), 1.0) == small // 2


@pytest.mark.parametrize("memory_gb", [0, -1.0, float("nan"), float("inf"), "abc", None])
def test_a_bad_budget_is_refused_naming_it(memory_gb):
    with pytest.raises(ConfigurationError, match="memory_gb"):
        windows_per_batch((8, 8, 8), 10.0, memory_gb)


@pytest.mark.parametrize(
    "call",
    [
        lambda: windows_per_batch((8, 8, 8), 0.0, 1.0),
        lambda: windows_per_batch((8, 0, 8), 10.0, 1.0),
        lambda: windows_per_batch((8, 8, 8), 10.0, 1.0, n_windows=0),
        lambda: unet_features_per_voxel(0, 2, 3),
        lambda: unet_features_per_voxel(8, -1, 3),
        lambda: unet_features_per_voxel(8, 2, 4),
    ],
)
def test_bad_sizes_are_refused(call):
    with pytest.raises(ConfigurationError):
        call()


def _position_predictor(batch: np.ndarray) -> np.ndarray:
    """A deterministic, batch-independent, nonlinear 'model' whose output depends on where a
    voxel sits in its window, so wrong stitching or padding shows up."""
    ramp = np.linspace(0.0, 1.0, batch.shape[1], dtype=np.float32)[:, None, None, None]
    return (1.0 / (1.0 + np.exp(-(batch * 0.7 + ramp)))).astype(np.float32)


@pytest.mark.parametrize("weighting", ["gaussian", "constant"])
@pytest.mark.parametrize(
    ("volume_shape", "window", "overlap"),
    [((23, 17, 12), (8, 8, 4), 0.5), ((5, 20, 9), (8, 8, 8), 0.25), ((16, 16, 6), (16, 16, 1), 0.0)],
)
def test_the_result_does_not_depend_on_the_batch_size(volume_shape, window, overlap, weighting):
    volume = np.random.default_rng(0).normal(size=volume_shape).astype(np.float32)
    outputs = [
        sliding_window_predict(volume, _position_predictor, window, overlap, batch_size, weighting=weighting)
        for batch_size in (1, 3, 7, 10_000)
    ]
    for output in outputs[1:]:
        np.testing.assert_array_equal(output, outputs[0])


@pytest.mark.parametrize("padding", ["centre", "end"])
@pytest.mark.parametrize("weighting", ["gaussian", "constant"])
def test_windows_past_the_border_equal_a_zero_padded_copy(padding, weighting):
    # Axes shorter than the window: the engine zero-fills windows instead of padding the volume.
    volume = np.random.default_rng(1).normal(size=(5, 13, 3)).astype(np.float32)
    window = (8, 6, 4)
    if padding == "centre":
        padded, crop = pad_to_window(volume, window)
    else:
        padded = np.zeros((8, 13, 4), np.float32)
        padded[:5, :, :3] = volume
        crop = (slice(0, 5), slice(0, 13), slice(0, 3))
    expected = sliding_window_predict(padded, _position_predictor, window, 0.5, 4, weighting=weighting)[crop]
    output = sliding_window_predict(volume, _position_predictor, window, 0.5, 4, weighting=weighting, padding=padding)
    np.testing.assert_array_equal(output, expected)


def test_constant_weights_average_overlapping_windows():
    volume = np.random.default_rng(2).normal(size=(20, 11, 9)).astype(np.float32)
    output = sliding_window_predict(volume, lambda batch: batch.copy(), (8, 6, 4), 0.5, 5, weighting="constant")
    np.testing.assert_allclose(output, volume, rtol=0, atol=1e-6)


def test_one_window_per_voxel_gives_the_prediction_itself():
    # The whole-slice case: windows tile the volume without overlap, weights are constant,
    # so each voxel is the predictor's output, bit for bit.
    volume = np.random.default_rng(3).normal(size=(12, 10, 7)).astype(np.float32)
    output = sliding_window_predict(volume, _position_predictor, (12, 10, 1), 0.0, 3, weighting="constant")
    expected = np.stack([_position_predictor(volume[None, :, :, z : z + 1, None])[0, :, :, 0, 0] for z in range(7)], axis=2)
    np.testing.assert_array_equal(output, expected)


def test_windows_are_cut_batch_by_batch_never_all_at_once(monkeypatch):
    volume = np.zeros((40, 40, 24), np.float32)
    window, batch_size = (8, 8, 8), 5
    n_windows = len(sliding_window_grid(volume.shape, window, 0.5))
    cut, seen = [], []
    extract = sw.extract_windows

    def recording_extract(vol, starts, shape):
        cut.append(len(starts))
        return extract(vol, starts, shape)

    def predictor(batch):
        seen.append(batch.shape[0])
        return np.full(batch.shape, 0.5, np.float32)

    monkeypatch.setattr(sw, "extract_windows", recording_extract)
    sliding_window_predict(volume, predictor, window, 0.5, batch_size)
    assert n_windows > 10 * batch_size
    assert max(cut) <= batch_size and max(seen) <= batch_size
    assert sum(seen) == n_windows and len(seen) == -(-n_windows // batch_size)


@pytest.mark.parametrize(("weighting", "accumulators"), [("gaussian", 2), ("constant", 1)])
def test_memory_is_the_accumulators_and_one_batch(weighting, accumulators):
    """Peak numpy allocations: the float32 accumulators (two with Gaussian weights, one with
    constant weights) plus a few batch-sized buffers; no float64 or padded copy of the volume."""
    volume = np.random.default_rng(4).normal(size=(96, 96, 40)).astype(np.float32)  # 1.4 MiB
    window, batch_size = (16, 16, 8), 8
    batch_bytes = batch_size * int(np.prod(window)) * 4  # 64 KiB
    tracemalloc.start()
    tracemalloc.reset_peak()
    sliding_window_predict(volume, lambda batch: batch.copy(), window, 0.5, batch_size, weighting=weighting)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < accumulators * volume.nbytes + 4 * batch_bytes, peak / volume.nbytes


def test_a_float64_volume_is_predicted_in_float32():
    volume = np.random.default_rng(5).normal(size=(12, 12, 6))
    seen = []

    def predictor(batch):
        seen.append(batch.dtype)
        return batch.copy()

    output = sliding_window_predict(volume, predictor, (8, 8, 4), 0.5, 2)
    assert output.dtype == np.float32 and set(seen) == {np.dtype(np.float32)}


def test_bad_weighting_or_padding_is_refused():
    volume = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ConfigurationError, match="weighting"):
        sliding_window_predict(volume, lambda b: b, (8, 8, 8), weighting="median")
    with pytest.raises(ConfigurationError, match="padding"):
        sliding_window_predict(volume, lambda b: b, (8, 8, 8), padding="start")


def test_grid_order_is_unchanged_c_order():
    # The streamed grid visits windows in the order of sliding_window_grid (last axis fastest),
    # so results are bit-identical to the list-based loop it replaced.
    volume = np.arange(12 * 10 * 6, dtype=np.float32).reshape(12, 10, 6)
    order = []

    def predictor(batch):
        order.extend(tuple(int(v) for v in w[0, 0, 0]) for w in batch)
        return np.zeros(batch.shape, np.float32)

    sliding_window_predict(volume, predictor, (8, 8, 4), 0.5, 3)
    grid = sliding_window_grid(volume.shape, (8, 8, 4), 0.5)
    assert order == [tuple(volume[x, y, z : z + 1].astype(int)) for x, y, z in grid]
    assert list(itertools.product([0, 4], [0, 2], [0, 2])) == grid


def test_the_case_arrays_by_hand():
    # 100 x 100 x 10 = 1e5 voxels, float32. One input channel, a sigmoid head, no mirroring:
    # input 1 + weighted sum 1 + weight sum 1 + the map back and the best class 2 = 5 arrays.
    assert sw.case_arrays_bytes((100, 100, 10), 1, 1, mirrored=False) == 4 * 10**5 * 5
    # A cascade's 4 channels, 3 class probabilities, mirrored: 4*2 inputs + 3*3 + 1 + 2 = 20.
    assert sw.case_arrays_bytes((100, 100, 10), 4, 3, mirrored=True) == 4 * 10**5 * 20


def test_the_activations_get_what_the_runtime_and_the_arrays_leave():
    gib = 2**30
    assert sw.activation_budget_gb(4.0, 0, runtime_gb=1.0) == 3.0
    assert sw.activation_budget_gb(4.0, gib // 2, runtime_gb=1.0) == 2.5
    # Nothing left: the floor, so the scan is still predicted, a window at a time.
    assert sw.activation_budget_gb(1.0, 2 * gib, runtime_gb=1.0) == sw.MIN_ACTIVATION_GB
    # The whole budget on a CT-sized grid (512 x 512 x 160, one channel, no mirroring): the
    # arrays are 5 x 160 MiB, so 4 GiB leaves 4 - RUNTIME_GB - 0.78 GiB for the batch.
    held = sw.case_arrays_bytes((512, 512, 160), 1, 1, mirrored=False)
    assert held == 5 * 512 * 512 * 160 * 4
    assert sw.activation_budget_gb(4.0, held) == pytest.approx(4.0 - sw.RUNTIME_GB - 0.78125)


def test_a_segmenter_batches_from_what_is_left_and_the_same_shape_always_gets_the_same_batch():
    from medseg.inference import Segmenter, SegmenterPlan

    plan = SegmenterPlan(
        model_key="conv3d", display_name="3D", window="patch", target_spacing=(1.0, 1.0, 1.0), interpolation_order=1,
        clip_percentiles=None, crop_margin=None, channel=None, label_mode="multiclass", classes={"1": "a", "2": "b"},
        lateralized=[], threshold=0.5, depth=2, patch_size=(32, 32, 16), overlap=0.5, sigma_scale=0.125,
        features_per_voxel=10.5, memory_gb=4.0, mirror_axes=[0, 1, 2],
    )
    segmenter = Segmenter(None, plan)
    shape = (512, 512, 160)
    # Three classes (background + 2), mirrored: 1*2 + 3*3 + 1 + 2 = 14 arrays of 160 MiB.
    expected = 4.0 - sw.RUNTIME_GB - 14 * 160 / 1024
    assert segmenter.activation_budget(shape) == pytest.approx(expected)
    assert segmenter.activation_budget(shape) == segmenter.activation_budget(shape)
    assert windows_per_batch((32, 32, 16), 10.5, segmenter.activation_budget(shape)) < windows_per_batch((32, 32, 16), 10.5, 4.0)
