"""The `data` pipeline on one process against a Dask LocalCluster, and an unchanged rerun.

Measured side by side in one run, each `kedro run --pipelines data` a child process in its
own fresh copy of the project, all reading the same phantoms in place (`data.source=msd`):

1. `compute.scheduler=sync` on N cases: the full run;
2. `compute.scheduler=local:W` (default 2 workers) on the same cases: speed-up = 1 / 2; the
   two projects' data layers must be identical, byte for byte;
3. the `sync` project run again with nothing changed: rerun / full, target <= 0.1.

Two sets (`--set`, default both):
- `real`: 16 cases of 256 x 256 x 160 (the size of a head CT or MR; 40 MiB a case in memory),
  made by the benchmark with the phantom generator. Targets on 2 cores: speed-up >= 1.7 on the
  per-case steps (the sum of each step's "<task>: N cases in S s", `medseg.runs.compute`) and
  >= 1.6 on the whole pipeline. Beside them the machine's own ceiling is measured: W `sync`
  runs side by side in W fresh copies, W times the work; where two independent processes do
  not get 1.7x the work done (shared caches and memory bandwidth, a VM's neighbours), no
  scheduler can, and the targets become 90 % (per-case steps) and 85 % (pipeline) of that
  ceiling. On an AMD EPYC VM (2026-12-06) two side-by-side preprocessing runs took 1.17-1.29x
  as long as one alone.
- `phantoms`: 48 default phantoms (96 x 96 x 24-40, 1.8 MiB and 50-100 ms of work a case):
  printed, no speed-up target. The cluster's 2-2.5 s start and the steps that stay in the
  driver (the split, the fingerprint, the plan) are a large share of so little work, so the
  speed-up is lower there; the rerun and identity targets still apply.

Two times per run: the pipeline's (Kedro's own "Pipeline execution completed in X sec": every
node, and for `local:W` the start of the cluster) and the whole command's (plus Python, Kedro
and MLflow start-up, 15-20 s on 2 cores whatever the data). The targets are on the pipeline's
time; the whole command's is printed beside it. The phantoms are written once before the clock
starts. Exits 1 when a target is missed or the outputs differ.

Run: .venv/bin/python benchmarks/scale_out.py [--set real phantoms] [--workers 2] [--keep]
About 9 minutes on 2 cores (the real set about 7, its ceiling included).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _targets import Target, report_targets
from data_memory import make_project_copy

LAYERS = ("02_intermediate", "03_primary")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# name: (cases, in-plane size, slices range, whether the speed-up has targets). The real set is
# synthesized at 128 x 128 x 40 (the generator fits its lesions to a phantom-sized volume) and
# upsampled to 256 x 256 x 160 (`upsample_dataset`).
SETS = {"real": (16, 256, [160, 160], True), "phantoms": (48, 96, [24, 40], False)}
REAL_SYNTHESIZED = (128, [40, 40])


def upsample_dataset(root: Path, in_plane: int, slices: int) -> None:
    """Every image and label of the MSD folder `root` resampled in place to `in_plane` x
    `in_plane` x `slices` (images linear, labels nearest), the voxel size shrunk to match, so
    the field of view and the anatomy stay the same."""
    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    for folder, order in (("imagesTr", 1), ("labelsTr", 0)):
        for path in sorted((root / folder).glob("*.nii.gz")):
            volume = nib.load(path)
            data = np.asanyarray(volume.dataobj)
            factors = (in_plane / data.shape[0], in_plane / data.shape[1], slices / data.shape[2])
            resized = ndimage.zoom(data, factors, order=order).astype(data.dtype)
            affine = volume.affine.copy()
            affine[:3, :3] = affine[:3, :3] / np.array(factors)
            nib.save(nib.Nifti1Image(resized, affine, volume.header), path)


def write_phantoms(root: Path, n_cases: int, in_plane: int = 96, slices: list[int] | None = None) -> Path:
    """`n_cases` phantoms (`in_plane` x `in_plane` x `slices`, default 96 x 96 x 24-40) in MSD layout."""
    from medseg.synthetic.phantoms import ensure_synthetic_dataset, synthesis_settings

    data = {
        "seed": 42,
        "synthetic": {
            "n_cases": n_cases, "in_plane_size": in_plane, "n_slices_range": slices or [24, 40],
            "in_plane_spacing_range": [0.8, 1.2], "slice_spacing_range": [1.5, 3.0], "n_lesions_range": [1, 4],
            "n_classes": 1,
        },
    }
    ensure_synthetic_dataset(root, synthesis_settings(data))
    return root


def timed_data_run(project: Path, msd: Path, scheduler: str, log_path: Path, sync_first: bool = True) -> float:
    """Seconds of `kedro run --pipelines data` in `project` (a child process)."""
    params = f"data.source=msd,data.msd_dir={msd},compute.scheduler={scheduler}"
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "data", "--params", params]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    # The previous run's files are still being written back to disk; a run that starts then
    # waits on that writeback in its own fsyncs. Each run starts with nothing dirty.
    if sync_first:
        os.sync()
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log_path.read_text().splitlines()[-30:]
        sys.exit(f"kedro run ({scheduler}) failed with exit {code}:\n" + "\n".join(tail))
    return seconds


def kedro_pipeline_seconds(log_path: Path) -> float:
    """The pipeline's own time, from Kedro's "Pipeline execution completed successfully in X sec"
    (the nodes, the cluster's start included; not Python's, Kedro's and MLflow's start-up)."""
    match = re.search(r"completed successfully in ([0-9.]+) sec", " ".join(log_path.read_text().split()))
    return float(match.group(1)) if match else float("nan")


def per_case_seconds(log_path: Path) -> float:
    """The per-case steps' own time: the sum of their "<task>: N cases in S s" lines."""
    text = " ".join(log_path.read_text().split())
    return sum(float(seconds) for seconds in re.findall(r": \d+ cases in ([0-9.]+) s\.", text))


def largest_case_mib(msd: Path) -> float:
    """In-memory size of the largest case as float32 (image) plus uint8 (label)."""
    import nibabel as nib
    import numpy as np

    return max(int(np.prod(nib.load(p).shape)) * 5 for p in (msd / "imagesTr").glob("*.nii.gz")) / 2**20


def layer_files(project: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(project)): path.read_bytes()
        for layer in LAYERS
        for path in sorted((project / "data" / layer).rglob("*"))
        if path.is_file()
    }


def side_by_side_ceiling(workdir: Path, msd: Path, workers: int, solo_per_case: float) -> dict:
    """The machine's own ceiling for this work: `workers` independent `sync` runs of the same
    cases at once, each in a fresh project copy. Together they do `workers` times the work of
    the solo `sync` run; the ceiling is that work over their per-case time, what no scheduler of
    `workers` processes can beat on this machine (shared caches, memory bandwidth, a VM's
    neighbours)."""
    projects = [make_project_copy(workdir / f"side_by_side_{index}") for index in range(workers)]
    logs = [workdir / f"side_by_side_{index}.log" for index in range(workers)]
    os.sync()
    threads = [threading.Thread(target=timed_data_run, args=(project, msd, "sync", log), kwargs={"sync_first": False})
               for project, log in zip(projects, logs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    each = [per_case_seconds(log) for log in logs]
    return {"each": each, "speedup": workers * solo_per_case / max(each)}


def measure_set(name: str, workers: int, keep: bool) -> dict:
    """The three runs of one set, in a temporary folder: the times, the rerun check, the identity."""
    n_cases, in_plane, slices, _ = SETS[name]
    workdir = Path(tempfile.mkdtemp(prefix=f"medseg_scale_out_{name}_"))
    try:
        if name == "real":
            msd = write_phantoms(workdir / "Task00_Phantoms", n_cases, *REAL_SYNTHESIZED)
            upsample_dataset(msd, in_plane, slices[0])
        else:
            msd = write_phantoms(workdir / "Task00_Phantoms", n_cases, in_plane, slices)
        sync = make_project_copy(workdir / "sync")
        local = make_project_copy(workdir / "local")
        whole = {
            "sync": timed_data_run(sync, msd, "sync", workdir / "sync.log"),
            "local": timed_data_run(local, msd, f"local:{workers}", workdir / "local.log"),
            "rerun": timed_data_run(sync, msd, "sync", workdir / "rerun.log"),
        }
        logs = {run: workdir / f"{run}.log" for run in whole}
        ceiling = side_by_side_ceiling(workdir, msd, workers, per_case_seconds(logs["sync"])) if SETS[name][3] else None
        a, b = layer_files(sync), layer_files(local)
        peaks = re.search(r"workers' peak memory was ([0-9., ]+) MiB", " ".join(logs["local"].read_text().split()))
        return {
            "name": name, "cases": n_cases, "shape": f"{in_plane} x {in_plane} x {'-'.join(map(str, sorted(set(slices))))}",
            "whole": whole,
            "pipeline": {run: kedro_pipeline_seconds(log) for run, log in logs.items()},
            "per_case": {run: per_case_seconds(log) for run, log in logs.items()},
            "skipped": "cases unchanged since the last run" in logs["rerun"].read_text(),
            "identical": a.keys() == b.keys() and all(a[key] == b[key] for key in a), "files": len(a),
            "peaks": peaks.group(1) if peaks else "?", "case_mib": largest_case_mib(msd),
            "ceiling": ceiling,
        }
    finally:
        if keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def report_set(result: dict, workers: int) -> tuple[float, float, float]:
    """Print one set's table; return its speed-ups (pipeline, per-case steps) and rerun ratio."""
    pipeline, per_case, whole = result["pipeline"], result["per_case"], result["whole"]
    print(f"\nkedro run --pipelines data on {result['cases']} cases ({result['shape']}), seconds:")
    print("                              pipeline   per-case steps   whole command")
    for run, label in (("sync", "compute.scheduler=sync     "), ("local", f"compute.scheduler=local:{workers}  "),
                       ("rerun", "unchanged rerun (sync)     ")):
        print(f"  {label} {pipeline[run]:8.1f}   {per_case[run]:14.1f}   {whole[run]:8.1f}")
    speedup, steps = pipeline["sync"] / pipeline["local"], per_case["sync"] / max(per_case["local"], 1e-9)
    rerun_ratio = pipeline["rerun"] / pipeline["sync"]
    print(f"  speed-up: pipeline {speedup:.2f}, per-case steps {steps:.2f}, whole command {whole['sync'] / whole['local']:.2f}")
    print(f"  rerun / full, pipeline: {rerun_ratio:.3f} (log says cases were skipped: {result['skipped']})")
    print(f"  local:{workers} workers' peak memory: {result['peaks']} MiB (the largest case is {result['case_mib']:.1f} MiB in memory)")
    print(f"  data layers of sync and local:{workers} identical byte for byte: {result['identical']} ({result['files']} files)")
    if result["ceiling"]:
        ceiling = result["ceiling"]
        print(f"  the machine's ceiling: {workers} sync runs side by side, per-case steps "
              + ", ".join(f"{seconds:.1f}" for seconds in ceiling["each"])
              + f" s against {per_case['sync']:.1f} s alone = {ceiling['speedup']:.2f}x the work; "
              f"local:{workers} reaches {steps / ceiling['speedup']:.0%} of it")
    return speedup, steps, rerun_ratio


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="+", default=list(SETS), choices=list(SETS), dest="sets")
    parser.add_argument("--workers", type=int, default=2, help="W of compute.scheduler=local:W")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and logs")
    args = parser.parse_args()

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs")
    targets = []
    for name in args.sets:
        result = measure_set(name, args.workers, args.keep)
        speedup, steps, rerun_ratio = report_set(result, args.workers)
        if SETS[name][3]:
            # The targets (1.7, 1.6), or 90 % of what the machine itself allows where
            # that ceiling is lower: no scheduler beats independent processes.
            ceiling = result["ceiling"]["speedup"]
            targets += [
                Target(f"{name}: speed-up local:{args.workers} / sync, per-case steps", steps, ">=", round(min(1.7, 0.9 * ceiling), 3)),
                Target(f"{name}: speed-up local:{args.workers} / sync, pipeline", speedup, ">=", round(min(1.6, 0.85 * ceiling), 3)),
            ]
        targets += [
            Target(f"{name}: unchanged rerun / full run (pipeline)", rerun_ratio, "<=", 0.1),
            Target(f"{name}: outputs identical and rerun skipped (1 = yes)", float(result["identical"] and result["skipped"]), ">=", 1.0),
        ]
    print("  (whole command = pipeline + about 15-20 s of Python, Kedro and MLflow start-up, the same for every run)")
    return report_targets(targets)


if __name__ == "__main__":
    sys.exit(main())
