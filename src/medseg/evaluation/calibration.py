"""Calibrated probabilities: temperature scaling fitted on held-out cases, and the expected
calibration error (ECE) that says how far a model's probabilities are from its frequencies.

**Temperature.** One temperature T for the model, binary or with several classes: the logits
are divided by T before the sigmoid or the softmax. A single T leaves the ranking of the
classes in every voxel as it was, so the masks do not change (the segmenter moves its
threshold with it); a temperature per class (vector scaling) could move the argmax, and a
calibration step must not change what was evaluated. The logits are recovered from the
probabilities the segmenter already averages (over mirrored copies, overlapping windows): the
log-odds for one sigmoid channel, the log-probabilities for a softmax (the logits up to a
constant per voxel, which a softmax ignores). So T applies to the averaged probability, exactly
as `predict`, serving and every engine produce it.

**Fit.** T minimises the negative log-likelihood of the reference labels over a sample of the
held-out voxels, drawn balanced (as many reference-foreground voxels as background ones per
case and class, seeded), so that the background's millions of easy voxels do not decide it.

**ECE, foreground-weighted.** Per foreground class (one against the rest), every voxel's
probability of that class falls in one of `bins` equal bins of [0, 1]. Voxels weigh so that the
reference's foreground and its background weigh one half each (w = 1 / (2 N_fg) and
1 / (2 N_bg), summed over the cases scored): in each bin the weighted mean probability is
compared with the weighted share of foreground voxels, and the ECE is the sum over bins of the
bin's weight times the absolute difference,
``ECE = Σ_b |Σ_{v∈b} w_v y_v − Σ_{v∈b} w_v p_v|``. With several classes, the mean over classes.
0 is perfect; an unweighted ECE would be near 0 for any model, the background being almost all
voxels and almost all certain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from medseg.inference.temperature import EPSILON, apply_temperature, logits_of, temperature_threshold  # noqa: F401

__all__ = [
    "CalibrationCounts",
    "apply_temperature",
    "balanced_sample",
    "fit_kept_temperature",
    "fit_temperature",
    "one_vs_rest",
    "temperature_threshold",
]

TEMPERATURE_RANGE = (0.05, 20.0)
ECE_BINS = 15


def one_vs_rest(probability: np.ndarray, labels: np.ndarray, class_values: tuple[int, ...]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probability of the class, reference is the class) per foreground class: one sigmoid
    channel is class `class_values[0]`'s; a softmax's channel k + 1 is `class_values[k]`'s."""
    probability = np.asarray(probability)
    if probability.ndim == labels.ndim:
        return [(probability, labels != 0)]
    return [(probability[..., index + 1], labels == value) for index, value in enumerate(class_values)]


def balanced_sample(
    probability: np.ndarray, labels: np.ndarray, class_values: tuple[int, ...], per_side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `per_side` reference-foreground and as many background voxels of a case, per
    class (for a softmax, the voxels' whole probability vectors), and their labels: the
    sample `fit_temperature` fits on. Returns (probabilities (n[, K + 1]), labels (n,))."""
    flat_labels = np.asarray(labels).reshape(-1)
    probability = np.asarray(probability)
    channels = probability.reshape(flat_labels.size, -1) if probability.ndim > labels.ndim else probability.reshape(-1)
    chosen = []
    for _, reference in one_vs_rest(probability, labels, class_values):
        mask = reference.reshape(-1)
        for side in (np.flatnonzero(mask), np.flatnonzero(~mask)):
            if side.size:
                chosen.append(rng.choice(side, size=min(per_side, side.size), replace=False))
    index = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return channels[index], flat_labels[index]


def _negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float, binary: bool,
                             class_values: tuple[int, ...]) -> float:
    scaled = logits / temperature
    if binary:
        y = (labels != 0).astype(np.float64)
        return float(np.mean(np.logaddexp(0.0, scaled) - y * scaled))  # -log σ(z) or -log(1 - σ(z))
    channel = np.zeros(labels.shape, dtype=np.int64)
    for index, value in enumerate(class_values):
        channel[labels == value] = index + 1
    log_normalizer = np.logaddexp.reduce(scaled, axis=-1)
    return float(np.mean(log_normalizer - scaled[np.arange(labels.size), channel]))


def fit_temperature(probability: np.ndarray, labels: np.ndarray, class_values: tuple[int, ...]) -> float:
    """The temperature that minimises the sample's negative log-likelihood.

    Args:
        probability: (n,) sigmoid probabilities or (n, K + 1) softmax probabilities, e.g.
            from `balanced_sample`.
        labels: (n,) reference label values.
        class_values: the foreground label values, in channel order.

    Returns:
        T in `TEMPERATURE_RANGE` (bounded search on log T); 1.0 for an empty sample or one
        with a single label, where nothing can be fitted.
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0 or np.unique(labels).size < 2:
        return 1.0
    binary = np.asarray(probability).ndim == 1
    logits = logits_of(probability, binary)
    result = optimize.minimize_scalar(
        lambda log_t: _negative_log_likelihood(logits, labels, float(np.exp(log_t)), binary, class_values),
        bounds=tuple(np.log(TEMPERATURE_RANGE)), method="bounded", options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def fit_kept_temperature(probability: np.ndarray, labels: np.ndarray, class_values: tuple[int, ...]) -> tuple[float, dict[str, float]]:
    """`fit_temperature` on a balanced sample, kept only if it lowers that sample's ECE (the
    balanced sample weighs foreground and background one half each, as the ECE does).

    Returns:
        (the temperature to use: the fitted one, or 1.0 when it did not lower the ECE or
        nothing could be fitted; {`fitted_temperature`, `val_ece_before`, `val_ece_after`}).
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        return 1.0, {}
    fitted = fit_temperature(probability, labels, class_values)
    binary = np.asarray(probability).ndim == 1
    before, after = CalibrationCounts(class_values), CalibrationCounts(class_values)
    before.add(probability, labels)
    after.add(apply_temperature(probability, fitted, binary), labels)
    report = {"fitted_temperature": fitted, "val_ece_before": before.ece(), "val_ece_after": after.ece()}
    return (fitted if report["val_ece_after"] < report["val_ece_before"] else 1.0), report


@dataclass
class CalibrationCounts:
    """The sums behind the foreground-weighted ECE, accumulated case by case so that no
    case's voxels are kept: per class, per side (background, foreground) and bin, the voxel
    count and the sum of the probabilities."""

    class_values: tuple[int, ...]
    bins: int = ECE_BINS
    counts: np.ndarray = field(init=False)
    sums: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.counts = np.zeros((len(self.class_values), 2, self.bins))
        self.sums = np.zeros((len(self.class_values), 2, self.bins))

    def add(self, probability: np.ndarray, labels: np.ndarray) -> None:
        """Add one case: its probabilities (sigmoid or softmax) and reference label map."""
        for index, (p, reference) in enumerate(one_vs_rest(probability, labels, self.class_values)):
            p = np.asarray(p, dtype=np.float64).reshape(-1)
            side = reference.reshape(-1).astype(np.int64)
            which = np.minimum((p * self.bins).astype(np.int64), self.bins - 1)
            flat = side * self.bins + which
            self.counts[index] += np.bincount(flat, minlength=2 * self.bins).reshape(2, self.bins)
            self.sums[index] += np.bincount(flat, weights=p, minlength=2 * self.bins).reshape(2, self.bins)

    def ece(self) -> float:
        """The foreground-weighted ECE (module docstring), the mean over classes that have
        both foreground and background voxels; NaN when none has."""
        values = []
        for counts, sums in zip(self.counts, self.sums):
            totals = counts.sum(axis=1)
            if (totals == 0).any():
                continue
            weights = 0.5 / totals  # per side: background, foreground
            predicted = (weights[:, None] * sums).sum(axis=0)
            observed = weights[1] * counts[1]
            values.append(float(np.abs(observed - predicted).sum()))
        return float(np.mean(values)) if values else float("nan")
