"""TensorFlow against onnxruntime: `Segmenter.segment` of a real-size scan on each engine, and the
two serving environments.

For each model (the 2D U-Net of `unet`'s defaults, 32-64-128 filters and a 256-filter
bottleneck over whole 256x256 slices; the 3D U-Net of `conv3d`'s defaults at depth 3, 8 base
filters, over 64^3 Gaussian-weighted windows at overlap 0.5) the same segmenter (random weights:
only time matters, and the ONNX export is the float32 clone of the same network) segments one
256x256x160 scan at 1 mm:

- on TensorFlow in float32, and in mixed_bfloat16 where the CPU has bfloat16 units (its
  fastest precision is compared);
- on onnxruntime in float32, its only precision on a CPU (it has no bfloat16 convolution).

Each engine runs in a spawned process of its own: the first `segment` (tracing, session set-up)
is timed apart, then the median of `--repeats`; peak RSS is the process's (`ru_maxrss`) after
the runs, less its RSS once the segmenter was built, so each figure is that engine's alone.

Then the environments: the installed size of `.venv` (TensorFlow) and of `.venv-serve-onnx`
(the onnxruntime variant's requirements, `make serve-onnx-env`), and the seconds from a fresh
interpreter to a loaded segmenter on each (imports and the model's load: what a server's start
waits on), median of 3.

Target: onnxruntime >= 1.0x TensorFlow in float32, per model (seconds per scan). The speed
against TensorFlow at its fastest precision is printed beside it.

Run: .venv/bin/python benchmarks/engines.py [--repeats 3] [--shape 256 256 160] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _targets import Target, report_targets  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SERVE_ONNX = ROOT / ".venv-serve-onnx"


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _segmenter(model: str, precision: str):
    """The default-sized segmenter of `model` in `precision`, with its ONNX export."""
    import keras

    from medseg.inference import Segmenter, SegmenterPlan
    from medseg.inference.engines import PASSED, ParityRecord
    from medseg.models.conv3d import build_unet3d
    from medseg.models.onnx_export import export_onnx
    from medseg.models.precision import with_precision
    from medseg.models.unet import with_input_shape
    from medseg.models.unet2d import build_unet2d
    from medseg.patching.sliding_window import unet_features_per_voxel

    keras.utils.set_random_seed(0)
    common = dict(target_spacing=(1.0, 1.0, 1.0), interpolation_order=1, clip_percentiles=None, crop_margin=None,
                  channel=None, label_mode="binary", classes={"1": "structure"}, lateralized=[], threshold=0.5,
                  sigma_scale=0.125, memory_gb=4.0)
    if model == "unet":
        network = with_input_shape(build_unet2d((256, 256, 1), base_filters=32, depth=3), (None, None, 1))
        plan = SegmenterPlan(model_key="unet", display_name="UNet", window="slice", depth=3, patch_size=None, overlap=0.0,
                             features_per_voxel=unet_features_per_voxel(32, 3, 2), **common)
    else:
        network = build_unet3d((64, 64, 64, 1), base_filters=8, depth=3)
        plan = SegmenterPlan(model_key="conv3d", display_name="UNet3D", window="patch", depth=0, patch_size=(64, 64, 64),
                             overlap=0.5, features_per_voxel=unet_features_per_voxel(8, 3, 3), **common)
    network = with_precision(network, precision)
    segmenter = Segmenter(network, plan)
    segmenter.onnx, segmenter.parity = export_onnx(network, slices=model == "unet"), ParityRecord(PASSED, "benchmark")
    return segmenter


def _measure(model: str, engine: str, precision: str, shape: tuple[int, int, int], repeats: int, queue) -> None:
    """In a spawned process: one engine's seconds per scan and peak RSS growth."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    from medseg.imaging.io import Volume

    segmenter = _segmenter(model, precision)
    if engine == "onnxruntime":
        segmenter.use_engine("onnxruntime")
        segmenter.model = None  # nothing of TensorFlow runs
    rng = np.random.default_rng(0)
    scan = Volume((rng.normal(0, 1, size=shape) * 100).astype(np.float32), np.eye(4))
    baseline = _rss_mb()
    start = time.perf_counter()
    segmenter.segment(scan)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        segmenter.segment(scan)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"model": model, "engine": engine, "precision": precision, "first_s": first,
               "seconds": statistics.median(seconds), "runs": seconds, "peak_rss_growth_mb": peak - baseline})


def measure(model: str, engine: str, precision: str, shape, repeats: int) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(model, engine, precision, tuple(shape), repeats, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{model} on {engine} ({precision}) failed (exit {process.exitcode})")
    return queue.get()


LOAD = """
import sys, time
start = time.perf_counter()
from medseg.inference.ensemble import load_segmenter
load_segmenter(sys.argv[1], sys.argv[2])
print(time.perf_counter() - start)
"""


def _site_packages_mb(venv: Path) -> float:
    out = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0])


def environments(folder: Path) -> dict:
    """Installed size and seconds to a loaded segmenter, per environment."""
    rows = {}
    for name, python, engine in (("tensorflow", ROOT / ".venv" / "bin" / "python", "tensorflow"),
                                 ("onnxruntime", SERVE_ONNX / "bin" / "python", "onnxruntime")):
        if not python.exists():
            print(f"{name}: {python.parent.parent} is missing ({'make serve-onnx-env' if name == 'onnxruntime' else 'make'} "
                  "builds it); not measured")
            continue
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "2"}
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run([str(python), "-c", LOAD, str(folder), engine], env=env, check=True, capture_output=True)
            seconds.append(time.perf_counter() - start)
        rows[name] = {"installed_mb": _site_packages_mb(python.parent.parent), "start_s": statistics.median(seconds)}
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 256, 160))
    parser.add_argument("--models", nargs="+", default=("unet", "conv3d"), choices=("unet", "conv3d"))
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from medseg.models.precision import cpu_has_bfloat16, read_cpuinfo

    bf16 = cpu_has_bfloat16(read_cpuinfo())
    model_name = next((line.split(":", 1)[1].strip() for line in read_cpuinfo().splitlines() if line.startswith("model name")),
                      platform.processor() or "unknown CPU")
    print(f"machine: {model_name}, {os.cpu_count()} cores, bfloat16 units: {'yes' if bf16 else 'no'}; "
          f"scan {'x'.join(map(str, args.shape))}, median of {args.repeats}")
    rows, targets = [], []
    for model in args.models:
        tf32 = measure(model, "tensorflow", "float32", args.shape, args.repeats)
        candidates = [tf32] + ([measure(model, "tensorflow", "mixed_bfloat16", args.shape, args.repeats)] if bf16 else [])
        ort = measure(model, "onnxruntime", "float32", args.shape, args.repeats)
        fastest = min(candidates, key=lambda row: row["seconds"])
        for row in (*candidates, ort):
            rows.append(row)
            print(f"{model:7s} {row['engine']:12s} {row['precision']:15s} {row['seconds']:7.2f} s/scan "
                  f"(first {row['first_s']:.2f} s)  peak RSS +{row['peak_rss_growth_mb']:.0f} MB")
        print(f"{model:7s} onnxruntime / TensorFlow float32: {tf32['seconds'] / ort['seconds']:.2f}x; "
              f"/ TensorFlow at its fastest ({fastest['precision']}): {fastest['seconds'] / ort['seconds']:.2f}x")
        targets.append(Target(f"{model}: onnxruntime speed / TensorFlow float32", tf32["seconds"] / ort["seconds"], ">=", 1.0))
    with tempfile.TemporaryDirectory() as folder:
        segmenter = _segmenter("unet", "float32")
        segmenter.save(Path(folder) / "segmenter")
        envs = environments(Path(folder) / "segmenter")
    for name, row in envs.items():
        print(f"environment {name:12s} installed {row['installed_mb']:.0f} MB, a loaded segmenter after {row['start_s']:.2f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engines.json").write_text(json.dumps({"rows": rows, "environments": envs, "cpu": model_name,
                                                           "bfloat16": bf16, "cores": os.cpu_count()}, indent=2))
    return report_targets(targets)


if __name__ == "__main__":
    sys.exit(main())
