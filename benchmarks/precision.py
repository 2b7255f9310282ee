"""Training and inference speed in float32 and in the precisions `training.precision: auto` picks.

For the 2D U-Net and the 3D U-Net at the sizes the planner (`medseg.kinds.sizes`) gives the
default phantoms:
  1. the planner's own measurement (`medseg.kinds.plans.measure_precisions`, then
     `choose_precision`) decides `auto`'s policy for training and for inference, as a run would;
  2. then, side by side in this run with the same random batches, float32 and each policy are
     timed again, independently of the planner's figures.
Prints train and inference samples/s and the auto/float32 ratios.

Targets: on a CPU with bfloat16 units, the 2D U-Net trains >= 1.8x faster with `auto`. On any
hardware `auto`'s choice trains and predicts at least 0.95x as fast as float32 (a wrong choice
would be slower; 5 % is the noise of two timings here). Exits 1 on a miss.

Run: .venv/bin/python benchmarks/precision.py [--steps 8] [--also mixed_bfloat16]
`--also` adds a precision to the table for information (e.g. emulated bfloat16 on a CPU without it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _targets import Target, report_targets  # noqa: E402

from medseg.imaging.geometry import plan_case_geometry, to_canonical  # noqa: E402
from medseg.imaging.io import Volume  # noqa: E402
from medseg.synthetic.shapes import synthesize_case  # noqa: E402
from medseg.models import build_unet2d, build_unet3d, compile_segmentation_model  # noqa: E402
from medseg.kinds.plans import measure_precisions  # noqa: E402
from medseg.models.precision import choose_precision, cpu_has_bfloat16, gpu_has_bfloat16, precision_candidates  # noqa: E402
from medseg.kinds.sizes import plan_patches, plan_slices  # noqa: E402


def phantom_median_shape(n_cases: int = 6) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The median training-grid shape and spacing of the default phantoms (as the data pipeline plans them)."""
    shapes, spacings = [], []
    for index in range(n_cases):
        image, _, affine = synthesize_case(index, seed=42)
        spacings.append(to_canonical(Volume(image, affine)).spacing)
        shapes.append((image.shape, affine))
    target = tuple(float(v) for v in np.median(np.array(spacings), axis=0))
    grid = [plan_case_geometry(shape, affine, target).preprocessed_shape for shape, affine in shapes]
    return tuple(int(v) for v in np.median(np.array(grid), axis=0)), target


def samples_per_second(precision: str, build, shape: tuple[int, ...], batch: int, steps: int) -> tuple[float, float]:
    """(train, inference) samples/s of a freshly built model under `precision`."""
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        model = compile_segmentation_model(build(), "adam", 1e-3, "bce+dice")
    finally:
        keras.mixed_precision.set_dtype_policy(previous)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype("float32")
    y = (x > 1.0).astype("float32")
    for _ in range(2):  # trace and warm up
        model.train_on_batch(x, y)
        model.predict_on_batch(x)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    train = batch * steps / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        model.predict_on_batch(x)
    infer = batch * steps / (time.perf_counter() - start)
    return train, infer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--also", action="append", default=[], help="another precision to measure, for information")
    args = parser.parse_args()

    median, spacing = phantom_median_shape()
    slices = plan_slices(median, 32, 3, args.memory_gb)
    patches = plan_patches(median, spacing, 16384, 8, args.memory_gb)
    size, patch = slices["input_size"], tuple(patches["patch_size"])
    pools = patches["poolings"]
    models = {
        "unet": ("2D U-Net", (size, size, 1), min(16, slices["batch_size"]), lambda: build_unet2d((size, size, 1), 32, 3)),
        # batch 4: the default's explicit conv3d.training.batch_size
        "unet3d": ("3D U-Net", (*patch, 1), 4, lambda: build_unet3d((*patch, 1), 8, len(pools), pool_sizes=pools)),
    }
    bf16_cpu, bf16_gpu = cpu_has_bfloat16(), gpu_has_bfloat16()
    print(f"phantoms: median grid {median} at {tuple(round(s, 2) for s in spacing)} mm; "
          f"CPU bfloat16 units: {bf16_cpu}; GPU with bfloat16: {bf16_gpu}")
    targets = []
    for kind, (name, shape, batch, build) in models.items():
        compiled = lambda build=build: compile_segmentation_model(build(), "adam", 1e-3, "bce+dice")  # noqa: E731
        chosen = choose_precision(measure_precisions(precision_candidates("auto"), compiled, batch))
        auto = {"train": chosen["training"], "infer": chosen["inference"]}
        measured = {"float32": samples_per_second("float32", build, shape, batch, args.steps)}
        for precision in dict.fromkeys([*auto.values(), *args.also]):
            if precision not in measured:
                measured[precision] = samples_per_second(precision, build, shape, batch, args.steps)
        print(f"\n{name} {shape[:-1]}, batch {batch}; auto -> training {auto['train']}, inference {auto['infer']}")
        print(f"  the planner: {chosen['reason'] or 'float32 only'}")
        print(f"{'precision':>16} {'train samples/s':>16} {'infer samples/s':>16}")
        for precision, (train, infer) in measured.items():
            print(f"{precision:>16} {train:16.2f} {infer:16.2f}")
        train_ratio = measured[auto["train"]][0] / measured["float32"][0]
        infer_ratio = measured[auto["infer"]][1] / measured["float32"][1]
        print(f"auto/float32: train {train_ratio:.2f}x, inference {infer_ratio:.2f}x")
        if kind == "unet" and bf16_cpu and not bf16_gpu:
            targets.append(Target(f"{name} train speed-up with auto (bfloat16 CPU)", train_ratio, ">=", 1.8))
        targets.append(Target(f"{name}: auto trains as fast as float32 or faster", train_ratio, ">=", 0.95))
        targets.append(Target(f"{name}: auto predicts as fast as float32 or faster", infer_ratio, ">=", 0.95))
    return report_targets(targets) if targets else report_targets([Target("a model measured", 1.0, ">=", 1.0)])


if __name__ == "__main__":
    sys.exit(main())
