"""The verdict of a benchmark: each measured value against its target, and the exit status.

Every script in `benchmarks/` ends with `sys.exit(report_targets([...]))`, so a missed target
prints FAILED *and* makes the script exit 1; `make benchmarks` stops at the first script that
exits non-zero. This module is not a benchmark itself: its name starts with `_`, and the
Makefile's loop skips such files.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Target", "report_targets"]

_COMPARISONS = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class Target:
    """One measured value and the bound it must meet.

    Attributes:
        name: what was measured, e.g. "ratio 24/6 cases".
        value: the measured value.
        comparison: "<=" (the value must not exceed `limit`) or ">=" (must reach it).
        limit: the bound, inclusive.
    """

    name: str
    value: float
    comparison: str
    limit: float

    def __post_init__(self) -> None:
        if self.comparison not in _COMPARISONS:
            raise ValueError(f"comparison must be one of {sorted(_COMPARISONS)}, not {self.comparison!r}")

    @property
    def met(self) -> bool:
        """True when the value meets the bound. A NaN or infinite value never does: a
        measurement that went wrong is not a pass."""
        value = float(self.value)
        return math.isfinite(value) and _COMPARISONS[self.comparison](value, self.limit)


def report_targets(targets: Iterable[Target]) -> int:
    """Print one verdict line per target and return the script's exit status.

    Args:
        targets: the targets of one benchmark run (at least one).

    Returns:
        0 when every target is met, 1 when any is missed (for `sys.exit`).

    Raises:
        ValueError: if `targets` is empty (a benchmark with nothing to check passes nothing).
    """
    targets = list(targets)
    if not targets:
        raise ValueError("report_targets needs at least one target.")
    for target in targets:
        verdict = "ok" if target.met else "FAILED"
        print(f"target {target.name}: {target.value:.4g} {target.comparison} {target.limit:g}   {verdict}")
    missed = [target.name for target in targets if not target.met]
    if missed:
        print(f"FAILED: {len(missed)} of {len(targets)} targets missed ({', '.join(missed)})")
        return 1
    print(f"all {len(targets)} targets met")
    return 0
