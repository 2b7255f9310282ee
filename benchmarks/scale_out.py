"""The `data` pipeline on one process against a Dask LocalCluster, and an unchanged rerun.

Measured side by side in one run, each `kedro run --pipelines data` a child process in its
own fresh copy of the project, all reading the same phantoms in place (`data.source=msd`):

1. `compute.scheduler=sync` on N phantoms (default 48): the full run;
2. `compute.scheduler=local:W` (default 2 workers) on the same phantoms: speed-up = 1 / 2,
   target >= 1.6 on 2 cores; the two projects' data layers must be identical, byte for byte;
3. the `sync` project run again with nothing changed: rerun / full, target <= 0.1.

Wall times are of the whole command, as a user sees them: Python and Kedro start-up, the
MLflow run, and for `local:W` the start of the cluster, included. The phantoms are written
once before the clock starts. Exits 1 when a target is missed or the outputs differ.

Run: .venv/bin/python benchmarks/scale_out.py [--cases 48] [--workers 2] [--keep]
"""

from __future__ import annotations

import argparse
import os
import platform
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
    from medseg.pipelines.data.nodes import _synthesis_settings, ensure_synthetic_dataset

    data = {
        "seed": 42,
        "synthetic": {
            "dir": str(root), "n_cases": n_cases, "in_plane_size": 96, "n_slices_range": [24, 40],
            "in_plane_spacing_range": [0.8, 1.2], "slice_spacing_range": [1.5, 3.0], "n_lesions_range": [1, 4],
            "n_classes": 1,
        },
    }
    ensure_synthetic_dataset(root, _synthesis_settings(data))
    return root


def timed_data_run(project: Path, msd: Path, scheduler: str, log_path: Path) -> float:
    """Seconds of `kedro run --pipelines data` in `project` (a child process)."""
    params = f"data.source=msd,data.msd_dir={msd},compute.scheduler={scheduler}"
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "data", "--params", params]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if code != 0:
        tail = log_path.read_text().splitlines()[-30:]
        sys.exit(f"kedro run ({scheduler}) failed with exit {code}:\n" + "\n".join(tail))
    return seconds


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
        a, b = layer_files(sync), layer_files(local)
        identical = a.keys() == b.keys() and all(a[name] == b[name] for name in a)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print(f"machine: {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"kedro run --pipelines data on {args.cases} phantoms (96 x 96 x 24-40), wall time of the command:")
    print(f"  compute.scheduler=sync      {full:7.1f} s")
    print(f"  compute.scheduler=local:{args.workers}   {parallel:7.1f} s   speed-up {full / parallel:.2f}")
    print(f"  unchanged rerun (sync)      {rerun:7.1f} s   rerun / full {rerun / full:.3f}; log says cases were skipped: {skipped}")
    print(f"  data layers of sync and local:{args.workers} identical byte for byte: {identical} ({len(a)} files)")
    return report_targets([
        Target(f"speed-up local:{args.workers} / sync", full / parallel, ">=", 1.6),
        Target("unchanged rerun / full run", rerun / full, "<=", 0.1),
        Target("outputs identical (1 = yes)", float(identical and skipped), ">=", 1.0),
    ])


if __name__ == "__main__":
    sys.exit(main())
