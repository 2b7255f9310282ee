"""The project's `kedro run`: Kedro's own command, with a user's mistake told in a few lines.

Kedro picks up a project's `cli.py` and lets its `run` replace the built-in one (and
`python -m medseg` runs it too). It takes every option of Kedro's `run`, plus `--verbose`.

A run that stops on bad input (a `medseg.errors.MedsegError`: a corrupt scan, a missing
folder, an unknown model) or on a parameter that fails validation (Kedro's
`ParameterValidationError`, pydantic's `ValidationError`) ends with that error's message alone
and exit status 1, not with a few hundred lines of traceback around the one useful sentence.
Kedro, kedro-mlflow and medseg's hooks have already done their part by then: the MLflow run is
marked FAILED and nothing half-written is published. `kedro run --verbose`, or the environment
variable `MEDSEG_TRACEBACK=1`, gives the full traceback instead. Any other exception (a bug,
not a mistake in the input) always keeps its traceback.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from kedro.framework.cli.project import run as kedro_run
from kedro.framework.cli.utils import KedroCliError

from medseg.runs.console import plain_console, user_error, verbose_console

TRACEBACK_ENV = "MEDSEG_TRACEBACK"


class RunStopped(click.ClickException):
    """A run stopped on bad input: printed as `Error: <message>` and a hint, exit status 1."""

    def show(self, file: Any = None) -> None:
        click.secho(f"Error: {self.message}", fg="red", err=True)
        click.secho(f"(kedro run --verbose, or {TRACEBACK_ENV}=1, shows the traceback.)", dim=True, err=True)


def _run(verbose: bool = False, **options: Any) -> None:
    if options.get("pipeline") and not options.get("pipelines"):
        # `--pipeline unet` is medseg's documented command; Kedro 1.7 deprecates the option
        # for `--pipelines`, which means the same for one name: pass it on as that.
        options["pipelines"], options["pipeline"] = [options["pipeline"]], None
    if verbose:
        verbose_console()
    else:
        plain_console()
    try:
        kedro_run.callback(**options)
    except KedroCliError:
        raise
    except Exception as exc:
        cause = user_error(exc)
        if cause is None or verbose or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        raise RunStopped(str(cause).strip() or type(cause).__name__) from None


run = click.Command(
    name="run",
    callback=_run,
    params=[
        *kedro_run.params,
        click.Option(
            ["--verbose", "-v"], is_flag=True, default=False,
            help=f"Show Kedro's full log, and on bad input the full traceback, not only the error's message (or set {TRACEBACK_ENV}=1).",
        ),
    ],
    help=kedro_run.help,
    short_help=kedro_run.short_help,
)


@click.group(name="medseg")
def cli() -> None:
    """Commands of the medseg project."""


cli.add_command(run)

__all__ = ["cli", "run", "user_error"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
