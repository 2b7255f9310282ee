"""Argument checks shared by the patching modules.

Each check raises `ConfigurationError` naming the parameter and saying how to fix it, so a bad
value in `parameters_*.yml` never surfaces as a numpy traceback deep inside a loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medseg.errors import ConfigurationError


def check_shape(value: Sequence[int], name: str, ndim: int | None = None) -> tuple[int, ...]:
    """Return `value` as a tuple of positive ints, or raise.

    Args:
        value: a shape in voxels, e.g. (96, 96, 64).
        name: the parameter name used in the error message.
        ndim: the required number of axes; None accepts any number >= 1.
    """
    try:
        shape = tuple(int(v) for v in value)
        exact = all(int(v) == v for v in value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"{name}={value!r} is not a shape: pass a sequence of positive integers, e.g. (64, 64, 32)."
        ) from None
    if not shape or not exact or min(shape) < 1:
        raise ConfigurationError(
            f"{name}={value!r} is not a shape: pass a sequence of positive integers, e.g. (64, 64, 32)."
        )
    if ndim is not None and len(shape) != ndim:
        raise ConfigurationError(f"{name}={value!r} has {len(shape)} axes; pass exactly {ndim}.")
    return shape


def check_positive_int(value: int, name: str) -> int:
    """Return `value` as an int >= 1, or raise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigurationError(f"{name}={value!r} is invalid: pass an integer >= 1.")
    return int(value)


def check_fraction(value: float, name: str, *, upper_inclusive: bool = True) -> float:
    """Return `value` as a float in [0, 1] (or [0, 1) when `upper_inclusive` is False), or raise."""
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = float("nan")
    upper_ok = fraction <= 1.0 if upper_inclusive else fraction < 1.0
    if not (fraction >= 0.0 and upper_ok):
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ConfigurationError(f"{name}={value!r} is invalid: pass a number in {interval}.")
    return fraction


def check_volume(volume: np.ndarray, name: str, ndim: int) -> np.ndarray:
    """Return `volume` as an ndarray with `ndim` axes, or raise."""
    array = np.asarray(volume)
    if array.ndim != ndim:
        raise ConfigurationError(
            f"{name} has shape {array.shape}; pass an array with {ndim} axes "
            + ("(x, y, z) and no channel axis." if ndim == 3 else "(x, y, z, channels).")
        )
    return array
