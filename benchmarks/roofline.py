"""How close the networks run to this machine's attainable peak (a roofline, measured in one run).

1. The peak, measured here: a large float32 matmul (2048³, `tf.linalg.matmul`) and, at each
   model's dominant shape, its most expensive convolution alone (the same layer, batch and
   channels the model runs), in float32 and in bfloat16 (`--bf16`: emulated on a CPU without
   bfloat16 units, so off by default there).
2. Each model, at the sizes the planner gives the default phantoms (`benchmarks/precision.py`):
   the training step (forward, backward, Adam) and the inference window, in GFLOP/s.
   Per model, a table of its convolutions (plain and transposed), each timed alone at its own
   shape and batch in every precision measured: GFLOP/s, % of that precision's matmul peak, and
   share of the layers' summed time, so the layers that waste the hardware are named; and each
   precision beyond float32 against that precision's bounds: the matmul peak, and the
   time-weighted per-layer bound (the layers' FLOPs over their summed time alone).
3. The end-to-end `Segmenter.segment` of a real-size scan (256×256×160 at 1 mm; random weights,
   default plan): seconds per scan, and the share of it spent in the network.

How FLOPs are counted: from the layers, by hand. A convolution costs
2 × kernel volume × input channels × output channels per output voxel; a transposed
convolution the same per *input* voxel; batch normalization, ReLU, pooling, concatenation and
the sigmoid are left out (less than 1 % of the convolutions here). A training step counts
3 × the forward FLOPs (the backward pass is two convolutions per convolution: the input's
gradient and the weights'), the usual convention; Adam's update is left out.

Targets, set from the first run (Intel Xeon with AMX, 2 cores, 2026-12-04, float32: the 2D
U-Net's training step at 62 % of the matmul peak, the 3D U-Net's inference at 59 % of its own
convolution's, the network 99 % of `segment`), at about two thirds of what was measured, since
timings on this shared VM vary by +-20 % between runs:
- the 2D U-Net's training step reaches >= 40 % of the float32 matmul peak (its convolutions have
  32-256 channels, enough to keep oneDNN's kernels busy);
- the 3D U-Net's inference reaches >= 40 % of the peak of its own dominant convolution: its
  8-32-channel convolutions have few FLOPs per byte, so the matmul peak is not attainable for
  them, and the convolution alone is the roofline that applies;
- `segment` of a 256x256x160 scan spends >= 90 % of its time in the network (the resampling,
  the z-score and the mapping back are done once per scan, the network ~1,000 windows).
The networks run in float32 here; in bfloat16 the peaks are 3.8x (matmul) and 6.6x (the 2D
convolution) higher on AMX, and the networks gain 1.2-1.8x (`benchmarks/precision.py`): the
small layers and the non-convolution ops (batch normalization, ReLU, casts) do not speed up
with the matrix units, so bfloat16 is further from its own peak.
Exits 1 on a miss.

Run: .venv/bin/python benchmarks/roofline.py [--repeats 5] [--bf16]
About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
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


def best_seconds(call, repeats: int) -> float:
    """The fastest of `repeats` calls after two warm-ups (tracing excluded)."""
    call()
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype: tf.DType, repeats: int, n: int = 2048) -> float:
    """GFLOP/s of an n³ matmul."""
    a = tf.random.normal((n, n), dtype=tf.float32)
    a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)
    run = tf.function(lambda: tf.linalg.matmul(a, b))
    seconds = best_seconds(lambda: run().numpy(), repeats)
    return 2.0 * n**3 / seconds / 1e9


def conv_peak(layer: keras.layers.Layer, batch: int, dtype: str, repeats: int) -> float:
    """GFLOP/s of the model's own dominant convolution alone, at its input shape and batch."""
    shape = tuple(layer.input.shape[1:])
    config = {**layer.get_config(), "dtype": dtype, "name": "alone"}
    alone = type(layer).from_config(config)
    x = tf.cast(tf.random.normal((batch, *shape)), dtype)
    alone(x)
    run = tf.function(lambda: alone(x))
    seconds = best_seconds(lambda: run().numpy(), repeats)
    return layer_flops(layer) * batch / seconds / 1e9


def layer_table(model: keras.Model, batch: int, dtypes: list[str], repeats: int) -> list[dict]:
    """Per convolution of `model` (plain and transposed), in each precision: its GFLOP/s timed
    alone at its own shape and batch, and its share of the sum of those times: the layers that
    take the time, and how far each is from what the hardware gives a large matmul."""
    rows = []
    for layer in model.layers:
        if not isinstance(layer, CONV + TRANSPOSED):
            continue
        row = {"layer": layer.name, "kernel": tuple(layer.kernel.shape), "input": tuple(layer.input.shape[1:]),
               "gflop": layer_flops(layer) * batch / 1e9}
        for dtype in dtypes:
            rate = conv_peak(layer, batch, dtype, repeats)
            row[dtype] = {"gflops": rate, "seconds": row["gflop"] / rate}
        rows.append(row)
    for dtype in dtypes:
        total = sum(row[dtype]["seconds"] for row in rows)
        for row in rows:
            row[dtype]["share"] = row[dtype]["seconds"] / total
    return rows


def print_layer_table(name: str, rows: list[dict], dtypes: list[str], peaks: dict[str, float]) -> None:
    print(f"\n{name}, per convolution timed alone (share of the layers' summed time; GFLOP/s and % of that precision's matmul peak):")
    print(f"  {'layer':<14} {'kernel':<22} {'input':<18}" + "".join(f"{d:>26}" for d in dtypes))
    for row in sorted(rows, key=lambda r: -r[dtypes[-1]]["share"]):
        cells = "".join(f"{row[d]['share']:>7.1%} {row[d]['gflops']:>8.1f} ({row[d]['gflops'] / peaks[d]:>4.0%})   " for d in dtypes)
        print(f"  {row['layer']:<14} {str(row['kernel']):<22} {str(row['input']):<18}{cells}")


def model_rates(model: keras.Model, batch: int, repeats: int) -> tuple[float, float]:
    """(training, inference) GFLOP/s of a compiled model on one random batch."""
    compiled = compile_segmentation_model(model, "adam", 1e-3, "bce+dice")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *model.input_shape[1:])).astype("float32")
    y = (x > 1.0).astype("float32")
    flops = forward_flops(model)
    train = best_seconds(lambda: compiled.train_on_batch(x, y), repeats)
    infer = best_seconds(lambda: compiled.predict_on_batch(x), repeats)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true",
                        help="also measure bfloat16 where the CPU has no bfloat16 units (emulated); on by itself where it has them")
    args = parser.parse_args()
    median, spacing = phantom_median_shape()
    slices = plan_slices(median, 32, 3, 4.0)
    patches = plan_patches(median, spacing, 16384, 8, 4.0)
    size, patch, pools = slices["input_size"], tuple(patches["patch_size"]), patches["poolings"]
    print(f"{cpu_name()}, {os.cpu_count()} cores; TensorFlow {tf.__version__}")

    dtypes = [("float32", tf.float32)] + ([("bfloat16", tf.bfloat16)] if args.bf16 or cpu_has_bfloat16() else [])
    peaks = {name: matmul_peak(dtype, args.repeats) for name, dtype in dtypes}
    for name, value in peaks.items():
        print(f"matmul 2048^3 {name}: {value:8.1f} GFLOP/s")

    models = {
        "2D U-Net": (build_unet2d((size, size, 1), 32, 3), min(16, slices["batch_size"]), f"{size}x{size}"),
        "3D U-Net": (build_unet3d((*patch, 1), 8, len(pools), pool_sizes=pools), 4, "x".join(map(str, patch))),
    }
    results = {}
    names = [name for name, _ in dtypes]
    for name, (model, batch, shape) in models.items():
        rows = layer_table(model, batch, names, args.repeats)
        print_layer_table(f"{name} {shape}, batch {batch}", rows, names, peaks)
        for dtype in names[1:]:  # each precision's model against its own time-weighted per-layer bound
            with dtype_policy(f"mixed_{dtype}"):
                mixed = (build_unet2d((size, size, 1), 32, 3) if name == "2D U-Net"
                         else build_unet3d((*patch, 1), 8, len(pools), pool_sizes=pools))
            train, infer = model_rates(mixed, batch, args.repeats)
            layers_s = sum(row[dtype]["seconds"] for row in rows)
            flops = sum(row["gflop"] for row in rows)
            print(f"  {dtype}: training {train:.1f} GFLOP/s, inference {infer:.1f} GFLOP/s = {infer / peaks[dtype]:.0%} of the "
                  f"{dtype} matmul peak, {infer / (flops / layers_s):.0%} of the time-weighted per-layer bound "
                  f"({flops / layers_s:.1f} GFLOP/s)")
        layer = dominant_conv(model)
        conv = {dtype: conv_peak(layer, batch, dtype, args.repeats) for dtype, _ in dtypes}
        train, infer = model_rates(model, batch, args.repeats)
        results[name] = {"conv": conv["float32"], "train": train, "infer": infer}
        print(f"\n{name} {shape}, batch {batch}: {forward_flops(model) / 1e9:.3f} GFLOP forward per sample")
        print(f"  dominant convolution {layer.name} {tuple(layer.kernel.shape)} on {tuple(layer.input.shape[1:])}: "
              + ", ".join(f"{d} {v:.1f} GFLOP/s" for d, v in conv.items()))
        print(f"  training step {train:8.1f} GFLOP/s = {train / peaks['float32']:.0%} of the matmul peak, "
              f"{train / conv['float32']:.0%} of its convolution")
        print(f"  inference     {infer:8.1f} GFLOP/s = {infer / peaks['float32']:.0%} of the matmul peak, "
              f"{infer / conv['float32']:.0%} of its convolution")

    seconds, share = segment_share(models["3D U-Net"][0], patch, len(pools))
    print(f"\nSegmenter.segment, 3D U-Net, 256x256x160 at 1 mm, overlap 0.5: {seconds:.1f} s per scan, "
          f"network {share:.0%} of it")
    return report_targets([
        Target("2D U-Net training / matmul peak", results["2D U-Net"]["train"] / peaks["float32"], ">=", 0.40),
        Target("3D U-Net inference / its convolution's peak", results["3D U-Net"]["infer"] / results["3D U-Net"]["conv"], ">=", 0.40),
        Target("segment: network share of a 256x256x160 scan", share, ">=", 0.9),
    ])


if __name__ == "__main__":
    sys.exit(main())
