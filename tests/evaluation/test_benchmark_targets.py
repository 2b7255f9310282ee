"""The benchmarks' verdict (benchmarks/_targets.py): a missed target makes the script exit 1.

The benchmarks are scripts, not part of the package; this tests their shared verdict without
running any of them (they are not timed tests). It lives here because the verdict is the
pass/fail report of a measurement.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def targets():
    name = "medseg_benchmark_targets"
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "_targets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


def test_met_targets_give_exit_status_zero(targets, capsys):
    status = targets.report_targets(
        [
            targets.Target("memory ratio", 1.014, "<=", 1.25),
            targets.Target("throughput ratio", 0.95, ">=", 0.95),  # the bound is inclusive
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "FAILED" not in out
    assert "target memory ratio: 1.014 <= 1.25   ok" in out


@pytest.mark.parametrize(
    ("value", "comparison", "limit"),
    [(1.26, "<=", 1.25), (0.94, ">=", 0.95), (math.nan, "<=", 1.25), (math.inf, ">=", 0.95)],
)
def test_a_missed_target_gives_exit_status_one(targets, capsys, value, comparison, limit):
    status = targets.report_targets(
        [targets.Target("first", 1.0, "<=", 1.10), targets.Target("second", value, comparison, limit)]
    )
    assert status == 1
    out = capsys.readouterr().out
    assert "target second:" in out and out.count("FAILED") == 2  # the line and the summary
    assert "1 of 2 targets missed (second)" in out


def test_no_targets_and_unknown_comparisons_are_errors(targets):
    with pytest.raises(ValueError, match="at least one"):
        targets.report_targets([])
    with pytest.raises(ValueError, match="comparison"):
        targets.Target("ratio", 1.0, "<", 1.25)


def test_the_exit_status_reaches_the_shell(tmp_path):
    # A script built like the benchmarks: `sys.exit(report_targets(...))`.
    script = tmp_path / "bench.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(BENCHMARKS)!r})\n"
        "from _targets import Target, report_targets\n"
        "sys.exit(report_targets([Target('ratio', float(sys.argv[1]), '<=', 1.25)]))\n"
    )
    assert subprocess.run([sys.executable, str(script), "1.2"], capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, str(script), "1.3"], capture_output=True).returncode == 1


def test_every_benchmark_script_exits_with_its_verdict():
    scripts = sorted(path for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_"))
    assert scripts
    for path in scripts:
        source = path.read_text()
        assert "return report_targets(" in source, f"{path.name} does not report its targets"
        assert "sys.exit(main())" in source, f"{path.name} ignores main()'s exit status"
