"""Peak memory of the `data` pipeline: N cases against 4N cases.

Measured side by side in one run: `kedro run --pipelines data` on N synthetic cases, then on 4N
cases, each in its own fresh temporary copy of the project (conf/ and pyproject.toml, empty data
folders, its own MLflow database) and its own child process. The peak resident set size of each
child is read from `os.wait4`, which gives the rusage of that child alone (and of any process it
waited for), so the two measurements do not mix.

The pipeline streams cases one at a time (lazy partitions), so its memory should not grow with
the number of cases: the ratio peak(4N) / peak(N) should stay <= 1.25. The script exits 1
when it does not (or when a run fails), so `make benchmarks` fails.

Run: .venv/bin/python benchmarks/data_memory.py [--cases 6] [--size 96]
It synthesizes the phantoms itself, so it needs no data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _targets import Target, report_targets

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_LAYERS = ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input",
               "06_models", "07_model_output", "08_reporting")


def make_project_copy(root: Path) -> Path:
    """conf/ and pyproject.toml of the repository in `root`, with empty data folders.

    An empty src/ is created too: Kedro refuses a project whose source folder is missing, and
    `medseg` itself is imported from the installed (editable) package.
    """
    shutil.copytree(REPO_ROOT / "conf", root / "conf")
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "conf" / "local").mkdir(exist_ok=True)
    (root / "src").mkdir()
    for layer in DATA_LAYERS:
        (root / "data" / layer).mkdir(parents=True)
    return root


def volumes_mib(project: Path) -> float:
    """In-memory size of all the volumes the run wrote, raw to primary (shape x dtype)."""
    import nibabel as nib

    total = 0
    for path in (project / "data").rglob("*.nii.gz"):
        image = nib.load(str(path))
        total += int(np.prod(image.shape)) * image.get_data_dtype().itemsize
    return total / 2**20


def peak_rss_of_data_run(n_cases: int, size: int, workdir: Path) -> tuple[float, float, float]:
    """Run the `data` pipeline on `n_cases` in a fresh copy.

    Returns:
        (peak RSS in MiB, seconds, MiB of all the volumes it wrote if held in memory at once).
    """
    project = make_project_copy(workdir / f"project_{n_cases}")
    params = f"data.synthetic.n_cases={n_cases},data.synthetic.in_plane_size={size}"
    command = [sys.executable, "-m", "kedro", "run", "--pipelines", "data", "--params", params]
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2"}
    log_path = workdir / f"kedro_{n_cases}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        tail = log_path.read_text().splitlines()[-30:]
        sys.exit(f"kedro run failed for {n_cases} cases (exit {child.returncode}):\n" + "\n".join(tail))
    n_written = len(list((project / "data" / "03_primary" / "images").glob("*.nii.gz")))
    if n_written != n_cases:
        sys.exit(f"expected {n_cases} preprocessed images, found {n_written} in {project}")
    return usage.ru_maxrss / 1024.0, seconds, volumes_mib(project)  # Linux: ru_maxrss is in KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6, help="N; the second run has 4N cases")
    parser.add_argument("--size", type=int, default=96, help="data.synthetic.in_plane_size, voxels")
    parser.add_argument("--keep", action="store_true", help="keep the temporary projects and logs")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="medseg_data_memory_"))
    try:
        results = {n: peak_rss_of_data_run(n, args.size, workdir) for n in (args.cases, 4 * args.cases)}
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    (small, small_s, _), (large, large_s, large_volumes) = results[args.cases], results[4 * args.cases]
    # What the target can detect: if the pipeline held every case in memory at once, the 4N
    # run would need about 3/4 of its volumes more than the N run.
    leak_ratio = (small + 0.75 * large_volumes) / small
    print(f"kedro run --pipelines data, in-plane size {args.size}, one child process per run, {os.cpu_count()} CPUs")
    print(f"peak RSS, {args.cases} cases: {small:8.1f} MiB   ({small_s:.0f} s)")
    print(f"peak RSS, {4 * args.cases} cases: {large:8.1f} MiB   ({large_s:.0f} s)")
    print(f"ratio {4 * args.cases}/{args.cases} cases: {large / small:.3f}")
    print(f"difference: {large - small:+.1f} MiB; one case's volumes take {large_volumes / (4 * args.cases):.1f} MiB in memory")
    print(
        f"sensitivity: the {4 * args.cases} cases' raw + intermediate + primary volumes take {large_volumes:.1f} MiB; "
        f"holding them all would give a ratio near {leak_ratio:.2f}"
    )
    return report_targets([Target(f"peak RSS ratio {4 * args.cases}/{args.cases} cases", large / small, "<=", 1.25)])


if __name__ == "__main__":
    sys.exit(main())
