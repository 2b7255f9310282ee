"""Temperature scaling at inference: a segmenter's probabilities with their logits divided by
the temperature that `medseg.evaluation.calibration` fitted on held-out cases.

The logits are recovered from the probabilities (the log-odds of one sigmoid channel; the
log-probabilities of a softmax, its logits up to a constant per voxel), since the segmenter
averages probabilities over mirrored copies and overlapping windows.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EPSILON", "apply_temperature", "logits_of", "temperature_threshold"]

EPSILON = 1e-6  # probabilities are clipped to [ε, 1 - ε] before their logarithm


def logits_of(probability: np.ndarray, binary: bool, dtype: type = np.float64) -> np.ndarray:
    """The log-odds (`binary`) or log-probabilities of clipped probabilities."""
    p = np.clip(np.asarray(probability, dtype=dtype), EPSILON, 1.0 - EPSILON)
    return np.log(p) - np.log1p(-p) if binary else np.log(p)


def apply_temperature(probability: np.ndarray, temperature: float, binary: bool) -> np.ndarray:
    """Probabilities with their logits divided by `temperature`, in float32.

    Args:
        probability: (…) foreground probabilities of one sigmoid channel (`binary`), or
            (…, K + 1) class probabilities on the last axis.
        temperature: T > 0; 1 returns the probabilities unchanged.
    """
    if temperature == 1.0:
        return np.asarray(probability, dtype=np.float32)
    # float32: a CT scan's class probabilities are gigabytes in float64.
    logits = logits_of(probability, binary, np.float32) / np.float32(temperature)
    if binary:
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def temperature_threshold(threshold: float, temperature: float) -> float:
    """The threshold on calibrated probabilities that gives the masks of `threshold` on the
    network's own: sigmoid(logit(threshold) / T)."""
    return float(apply_temperature(np.asarray(threshold), temperature, binary=True))
