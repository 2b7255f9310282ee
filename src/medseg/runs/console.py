"""What `kedro run` prints besides medseg's own lines: third-party notices a user can do
nothing about are left out, each by its exact text and the module that emits it.

Two kinds, both set up when `medseg` is imported (Kedro imports it before it builds the
configuration or loads TensorFlow):

- Python warnings (`quiet_third_party_warnings`): Kedro 1.7 and kedro-mlflow register their own
  OmegaConf resolvers with the deprecated `register_new_resolver()` (one warning per resolver
  and run; medseg's own resolvers avoid it), and kedro-mlflow's `KedroPipelineModel` has no
  type hints, which MLflow points out whenever kedro-mlflow is imported.
- TensorFlow's C++ start-up lines (`quiet_tensorflow_import`): on CPUs where oneDNN is on by
  default (Intel Xeons with AMX, AMD EPYC with AVX-512) TensorFlow 2.21 prints
  "oneDNN custom operations are on" through absl before its logging is set up, where
  `TF_CPP_MIN_LOG_LEVEL` does not reach. Turning oneDNN off (`TF_ENABLE_ONEDNN_OPTS=0`) would
  silence it, and cost the bfloat16 speed-up, so instead those lines are dropped from what the
  import writes to stderr; every other line of it is written as it came.

A user who exports `TF_CPP_MIN_LOG_LEVEL=0` (TensorFlow's "show everything") sees all of it.
"""

from __future__ import annotations

import contextlib
import logging
import importlib.abc
import importlib.machinery
import os
import re
import sys
import tempfile
import warnings

# (message regex, module regex) of each Python warning left out. Messages may start with the
# ANSI colour codes MLflow adds.
_COLOUR = r"(\x1b\[[0-9;]*m)?"
THIRD_PARTY_WARNINGS = (
    (r"register_new_resolver\(\) is deprecated", r"kedro\.config\.omegaconf_config|kedro_mlflow\..*"),
    (_COLOUR + r"Add type hints to the `predict` method", r"mlflow\.pyfunc\.utils\.data_validation"),
    # Kedro's advice against dots in dataset names outside the node's namespace: `predict`
    # reads every model's `<model>.segmenter_folder`, named by the model's namespace on purpose.
    (r"One or more dataset names contain '\.' characters", r"medseg\.pipelines\..*"),
    # kedro-mlflow logs the run's input datasets with a local path that MLflow's registry can read
    # as two sources of the same class; it picks that class either way.
    (r"The specified dataset source can be interpreted in multiple ways", r"mlflow\.data\..*"),
    # The segmenter's pyfunc model has a signature; an input example would be a scan on disk.
    (_COLOUR + r"An input example was not provided when logging the model", r"mlflow\..*"),
)

# Log records a user can do nothing about, by (logger, message regex): MLflow's notice that a
# pyfunc model given as an object is pickled (medseg's SegmenterModel holds no state; its code
# travels with the model as `code_paths`).
THIRD_PARTY_RECORDS = (
    ("mlflow.pyfunc", re.compile(r"^Passing a Python object as `python_model` causes it to be serialized using CloudPickle")),
)

# Lines TensorFlow's absl logging writes to stderr while it loads: the "before
# absl::InitializeLog()" banner and the INFO lines of oneDNN and of the CPU feature guard.
TENSORFLOW_NOTICE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:. ]+\s+\d+ (port|cpu_feature_guard)\.cc:\d+\] .*"
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow with the appropriate compiler flags\.)$"
)


def quiet_third_party_warnings() -> None:
    """Leave out the Python warnings of `THIRD_PARTY_WARNINGS` (by message and module), both
    as warnings and as the records of the `py.warnings` logger (`ThirdPartyNotices`), and the
    log records of `THIRD_PARTY_RECORDS`."""
    for message, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning, module=module)
    # Warnings go through logging (the `py.warnings` logger), as Kedro's rich console has them:
    # the console's handlers show them, and the filter below can drop a third party's notice
    # that it emits under a `catch_warnings()` of its own.
    logging.captureWarnings(True)
    for name in ("py.warnings", *(logger for logger, _ in THIRD_PARTY_RECORDS)):
        captured = logging.getLogger(name)
        if not any(isinstance(f, ThirdPartyNotices) for f in captured.filters):
            captured.addFilter(ThirdPartyNotices())


@contextlib.contextmanager
def stderr_without(pattern: re.Pattern[bytes]):
    """While the block runs, what is written to file descriptor 2 (by Python or by C++ code)
    goes to a temporary file; afterwards it is written to the real stderr, in order, without
    the lines that match `pattern` in full. Nothing else is lost, an exception included."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real stderr (an embedded interpreter)
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not pattern.match(line.rstrip(b"\r\n"))]
            if kept:
                os.write(2, b"".join(kept))


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as the other finders do, and runs its first import inside
    `stderr_without(TENSORFLOW_NOTICE)`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: the import below and every later one are plain
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            loader = spec.loader
            plain_exec = loader.exec_module

            def exec_module(module):
                with stderr_without(TENSORFLOW_NOTICE):
                    plain_exec(module)

            loader.exec_module = exec_module
        return spec


def quiet_tensorflow_import() -> None:
    """Drop TensorFlow's start-up notices (`TENSORFLOW_NOTICE`) from its first import, unless
    TensorFlow is imported already or the user asked for its INFO lines
    (`TF_CPP_MIN_LOG_LEVEL=0`)."""
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    if not any(isinstance(finder, _QuietTensorFlowFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


class ThirdPartyNotices(logging.Filter):
    """A filter of the `py.warnings` logger, through which Python's warnings are logged
    (`logging.captureWarnings`), that leaves out the warnings of `THIRD_PARTY_WARNINGS` (MLflow
    emits its type-hint notice under `warnings.catch_warnings()` with a filter of its own, which
    overrides `quiet_third_party_warnings`, so it is dropped here instead); on the loggers of
    `THIRD_PARTY_RECORDS`, it leaves out those records."""

    _NOTICES = tuple(
        (re.compile(message), re.compile(module.replace(r"\.", "/").replace(".*", "[^:]*")))
        for message, module in THIRD_PARTY_WARNINGS
    )

    def filter(self, record) -> bool:
        text = record.getMessage()
        if record.name != "py.warnings":
            return not any(record.name == name and pattern.search(text) for name, pattern in THIRD_PARTY_RECORDS)
        return not any(message.search(text) and module.search(text) for message, module in self._NOTICES)


def user_error(exc: BaseException | None) -> BaseException | None:
    """The error of the user's input behind `exc`, if it is one: `exc` itself or an error it
    was raised from (Kedro wraps a dataset's error in its own `DatasetError`).

    Returns:
        The first `MedsegError`, `ParameterValidationError` or pydantic `ValidationError` in
        the chain of causes, or None when the chain holds none (a bug: keep the traceback).
    """
    from kedro.validation.exceptions import ParameterValidationError
    from pydantic import ValidationError

    from medseg.errors import MedsegError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (MedsegError, ParameterValidationError, ValidationError)):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


# Kedro's own account of a failed run, which the command's last lines give once: the node's
# error (its message again) and the nodes not run, with a `--from-nodes` hint.
KEDRO_FAILURE_RECORDS = (
    ("kedro.pipeline.node", re.compile(r"^Node .* failed with error:", re.S)),
    ("kedro.runner", re.compile(r"^There are \d+ nodes that have not run\.")),
)


class UserErrorsOnce(logging.Filter):
    """Leaves out the log records that repeat a failed run's error: those that carry a user's
    error (`user_error`), and Kedro's account of the failure (`KEDRO_FAILURE_RECORDS`). The
    command prints the message once, at the end, with its hint (`medseg.cli`); a bug keeps its
    traceback there."""

    def filter(self, record) -> bool:
        if record.exc_info and record.exc_info[1] is not None and user_error(record.exc_info[1]) is not None:
            return False
        text = record.getMessage()
        return not any(record.name.startswith(name) and pattern.search(text) for name, pattern in KEDRO_FAILURE_RECORDS)


def plain_console() -> None:
    """The default console of `kedro run` (conf/logging.yml), with a user's error told once."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, UserErrorsOnce) for f in handler.filters):
            handler.addFilter(UserErrorsOnce())


VERBOSE_CONSOLE = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"rich": {"class": "kedro.logging.RichHandler", "rich_tracebacks": True}},
    "loggers": {"kedro": {"level": "INFO"}, "kedro.io.data_catalog": {"level": "WARNING"}, "medseg": {"level": "INFO"},
                "distributed": {"level": "WARNING"}},
    "root": {"handlers": ["rich"]},
}


def verbose_console() -> None:
    """`kedro run --verbose`: Kedro's rich log of every INFO line (nodes, datasets, medseg's own
    planning, batching and progress lines) instead of the stage lines."""
    import logging.config

    logging.config.dictConfig(VERBOSE_CONSOLE)
