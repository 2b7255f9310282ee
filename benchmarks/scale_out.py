"""The `data` pipeline on one process against a Dask LocalCluster, and an unchanged rerun.

Measured side by side in one run, each `kedro run --pipelines data` a child process in its
own fresh copy of the project, all reading the same phantoms in place (`data.source=msd`):

1. `compute.scheduler=sync` on N phantoms (default 48): the full run;
2. `compute.scheduler=local:W` (default 2 workers) on the same phantoms: speed-up = 1 / 2,
   target >= 1.6 on 2 cores; the two projects' data layers must be identical, byte for byte;
3. the `sync` project run again with nothing changed: rerun / full, target <= 0.1.

Two times per run: the pipeline's (Kedro's own "Pipeline execution completed in X sec": every
node, and for `local:W` the start of the cluster) and the whole command's (plus Python, Kedro
and MLflow start-up, 15-20 s on 2 cores whatever the data). The targets are on the pipeline's
time; the whole command's is printed beside it. The phantoms are written once before the clock
starts. Exits 1 when a target is missed or the outputs differ.

Run: .venv/bin/python benchmarks/scale_out.py [--cases 48] [--workers 2] [--keep]
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


def write_phantoms(root: Path, n_cases: int) -> Path:
    """`n_cases` default-sized phantoms (96 x 96 x 24-40) in MSD layout."""
    from medseg.imaging.phantoms import ensure_synthetic_dataset, synthesis_settings

    data = {
        "seed": 42,
        "synthetic": {
            "n_cases": n_cases, "in_plane_size": 96, "n_slices_range": [24, 40],
            "in_plane_spacing_range": [0.8, 1.2], "slice_spacing_range": [1.5, 3.0], "n_lesions_range": [1, 4],
            "n_classes": 1,
        },
    }
    ensure_synthetic_dataset(root, synthesis_settings(data))
    return root


def timed_data_run(project: Path, msd: Path, scheduler: str, log_path: Path) -> float:
    """Seconds of `kedro run --pipelines data` in `project` (a child process)."""
    params = f"data.source=msd,data.msd_dir={msd},compute.scheduler={scheduler}"
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "data", "--params", params]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    # The previous run's files are still being written back to disk; a run that starts then
    # waits on that writeback in its own fsyncs. Each run starts with nothing dirty.
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=48)
    parser.add_argument("--workers", type=int, default=2, help="W of compute.scheduler=local:W")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and logs")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="medseg_scale_out_"))
    try:
        msd = write_phantoms(workdir / "Task00_Phantoms", args.cases)
        sync = make_project_copy(workdir / "sync")
        local = make_project_copy(workdir / "local")
        full = timed_data_run(sync, msd, "sync", workdir / "sync.log")
        parallel = timed_data_run(local, msd, f"local:{args.workers}", workdir / "local.log")
        rerun = timed_data_run(sync, msd, "sync", workdir / "rerun.log")
        skipped = "cases unchanged since the last run" in (workdir / "rerun.log").read_text()
        pipeline_s = {name: kedro_pipeline_seconds(workdir / f"{name}.log") for name in ("sync", "local", "rerun")}
        worker_peaks = re.search(r"workers' peak memory was ([0-9., ]+) MiB", " ".join((workdir / "local.log").read_text().split()))
        case_mib = largest_case_mib(msd)
        a, b = layer_files(sync), layer_files(local)
        identical = a.keys() == b.keys() and all(a[name] == b[name] for name in a)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"kedro run --pipelines data on {args.cases} phantoms (96 x 96 x 24-40), seconds:")
    print("                              pipeline   whole command")
    print(f"  compute.scheduler=sync      {pipeline_s['sync']:8.1f}   {full:8.1f}")
    print(f"  compute.scheduler=local:{args.workers}   {pipeline_s['local']:8.1f}   {parallel:8.1f}")
    print(f"  unchanged rerun (sync)      {pipeline_s['rerun']:8.1f}   {rerun:8.1f}   (log says cases were skipped: {skipped})")
    speedup = pipeline_s["sync"] / pipeline_s["local"]
    rerun_ratio = pipeline_s["rerun"] / pipeline_s["sync"]
    print(f"  speed-up, pipeline: {speedup:.2f}; whole command: {full / parallel:.2f}")
    print(f"  rerun / full, pipeline: {rerun_ratio:.3f}; whole command: {rerun / full:.3f}")
    print(f"  local:{args.workers} workers' peak memory: {worker_peaks.group(1) if worker_peaks else '?'} MiB "
          f"(the largest case is {case_mib:.1f} MiB in memory)")
    print(f"  data layers of sync and local:{args.workers} identical byte for byte: {identical} ({len(a)} files)")
    print("  (whole command = pipeline + about 15-20 s of Python, Kedro and MLflow start-up, the same for every run)")
    return report_targets([
        Target(f"speed-up local:{args.workers} / sync (pipeline)", speedup, ">=", 1.6),
        Target("unchanged rerun / full run (pipeline)", rerun_ratio, "<=", 0.1),
        Target("outputs identical and rerun skipped (1 = yes)", float(identical and skipped), ">=", 1.0),
    ])


if __name__ == "__main__":
    sys.exit(main())
