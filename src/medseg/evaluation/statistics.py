"""Uncertainty over cases: bootstrap confidence intervals of a mean, and the paired comparison
of two models on the same cases.

Both resample cases (never voxels or classes), with replacement, from a seeded generator, so a
summary is the same on every machine and every rerun. The interval is the percentile
interval: the (1 - level) / 2 and (1 + level) / 2 quantiles of the resampled statistic
(numpy's linear interpolation). It is the interval that nnU-Net's and Metrics Reloaded's users
meet most, and needs no assumption on the metric's distribution; with few cases it is too
narrow (it cannot see tails that the sample lacks), which is why the champion's comparison
also asks for a minimum number of cases (`medseg.pipelines.selection`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["Bootstrap", "PairedComparison", "bootstrap_interval", "paired_bootstrap"]

# Resampled statistics computed at once: bounds the (chunk, cases, classes) array to a few
# tens of MiB for a thousand cases of ten classes.
_CHUNK = 256


@dataclass(frozen=True)
class Bootstrap:
    """How a summary's intervals are drawn (`params:evaluation`).

    Attributes:
        resamples: resampled sets of cases (0: no interval).
        seed: the generator's seed.
        level: the interval's confidence level, e.g. 0.95.
    """

    resamples: int = 2000
    seed: int = 0
    level: float = 0.95

    @classmethod
    def of(cls, evaluation: dict | None) -> Bootstrap:
        """From `params:evaluation` (its `bootstrap_resamples`, `bootstrap_seed`,
        `confidence_level`), or the defaults for None."""
        if not evaluation:
            return cls()
        return cls(int(evaluation["bootstrap_resamples"]), int(evaluation["bootstrap_seed"]),
                   float(evaluation["confidence_level"]))


def _class_mean_of_means(samples: np.ndarray) -> np.ndarray:
    """(chunk, cases, classes) -> (chunk,): the mean over classes of each class's mean over
    its finite cases; NaN where no class has a finite case."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: NaN, as meant
        return np.nanmean(np.nanmean(samples, axis=1), axis=1)


def bootstrap_interval(values: np.ndarray, bootstrap: Bootstrap = Bootstrap()) -> tuple[float, float] | None:
    """The percentile bootstrap interval of a mean over cases.

    Args:
        values: shape (cases,) or (cases, classes), NaN where a case has no value for a class
            (both masks empty). The statistic is the mean over classes of each class's mean
            over its finite cases (for one class, the mean of the finite values), the
            `mean` of `medseg.evaluation.reports.summarize_per_class`.
        bootstrap: resamples, seed and level.

    Returns:
        (low, high), or None when no interval can be drawn: no resample asked for, or fewer
        than two cases with a finite value. A resample whose cases are all NaN is left out.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0 or array.shape[0] == 0:
        return None
    array = array.reshape(array.shape[0], -1)
    array = array[np.isfinite(array).any(axis=1)]
    n_cases = array.shape[0]
    if bootstrap.resamples <= 0 or n_cases < 2:
        return None
    generator = np.random.default_rng(bootstrap.seed)
    statistics = []
    for start in range(0, bootstrap.resamples, _CHUNK):
        count = min(_CHUNK, bootstrap.resamples - start)
        statistics.append(_class_mean_of_means(array[generator.integers(0, n_cases, size=(count, n_cases))]))
    drawn = np.concatenate(statistics)
    drawn = drawn[np.isfinite(drawn)]
    tail = (1.0 - bootstrap.level) / 2.0
    low, high = np.quantile(drawn, [tail, 1.0 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedComparison:
    """A candidate against a reference on the same cases (`paired_bootstrap`).

    Attributes:
        n_cases: the cases both were scored on.
        difference: the mean over cases of candidate - reference.
        low, high: its two-sided percentile interval at the bootstrap's level.
        p_value: the one-sided bootstrap p-value of "no improvement": the share of resampled
            mean differences at or below 0, counted as (k + 1) / (B + 1) so that it is never 0.
    """

    n_cases: int
    difference: float
    low: float
    high: float
    p_value: float

    def significant(self, alpha: float) -> bool:
        """Whether the candidate is better at one-sided level `alpha`."""
        return self.difference > 0 and self.p_value < alpha


def paired_bootstrap(candidate: np.ndarray, reference: np.ndarray, bootstrap: Bootstrap = Bootstrap()) -> PairedComparison:
    """Compare two models' per-case scores, paired by case, by resampling the cases.

    Args:
        candidate, reference: shape (cases,), the same cases in the same order (e.g. each
            case's mean Dice over its classes); a case where either is NaN is left out.
        bootstrap: resamples (at least 1), seed and level.

    Returns:
        The mean difference, its interval and one-sided p-value. With fewer than two paired
        cases the interval is the difference itself and the p-value 1.

    Raises:
        ValueError: if the two arrays have different lengths.
    """
    first, second = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (candidate, reference))
    if first.shape != second.shape:
        raise ValueError(f"Paired scores need the same cases: {first.size} against {second.size}.")
    differences = (first - second)[np.isfinite(first) & np.isfinite(second)]
    n_cases = int(differences.size)
    if n_cases == 0:
        return PairedComparison(0, float("nan"), float("nan"), float("nan"), 1.0)
    mean = float(differences.mean())
    if n_cases < 2 or bootstrap.resamples <= 0:
        return PairedComparison(n_cases, mean, mean, mean, 1.0)
    generator = np.random.default_rng(bootstrap.seed)
    drawn = np.concatenate([
        differences[generator.integers(0, n_cases, size=(min(_CHUNK, bootstrap.resamples - start), n_cases))].mean(axis=1)
        for start in range(0, bootstrap.resamples, _CHUNK)
    ])
    tail = (1.0 - bootstrap.level) / 2.0
    low, high = np.quantile(drawn, [tail, 1.0 - tail])
    p_value = (int(np.count_nonzero(drawn <= 0.0)) + 1) / (drawn.size + 1)
    return PairedComparison(n_cases, mean, float(low), float(high), float(p_value))
