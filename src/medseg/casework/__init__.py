"""Per-case work in its plainest form, for the domain modules: one case after another in this
process, and the two-part result a segmenter makes. `medseg.runs.compute` runs the same work on a
Dask cluster (its executors' `map` has the signature of `map_in_order`), so the domain takes a
`mapper` argument and never imports the run infrastructure. No Kedro, MLflow or Dask here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from medseg.casework.progress import CaseProgress

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverThenWorker:
    """A per-case result made in two parts: `driver()` in this process (a segmenter's network),
    then `worker(driver's result)` where the executor runs its tasks (the inverse geometry and
    the writing of a mask). Calling it runs both here, so it is also a plain lazy partition."""

    driver: Callable[[], Any]
    worker: Callable[[Any], Any]

    def __call__(self) -> Any:
        return self.worker(self.driver())


def map_in_order(
    func: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    task: str,
    case_ids: Sequence[str] | None = None,
    prepare: Callable[[Any], Any] | None = None,
    logger: logging.Logger | None = None,
) -> list[Any]:
    """`[func(prepare(item)) for item in items]` in this process, logging "task: case i of N".

    Args:
        func: the per-case work.
        items: one per case.
        task: the start of each progress line.
        case_ids: names of the cases in the progress lines (default `str(item)`).
        prepare: work run on each item just before `func`; its result is what `func` receives.
        logger: where the progress lines go (default this module's).

    Returns:
        The results, in the order of `items`. The first exception is raised as is.
    """
    names = list(case_ids) if case_ids is not None else [str(item) for item in items]
    progress = CaseProgress(task, len(items), logger=logger or _logger)
    results = []
    for item, name in zip(items, names):
        results.append(func(prepare(item) if prepare is not None else item))
        progress.advance(name)
    return results
