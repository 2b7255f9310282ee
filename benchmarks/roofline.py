"""How close the networks run to this machine's attainable peak, in each precision medseg runs
(a roofline, measured in one run; every figure the median of `--repeats` timings, 3 by default,
each the mean of as many calls as take a quarter of a second).

1. The peaks, measured here in float32 and in bfloat16 (where the CPU has bfloat16 units, or
   with `--bf16`, emulated; on a GPU also float16, a path not yet run): a large matmul (2048³, `tf.linalg.matmul`), and each model's
   dominant convolution alone (the same layer, batch and channels the model runs).
2. Each model (the 2D and 3D U-Nets at the sizes the planner gives the default phantoms,
   `benchmarks/precision.py`), per convolution (plain and transposed), timed alone at its own
   shape and batch in every precision: forward, and forward plus backward (the gradients of
   the input and the kernel, what a training step does with it); GFLOP/s, % of that
   precision's matmul peak, and share of the layers' summed time, so the layers that waste
   the hardware are named. Their summed times give the time-weighted per-layer bounds of
   inference (forward) and training (forward + backward).
3. Each model's training step (`train_on_batch`: forward, backward, Adam) and inference (the
   network as the segmenter runs it, normalizations folded) in every precision, in GFLOP/s,
   against that precision's matmul peak and per-layer bounds.
4. The end-to-end `Segmenter.segment` of a real-size scan (256×256×160 at 1 mm; random weights,
   default plan): seconds per scan, and the share of it spent in the network.

How FLOPs are counted: from the layers, by hand. A convolution costs
2 × kernel volume × input channels × output channels per output voxel; a transposed
convolution the same per *input* voxel; batch normalization, ReLU, pooling, concatenation and
the sigmoid are left out (less than 1 % of the convolutions here). A training step counts
3 × the forward FLOPs (the backward pass is two convolutions per convolution: the input's
gradient and the weights'), the usual convention; Adam's update is left out.

Targets (exit 1 on a miss):
- float32, set from the first run (Intel Xeon with AMX, 2026-12-04: 62 % and 59 %) at about two
  thirds of it: the 2D U-Net's training step >= 40 % of the float32 matmul peak; the 3D U-Net's
  inference >= 40 % of its own dominant convolution's rate (its 8-32-channel convolutions have
  few FLOPs per byte, so the matmul peak is not attainable for them);
- bfloat16, where the CPU has bfloat16 units (issue 39): each U-Net's training and inference
  >= 50 % of the bfloat16 matmul peak, or, where narrow layers make that impossible (50 % of the
  peak would take more than 80 % of the per-layer bound, which is then below 62.5 % of the
  peak), >= 80 % of that per-layer bound: the lower of the two targets;
- `segment` of a 256x256x160 scan spends >= 90 % of its time in the network.

Run: .venv/bin/python benchmarks/roofline.py [--repeats 3] [--bf16]
About 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _targets import Target, report_targets  # noqa: E402
from precision import phantom_median_shape  # noqa: E402
from scale_out import cpu_name  # noqa: E402

from medseg.imaging.io import Volume  # noqa: E402
from medseg.inference import Segmenter, SegmenterPlan  # noqa: E402
from medseg.models import build_unet2d, build_unet3d, compile_segmentation_model  # noqa: E402
from medseg.models.normalization import inference_network  # noqa: E402
from medseg.models.precision import cpu_has_bfloat16, dtype_policy  # noqa: E402
from medseg.patching.sliding_window import unet_features_per_voxel  # noqa: E402
from medseg.kinds.sizes import plan_patches, plan_slices  # noqa: E402

CONV = (keras.layers.Conv2D, keras.layers.Conv3D)
TRANSPOSED = (keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose)


def layer_flops(layer: keras.layers.Layer) -> float:
    """Forward FLOPs of one convolution for one sample (0 for any other layer)."""
    if not isinstance(layer, CONV + TRANSPOSED):
        return 0.0
    kernel = layer.kernel.shape  # (*k, in, out)
    per_voxel = 2.0 * float(np.prod(kernel))
    if isinstance(layer, TRANSPOSED):
        voxels = np.prod(layer.input.shape[1:-1])
    else:
        voxels = np.prod(layer.output.shape[1:-1])
    return per_voxel * float(voxels)


def forward_flops(model: keras.Model) -> float:
    return float(sum(layer_flops(layer) for layer in model.layers))


def dominant_conv(model: keras.Model) -> keras.layers.Layer:
    """The convolution with the most FLOPs."""
    return max((layer for layer in model.layers if isinstance(layer, CONV)), key=layer_flops)


def median_seconds(call, repeats: int, min_seconds: float = 0.25) -> float:
    """Seconds per call: the median of `repeats` timings after two warm-ups (tracing excluded),
    each timing the mean of as many consecutive calls as take about `min_seconds` (as `timeit`
    does), so that a millisecond layer is not timed by one noisy call."""
    call()
    start = time.perf_counter()
    call()
    calls = max(1, math.ceil(min_seconds / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def matmul_peak(dtype: tf.DType, repeats: int, n: int = 2048) -> float:
    """GFLOP/s of an n³ matmul."""
    a = tf.random.normal((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    run = tf.function(lambda: tf.linalg.matmul(a, b))
    seconds = median_seconds(lambda: run().numpy(), repeats)
    return 2.0 * n**3 / seconds / 1e9


def layer_seconds(layer: keras.layers.Layer, batch: int, dtype: str, repeats: int) -> tuple[float, float]:
    """(forward, forward + backward) seconds of one convolution alone, at its input shape and
    batch, in `dtype`, followed by a ReLU as in the network (so that the backward pass needs
    the forward's output, as a training step does): the backward pass computes the gradients
    of the input and the kernel for a random upstream gradient. Each call returns one value of
    each result, so that copying results out is not timed."""
    shape = tuple(layer.input.shape[1:])
    config = {**layer.get_config(), "dtype": dtype, "name": "alone"}
    alone = type(layer).from_config(config)
    x = tf.cast(tf.random.normal((batch, *shape)), dtype)
    upstream = tf.cast(tf.random.normal(alone(x).shape), dtype)

    def first(tensor):
        return tf.reshape(tensor, [-1])[0]

    forward = tf.function(lambda: first(tf.nn.relu(alone(x))))

    @tf.function
    def both():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(tf.nn.relu(alone(x)) * upstream, tf.float32))
        return [first(g) for g in tape.gradient(loss, [x, alone.kernel])]

    return (median_seconds(lambda: forward().numpy(), repeats),
            median_seconds(lambda: [g.numpy() for g in both()], repeats))


def layer_table(model: keras.Model, batch: int, dtypes: list[str], repeats: int) -> list[dict]:
    """Per convolution of `model` (plain and transposed), in each precision: its forward and
    forward + backward GFLOP/s timed alone at its own shape and batch, and its share of the sum
    of those times: the layers that take the time, and how far each is from what the hardware
    gives a large matmul."""
    rows = []
    for layer in model.layers:
        if not isinstance(layer, CONV + TRANSPOSED):
            continue
        row = {"layer": layer.name, "kernel": tuple(layer.kernel.shape), "input": tuple(layer.input.shape[1:]),
               "gflop": layer_flops(layer) * batch / 1e9}
        for dtype in dtypes:
            forward, both = layer_seconds(layer, batch, dtype, repeats)
            row[dtype] = {"gflops": row["gflop"] / forward, "seconds": forward,
                          "train_gflops": 3.0 * row["gflop"] / both, "train_seconds": both}
        rows.append(row)
    for dtype in dtypes:
        total = sum(row[dtype]["seconds"] for row in rows)
        train_total = sum(row[dtype]["train_seconds"] for row in rows)
        for row in rows:
            row[dtype]["share"] = row[dtype]["seconds"] / total
            row[dtype]["train_share"] = row[dtype]["train_seconds"] / train_total
    return rows


def per_layer_bounds(rows: list[dict], dtype: str) -> tuple[float, float]:
    """(training, inference) GFLOP/s if the model took only its convolutions' times alone: the
    time-weighted per-layer bound in `dtype`."""
    flops = sum(row["gflop"] for row in rows)
    return (3.0 * flops / sum(row[dtype]["train_seconds"] for row in rows),
            flops / sum(row[dtype]["seconds"] for row in rows))


def print_layer_table(name: str, rows: list[dict], dtypes: list[str], peaks: dict[str, float]) -> None:
    print(f"\n{name}, per convolution timed alone, forward | forward + backward (share of the layers' summed time; "
          "GFLOP/s and % of that precision's matmul peak):")
    print(f"  {'layer':<14} {'kernel':<22} {'input':<18}" + "".join(f"{d:>52}" for d in dtypes))
    for row in sorted(rows, key=lambda r: -r[dtypes[-1]]["train_share"]):
        cells = "".join(
            f"{row[d]['share']:>7.1%} {row[d]['gflops']:>7.1f} ({row[d]['gflops'] / peaks[d]:>4.0%}) |"
            f"{row[d]['train_share']:>7.1%} {row[d]['train_gflops']:>7.1f} ({row[d]['train_gflops'] / peaks[d]:>4.0%})  "
            for d in dtypes
        )
        print(f"  {row['layer']:<14} {str(row['kernel']):<22} {str(row['input']):<18}{cells}")


def model_rates(model: keras.Model, batch: int, repeats: int) -> tuple[float, float]:
    """(training, inference) GFLOP/s of a compiled model on one random batch: the training step
    as `fit` runs it, inference on the network as the segmenter runs it (normalizations folded)."""
    compiled = compile_segmentation_model(model, "adam", 1e-3, "bce+dice")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *model.input_shape[1:])).astype("float32")
    y = (x > 1.0).astype("float32")
    flops = forward_flops(model)
    network = inference_network(compiled)
    train = median_seconds(lambda: compiled.train_on_batch(x, y), repeats)
    infer = median_seconds(lambda: network.predict_on_batch(x), repeats)
    return 3.0 * flops * batch / train / 1e9, flops * batch / infer / 1e9


def segment_share(model: keras.Model, patch: tuple[int, int, int], depth: int) -> tuple[float, float]:
    """(seconds per scan, network share) of `Segmenter.segment` on a 256×256×160 scan at 1 mm."""
    plan = SegmenterPlan(
        model_key="conv3d", display_name="3D U-Net", window="patch", target_spacing=(1.0, 1.0, 1.0),
        interpolation_order=1, clip_percentiles=(0.5, 99.5), crop_margin=None, channel=None, label_mode="binary",
        classes={"1": "structure"}, lateralized=[], threshold=0.5, depth=depth, patch_size=patch, overlap=0.5,
        sigma_scale=0.125, features_per_voxel=unet_features_per_voxel(8, depth, 3), memory_gb=4.0,
    )
    segmenter = Segmenter(model, plan)
    network = [0.0]
    original = segmenter._predict_network_input

    def timed(image):
        start = time.perf_counter()
        out = original(image)
        network[0] += time.perf_counter() - start
        return out

    segmenter._predict_network_input = timed
    scan = Volume(np.random.default_rng(1).normal(100, 20, size=(256, 256, 160)).astype(np.float32), np.eye(4))
    start = time.perf_counter()
    segmenter.segment(scan)
    total = time.perf_counter() - start
    return total, network[0] / total


def precision_target(name: str, what: str, rate: float, peak: float, layer_bound: float) -> Target:
    """Issue 39's target in bfloat16: >= 50 % of the matmul peak, or, where narrow layers make that
    impossible, >= 80 % of the time-weighted per-layer bound. Impossible is read as: 50 % of the
    peak would take more than 80 % of the per-layer bound (the bound is below 62.5 % of the
    peak), since the step's other work (normalization, ReLU, loss, optimizer) never leaves the
    convolutions all of it. So the target is the lower of the two, and a narrow layer made faster
    never turns a met target into a missed one (a bound just above half the peak, with 50 %
    asked, did: 3D training at 87 % of a bound of 53 %)."""
    if 0.8 * layer_bound >= 0.5 * peak:
        return Target(f"{name} {what} in bfloat16 / the bfloat16 matmul peak", rate / peak, ">=", 0.5)
    return Target(f"{name} {what} in bfloat16 / its per-layer bound ({layer_bound:.0f} GFLOP/s, "
                  f"{layer_bound / peak:.0%} of the peak)", rate / layer_bound, ">=", 0.8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; each figure is their median")
    parser.add_argument("--bf16", action="store_true",
                        help="also measure bfloat16 where the CPU has no bfloat16 units (emulated); on by itself where it has them")
    args = parser.parse_args()
    median, spacing = phantom_median_shape()
    slices = plan_slices(median, 32, 3, 4.0)
    patches = plan_patches(median, spacing, 16384, 8, 4.0)
    size, patch, pools = slices["input_size"], tuple(patches["patch_size"]), patches["poolings"]
    units = cpu_has_bfloat16()
    print(f"{cpu_name()}, {os.cpu_count()} cores, bfloat16 units: {'yes' if units else 'no'}; TensorFlow {tf.__version__}; "
          f"every figure the median of {args.repeats} timings")

    gpu = bool(tf.config.list_physical_devices("GPU"))  # there float16 too (not run yet: no GPU was lent)
    dtypes = ([("float32", tf.float32)] + ([("bfloat16", tf.bfloat16)] if args.bf16 or units or gpu else [])
              + ([("float16", tf.float16)] if gpu else []))
    names = [name for name, _ in dtypes]
    peaks = {name: matmul_peak(dtype, args.repeats) for name, dtype in dtypes}
    for name, value in peaks.items():
        print(f"matmul 2048^3 {name}: {value:8.1f} GFLOP/s")

    builders = {
        "2D U-Net": (lambda: build_unet2d((size, size, 1), 32, 3), min(16, slices["batch_size"]), f"{size}x{size}"),
        "3D U-Net": (lambda: build_unet3d((*patch, 1), 8, len(pools), pool_sizes=pools), min(16, patches["batch_size"]),
                     "x".join(map(str, patch))),
    }
    results, targets, models = {}, [], {}
    for name, (build, batch, shape) in builders.items():
        model = models[name] = build()
        rows = layer_table(model, batch, names, args.repeats)
        print_layer_table(f"{name} {shape}, batch {batch}", rows, names, peaks)
        layer = dominant_conv(model)
        (dominant,) = [row for row in rows if row["layer"] == layer.name]  # its forward rate, timed in the table
        conv = {dtype: dominant[dtype]["gflops"] for dtype in names}
        print(f"\n{name} {shape}, batch {batch}: {forward_flops(model) / 1e9:.3f} GFLOP forward per sample; "
              f"dominant convolution {layer.name} {tuple(layer.kernel.shape)} on {tuple(layer.input.shape[1:])}: "
              + ", ".join(f"{d} {v:.1f} GFLOP/s" for d, v in conv.items()))
        for dtype in names:
            with dtype_policy("float32" if dtype == "float32" else f"mixed_{dtype}"):
                in_precision = build()
            train, infer = model_rates(in_precision, batch, args.repeats)
            train_bound, infer_bound = per_layer_bounds(rows, dtype)
            results[name, dtype] = {"conv": conv[dtype], "train": train, "infer": infer}
            for what, rate, bound in (("training step", train, train_bound), ("inference", infer, infer_bound)):
                print(f"  {dtype:<9} {what:<13} {rate:7.1f} GFLOP/s = {rate / peaks[dtype]:4.0%} of the {dtype} matmul peak, "
                      f"{rate / bound:4.0%} of the per-layer bound ({bound:.1f} GFLOP/s = {bound / peaks[dtype]:.0%} of the peak)")
            if dtype == "bfloat16" and units and not gpu:  # issue 39's targets are the CPU's
                targets += [precision_target(name, "training", train, peaks[dtype], train_bound),
                            precision_target(name, "inference", infer, peaks[dtype], infer_bound)]
        print(f"  float32 training step = {results[name, 'float32']['train'] / conv['float32']:.0%} of its dominant "
              f"convolution's forward rate, inference {results[name, 'float32']['infer'] / conv['float32']:.0%}")

    seconds, share = segment_share(models["3D U-Net"], patch, len(pools))
    print(f"\nSegmenter.segment, 3D U-Net, 256x256x160 at 1 mm, overlap 0.5: {seconds:.1f} s per scan, "
          f"network {share:.0%} of it")
    return report_targets([
        Target("2D U-Net training in float32 / the float32 matmul peak", results["2D U-Net", "float32"]["train"] / peaks["float32"],
               ">=", 0.40),
        Target("3D U-Net inference in float32 / its convolution's peak",
               results["3D U-Net", "float32"]["infer"] / results["3D U-Net", "float32"]["conv"], ">=", 0.40),
        *targets,
        Target("segment: network share of a 256x256x160 scan", share, ">=", 0.9),
    ])


if __name__ == "__main__":
    sys.exit(main())
