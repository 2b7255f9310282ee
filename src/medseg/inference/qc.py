"""Quality control of every prediction: three flags, each with its score and its reason, that
say when not to trust a mask, and one combined score that orders the cases for review.

- **out of distribution**: the scan's voxel spacing, field of view (mm along each RAS axis),
  orientation or intensity (the whole image's mean and standard deviation) lie outside what the
  model was trained on;
- **low confidence**: the mean predictive entropy over the predicted foreground (bits, scaled
  to [0, 1] by log2 of the number of channels) is high;
- **implausible size**: a class's predicted volume lies outside the training cases' range, or
  it is empty where every training case had it.

Each raw score is a distance: for a range, how far the value lies beyond it in units of the
range's width (0 inside; the width at least a tenth of the range's magnitude, so a dataset of
one spacing still has a tolerance); an orientation never seen counts 1, a class missing where it
was always present counts `MISSING`; for confidence, the entropy itself. The ranges come from
the training cases, the thresholds from the held-out (validation) cases: each flag's threshold
is the largest raw score of a held-out case times `HELD_OUT_SLACK`, and never below the flag's
floor (`FLOORS`), so no held-out case is flagged; the entropy's is raised further to the bound
that a new clean case exceeds with probability `FALSE_FLAG_RATE` / 3 if the held-out entropies
are log-normal (`prediction_bound`), since a few held-out cases underestimate their tail. A flag's score is its raw score over its
threshold: 1 or more flags it. The combined QC score is the largest of the three scores, so it is
at least 1 exactly when some flag is raised, and a higher one is further from what the model knows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from nibabel.orientations import aff2axcodes, io_orientation

__all__ = ["QC_COLUMNS", "QualityReference", "ScanFeatures", "assess", "assess_prediction", "entropy_of", "grid_volumes_ml", "predicted_foreground", "scan_features"]

FLAGS = ("out_of_distribution", "low_confidence", "implausible_size")
QC_COLUMNS = ("qc_score", "qc_flags", "qc_reason", *(f"qc_{flag}" for flag in FLAGS))
FLOORS = {"out_of_distribution": 0.5, "low_confidence": 0.1, "implausible_size": 0.5}
HELD_OUT_SLACK = 1.1
# The share of clean cases the flags may raise between them, by design: the entropy's threshold
# is its held-out prediction bound at a third of it (`prediction_bound`).
FALSE_FLAG_RATE = 0.1
MISSING = 10.0  # the raw size score of a class predicted empty where every training case had it
RELATIVE_WIDTH = 0.1


@dataclass(frozen=True)
class ScanFeatures:
    """What the out-of-distribution flag compares: spacing and field of view along RAS axes (mm),
    the orientation code (`RAS`, `LPS`, ...), the image's intensity mean and standard deviation."""

    spacing: tuple[float, float, float]
    extent_mm: tuple[float, float, float]
    orientation: str
    intensity_mean: float
    intensity_std: float


def canonical_extent_mm(shape: Sequence[int], affine: np.ndarray) -> tuple[float, float, float]:
    """The field of view in mm along the R, A, S axes of a grid (shape × spacing, reordered)."""
    affine = np.asarray(affine, dtype=np.float64)
    sizes = np.asarray(shape[:3], dtype=np.float64) * np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    extent = np.zeros(3)
    for axis, (target, _) in enumerate(io_orientation(affine)):
        extent[int(target)] = sizes[axis]
    return tuple(float(v) for v in extent)


def scan_features(data: np.ndarray, affine: np.ndarray) -> ScanFeatures:
    """A scan's features, from its array (the scan's own grid) and affine."""
    affine = np.asarray(affine, dtype=np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    spacing = np.zeros(3)
    for axis, (target, _) in enumerate(io_orientation(affine)):
        spacing[int(target)] = zooms[axis]
    values = np.asarray(data)
    return ScanFeatures(tuple(float(v) for v in spacing), canonical_extent_mm(values.shape, affine),
                        "".join(aff2axcodes(affine)), float(values.mean(dtype=np.float64)),
                        float(values.std(dtype=np.float64)))


def predicted_foreground(probability: np.ndarray, threshold: float) -> np.ndarray:
    """The probabilities of the predicted foreground voxels: (n,) of one sigmoid channel at or
    above `threshold`; (n, K + 1) of a softmax's voxels whose most probable channel is not 0."""
    p = np.asarray(probability, dtype=np.float32)
    return p[p >= threshold] if p.ndim == 3 else p[p.argmax(axis=-1) != 0]


def entropy_of(foreground: np.ndarray) -> float:
    """The mean entropy of `predicted_foreground`'s voxels in [0, 1]: bits for one sigmoid
    channel, over log2(K + 1) for a softmax; 0.0 for none (the size flag says so)."""
    values = np.asarray(foreground, dtype=np.float64)
    if values.shape[0] == 0:
        return 0.0
    if values.ndim == 1:
        q = np.clip(values, 1e-7, 1 - 1e-7)
        return float(np.mean(-(q * np.log2(q) + (1 - q) * np.log2(1 - q))))
    q = np.clip(values, 1e-7, 1.0)
    return float(np.mean(-(q * np.log2(q)).sum(axis=-1)) / np.log2(values.shape[-1]))


def grid_volumes_ml(probability: np.ndarray, threshold: float, class_values: Sequence[str], voxel_ml: float) -> dict[str, float]:
    """Each class's predicted volume in ml on the model's grid, {label value (text): ml}: one
    sigmoid channel at `threshold` is the first value's; a softmax's channel k + 1 is value k's."""
    p = np.asarray(probability)
    if p.ndim == 3:
        return {class_values[0]: float(np.count_nonzero(p >= threshold)) * voxel_ml}
    counts = np.bincount(p.argmax(axis=-1).reshape(-1), minlength=len(class_values) + 1)
    return {value: float(counts[index + 1]) * voxel_ml for index, value in enumerate(class_values)}


def _beyond(value: float, low: float, high: float) -> float:
    """How far `value` lies outside [low, high], in units of the range's width (0 inside)."""
    width = max(high - low, RELATIVE_WIDTH * max(abs(low), abs(high)), 1e-6)
    return float(max(0.0, low - value, value - high) / width)


@dataclass
class QualityReference:
    """What a segmenter knows of its training data, and the flags' thresholds (saved in
    `segmenter.json` as `qc`).

    Attributes:
        spacing, extent_mm: [low, high] per RAS axis over the training cases.
        orientations: the orientation codes of the training cases.
        intensity_mean, intensity_std: [low, high] over the training cases.
        volume_ml: {label value (text): [low, high]} of each class's volume in the training cases.
        always_present: label values present in every training case.
        thresholds: {flag: threshold}, from the held-out cases (`calibrated`).
        held_out_cases: how many held-out cases set them.
    """

    spacing: list[list[float]]
    extent_mm: list[list[float]]
    orientations: list[str]
    intensity_mean: list[float]
    intensity_std: list[float]
    volume_ml: dict[str, list[float]]
    always_present: list[str]
    thresholds: dict[str, float] = field(default_factory=lambda: dict(FLOORS))
    held_out_cases: int = 0

    @classmethod
    def from_training(cls, features: Sequence[ScanFeatures], volumes: Sequence[Mapping[str, float]]) -> QualityReference:
        """The ranges of the training cases: their features, and their classes' volumes (ml)."""
        def span(values) -> list[float]:
            return [float(np.min(values)), float(np.max(values))]

        classes = sorted({value for case in volumes for value in case})
        return cls(
            spacing=[span([f.spacing[a] for f in features]) for a in range(3)],
            extent_mm=[span([f.extent_mm[a] for f in features]) for a in range(3)],
            orientations=sorted({f.orientation for f in features}),
            intensity_mean=span([f.intensity_mean for f in features]),
            intensity_std=span([f.intensity_std for f in features]),
            volume_ml={value: span([case.get(value, 0.0) for case in volumes]) for value in classes},
            always_present=[value for value in classes if all(case.get(value, 0.0) > 0 for case in volumes)],
        )

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> QualityReference:
        return cls(**{key: value for key, value in record.items() if key in cls.__dataclass_fields__})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def raw_scores(self, features: ScanFeatures, entropy: float, volumes: Mapping[str, float]) -> dict[str, tuple[float, str]]:
        """{flag: (raw score, reason)} of one case."""
        checks = [(f"spacing {'RAS'[a]} {features.spacing[a]:.3g} mm", _beyond(features.spacing[a], *self.spacing[a]),
                   f"[{self.spacing[a][0]:.3g}, {self.spacing[a][1]:.3g}]") for a in range(3)]
        checks += [(f"field of view {'RAS'[a]} {features.extent_mm[a]:.4g} mm", _beyond(features.extent_mm[a], *self.extent_mm[a]),
                    f"[{self.extent_mm[a][0]:.4g}, {self.extent_mm[a][1]:.4g}]") for a in range(3)]
        checks += [(f"intensity mean {features.intensity_mean:.4g}", _beyond(features.intensity_mean, *self.intensity_mean),
                    f"[{self.intensity_mean[0]:.4g}, {self.intensity_mean[1]:.4g}]"),
                   (f"intensity std {features.intensity_std:.4g}", _beyond(features.intensity_std, *self.intensity_std),
                    f"[{self.intensity_std[0]:.4g}, {self.intensity_std[1]:.4g}]")]
        if features.orientation not in self.orientations:
            checks.append((f"orientation {features.orientation}", 1.0, "/".join(self.orientations)))
        what, ood, seen = max(checks, key=lambda c: c[1])
        sizes = [(f"class {value} {volumes.get(value, 0.0):.4g} ml", _beyond(volumes.get(value, 0.0), low, high),
                  f"[{low:.4g}, {high:.4g}] ml") for value, (low, high) in self.volume_ml.items()]
        sizes += [(f"class {value} empty", MISSING, "present in every training case")
                  for value in self.always_present if volumes.get(value, 0.0) == 0.0]
        size_what, size, size_seen = max(sizes, key=lambda c: c[1]) if sizes else ("", 0.0, "")
        return {
            "out_of_distribution": (ood, f"{what} outside the training range {seen}"),
            "low_confidence": (entropy, f"mean foreground entropy {entropy:.3f}"),
            "implausible_size": (size, f"{size_what} outside the training range {size_seen}" if sizes else ""),
        }

    def calibrated(self, held_out: Sequence[Mapping[str, tuple[float, str]]]) -> QualityReference:
        """The thresholds from the held-out cases' raw scores (`raw_scores`): each flag's floor,
        the largest held-out score times `HELD_OUT_SLACK`, and for the entropy (a score every
        case has) its log-normal prediction bound at `FALSE_FLAG_RATE` / 3, whichever is highest."""
        thresholds = {}
        for flag in FLAGS:
            values = [case[flag][0] for case in held_out]
            threshold = max(FLOORS[flag], HELD_OUT_SLACK * max(values, default=0.0))
            if flag == "low_confidence":
                threshold = max(threshold, prediction_bound(values, FALSE_FLAG_RATE / len(FLAGS)))
            thresholds[flag] = threshold
        self.thresholds = thresholds
        self.held_out_cases = len(held_out)
        return self


def prediction_bound(values: Sequence[float], rate: float) -> float:
    """The value a new case from the held-out cases' population exceeds with probability
    `rate`, if their logarithms are normal: exp(m + t_{n-1}(1 - rate) s sqrt(1 + 1/n)), with m
    and s the mean and standard deviation of the n logarithms (Student's prediction interval,
    which widens as n shrinks). 0 with fewer than 3 positive values.

    Why: the held-out cases are few (8 validation cases) and they chose the checkpoint, so
    their entropies run low; the largest of 8 is exceeded by about one new clean case in 9,
    and more, which would flag clean cases as often as the flag is worth.
    """
    from scipy import stats

    logs = np.log([v for v in values if v > 0])
    n = logs.size
    if n < 3:
        return 0.0
    spread = float(logs.std(ddof=1)) * np.sqrt(1.0 + 1.0 / n)
    return float(np.exp(logs.mean() + stats.t.ppf(1.0 - rate, n - 1) * spread))


def assess_prediction(record: Mapping[str, Any], data: np.ndarray, affine: np.ndarray, probability: np.ndarray,
                      threshold: float, class_values: Sequence[str], voxel_ml: float) -> dict[str, Any]:
    """The QC columns of one prediction (`assess`), from the reference `record`
    (`QualityReference.to_dict`; {} gives no columns), the scan's array and affine, and its
    calibrated probabilities on a grid of `voxel_ml` ml voxels thresholded at `threshold`."""
    if not record:
        return {}
    reference = QualityReference.from_dict(record)
    entropy = entropy_of(predicted_foreground(probability, threshold))
    volumes = grid_volumes_ml(probability, threshold, class_values, voxel_ml)
    return assess(reference, reference.raw_scores(scan_features(data, affine), entropy, volumes))


def assess(reference: QualityReference, raw: Mapping[str, tuple[float, str]]) -> dict[str, Any]:
    """The QC columns of one case: `qc_score` (the largest flag score), `qc_flags` (the raised
    flags, `;`-separated, empty when none), `qc_reason` (each raised flag's reason) and each
    flag's own score `qc_<flag>`."""
    scores = {flag: raw[flag][0] / reference.thresholds[flag] for flag in FLAGS}
    raised = [flag for flag in FLAGS if scores[flag] >= 1.0]
    return {
        "qc_score": round(float(max(scores.values())), 4),
        "qc_flags": ";".join(raised),
        "qc_reason": "; ".join(f"{flag}: {raw[flag][1]}" for flag in raised),
        **{f"qc_{flag}": round(float(scores[flag]), 4) for flag in FLAGS},
    }
