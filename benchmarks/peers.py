"""medseg side by side with MONAI: sliding-window inference, one training step, metric parity.

Measured in one run on the same volume (smoothed noise, 160x160x96 float32), the same window
(64x64x64), overlap (0.5), Gaussian weighting (sigma = 0.125 x window in both) and batches:

  1. sliding-window inference of a whole volume: medseg's `sliding_window_predict` with the
     segmenter's `window_predictor` (`model.predict_on_batch`) against MONAI's
     `sliding_window_inference` under `torch.inference_mode`, with the same sw_batch_size
     (medseg's: `windows_per_batch` at `planning.memory_gb`). Voxels/s, and the time of the
     bare network on the same windows, so the rest is the engine's (cutting and stitching);
  2. one training step: medseg's model compiled as medseg trains it (Adam, BCE+Dice) and timed
     as the planner times it (`seconds_per_training_step`, through `model.fit`), against
     MONAI's network with `DiceCELoss` and Adam, same batch and patch: samples/s;
  3. metric parity on the same masks: `dice_score`, `iou_score`, `hausdorff_distance_95`,
     `normalized_surface_dice` against `DiceMetric`, `MeanIoU`,
     `HausdorffDistanceMetric(percentile=95)` with `spacing=` (and its surface distances,
     `get_edge_surface_distance`, with the percentile in float64), `SurfaceDiceMetric`,
     on random shapes, anisotropic spacings and empty masks (the conventions for empty masks
     differ and are printed, not hidden); and the two stitching engines on one predictor;
  4. each side in each precision it has on this machine: medseg in the policies that
     `training.precision: auto` measures (`precision_candidates`: float32, and mixed_bfloat16
     where the CPU has bfloat16 units), MONAI in float32 and, on such a CPU, under
     `torch.autocast("cpu", dtype=torch.bfloat16)` when that makes one forward pass faster
     (timed in MONAI's float32 process first); each side is compared at its fastest.

The networks: medseg's `build_unet3d(base_filters=8, depth=4)` (the default width; depth 4 is
what the planner's `poolings_per_axis` gives a 64^3 isotropic patch) and MONAI's `BasicUNet`
with features (8, 16, 32, 64, 128, 8), BatchNorm and ReLU: the same design, stage for stage
(two 3x3x3 conv-BN-ReLU per stage, max pooling, 2x2x2 transposed convolutions, skip
concatenation). MONAI's `UNet` is another design (strided convolutions, residual units).
Weights are random; only time (and, for the metrics, values) matter. MONAI's network runs in
the memory layout that is faster here (NCDHW or channels_last_3d, timed on one batch).

Each framework runs in a fresh spawned process of its own, once per precision, so threads,
allocators and peak RSS are its alone. Peak memory is the growth of the process's peak RSS
over its RSS once the network is built: for the first call (TensorFlow traces the graph
there), and in steady state (the peak mark reset through /proc/self/clear_refs). Torch uses
`torch.set_num_threads(os.cpu_count())`, the pool TensorFlow sizes by default.

Targets: medseg >= 2.0x MONAI on inference voxels/s and on training samples/s, each at its
fastest precision; metric parity |medseg - MONAI| / max(1, |MONAI|) <= 1e-6 wherever both
define a value. MONAI computes in float32, so a distance in mm agrees to float32's relative
resolution, not to 1e-6 mm; and its HD95 is compared after MONAI's own surface distances with
the percentile taken in float64, since `torch.quantile` in float32 rounds the interpolation
point itself (the metric object's own difference is printed beside it). The two engines on one
Gaussian map agree to 1e-5. Exits 1 on a miss and prints where medseg loses.

Every speed figure is the median of `--runs` (3) runs, each side and precision in a fresh process
per run, the sides taking turns.

Run: .venv-peers/bin/python benchmarks/peers.py [--quick] [--runs 3] [--repeats 3] [--memory-gb 4]
It needs the `peers` extra (torch, MONAI) in its own environment:
  python3 -m venv .venv-peers && .venv-peers/bin/pip install -e '.[cpu,peers]'
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _targets import Target, report_targets  # noqa: E402
from scipy import ndimage  # noqa: E402

from medseg.evaluation.metrics import dice_score, hausdorff_distance_95, iou_score, normalized_surface_dice  # noqa: E402
from medseg.kinds.sizes import poolings_per_axis  # noqa: E402
from medseg.patching.sliding_window import (  # noqa: E402
    activation_budget_gb,
    case_arrays_bytes,
    extract_windows,
    gaussian_importance_map,
    pad_to_window,
    sliding_window_grid,
    sliding_window_predict,
    unet_features_per_voxel,
    windows_per_batch,
)

MIB = 2**20
BASE_FILTERS = 8  # build_unet3d's default width
DEPTH = 4  # BasicUNet's fixed four poolings, and what the planner gives a 64^3 isotropic patch
SPEED_TARGET = 2.0  # medseg / MONAI, inference voxels/s and training samples/s, each at its fastest (issue 39)
PARITY_TOLERANCE = 1e-6
STITCH_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Setup:
    """What both sides run on: sizes in voxels, batches in windows or samples."""

    volume_shape: tuple[int, int, int]
    window: tuple[int, int, int]
    overlap: float
    sigma_scale: float
    infer_batch: int
    train_batch: int
    learning_rate: float
    repeats: int
    train_steps: int


def smooth_volume(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Standardized Gaussian-smoothed noise (sigma 4 voxels), float32: an image-like volume."""
    noise = np.random.default_rng(seed).normal(size=shape)
    volume = ndimage.gaussian_filter(noise, sigma=4.0)
    return ((volume - volume.mean()) / volume.std()).astype(np.float32)


def window_stack(volume: np.ndarray, setup: Setup) -> np.ndarray:
    """The windows the engines cut, (N, wx, wy, wz, 1), on the same grid and padding."""
    padded, _ = pad_to_window(volume, setup.window)
    return extract_windows(padded, sliding_window_grid(padded.shape, setup.window, setup.overlap), setup.window)


def basic_unet_features(base_filters: int) -> tuple[int, ...]:
    """BasicUNet's `features` for medseg's widths: base·2^i for the five stages, then the last
    decoder stage's width (base)."""
    return (*(base_filters * 2**i for i in range(DEPTH + 1)), base_filters)


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: "5" into /proc/self/clear_refs), so that
    ru_maxrss counts from here; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def time_inference(sliding: Callable[[], object], make_network: Callable[[], Callable[[], object]], repeats: int) -> dict:
    """Time `sliding()` (the whole volume) and the bare network on the same windows, in this
    process, and the peak RSS of the sliding-window calls above the RSS once the network is built.

    The first call is cold (tracing, first allocations); `repeats` warm calls follow, with the
    peak mark reset before them (what an allocator keeps from the first call counts there too),
    then `repeats` calls of `make_network()`'s function, whose window stack is built after the
    memory is measured.
    """
    built = rss_bytes()
    can_reset = reset_peak_rss()
    first = timed(sliding)
    first_growth = peak_rss_bytes() - built
    reset_peak_rss()
    sliding_times = [timed(sliding) for _ in range(repeats)]
    steady_growth = peak_rss_bytes() - built if can_reset else float("nan")
    network = make_network()
    network_times = [timed(network) for _ in range(repeats)]
    return {
        "first_s": first,
        "sliding_s": statistics.median(sliding_times),
        "network_s": statistics.median(network_times),
        "first_growth_mib": first_growth / MIB,
        "steady_growth_mib": steady_growth / MIB,
    }


def measure_medseg(setup: Setup, precision: str) -> dict:
    """medseg in a fresh process: inference and a training step of the 3D U-Net in `precision`."""
    import keras

    from medseg.inference.windows import window_predictor
    from medseg.models import build_unet3d, compile_segmentation_model
    from medseg.models.normalization import inference_network
    from medseg.models.precision import dtype_policy
    from medseg.models.training import seconds_per_training_step

    keras.utils.set_random_seed(0)
    volume = smooth_volume(setup.volume_shape)
    with dtype_policy(precision):
        model = build_unet3d((*setup.window, 1), base_filters=BASE_FILTERS, depth=DEPTH)
    compile_segmentation_model(model, "adam", setup.learning_rate, "bce+dice")
    predict = window_predictor(inference_network(model))  # as the segmenter runs it: normalizations folded

    def sliding():
        return sliding_window_predict(
            volume, predict, setup.window, overlap=setup.overlap, batch_size=setup.infer_batch, sigma_scale=setup.sigma_scale
        )

    def make_network():
        windows = window_stack(volume, setup)
        return lambda: [predict(windows[i : i + setup.infer_batch]) for i in range(0, len(windows), setup.infer_batch)]

    result = time_inference(sliding, make_network, setup.repeats)
    result["train_step_s"] = seconds_per_training_step(model, setup.train_batch, steps=setup.train_steps)
    result["trainable"] = int(sum(math.prod(w.shape) for w in model.trainable_weights))
    result["other_weights"] = int(model.count_params()) - result["trainable"]
    return result


def measure_monai(setup: Setup, precision: str, probe_precisions: tuple[str, ...] = ()) -> dict:
    """MONAI in a fresh process: inference and a training step of BasicUNet in `precision`
    ("float32", or "bfloat16": `torch.autocast` on the CPU), in the faster memory layout.

    One forward pass of a training batch is timed first in each layout, for `precision` and
    each of `probe_precisions` (so that the caller can tell whether bfloat16 helps at all).
    """
    import torch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    volume = smooth_volume(setup.volume_shape)
    # Keras' BatchNormalization momentum 0.9 is torch's 0.1 (the weight of the new batch).
    net = BasicUNet(
        spatial_dims=3, in_channels=1, out_channels=1, features=basic_unet_features(BASE_FILTERS),
        act="relu", norm=("batch", {"momentum": 0.1}), dropout=0.0,
    )

    def autocast(policy: str = precision):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=policy == "bfloat16")

    layouts = {"NCDHW": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
    probe = torch.randn(setup.train_batch, 1, *setup.window)
    probe_s = {}
    net.eval()
    for name, layout in layouts.items():
        net.to(memory_format=layout)  # outside inference_mode: the weights must stay trainable
        for policy in dict.fromkeys((precision, *probe_precisions)):
            with torch.inference_mode(), autocast(policy):
                net(probe.contiguous(memory_format=layout))
                probe_s[policy, name] = timed(lambda: net(probe.contiguous(memory_format=layout)))
    layout_name = min(layouts, key=lambda name: probe_s[precision, name])
    layout = layouts[layout_name]
    net.to(memory_format=layout)

    # The same float32 probabilities as medseg's sigmoid head.
    def predictor(windows):
        return torch.sigmoid(net(windows.contiguous(memory_format=layout))).float()

    image = torch.from_numpy(volume)[None, None]

    def sliding():
        with torch.inference_mode(), autocast():
            out = sliding_window_inference(
                image, setup.window, setup.infer_batch, predictor,
                overlap=setup.overlap, mode="gaussian", sigma_scale=setup.sigma_scale,
            )
        return out.numpy()[0, 0]

    def make_network():
        windows = torch.from_numpy(window_stack(volume, setup)).permute(0, 4, 1, 2, 3).contiguous()

        def network():
            with torch.inference_mode(), autocast():
                return [predictor(windows[i : i + setup.infer_batch]) for i in range(0, len(windows), setup.infer_batch)]

        return network

    result = time_inference(sliding, make_network, setup.repeats)

    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=setup.learning_rate)
    # batch=True: Dice pooled over the batch, as medseg's loss pools it.
    loss_function = DiceCELoss(sigmoid=True, batch=True)
    x = torch.randn(setup.train_batch, 1, *setup.window).contiguous(memory_format=layout)
    y = torch.zeros(setup.train_batch, 1, *setup.window)  # all background, as seconds_per_training_step

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_function(net(x), y)
        loss.backward()
        optimizer.step()

    step()  # warm-up, as medseg's traced step
    result["train_step_s"] = statistics.median(timed(step) for _ in range(setup.train_steps))
    result["trainable"] = int(sum(p.numel() for p in net.parameters() if p.requires_grad))
    result["other_weights"] = int(sum(b.numel() for name, b in net.named_buffers() if not name.endswith("num_batches_tracked")))
    result["layout"] = layout_name
    result["probe_s"] = probe_s
    result["threads"] = torch.get_num_threads()
    return result


def median_of_runs(runs: list[dict]) -> dict:
    """One side's figures over its runs: the median of each number, the first run's other values
    (its memory layout, probe, parameter counts)."""
    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            merged[key] = statistics.median(run[key] for run in runs)
    return merged


def in_fresh_process(function: Callable, *args) -> dict:
    """`function(*args)` in a newly spawned interpreter: one framework per process."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def stitching_parity(setup: Setup) -> list[tuple[str, float, float, float, float]]:
    """Both engines on the same volume with one predictor whose output depends on the voxel's
    place in its window (so the weights matter): rows of (what, max abs difference, share of
    voxels differing by more than 1e-3, medseg s, MONAI s)."""
    import torch
    from monai.inferers import sliding_window_inference

    volume = smooth_volume(setup.volume_shape, seed=1)
    ramp = (1.0 + np.arange(setup.window[0], dtype=np.float32) / setup.window[0])[:, None, None]
    ramp_torch = torch.from_numpy(ramp)
    image = torch.from_numpy(volume)[None, None]
    medseg_map = torch.from_numpy(gaussian_importance_map(setup.window, setup.sigma_scale))
    variants = {
        "gaussian, MONAI's own map": ("gaussian", {"mode": "gaussian", "sigma_scale": setup.sigma_scale}),
        "gaussian, medseg's map as roi_weight_map": ("gaussian", {"mode": "gaussian", "roi_weight_map": medseg_map}),
        "constant": ("constant", {"mode": "constant"}),
    }
    rows = []
    for what, (weighting, options) in variants.items():
        def ours():
            return sliding_window_predict(
                volume, lambda w: w[..., 0] * ramp, setup.window, overlap=setup.overlap,
                batch_size=setup.infer_batch, sigma_scale=setup.sigma_scale, weighting=weighting,
            )

        def theirs():
            with torch.inference_mode():
                out = sliding_window_inference(
                    image, setup.window, setup.infer_batch, lambda w: w * ramp_torch, overlap=setup.overlap, **options
                )
            return out.numpy()[0, 0]

        difference = np.abs(ours() - theirs())
        rows.append((what, float(difference.max()), float((difference > 1e-3).mean()), timed(ours), timed(theirs)))
    return rows


def blobs(rng: np.random.Generator, shape: tuple[int, ...], count: int = 2) -> list[np.ndarray]:
    """`count` standardized smooth noise fields (sigma 2 voxels) of `shape`."""
    fields = [ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0) for _ in range(count)]
    return [(f - f.mean()) / f.std() for f in fields]


def mask_cases(rng: np.random.Generator, n_random: int) -> list[tuple[str, np.ndarray, np.ndarray, tuple[float, ...]]]:
    """(name, reference, prediction, spacing in mm) for the parity table."""
    spacings = [(1.0, 1.0, 1.0), (0.8, 0.8, 2.5), (1.5, 0.7, 3.0)]
    cases = []
    for i in range(n_random):
        shape = tuple(int(s) for s in rng.integers(12, 56, size=3))
        a, b = blobs(rng, shape)
        cases.append((f"random {i}", a > 0.5, a + 0.7 * b > 0.5, spacings[i % len(spacings)]))
    shape = (40, 36, 24)
    cube = np.zeros(shape, bool)
    cube[8:24, 10:26, 6:16] = True
    shifted = np.roll(cube, (3, -2, 1), axis=(0, 1, 2))
    border = cube.copy()
    border[:, :4, :] = True  # touches two faces of the array
    voxel_a, voxel_b = np.zeros(shape, bool), np.zeros(shape, bool)
    voxel_a[5, 5, 5], voxel_b[30, 20, 18] = True, True
    empty = np.zeros(shape, bool)
    cases += [
        ("identical", cube, cube.copy(), (0.8, 0.8, 2.5)),
        ("shifted cube", cube, shifted, (0.8, 0.8, 2.5)),
        ("touching the border", cube, border, (1.2, 0.9, 2.0)),
        ("one voxel each", voxel_a, voxel_b, (0.7, 1.1, 3.0)),
        ("reference empty", empty, cube, (1.0, 1.0, 1.0)),
        ("prediction empty", cube, empty, (1.0, 1.0, 1.0)),
        ("both empty", empty, empty.copy(), (1.0, 1.0, 1.0)),
    ]
    return cases


# The NSD tolerance of the parity check: not a multiple of any case's spacing, so that no
# distance sits on it and float32 against float64 cannot decide a voxel.
NSD_TOLERANCE_MM = 1.3


def monai_metrics(
    reference: np.ndarray, prediction: np.ndarray, spacing: tuple[float, ...], ignore_empty: bool = True
) -> tuple[float, float, float, float, float]:
    """MONAI's (Dice, IoU, HD95 in mm, HD95 in mm with its percentile in float64, NSD at
    `NSD_TOLERANCE_MM`) of one binary case, one channel, background included.

    `SurfaceDiceMetric` counts MONAI's own surface distances (float32) against the tolerance,
    so it is compared as it is: a count does not round.

    `HausdorffDistanceMetric` computes in float32 throughout: its surface distances, and the
    95th percentile by `torch.quantile`, whose interpolation point q·(n - 1) is rounded to
    float32 too, so with thousands of surface voxels it lands up to ~1e-4 of a rank away. The
    fourth value takes MONAI's own surfaces and distances (`get_edge_surface_distance`, the
    metric's first step) and only the percentile in float64; NaN when a mask is empty.
    """
    import torch
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDiceMetric
    from monai.metrics.utils import get_edge_surface_distance

    y = torch.from_numpy(reference[None, None].astype(np.float32))
    y_pred = torch.from_numpy(prediction[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on each empty mask; the table shows the values
        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=ignore_empty)(y_pred, y)
        iou = MeanIoU(include_background=True, reduction="none", ignore_empty=ignore_empty)(y_pred, y)
        hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            y_pred, y, spacing=list(spacing)
        )
        nsd = SurfaceDiceMetric(class_thresholds=[NSD_TOLERANCE_MM], include_background=True, reduction="none")(
            y_pred, y, spacing=list(spacing)
        )
        hd95_float64 = float("nan")
        if reference.any() and prediction.any():
            _, distances, _ = get_edge_surface_distance(y_pred[0, 0], y[0, 0], spacing=list(spacing), symmetric=True)
            hd95_float64 = max(float(torch.quantile(d.double(), 0.95)) for d in distances)
    return float(dice), float(iou), float(hd95), hd95_float64, float(nsd)


def metric_parity(n_random: int) -> tuple[float, float, float, list[str]]:
    """Print the parity table.

    Returns:
        (the largest |medseg - MONAI| / max(1, |MONAI|) of Dice, IoU, HD95 with MONAI's
        percentile in float64 and NSD, where both define a value; the largest |medseg - MONAI| of the
        same; the largest |medseg - MONAI| of HD95 against `HausdorffDistanceMetric` itself;
        the (case, metric) pairs that one library defines and the other does not).
    """
    print(
        f"{'case':<20} {'shape':>8} {'spacing mm':>11} {'Dice medseg':>11} {'MONAI':>10} {'IoU medseg':>11} {'MONAI':>10} "
        f"{'HD95 medseg':>12} {'MONAI':>10} {'MONAI f64':>10} {'NSD medseg':>10} {'MONAI':>10} {'|diff|':>8}"
    )
    worst_scaled = worst_abs = worst_metric_object = 0.0
    undefined_on_one_side = []
    empty_rows = []
    for name, reference, prediction, spacing in mask_cases(np.random.default_rng(7), n_random):
        ours = (dice_score(reference, prediction), iou_score(reference, prediction), hausdorff_distance_95(reference, prediction, spacing),
                normalized_surface_dice(reference, prediction, spacing, NSD_TOLERANCE_MM))
        theirs = monai_metrics(reference, prediction, spacing)
        compared = (theirs[0], theirs[1], theirs[3], theirs[4])
        differences = []
        for metric, a, b in zip(("Dice", "IoU", "HD95", "NSD"), ours, compared):
            if math.isfinite(a) and math.isfinite(b):
                differences.append(abs(a - b))
                worst_scaled = max(worst_scaled, abs(a - b) / max(1.0, abs(b)))
            elif not (a == b or (math.isnan(a) and math.isnan(b))):
                undefined_on_one_side.append(f"{name}: {metric} medseg {a} / MONAI {b}")
        if math.isfinite(ours[2]) and math.isfinite(theirs[2]):
            worst_metric_object = max(worst_metric_object, abs(ours[2] - theirs[2]))
        case_worst = max(differences, default=0.0)
        worst_abs = max(worst_abs, case_worst)
        shape = "x".join(str(n) for n in reference.shape)
        print(
            f"{name:<20} {shape:>8} {'x'.join(f'{s:g}' for s in spacing):>11} {ours[0]:11.7f} {theirs[0]:10.7f} "
            f"{ours[1]:11.7f} {theirs[1]:10.7f} {ours[2]:12.7f} {theirs[2]:10.6f} {theirs[3]:10.6f} "
            f"{ours[3]:10.7f} {theirs[4]:10.7f} {case_worst:8.1e}"
        )
        if not (reference.any() and prediction.any()):
            empty_rows.append((name, ours, theirs, monai_metrics(reference, prediction, spacing, ignore_empty=False)))
    print("|diff|: Dice, IoU, HD95 against 'MONAI f64' (MONAI's surface distances, the percentile in float64), "
          f"and NSD at {NSD_TOLERANCE_MM:g} mm against SurfaceDiceMetric")
    print(f"max |medseg - MONAI| where both define a value: {worst_abs:.2e}; scaled by max(1, |MONAI|): {worst_scaled:.2e}")
    print(f"HD95 against HausdorffDistanceMetric itself (float32 torch.quantile): max |diff| {worst_metric_object:.2e} mm")
    print("\nempty masks (the conventions differ; parity is only asked where both define a value):")
    print(f"{'case':<20} {'medseg Dice/IoU/HD95/NSD':>26} {'MONAI default (ignore_empty=True)':>34} {'MONAI ignore_empty=False':>26}")
    for name, ours, theirs, theirs_kept in empty_rows:
        print(
            f"{name:<20} {'/'.join(f'{v:g}' for v in ours):>26} {'/'.join(f'{v:g}' for v in (*theirs[:3], theirs[4])):>34} "
            f"{'/'.join(f'{v:g}' for v in theirs_kept[:2]):>26}"
        )
    print("  medseg: Dice/IoU NaN only when both are empty, 0 when exactly one is; HD95 NaN when either is")
    print("  (hausdorff_distance_95_penalized counts a miss as the image diagonal). MONAI's default")
    print("  ignore_empty=True makes Dice/IoU NaN whenever the reference is empty; ignore_empty=False")
    print("  gives 1 for both empty and 0 for one empty. Its HD95 is NaN when either mask is empty.")
    print("  NSD, both: NaN when both are empty, 0 when exactly one is.")
    return worst_scaled, worst_abs, worst_metric_object, undefined_on_one_side


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 96x96x64 volume, one repeat, two training steps")
    parser.add_argument("--repeats", type=int, default=None, help="warm sliding-window calls per side (default 3, quick 1)")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="planning.memory_gb, for medseg's inference batch")
    parser.add_argument("--runs", type=int, default=None,
                        help="fresh processes per side and precision; each figure is their median (default 3, quick 1)")
    args = parser.parse_args()
    missing = [name for name in ("torch", "monai") if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"benchmarks/peers.py needs {' and '.join(missing)} (the `peers` extra), kept out of the main .venv: "
            "python3 -m venv .venv-peers && .venv-peers/bin/pip install -e '.[cpu,peers]', then "
            "run .venv-peers/bin/python benchmarks/peers.py"
        )

    from medseg.models.precision import cpu_has_bfloat16, machine_description, precision_candidates

    volume_shape, window, overlap, sigma_scale = ((96, 96, 64) if args.quick else (160, 160, 96)), (64, 64, 64), 0.5, 0.125
    held = case_arrays_bytes(volume_shape, 1, 1, mirrored=False)
    infer_batch = windows_per_batch(
        window, unet_features_per_voxel(BASE_FILTERS, DEPTH, 3), activation_budget_gb(args.memory_gb, held),
        n_windows=len(sliding_window_grid(volume_shape, window, overlap)),
    )
    setup = Setup(
        volume_shape=volume_shape, window=window, overlap=overlap, sigma_scale=sigma_scale, infer_batch=infer_batch,
        train_batch=4,  # conv3d.training.batch_size
        learning_rate=0.002,  # conv3d.training.learning_rate
        repeats=args.repeats or (1 if args.quick else 3), train_steps=2 if args.quick else 4,
    )
    machine = machine_description()
    bf16 = cpu_has_bfloat16()
    planned_depth = len(poolings_per_axis(window, (1.0, 1.0, 1.0), max_depth=DEPTH))
    n_windows = len(sliding_window_grid(volume_shape, window, overlap))
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, CPU bfloat16 units: {bf16}; TensorFlow {machine['tensorflow']} "
          f"(its default pools: one thread per core); torch.set_num_threads({os.cpu_count()}) = os.cpu_count()")
    print(f"volume {volume_shape} float32 (smoothed noise), window {window}, overlap {overlap}, Gaussian sigma "
          f"{sigma_scale} x window, {n_windows} windows, sw_batch_size {infer_batch} (medseg's windows_per_batch at "
          f"planning.memory_gb={args.memory_gb:g}), training batch {setup.train_batch}, {setup.repeats} repeats; poolings_per_axis plans {planned_depth} stages for "
          f"this window at 1 mm")

    runs = args.runs or (1 if args.quick else 3)
    every: dict[tuple[str, str], list[dict]] = {}
    for run in range(runs):  # the sides take turns, so a slow spell of the machine falls on both
        print(f"  run {run + 1} of {runs}:", flush=True)
        for precision in precision_candidates("auto"):
            print(f"    measuring medseg {precision} ...", flush=True)
            every.setdefault(("medseg", precision), []).append(in_fresh_process(measure_medseg, setup, precision))
        print("    measuring MONAI float32 ...", flush=True)
        every.setdefault(("MONAI", "float32"), []).append(
            in_fresh_process(measure_monai, setup, "float32", ("bfloat16",) if bf16 and run == 0 else ()))
        probe_s = every["MONAI", "float32"][0]["probe_s"]
        fastest_policy, _ = min(probe_s, key=probe_s.get)
        if fastest_policy == "bfloat16":
            print("    measuring MONAI bfloat16 ...", flush=True)
            every.setdefault(("MONAI", "bfloat16"), []).append(in_fresh_process(measure_monai, setup, "bfloat16"))
    results = {key: median_of_runs(values) for key, values in every.items()}

    ours, theirs = results["medseg", "float32"], results["MONAI", "float32"]
    print(f"\nnetworks: medseg build_unet3d(base_filters={BASE_FILTERS}, depth={DEPTH}): {ours['trainable']:,} trainable "
          f"(+{ours['other_weights']:,} BatchNorm moving statistics)")
    print(f"          MONAI BasicUNet(features={basic_unet_features(BASE_FILTERS)}, norm=batch, act=relu): "
          f"{theirs['trainable']:,} trainable (+{theirs['other_weights']:,} BatchNorm running statistics)")
    print("          (BasicUNet's last up-convolution keeps 16 channels where medseg's halves them to 8, and its "
          "convolutions have biases, which medseg's 3D U-Net leaves out before a normalization: "
          f"{theirs['trainable'] - ours['trainable']:+,})")
    probe = ", ".join(f"{policy} {layout} {seconds:.3f} s" for (policy, layout), seconds in probe_s.items())
    print(f"MONAI forward pass of one batch of {setup.train_batch}: {probe}; torch threads {theirs['threads']}")
    for (side, precision), r in results.items():
        if side == "MONAI":
            print(f"MONAI {precision} runs in {r['layout']}")
    if bf16 and ("MONAI", "bfloat16") not in results:
        print("MONAI bfloat16 autocast is slower than float32 on that pass here: not measured further")

    voxels = math.prod(volume_shape)
    print("\ninference: s/volume the median of the warm calls; network s the bare network on the same windows and")
    print("batches; engine s the rest (cutting windows, weighting, stitching); peak RSS above the built process")
    print(f"{'':<8} {'precision':>15} {'s/volume':>9} {'Mvoxel/s':>9} {'network s':>10} {'engine s':>9} "
          f"{'first call s':>12} {'peak RSS +MiB first':>20} {'warm':>8}")
    for (side, precision), r in results.items():
        print(f"{side:<8} {precision:>15} {r['sliding_s']:9.3f} {voxels / r['sliding_s'] / 1e6:9.3f} {r['network_s']:10.3f} "
              f"{r['sliding_s'] - r['network_s']:9.3f} {r['first_s']:12.3f} {r['first_growth_mib']:20.0f} {r['steady_growth_mib']:8.0f}")
    print(f"\n{'training':<8} {'precision':>15} {'s/step':>9} {'samples/s':>10}   (median of {setup.train_steps} steps after a warm-up)")
    for (side, precision), r in results.items():
        print(f"{side:<8} {precision:>15} {r['train_step_s']:9.3f} {setup.train_batch / r['train_step_s']:10.3f}")

    def best(side: str, key: str) -> tuple[str, dict]:
        return min(((p, r) for (s, p), r in results.items() if s == side), key=lambda item: item[1][key])

    (ours_infer_p, ours_infer), (theirs_infer_p, theirs_infer) = best("medseg", "sliding_s"), best("MONAI", "sliding_s")
    (ours_train_p, ours_train), (theirs_train_p, theirs_train) = best("medseg", "train_step_s"), best("MONAI", "train_step_s")
    inference_ratio = theirs_infer["sliding_s"] / ours_infer["sliding_s"]
    training_ratio = theirs_train["train_step_s"] / ours_train["train_step_s"]
    print(f"\nfastest: inference medseg {ours_infer_p} / MONAI {theirs_infer_p}: {inference_ratio:.2f}x voxels/s; "
          f"training medseg {ours_train_p} / MONAI {theirs_train_p}: {training_ratio:.2f}x samples/s "
          f"(the medians of {runs} runs)")
    if runs > 1:
        pairs = zip(every["MONAI", theirs_infer_p], every["medseg", ours_infer_p], every["MONAI", theirs_train_p],
                    every["medseg", ours_train_p])
        print("  each run: " + "; ".join(f"inference {a['sliding_s'] / b['sliding_s']:.2f}x, training "
                                         f"{c['train_step_s'] / d['train_step_s']:.2f}x" for a, b, c, d in pairs))
    if inference_ratio < 1.0:
        print(f"where medseg loses on inference: network {ours_infer['network_s']:.3f} s vs MONAI's {theirs_infer['network_s']:.3f} s, "
              f"engine {ours_infer['sliding_s'] - ours_infer['network_s']:.3f} s vs {theirs_infer['sliding_s'] - theirs_infer['network_s']:.3f} s")
    if training_ratio < 1.0:
        print(f"where medseg loses on training: {ours_train['train_step_s']:.3f} s per step vs MONAI's {theirs_train['train_step_s']:.3f} s "
              f"(network and Adam alike; medseg's step also computes its dice and iou metrics)")

    print("\nstitching engines, one predictor (window x a ramp along x, so the weights matter):")
    print("  both Gaussians have sigma = sigma_scale x window per axis, centred at (w - 1) / 2; medseg scales the map to a")
    print("  maximum of 1 and raises only float32 underflow (nnU-Net), MONAI floors every weight at 1e-3")
    # torch in a process of its own here too: this one has TensorFlow loaded (the hardware probe), and torch's
    # import of triton after it crashed the interpreter (Segmentation fault; AMD EPYC, torch 2.14.1, 2026-12-07)
    stitch_rows = in_fresh_process(stitching_parity, setup)
    for what, difference, share, ours_s, theirs_s in stitch_rows:
        print(f"  {what:<42} max abs diff {difference:.2e}, voxels > 1e-3 apart {share:7.3%}; engine alone: medseg {ours_s:.3f} s, MONAI {theirs_s:.3f} s")
    same_map = max(row[1] for row in stitch_rows if row[0] != "gaussian, MONAI's own map")

    print("\nmetric parity (medseg reference/prediction = MONAI y/y_pred; background included, one channel):")
    worst_scaled, _, _, undefined = in_fresh_process(metric_parity, 3 if args.quick else 6)
    for line in undefined:
        print(f"  defined on one side only: {line}")

    return report_targets(
        [
            Target(f"inference voxels/s medseg ({ours_infer_p}) / MONAI ({theirs_infer_p})", inference_ratio, ">=", SPEED_TARGET),
            Target(f"training samples/s medseg ({ours_train_p}) / MONAI ({theirs_train_p})", training_ratio, ">=", SPEED_TARGET),
            Target("metric parity |diff| / max(1, |MONAI|) where both define a value", worst_scaled, "<=", PARITY_TOLERANCE),
            Target("stitching on the same weights, max abs difference", same_map, "<=", STITCH_TOLERANCE),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
