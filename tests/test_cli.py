"""The console of `kedro run`: bad input told in a few lines, no third-party notices a user
can do nothing about, and no TensorFlow C++ lines on any CPU."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_project_copy

KEDRO = str(Path(sys.executable).with_name("kedro"))


def _kedro_run(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "MEDSEG_TRACEBACK")}
    environment.update(env)  # as a user's shell has it: no TF_CPP_MIN_LOG_LEVEL of the Makefile
    return subprocess.run([KEDRO, "run", *args], cwd=project, env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bad_dataset_runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """`kedro run --pipeline data` on an MSD folder that does not exist (what `--verbose`
    changes is tested on the command itself, below)."""
    project = make_project_copy(tmp_path_factory.mktemp("cli") / "project")
    missing = project / "no_such_dataset"
    args = ("--pipeline", "data", "--params", f"data.source=msd,data.msd_dir={missing}")
    return {
        "plain": _kedro_run(project, *args),
    }


def test_bad_input_ends_with_its_message_alone(bad_dataset_runs):
    done = bad_dataset_runs["plain"]
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "Traceback" not in output and "DatasetNotFoundError" not in output
    last = done.stderr.strip().splitlines()
    assert last[-2].startswith("Error: ") and "no_such_dataset: dataset folder not found" in last[-2]
    assert "Set data.msd_dir" in last[-2]
    assert last[-1] == "(kedro run --verbose, or MEDSEG_TRACEBACK=1, shows the traceback.)"
    # The message once, in a console that fits in ten lines: no Kedro account of the failure.
    lines = output.strip().splitlines()
    assert len(lines) <= 10, output
    assert output.count("dataset folder not found") == 1 and "--from-nodes" not in output


def test_the_console_filter_drops_the_repeats_of_a_failed_run_and_keeps_a_bug():
    import logging

    from medseg.errors import DatasetNotFoundError
    from medseg.runs.console import UserErrorsOnce

    def record(name, level, message, error=None):
        made = logging.LogRecord(name, level, __file__, 1, message, None, None)
        if error is not None:
            made.exc_info = (type(error), error, None)
        return made

    keep = UserErrorsOnce().filter
    assert not keep(record("kedro.pipeline.node", logging.ERROR, "Node list_source_cases: f() -> [x] failed with error: \nx"))
    assert not keep(record("kedro.runner.sequential_runner", logging.WARNING, "There are 7 nodes that have not run.\nYou can"))
    wrapped = RuntimeError("dataset failed")
    wrapped.__cause__ = DatasetNotFoundError("/x: dataset folder not found")
    assert not keep(record("kedro.io", logging.ERROR, "load failed", wrapped))
    assert keep(record("kedro.io", logging.ERROR, "load failed", ZeroDivisionError("a bug")))
    assert keep(record("medseg.stages", logging.INFO, "[1/9] data.validate_cases  0.1 s"))


def test_the_run_command_takes_kedros_options_and_verbose():
    from kedro.framework.cli.project import run as kedro_run

    from medseg.cli import run

    assert {p.name for p in kedro_run.params} | {"verbose"} == {p.name for p in run.params}
    context = run.make_context("run", ["--pipeline", "unet", "--verbose", "--params", "unet.training.epochs=1"])
    assert context.params["verbose"] is True and context.params["pipeline"] == "unet"
    assert run.make_context("run", ["-v"]).params["verbose"] is True
    assert run.make_context("run", []).params["verbose"] is False


@pytest.mark.parametrize("env, verbose, kept", [("", False, False), ("0", False, False), ("1", False, True), ("", True, True)])
def test_medseg_traceback_or_verbose_let_the_error_through(monkeypatch, env, verbose, kept):
    import medseg.cli as cli
    from medseg.errors import SplitError

    def failing_run(**options):
        raise SplitError("3 cases for a split that needs 4. Add cases.")

    monkeypatch.setattr(cli.kedro_run, "callback", failing_run)
    monkeypatch.setenv(cli.TRACEBACK_ENV, env)
    with pytest.raises(SplitError if kept else cli.RunStopped, match="3 cases for a split"):
        cli._run(verbose=verbose, pipeline=None, pipelines=["data"])


def test_no_third_party_notice_nor_tensorflow_line_on_the_console(bad_dataset_runs):
    output = bad_dataset_runs["plain"].stdout + bad_dataset_runs["plain"].stderr
    for notice in ("register_new_resolver", "Add type hints", "deprecated", "oneDNN", "absl::InitializeLog", "I0000"):
        assert notice not in output, notice


# Imports TensorFlow, after medseg or not, then MLflow, and says whether MLflow's telemetry client runs.
IMPORTS = (
    "import os, sys\nif sys.argv[1] == 'medseg': import medseg\nimport tensorflow\nos.write(2, b'still here\\n')\n"
    "import mlflow\nfrom mlflow.telemetry import get_telemetry_client\nprint(type(get_telemetry_client()).__name__)"
)


def _shell_environment() -> dict[str, str]:
    """This environment as a user's shell has it: without the Makefile's TF_CPP_MIN_LOG_LEVEL,
    nor the variables by which MLflow decides that it runs under CI or a test (read from
    MLflow's own check), in which case it would send nothing whatever medseg does."""
    import re

    from mlflow.telemetry import utils

    markers = set(re.findall(r'"([A-Z][A-Z0-9_]+)"', inspect.getsource(utils._is_ci_env_or_testing)))
    markers |= {"MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", "TF_CPP_MIN_LOG_LEVEL"}
    return {k: v for k, v in os.environ.items() if k not in markers}


@pytest.fixture(scope="module")
def imports() -> dict[str, subprocess.CompletedProcess]:
    """IMPORTS in a fresh process, with and without medseg first. TF_ENABLE_ONEDNN_OPTS=1 turns
    oneDNN on whatever the CPU, so that TensorFlow prints its notice on every machine."""
    env = {**_shell_environment(), "TF_ENABLE_ONEDNN_OPTS": "1"}
    done = {first: subprocess.run([sys.executable, "-c", IMPORTS, first], env=env, capture_output=True, text=True, timeout=120)
            for first in ("plain", "medseg")}
    for result in done.values():
        assert result.returncode == 0, result.stderr[-2000:]
    return done


def test_tensorflow_start_up_lines_are_dropped_and_the_rest_kept(imports):
    """Imported after medseg, nothing of TensorFlow's start-up reaches stderr."""
    if "oneDNN custom operations are on" not in imports["plain"].stderr:
        pytest.skip("this TensorFlow build prints no oneDNN notice here, so there is nothing to drop")
    assert imports["medseg"].stderr == "still here\n"


def test_mlflow_telemetry_is_off_once_medseg_is_imported(imports):
    """MLflow 3 sends usage telemetry from a user's shell; importing medseg (as `kedro run`
    does, before MLflow) turns it off. Without medseg, the same shell gets MLflow's client:
    the check sees a shell as MLflow would."""
    assert imports["plain"].stdout.split() == ["TelemetryClient"]
    assert imports["medseg"].stdout.split() == ["NoneType"]
