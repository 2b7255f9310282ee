"""Peak memory of 3D patch training: N cases against 4N cases.

Measured side by side in one run, without Kedro: 4N preprocessed-like cases (synthetic phantoms,
reoriented to RAS, z-scored float32 images and uint8 labels) are written as NIfTI files to a
temporary folder. Then, in a fresh child process per measurement, a 3D U-Net
(`build_unet3d`, compiled with `compile_segmentation_model`) trains for the same number of steps
on the first N cases, then on all 4N, fed as the `conv3d` pipeline feeds it:
`make_tf_dataset(lambda: patch_stream(load_case, ids, ...), augment=True)`, with `load_case`
reading the NIfTI files with `read_volume`. The peak resident set size of each child is read
from `os.wait4` (that child's own rusage), so the two measurements do not mix.

`patch_stream` holds one case and a bounded queue of patches, so memory should not grow with
the number of cases: the ratio peak(4N) / peak(N) should stay <= 1.25. The script exits 1
when it does not (or when a child fails), so `make benchmarks` fails.

Run: .venv/bin/python benchmarks/patch_memory.py [--cases 6] [--steps 25] [--batch 4] [--patch 32]
It synthesizes the phantoms itself, so it needs no data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from _targets import Target, report_targets  # noqa: E402


def write_cases(folder: Path, n_cases: int, size: int) -> float:
    """Write `n_cases` preprocessed-like cases; return their in-memory size in MiB."""
    from medseg.imaging.geometry import to_canonical
    from medseg.imaging.io import Volume, write_volume
    from medseg.imaging.normalization import zscore_normalize
    from medseg.synthetic.shapes import synthesize_case

    total = 0
    for index in range(n_cases):
        image, label, affine = synthesize_case(index, seed=0, in_plane_size=size)
        image = to_canonical(Volume(image, affine))
        label = to_canonical(Volume(label, affine))
        write_volume(Volume(zscore_normalize(image.data), image.affine), folder / f"case_{index:03d}_image.nii.gz")
        write_volume(Volume(label.data.astype(np.uint8), label.affine), folder / f"case_{index:03d}_label.nii.gz")
        total += image.data.size * 4 + label.data.size
    return total / 2**20


def child(args: argparse.Namespace) -> None:
    """Train for `args.steps` steps on the first `args.n` cases of `args.data`; print a JSON line."""
    import keras

    from medseg.imaging.io import read_volume
    from medseg.models import build_unet3d, compile_segmentation_model
    from medseg.patching import make_tf_dataset, patch_stream

    folder = Path(args.data)
    ids = [f"case_{index:03d}" for index in range(args.n)]
    loads = []

    def load_case(case_id: str) -> tuple[np.ndarray, np.ndarray]:
        loads.append(case_id)
        image = read_volume(folder / f"{case_id}_image.nii.gz", role="image").data
        label = read_volume(folder / f"{case_id}_label.nii.gz", role="label").data
        return image, label

    shape = (args.patch,) * 3
    keras.utils.set_random_seed(0)
    model = compile_segmentation_model(build_unet3d((*shape, 1), base_filters=8, depth=2))
    dataset = make_tf_dataset(
        lambda: patch_stream(load_case, ids, shape, samples_per_volume=8, queue_length=64, foreground_fraction=0.33, seed=0),
        (*shape, 1),
        args.batch,
        augment=True,
    )
    model.fit(dataset, epochs=1, steps_per_epoch=args.steps, verbose=0)
    print(json.dumps({"case_loads": len(loads), "distinct_cases": len(set(loads))}))


def measure(script_args: list[str]) -> tuple[float, float, dict]:
    """Run this script with `--child`; return (its peak RSS in MiB, seconds, its JSON line)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *script_args]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # stderr to a file: a full pipe would block the child
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        stdout = process.stdout.read()  # read before reaping, then this child's own rusage
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if process.returncode != 0:
            log.seek(0)
            sys.exit(f"child {command} failed (exit {process.returncode}):\n{log.read()[-4000:]}")
    return usage.ru_maxrss / 1024.0, seconds, json.loads(stdout.strip().splitlines()[-1])  # ru_maxrss: KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="N; the second run has 4N cases")
    parser.add_argument("--size", type=int, default=96, help="in-plane size of the phantoms, voxels")
    parser.add_argument("--steps", type=int, default=25, help="training steps per measurement")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--patch", type=int, default=32, help="cubic patch, voxels")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    folder = Path(tempfile.mkdtemp(prefix="medseg_patch_memory_"))
    try:
        all_cases_mib = write_cases(folder, 4 * args.cases, args.size)
        common = ["--data", str(folder), "--steps", str(args.steps), "--batch", str(args.batch), "--patch", str(args.patch)]
        results = {n: measure([*common, "--n", str(n)]) for n in (args.cases, 4 * args.cases)}
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    (small, small_s, small_info), (large, large_s, large_info) = results[args.cases], results[4 * args.cases]
    leak_ratio = (small + 0.75 * all_cases_mib) / small
    print(
        f"3D U-Net, patch {args.patch}^3, batch {args.batch}, {args.steps} steps, in-plane size {args.size}, "
        f"one child process per run, {os.cpu_count()} CPUs"
    )
    for n, peak, seconds, info in ((args.cases, small, small_s, small_info), (4 * args.cases, large, large_s, large_info)):
        print(
            f"peak RSS, {n} cases: {peak:8.1f} MiB   ({seconds:.0f} s; {info['case_loads']} case loads, "
            f"{info['distinct_cases']} distinct)"
        )
    print(f"ratio {4 * args.cases}/{args.cases} cases: {large / small:.3f}")
    print(f"difference: {large - small:+.1f} MiB; one case takes {all_cases_mib / (4 * args.cases):.1f} MiB in memory")
    print(
        f"sensitivity: the {4 * args.cases} cases take {all_cases_mib:.1f} MiB in memory; "
        f"holding them all would give a ratio near {leak_ratio:.2f}"
    )
    return report_targets([Target(f"peak RSS ratio {4 * args.cases}/{args.cases} cases", large / small, "<=", 1.25)])


if __name__ == "__main__":
    sys.exit(main())
