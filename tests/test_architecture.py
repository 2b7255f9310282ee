"""The layers are a contract that import-linter checks: the architecture page's table is the
contract's list, and an import that points up fails the check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _contract(contract_id: str) -> dict:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return next(c for c in config["contracts"] if c["id"] == contract_id)


def _page_layers() -> list[list[str]]:
    page = (REPO_ROOT / "docs" / "architecture.md").read_text()
    table = page.split("<!-- layers:", 1)[1]
    rows = re.findall(r"^\| (\d+) \| ([^|]+) \|", table, flags=re.M)
    assert [int(n) for n, _ in rows] == list(range(1, len(rows) + 1))
    return [re.findall(r"`([\w.]+)`", packages) for _, packages in rows]


def test_the_architecture_page_lists_the_contract_layers():
    contract = [[name.strip() for name in layer.split("|")] for layer in _contract("layers")["layers"]]
    assert _page_layers() == contract


def test_every_package_is_in_a_layer_and_only_entry_points_sit_loose():
    layered = {name for layer in _page_layers() for name in layer}
    source = REPO_ROOT / "src" / "medseg"
    packages = {f"medseg.{p.name}" for p in source.iterdir() if (p / "__init__.py").exists()}
    modules = {f"medseg.{p.stem}" for p in source.glob("*.py") if p.name != "__init__.py"}
    assert packages <= layered, packages - layered
    assert modules <= layered, modules - layered
    assert {m.split(".")[1] for m in modules} == {"settings", "pipeline_registry", "cli", "__main__", "errors", "parameters"}


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([str(LINT_IMPORTS)], cwd=root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed (the `test` extra)")
@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("imaging/geometry.py", "import medseg.pipelines.template", "Layers point down"),
        ("storage/paths.py", "import medseg.runs.tracking", "Layers point down"),
        ("evaluation/metrics.py", "import mlflow", "The domain imports no Kedro, MLflow or Dask"),
    ],
)
def test_an_import_against_the_contracts_fails_the_check(tmp_path: Path, module: str, line: str, contract: str):
    shutil.copytree(REPO_ROOT / "src" / "medseg", tmp_path / "src" / "medseg", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0
    target = tmp_path / "src" / "medseg" / module
    target.write_text(target.read_text() + f"\n{line}  # against the contract\n")
    result = _lint(tmp_path)
    assert result.returncode == 1
    assert f"{contract} BROKEN" in result.stdout
