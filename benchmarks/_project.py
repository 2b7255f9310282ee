"""A medseg project of a benchmark's own, and `kedro run` in it: shared by the benchmarks that
train and predict through the command line (`peers_accuracy.py`, `qc.py`). Not a benchmark: its
name starts with `_`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_copy(root: Path) -> Path:
    """A project of its own: conf/ and pyproject.toml, empty data folders (MLflow makes its store)."""
    shutil.copytree(ROOT / "conf", root / "conf")
    (root / "conf" / "local").mkdir(exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    for folder in ("src", "notebooks", *(f"data/{layer}" for layer in (
            "01_raw", "02_intermediate", "03_primary", "05_model_input", "06_models", "07_model_output", "08_reporting"))):
        (root / folder).mkdir(parents=True)
    return root


def kedro(project: Path, args: list[str], params: dict[str, object], log: Path) -> float:
    """`kedro run <args> --params ...` in `project`; its wall time. Exits with the log's tail on a failure."""
    text = ",".join(f"{key}={value}" for key, value in params.items())
    command = [sys.executable, "-m", "kedro", "run", *args] + (["--params", text] if text else [])
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "TF_CPP_MIN_LOG_LEVEL": "2", "COLUMNS": "200"}
    start = time.perf_counter()
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(command)}\n")
        sink.flush()
        code = subprocess.call(command, cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{' '.join(command[2:])} failed in {project} (exit {code}):\n" + "\n".join(log.read_text().splitlines()[-30:]))
    return time.perf_counter() - start
