"""Inference profiles: `fast`, `balanced` and `accurate`, each a setting of the segmenter's
existing knobs chosen by measurement.

A setting is the test-time mirroring axes, the sliding windows' overlap (patch models), the
largest-component filter and the engine (`medseg.inference.engines`). Only what the model has
is a candidate: mirroring over the axes that change its prediction (`effective_mirror_axes`),
overlap where it slides windows, onnxruntime where its export passed its parity check.

`measure_settings` runs every candidate on held-out cases (the validation split), on the
training grid: the seconds of the network part and the postprocessing per scan, and the Dice
against the case's labels. `choose_profiles` then takes:

- `accurate`: the best mean Dice, the quickest of those within `ACCURATE_DICE` (0.001) of it:
  the same setting on another engine differs by the rounding of the threshold's voxels (on a
  256x256x160 scan the 2D U-Net's 0.9662 on both engines, its float32 export 23 s slower), and
  that is not a reason to be slower;
- `balanced`: the quickest within `BALANCED_DICE` (0.005) of it;
- `fast`: the quickest within `FAST_DICE` (0.02) of it.

The temperature and the QC thresholds were fitted with the plan's own setting. Every profile
uses them unchanged: the temperature only moves the probabilities against the threshold (no
mask changes), and mirroring averages probabilities, which lowers their entropy a little, so
under a mirrored profile the low-confidence flag is, if anything, raised less often.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from medseg.errors import ConfigurationError
from medseg.inference.engines import ONNXRUNTIME, PASSED, TENSORFLOW, class_dice
from medseg.inference.postprocessing import keep_largest_component, source_label_map

PROFILES = ("fast", "balanced", "accurate")
ACCURATE_DICE = 0.001
BALANCED_DICE = 0.005
FAST_DICE = 0.02
# Overlaps tried for sliding windows, besides the plan's own: nnU-Net's 0.5 and a cheaper one.
OVERLAPS = (0.25, 0.5)


@dataclass(frozen=True)
class InferenceSetting:
    """One candidate: mirroring axes, overlap (None: the window has none), the largest-component
    filter, the engine."""

    mirror_axes: tuple[int, ...]
    overlap: float | None
    keep_largest_component: bool
    engine: str

    @property
    def label(self) -> str:
        parts = [f"mirror {','.join(map(str, self.mirror_axes))}" if self.mirror_axes else "no mirroring"]
        if self.overlap is not None:
            parts.append(f"overlap {self.overlap:g}")
        parts += ["largest component"] if self.keep_largest_component else []
        return " · ".join([*parts, self.engine])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mirror_axes": list(self.mirror_axes)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> InferenceSetting:
        return cls(tuple(int(a) for a in record["mirror_axes"]), None if record.get("overlap") is None else float(record["overlap"]),
                   bool(record["keep_largest_component"]), str(record["engine"]))


def candidate_settings(segmenter) -> list[InferenceSetting]:
    """Every setting `segmenter` can run: mirroring none, the plan's and all axes (those that
    change its prediction), overlaps for sliding windows, with and without the largest
    component, on TensorFlow and, where its export passed, onnxruntime."""
    mirrors = list(dict.fromkeys([(), tuple(segmenter.effective_mirror_axes()), tuple(segmenter.effective_mirror_axes([0, 1, 2]))]))
    overlaps: list[float | None] = [None]
    if segmenter.windows.name == "patch":
        overlaps = sorted({*OVERLAPS, float(segmenter.plan.overlap)})
    engines = [TENSORFLOW]
    if _onnx_passed(segmenter):
        engines.append(ONNXRUNTIME)
    return [InferenceSetting(m, o, lcc, e) for e in engines for m in mirrors for o in overlaps for lcc in (False, True)]


def _onnx_passed(segmenter) -> bool:
    stages = [segmenter, *segmenter.context]
    return all(s.onnx is not None and s.parity is not None and s.parity.status == PASSED for s in stages)


def measure_settings(
    segmenter,
    cases: Mapping[str, tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]],
    settings: Sequence[InferenceSetting] | None = None,
) -> list[dict[str, Any]]:
    """Seconds per scan and mean Dice of each setting on `cases`.

    Args:
        segmenter: a `Segmenter` (left on its own engine, overlap and postprocessing).
        cases: {case_id: (a loader of its preprocessed image, of its labels on the same grid:
            0 background, k the k-th class)}.
        settings: the candidates; None: `candidate_settings(segmenter)`.

    Returns:
        One row per setting: its fields, `label`, `seconds` (mean per case: the network part
        with its mirroring, the threshold or argmax, the largest-component filter) and `dice`
        (mean over cases of the mean over classes).
    """
    settings = list(settings or candidate_settings(segmenter))
    n_classes = len(segmenter.plan.classes)
    values = tuple(range(1, n_classes + 1)) if segmenter.plan.label_mode == "multiclass" else (1,)
    engine, overlap = segmenter.engine, segmenter.plan.overlap
    sums: dict[InferenceSetting, list[float]] = {s: [0.0, 0.0] for s in settings}
    try:
        warmed = False
        for load_image, load_labels in cases.values():
            image, reference = load_image(), load_labels()
            if not warmed:  # each engine's first call (a graph traced, a session's first run) is not a setting's time
                corner = image[tuple(slice(0, min(int(n), 48)) for n in image.shape[:3])]
                for name in dict.fromkeys(s.engine for s in settings):
                    segmenter.use_engine(name).probabilities(corner)
                warmed = True
            # The network runs once per (engine, mirroring, overlap); the filter reuses its labels.
            for key in dict.fromkeys((s.engine, s.mirror_axes, s.overlap) for s in settings):
                segmenter.use_engine(key[0])
                if key[2] is not None:
                    segmenter.plan.overlap = key[2]
                start = time.perf_counter()
                labels = source_label_map(segmenter.probabilities(image, key[1]), segmenter.mask_threshold, values)
                network = time.perf_counter() - start
                start = time.perf_counter()
                filtered = keep_largest_component(labels, values)
                filtering = time.perf_counter() - start
                for setting in settings:
                    if (setting.engine, setting.mirror_axes, setting.overlap) == key:
                        kept = filtered if setting.keep_largest_component else labels
                        sums[setting][0] += network + (filtering if setting.keep_largest_component else 0.0)
                        sums[setting][1] += float(np.mean(class_dice(kept, reference, values)))
    finally:
        segmenter.use_engine(engine)
        segmenter.plan.overlap = overlap
    n = max(len(cases), 1)
    return [{**s.to_dict(), "label": s.label, "seconds": sums[s][0] / n, "dice": sums[s][1] / n} for s in settings]


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per row, whether no other row is at least as quick and as accurate and better in one."""
    return [not any(o["seconds"] <= r["seconds"] and o["dice"] >= r["dice"] and (o["seconds"] < r["seconds"] or o["dice"] > r["dice"])
                    for o in rows) for r in rows]


def choose_profiles(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{profile: its row} from measured rows (see the module docstring)."""
    if not rows:
        return {}
    best = max(row["dice"] for row in rows)

    def quickest_within(margin: float) -> Mapping[str, Any]:
        return min((row for row in rows if row["dice"] >= best - margin), key=lambda row: (row["seconds"], -row["dice"]))

    return {"fast": dict(quickest_within(FAST_DICE)), "balanced": dict(quickest_within(BALANCED_DICE)),
            "accurate": dict(quickest_within(ACCURATE_DICE))}


def profile_setting(profiles: Mapping[str, Mapping[str, Any]], name: str, model: str) -> InferenceSetting:
    """The setting of profile `name`, refused with the fix when the model has none."""
    if name not in PROFILES:
        raise ConfigurationError(f"profile '{name}' is not one of {list(PROFILES)}.")
    if name not in profiles:
        raise ConfigurationError(
            f"{model}: has no inference profiles (trained with `<model>.inference.profiles: false`, without validation "
            "cases, or before medseg chose profiles). Leave predict.profile null to use the model's own setting, or train "
            "it again."
        )
    return InferenceSetting.from_dict(profiles[name])
