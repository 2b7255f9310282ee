"""`make run` / `make test` install exactly one TensorFlow build per environment.

The Makefile runs in a scratch folder with a stand-in `.venv/bin/python` that records each
`pip install` instead of installing, so these tests need neither the network nor a GPU. They
live beside the benchmark verdict tests: both check the project's tooling, not the package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

FAKE_TOOL = """#!/bin/sh
# Stand-in for .venv/bin/python and the tools make calls: record `-m ...` and `kedro ...`, run `-c` for real.
if [ "$1" = "-c" ]; then exec {python} "$@"; fi
echo "$(basename "$0") $*" >> "$(dirname "$0")/../calls.log"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    shutil.copy(REPO_ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # The site's Mermaid script, as `make docs` leaves it: these tests fetch nothing.
    mermaid = tmp_path / "docs" / "assets" / "javascripts" / "mermaid.min.js"
    mermaid.parent.mkdir(parents=True)
    mermaid.write_text("")
    # ... NiiVue's script, as `make niivue` leaves it, and the onnxruntime serving environment as
    # `make serve-onnx-env` leaves it (its stamp newer than pyproject.toml): nothing is installed.
    niivue = tmp_path / "src" / "medseg" / "evaluation" / "assets" / "niivue.js"
    niivue.parent.mkdir(parents=True)
    niivue.write_text("")
    (tmp_path / ".venv-serve-onnx").mkdir()
    (tmp_path / ".venv-serve-onnx" / ".installed").write_text("")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "kedro", "lint-imports", "mkdocs"):
        tool = bin_dir / name
        tool.write_text(FAKE_TOOL.format(python=sys.executable))
        tool.chmod(0o755)
    return tmp_path


def _make(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", *args], cwd=project, capture_output=True, text=True)


def _pip_installs(project: Path) -> list[str]:
    log = project / ".venv" / "calls.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [line.split(" -e ")[-1] for line in lines if " -m pip install " in line]


def test_make_test_on_a_fresh_clone_installs_the_cpu_build_and_the_test_tools(project):
    result = _make(project, "test")
    assert result.returncode == 0, result.stderr
    assert _pip_installs(project) == [".[cpu,test,docs]"]
    assert (project / ".venv" / ".extras").read_text().strip() == "cpu"


def test_make_test_after_a_gpu_run_keeps_the_gpu_build(project):
    assert _make(project, "run", "EXTRAS=gpu").returncode == 0
    result = _make(project, "test")
    assert result.returncode == 0, result.stderr
    assert _make(project, "run").returncode == 0  # up to date: no third install
    assert _pip_installs(project) == [".[gpu]", ".[gpu,test,docs]"]


def test_switching_builds_in_one_environment_is_refused(project):
    assert _make(project, "run", "EXTRAS=gpu").returncode == 0
    result = _make(project, "test", "EXTRAS=cpu")
    assert result.returncode != 0
    assert "holds the gpu build" in result.stderr and "rm -rf .venv" in result.stderr
    assert _pip_installs(project) == [".[gpu]"]


def test_the_test_extra_does_not_pin_a_tensorflow_build():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def tensorflow_builds(requirements: list[str]) -> list[str]:
        return [r for r in requirements if r.lower().startswith("tensorflow")]

    assert tensorflow_builds(extras["test"]) == []
    assert tensorflow_builds(extras["cpu"]) == ["tensorflow-cpu~=2.21.0"]
    assert tensorflow_builds(extras["gpu"]) == ["tensorflow[and-cuda]~=2.21.0"]


def test_an_environment_from_the_old_makefile_keeps_its_build(project):
    # The old `make test` stamp meant tensorflow-cpu was installed.
    (project / ".venv" / ".installed-test").touch()
    refused = _make(project, "run", "EXTRAS=gpu")
    assert refused.returncode != 0 and "holds the cpu build" in refused.stderr
    assert _make(project, "test").returncode == 0
    assert _pip_installs(project) == [".[cpu,test,docs]"]
