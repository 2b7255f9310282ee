"""Progress of the steps that work case by case: "case i of N" and the time left, as log lines.

The lines go through Python's `logging`, so `kedro run` shows them with its rich handler like
any other log line, and a user's logging configuration applies. No Kedro import here: the
domain modules (`medseg.cases.validation`) use it too.

A run stays quiet when it is quick: a line is written at most every `every_s` seconds *and*
every `every_fraction` of the cases, plus one line when the last case is done. Six small cases
in a second give that one line; four CT-sized scans at 40 s each give one line per case.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

__all__ = ["CaseProgress", "format_duration", "track_cases", "track_partitions"]

T = TypeVar("T")

DEFAULT_EVERY_S = 5.0
DEFAULT_EVERY_FRACTION = 0.1

_logger = logging.getLogger(__name__)


def format_duration(seconds: float) -> str:
    """`"0.4 s"`, `"12 s"`, `"1:05"` (m:ss) or `"1:02:03"` (h:mm:ss), rounded to the second
    from 10 s up."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole} s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class CaseProgress:
    """Counts finished cases of one step and logs "case i of N", with an estimated time left.

    The estimate is the mean time per finished case times the cases left; the clock starts at
    `start()` (by default when the object is made) and the first `advance()` starts it too.

    Args:
        task: what the step does, the start of every line (e.g. "validate_cases").
        total: the number of cases N (0 is allowed and logs nothing).
        logger: where the lines go (default: this module's logger); level INFO.
        every_s: at least this many seconds between two lines (the last line excepted).
        every_fraction: at least this fraction of the cases between two lines (idem).
        clock: monotonic seconds; tests pass a fake one.
        start: start the clock now; False waits for `start()` or the first `advance()`
            (lazy partitions: the catalog computes them later, at save time).
        unit: what is counted, in the lines ("case"; "fold" for cross-validation).
    """

    def __init__(
        self,
        task: str,
        total: int,
        *,
        logger: logging.Logger | None = None,
        every_s: float = DEFAULT_EVERY_S,
        every_fraction: float = DEFAULT_EVERY_FRACTION,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
        unit: str = "case",
    ) -> None:
        self.task = task
        self.unit = unit
        self.total = int(total)
        self.done = 0
        self._logger = logger or _logger
        self._every_s = float(every_s)
        self._every_fraction = float(every_fraction)
        self._clock = clock
        self._started_at: float | None = None
        self._last_logged_at: float | None = None
        self._last_logged_done = 0
        if start:
            self.start()

    def start(self) -> CaseProgress:
        """Start the clock, unless it runs already."""
        if self._started_at is None:
            self._started_at = self._last_logged_at = self._clock()
        return self

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._started_at is None else self._clock() - self._started_at

    def remaining_s(self) -> float | None:
        """Estimated seconds left: mean time per finished case x cases left (None before the
        first case)."""
        if self.done == 0:
            return None
        return self.elapsed_s / self.done * max(self.total - self.done, 0)

    def advance(self, case_id: str | None = None) -> str | None:
        """Count one finished case and log a line when it is due.

        Args:
            case_id: the case just finished, named in the line.

        Returns:
            The line logged, or None when none was due.
        """
        self.start()
        self.done += 1
        now = self._clock()
        last = self.done >= self.total
        waited = now - (self._last_logged_at if self._last_logged_at is not None else now)
        moved = (self.done - self._last_logged_done) / max(self.total, 1)
        if not last and (waited < self._every_s or moved < self._every_fraction):
            return None
        self._last_logged_at, self._last_logged_done = now, self.done
        if last:
            cases = self.unit if self.total == 1 else f"{self.unit}s"
            line = f"{self.task}: {self.done} of {self.total} {cases} done in {format_duration(self.elapsed_s)}"
        else:
            named = f" ({case_id})" if case_id is not None else ""
            line = (
                f"{self.task}: {self.unit} {self.done} of {self.total}{named}, {format_duration(self.elapsed_s)} elapsed, "
                f"about {format_duration(self.remaining_s())} left"
            )
        self._logger.info(line)
        return line


def track_cases(items: Iterable[T], progress: CaseProgress, case_id: Callable[[T], str] | None = None) -> Iterator[T]:
    """Yield `items` and count each one as finished when the loop asks for the next.

    Args:
        items: the cases, one per loop step.
        progress: counts them (its `total` should be the number of items).
        case_id: names a case in the log line (default: `str(item)`).
    """
    name = case_id or str
    for item in items:
        yield item
        progress.advance(name(item))


def track_partitions(
    partitions: Mapping[str, Callable[[], T]], task: str, *, logger: logging.Logger | None = None, **options
) -> dict[str, Callable[[], T]]:
    """Lazy partitions (`PartitionedDataset`'s lazy save) that log progress as each one is made.

    The catalog calls each callable in turn when it saves the dataset; the clock starts with
    the first call, not when the node returns the dict.

    Args:
        partitions: {partition id: callable returning the partition's data}.
        task: the start of every log line, e.g. "preprocess_cases (images)".
        logger: see :class:`CaseProgress`.
        options: `every_s`, `every_fraction` or `clock` of :class:`CaseProgress`.

    Returns:
        The same keys, each callable wrapped; its result is returned unchanged.
    """
    progress = CaseProgress(task, len(partitions), logger=logger, start=False, **options)

    def tracked(key: str, make: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            progress.start()
            result = make()
            progress.advance(key)
            return result

        return run

    return {key: tracked(key, make) for key, make in partitions.items()}
