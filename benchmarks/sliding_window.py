"""Sliding-window inference: its overhead over the bare model, and seamless stitching.

Measured side by side in one run, with the same untrained 3D U-Net, the same window grid and
the same batch size:
  1. `sliding_window_predict` on a whole volume (pad, cut windows batch by batch, predict,
     Gaussian-weighted blending, crop back), with `model.predict_on_batch` as the predictor;
  2. bare Keras: `model.predict_on_batch` on exactly the same windows, cut beforehand with
     `extract_windows` on the same `sliding_window_grid` and fed in the same batches.
The two are timed alternately `--repeats` times after a warm-up each (tracing excluded), and the
medians are compared: the ratio sliding / bare is the stitching overhead (target <= 1.10).
`model.predict` on the whole window stack (same batch size) is printed for reference.

It then checks the stitching alone: with a predictor that returns its input, the output must be
the input everywhere (max abs error <= 1e-5), on volumes that are not a multiple of the window,
smaller than the window on every axis, and smaller on some axes only, for several overlaps.
A seam (a voxel covered by no window, or weights that do not normalise) would show up there.
The script exits 1 when either target is missed, so `make benchmarks` fails.

Run: .venv/bin/python benchmarks/sliding_window.py [--shape 96 96 40] [--patch 32] [--batch 4]
It needs no data: the volume is random noise (the model is untrained; only time matters).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402
from _targets import Target, report_targets  # noqa: E402

from medseg.models import build_unet3d  # noqa: E402
from medseg.patching import (  # noqa: E402
    extract_windows,
    pad_to_window,
    sliding_window_grid,
    sliding_window_predict,
)

SEAM_TOLERANCE = 1e-5


def bare_predict(model: keras.Model, windows: np.ndarray, batch: int) -> np.ndarray:
    """`predict_on_batch` over a prepared window stack, `batch` windows at a time."""
    return np.concatenate(
        [np.asarray(model.predict_on_batch(windows[i : i + batch])) for i in range(0, len(windows), batch)]
    )


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def seam_check(shapes: list[tuple[int, int, int]], window: tuple[int, int, int], overlaps: list[float]) -> float:
    """Largest |output - input| of `sliding_window_predict` with the identity predictor."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for shape in shapes:
        volume = rng.normal(size=shape).astype(np.float32)
        for overlap in overlaps:
            out = sliding_window_predict(volume, lambda x: x, window, overlap=overlap, batch_size=3)
            assert out.shape == volume.shape, (out.shape, volume.shape)
            error = float(np.abs(out - volume).max())
            worst = max(worst, error)
            print(f"  identity, volume {shape}, overlap {overlap:.2f}: max abs error {error:.2e}")
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 40], help="volume (X Y Z), voxels")
    parser.add_argument("--patch", type=int, default=32, help="cubic window = training patch, voxels")
    parser.add_argument("--batch", type=int, default=4, help="windows per predict call")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    window = (args.patch,) * 3
    keras.utils.set_random_seed(0)
    model = build_unet3d((*window, 1), base_filters=8, depth=2)
    volume = np.random.default_rng(0).normal(size=args.shape).astype(np.float32)

    # The very same windows for the bare model: same padding, grid and batch size.
    padded, _ = pad_to_window(volume, window)
    grid = sliding_window_grid(padded.shape, window, args.overlap)
    windows = extract_windows(padded, grid, window)

    def sliding():
        return sliding_window_predict(volume, model.predict_on_batch, window, overlap=args.overlap, batch_size=args.batch)

    def bare():
        return bare_predict(model, windows, args.batch)

    def keras_predict():
        return model.predict(windows, batch_size=args.batch, verbose=0)

    sliding(), bare(), keras_predict()  # warm-up: tracing and first allocations
    sliding_times, bare_times = [], []
    for _ in range(args.repeats):  # alternate, so load from other processes hits both alike
        sliding_times.append(timed(sliding))
        bare_times.append(timed(bare))
    predict_time = timed(keras_predict)  # reference only: timed once
    sliding_median, bare_median = statistics.median(sliding_times), statistics.median(bare_times)

    print(
        f"volume {tuple(args.shape)}, window {window}, overlap {args.overlap}, "
        f"{len(grid)} windows in batches of {args.batch}, {args.repeats} repeats, {os.cpu_count()} CPUs"
    )
    print(f"sliding_window_predict:            {sliding_median:8.3f} s (median; all {', '.join(f'{t:.3f}' for t in sliding_times)})")
    print(f"bare predict_on_batch, same stack: {bare_median:8.3f} s (median; all {', '.join(f'{t:.3f}' for t in bare_times)})")
    print(f"model.predict, same stack (ref.):  {predict_time:8.3f} s (once)")
    print(f"overhead ratio sliding / bare:     {sliding_median / bare_median:8.3f}")

    print("seam check (predictor returns its input):")
    p = args.patch
    shapes = [
        tuple(args.shape),              # not a multiple of the window
        (p + 13, 2 * p + 7, p + 1),     # one voxel past a window on an axis
        (p // 2 + 3, p // 3, p // 4),   # smaller than the window on every axis
        (2 * p + 5, p // 2, p),         # smaller on one axis, exactly the window on another
    ]
    worst = seam_check(shapes, window, overlaps=[0.0, 0.25, 0.5, 0.75])
    print(f"max abs error over all volumes:    {worst:.2e}")
    return report_targets(
        [
            Target("overhead ratio sliding / bare", sliding_median / bare_median, "<=", 1.10),
            Target("identity stitching max abs error", worst, "<=", SEAM_TOLERANCE),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
