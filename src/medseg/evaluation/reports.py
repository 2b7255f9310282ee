"""Evaluation reports: the metrics summary, training curves and overlay figures.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`, rendered by Agg
when saved), never with pyplot, so no global figure state leaks between nodes or tests. They
are returned, not written: the Kedro catalog saves them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from medseg.errors import ConfigurationError, GeometryMismatchError
from medseg.evaluation.metrics import evaluate_case_per_class
from medseg.evaluation.statistics import Bootstrap, bootstrap_interval

__all__ = [
    "DEFAULT_SUMMARY_METRICS",
    "OverlaySlice",
    "choose_overlay_slice",
    "flatten_class_means",
    "flatten_summary",
    "plot_case_metrics",
    "plot_overlays",
    "plot_training_curves",
    "summarize_metrics",
    "summarize_per_class",
]

# `hd95_mm_penalized` sits beside `hd95_mm` so that a summary never rewards a miss: the plain
# mean leaves missed cases out, the penalized one counts each as the image diagonal in mm.
DEFAULT_SUMMARY_METRICS: tuple[str, ...] = (
    "dice",
    "iou",
    "nsd",
    "hd95_mm",
    "hd95_mm_penalized",
    "precision",
    "recall",
)

REFERENCE_COLOR = "lime"
PREDICTION_COLOR = "red"


def _new_figure(width_in: float, height_in: float) -> Figure:
    """Return an empty Figure (size in inches) drawn by the Agg canvas, whatever the backend."""
    figure = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _json_float(value: float) -> float | None:
    """Return `value` as a plain float, or None when it is NaN or infinite (not valid JSON)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _interval(values: np.ndarray, bootstrap: Bootstrap | None) -> dict[str, float | None]:
    """`{"ci_low", "ci_high"}` of a mean over cases (None where no interval can be drawn), or
    nothing without a bootstrap."""
    if bootstrap is None:
        return {}
    low, high = bootstrap_interval(values, bootstrap) or (None, None)
    return {"ci_low": low, "ci_high": high}


def interval_statement(bootstrap: Bootstrap) -> str:
    """What a summary's `ci_low` and `ci_high` are, in words, for the summary itself."""
    return (f"{bootstrap.level:.0%} percentile bootstrap interval of the mean over cases: {bootstrap.resamples} "
            f"resamples of the cases, seed {bootstrap.seed}")


def _summarize_column(values: pd.Series, bootstrap: Bootstrap | None = None) -> dict[str, float | int | None]:
    """Mean, population std, median, n and n_missing of one metric column, and the mean's
    interval (`ci_low`, `ci_high`) when `bootstrap` is given."""
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
    finite = numbers[np.isfinite(numbers)]
    if finite.size == 0:
        mean = std = median = None
    else:
        mean = _json_float(finite.mean())
        std = _json_float(finite.std(ddof=0))
        median = _json_float(np.median(finite))
    return {
        "mean": mean,
        "std": std,
        "median": median,
        "n": int(finite.size),
        "n_missing": int(numbers.size - finite.size),
        **_interval(finite, bootstrap),
    }


def summarize_metrics(
    per_case: pd.DataFrame, metrics: Sequence[str] | None = None, bootstrap: Bootstrap | None = None
) -> dict[str, object]:
    """Summary statistics of the per-case metrics, ready for `json.JSONDataset`.

    Args:
        per_case: one row per case, with a column per metric (as from
            `medseg.evaluation.metrics.evaluate_case`). Optional bool columns
            `reference_empty` and `prediction_empty` add the empty-mask counts below.
        metrics: the metric columns to summarize; None: those of `DEFAULT_SUMMARY_METRICS`
            that the table has (a table written before `nsd` existed has none).
        bootstrap: when given, each metric also has the bootstrap interval of its mean over
            cases, `ci_low` and `ci_high` (None with fewer than two finite cases), and the
            summary says how it was drawn (`confidence_interval`).

    Returns:
        `{"n_cases": int, "<metric>": {"mean", "std", "median", "n", "n_missing"}, ...}` where
        only finite values enter mean, std and median; `n` counts them and `n_missing` counts
        the NaN and infinite values left out (e.g. Dice when both masks are empty, HD95 when
        either is). Because `hd95_mm` leaves a missed case out, its mean can improve when a
        model misses; `hd95_mm_penalized` (in the defaults) counts each case where exactly
        one mask is empty as the image diagonal in mm (see
        `medseg.evaluation.metrics.hausdorff_distance_95_penalized`), so its mean does not. `std` is the population standard deviation (ddof=0): the test cases are
        the whole population being described, and it is defined for a single case (0.0).
        Statistics of a metric with no finite value are None. When the empty-flag columns
        exist, the summary also has `n_reference_empty`, `n_prediction_empty` and
        `n_both_empty`. All values are plain Python ints, floats or None (JSON null).

    Raises:
        ConfigurationError: if a requested metric is not a column of `per_case`.
    """
    if metrics is None:
        metrics = [name for name in DEFAULT_SUMMARY_METRICS if name in per_case.columns]
    missing_columns = [name for name in metrics if name not in per_case.columns]
    if missing_columns:
        raise ConfigurationError(
            f"Metrics {missing_columns} are not columns of the per-case table "
            f"(columns: {list(per_case.columns)}). Choose metrics among the columns."
        )
    summary: dict[str, object] = {"n_cases": int(len(per_case))}
    for name in metrics:
        summary[name] = _summarize_column(per_case[name], bootstrap)
    if bootstrap is not None:
        summary["confidence_interval"] = interval_statement(bootstrap)
    if {"reference_empty", "prediction_empty"} <= set(per_case.columns):
        reference_empty = per_case["reference_empty"].astype(bool)
        prediction_empty = per_case["prediction_empty"].astype(bool)
        summary["n_reference_empty"] = int(reference_empty.sum())
        summary["n_prediction_empty"] = int(prediction_empty.sum())
        summary["n_both_empty"] = int((reference_empty & prediction_empty).sum())
    return summary


def per_case_table(rows: Sequence[Mapping[str, object]], classes: Mapping[int, str]) -> pd.DataFrame:
    """The per-case, per-class table of `rows` (`case_id` and the keys of
    `evaluate_case_per_class`). Without a row (a split without test cases) it still has those
    columns, so its CSV has a header and reads back as an empty table."""
    if rows:
        return pd.DataFrame(rows)
    empty = np.zeros((1, 1, 1), np.uint8)
    return pd.DataFrame(columns=["case_id", *evaluate_case_per_class(empty, empty, (1.0, 1.0, 1.0), classes)[0]])


def summarize_per_class(
    per_case: pd.DataFrame, metrics: Sequence[str] | None = None, bootstrap: Bootstrap | None = None
) -> dict[str, object]:
    """`summarize_metrics` of a per-case, per-class table, with nnU-Net's foreground mean.

    Args:
        per_case: one row per case and foreground class, with `case_id`, `class` and the
            metric columns (from `evaluate_case_per_class`). Without a `class` column it is
            summarised as one class.

    Returns:
        The `summarize_metrics` of all rows, where each metric's `mean` is the mean over the
        classes of each class's mean (nnU-Net's `foreground_mean`: a rare class weighs as
        much as a common one) and `std`, `median`, `n`, `n_missing` are over all (case,
        class) rows; `n_cases` counts cases, and `classes` holds each class's own
        `summarize_metrics`. With one class this is exactly its summary. With `bootstrap`,
        each mean has its interval (`ci_low`, `ci_high`), the foreground mean's drawn by
        resampling whole cases (all classes of a case together).
    """
    if metrics is None:
        metrics = [name for name in DEFAULT_SUMMARY_METRICS if name in per_case.columns]
    summary = summarize_metrics(per_case, metrics, bootstrap)
    if "class" not in per_case.columns:
        return summary
    classes = {str(name): summarize_metrics(rows, metrics, bootstrap) for name, rows in per_case.groupby("class", sort=False)}
    for name in metrics:
        means = [c[name]["mean"] for c in classes.values() if c[name]["mean"] is not None]
        summary[name]["mean"] = _json_float(np.mean(means)) if means else None
        if bootstrap is not None and "case_id" in per_case.columns:
            by_case = per_case.assign(_value=pd.to_numeric(per_case[name], errors="coerce")).pivot_table(
                index="case_id", columns="class", values="_value", aggfunc="mean", dropna=False, sort=False)
            summary[name].update(_interval(by_case.to_numpy(dtype=np.float64), bootstrap))
    summary["n_cases"] = int(per_case["case_id"].nunique()) if "case_id" in per_case.columns else summary["n_cases"]
    summary["classes"] = classes
    return summary


def flatten_class_means(summary: Mapping[str, object], prefix: str = "test_") -> dict[str, float]:
    """`{"<prefix><metric>_<class>_mean": float}` for each class of a `summarize_per_class`
    summary, e.g. `test_dice_core_mean`, and its interval (`test_dice_core_ci_low`,
    `..._ci_high`) where the summary has one (None values are left out)."""
    flat = {}
    for name, class_summary in dict(summary.get("classes") or {}).items():
        for metric, stats in class_summary.items():
            if not isinstance(stats, Mapping):
                continue
            for stat in ("mean", "ci_low", "ci_high"):
                if stats.get(stat) is not None:
                    flat[f"{prefix}{metric}_{name}_{stat}"] = float(stats[stat])
    return flat


def flatten_summary(summary: Mapping[str, object], prefix: str = "test_") -> dict[str, float]:
    """Flatten a `summarize_metrics` summary into MLflow-style scalar metrics.

    Args:
        summary: output of `summarize_metrics`.
        prefix: prepended to every key.

    Returns:
        `{"<prefix><metric>_<stat>": float}`, e.g. `test_dice_mean`, plus the top-level
        counts, e.g. `test_n_cases`. Statistics that are None are left out (MLflow has no
        missing value), and so are values that are not numbers (e.g. a run id stored in the
        summary beside the metrics).
    """

    def is_number(value: object) -> bool:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

    flat: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, Mapping):
            for stat, stat_value in value.items():
                if is_number(stat_value):
                    flat[f"{prefix}{key}_{stat}"] = float(stat_value)
        elif is_number(value):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def _metric_families(names: Iterable[str]) -> list[str]:
    """Return the metric families of history keys (`val_dice` -> `dice`), loss first."""
    families: list[str] = []
    for name in names:
        family = name.removeprefix("val_")
        if family not in families:
            families.append(family)
    if "loss" in families:
        families.remove("loss")
        families.insert(0, "loss")
    return families


SOFT_METRIC_FAMILIES = ("dice", "iou")


def _is_soft_metric(family: str) -> bool:
    """`dice`, `iou` and their per-class forms (`dice_1`, `iou_2`)."""
    return family.split("_")[0] in SOFT_METRIC_FAMILIES


def training_metrics_caption(samples: str) -> str:
    """What a training curve's Dice and IoU are, for the figure: not the test metrics.

    Args:
        samples: what the batches held, e.g. "sampled 2D slices" or "sampled 3D patches".
    """
    return (
        f"Dice and IoU here are the soft (smoothed, from probabilities) Dice and IoU of each batch of {samples}, "
        "pooled over the batch, as Keras logs them while training (val: batches of the validation cases).\n"
        "They are not the per-case 3D test Dice and IoU on hard masks of metrics_summary.json and metrics_per_case.csv."
    )


def plot_training_curves(history: Mapping[str, Sequence[float]], samples: str | None = None) -> Figure:
    """Plot a Keras-style training history, one axis per metric family.

    Args:
        history: `History.history`-like mapping from metric name to one value per epoch,
            e.g. `{"loss": [...], "val_loss": [...], "dice": [...], "val_dice": [...],
            "iou": [...], "val_iou": [...]}`. A key `val_<name>` is the validation curve of
            family `<name>`; a family may have only one of the two.
        samples: what the training batches held (e.g. "sampled 2D slices"). When given and
            the history has a `dice` or `iou` family (or a per-class `dice_k`), the figure says below its axes that
            these are batch metrics of those samples, not the per-case 3D test metrics
            (:func:`training_metrics_caption`), and those axes are titled "(batch, soft)".

    Returns:
        A Figure with one axis per family (loss first, then in the order met), side by side.
        Each axis has a "train" line and, when present, a "val" line, epochs 1..N on x with
        integer ticks only; every epoch is marked, so a 1-epoch run shows one visible point
        per line (x from 0.5 to N + 0.5).

    Raises:
        ValueError: if `history` is empty.
    """
    families = _metric_families(history)
    if not families:
        raise ValueError("The training history is empty: there is nothing to plot.")
    captioned = samples is not None and any(_is_soft_metric(family) for family in families)
    figure = _new_figure(4.5 * len(families), 4.3 if captioned else 3.5)
    axes = figure.subplots(1, len(families), squeeze=False)[0]
    n_epochs = 1
    for axis, family in zip(axes, families):
        for split, key in (("train", family), ("val", f"val_{family}")):
            values = history.get(key)
            if values is None or len(values) == 0:
                continue
            epochs = np.arange(1, len(values) + 1)
            n_epochs = max(n_epochs, len(values))
            axis.plot(epochs, np.asarray(values, dtype=np.float64), marker="o", markersize=5, label=split)
        title = f"{family} (batch, soft)" if captioned and _is_soft_metric(family) else family
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.set_ylabel(family)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.grid(True, alpha=0.3)
        axis.legend()
    for axis in axes:
        axis.set_xlim(0.5, n_epochs + 0.5)
    if captioned:
        figure.supxlabel(training_metrics_caption(samples), fontsize="small")
    return figure


def choose_overlay_slice(reference: np.ndarray, prediction: np.ndarray) -> int:
    """Axial slice to show for a case: the one where the reference is largest.

    Args:
        reference: ground-truth mask, shape (X, Y, Z) (non-zero = foreground).
        prediction: predicted mask, same shape.

    Returns:
        The index along the third (axial) axis with the largest reference area (the first
        such slice on ties). When the reference is empty, the slice with the largest
        prediction area; when both are empty, the middle slice `Z // 2`.

    Raises:
        GeometryMismatchError: if the shapes differ or the masks are not 3D.
    """
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape or reference.ndim != 3:
        raise GeometryMismatchError(
            f"Overlay slices need two 3D masks of one shape; got reference {reference.shape} "
            f"and prediction {prediction.shape}."
        )
    for mask in (reference, prediction):
        area_per_slice = np.count_nonzero(mask, axis=(0, 1))
        if area_per_slice.any():
            return int(np.argmax(area_per_slice))
    return reference.shape[2] // 2


# Multi-class overlays: one colour per label value (reference solid, prediction dashed).
CLASS_COLORS = ("lime", "deepskyblue", "orange", "magenta", "yellow", "cyan", "red", "white")


def _draw_contour(axis, mask2d: np.ndarray, color: str, linestyle: str = "solid", color_by_class: bool = False) -> None:
    """Draw the outline of a 2D mask (X, Y) on `axis`; nothing when the mask is empty or full.

    With `color_by_class`, each label value gets its own outline in `CLASS_COLORS[value - 1]`
    (cycled), so that classes can be told apart."""
    mask2d = np.asarray(mask2d)
    values = [int(v) for v in np.unique(mask2d) if v != 0] if color_by_class else [None]
    for value in values:
        mask = mask2d != 0 if value is None else mask2d == value
        shade = color if value is None else CLASS_COLORS[(value - 1) % len(CLASS_COLORS)]
        if mask.any() and not mask.all():
            axis.contour(mask.T.astype(np.float32), levels=[0.5], colors=[shade], linewidths=1.2, linestyles=linestyle)


class OverlaySlice(NamedTuple):
    """One case's row of the overlay figure.

    Attributes:
        case_id: the case.
        image, reference, prediction: one axial slice of each, shape (X, Y).
        z: the slice's index along the third (axial) axis of the canonical volume, or None.
        dice: the case's Dice (3D, whole volume), or None; NaN when both masks are empty.
    """

    case_id: str
    image: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray
    z: int | None = None
    dice: float | None = None


def overlay_title(case: OverlaySlice) -> str:
    """`"case_003 · axial slice 12 · case Dice 0.874"`; parts that are None are left out, and
    a NaN Dice reads "case Dice n/a (both masks empty)"."""
    parts = [str(case.case_id)]
    if case.z is not None:
        parts.append(f"axial slice {int(case.z)}")
    if case.dice is not None:
        dice = float(case.dice)
        parts.append(f"case Dice {dice:.3f}" if math.isfinite(dice) else "case Dice n/a (both masks empty)")
    return " · ".join(parts)


NO_TEST_CASE = "No test case: the split holds none (data.split.test is 0), so nothing was scored here."


def plot_note(text: str) -> Figure:
    """A small figure that holds only `text`, for a report that has nothing to draw."""
    figure = _new_figure(6.0, 1.5)
    axis = figure.subplots()
    axis.axis("off")
    axis.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return figure


def plot_overlays(cases: Sequence[OverlaySlice | tuple]) -> Figure:
    """Lay the reference and predicted contours over one image slice per case.

    Args:
        cases: an :class:`OverlaySlice` per case, or a plain tuple `(case_id, image2d,
            reference2d, prediction2d[, z[, dice]])`; the three arrays are one slice of
            shape (X, Y), e.g. `volume[:, :, z]` with `z` from `choose_overlay_slice`. The
            caller chooses the slice.

    Returns:
        A Figure with one axis per case, one row each: the image in gray (x to the right, y
        up, i.e. `image2d.T` with origin lower), the reference contour in green and the
        prediction contour in red, titled with the case id, the axial slice index and the
        case's (3D) Dice when given (:func:`overlay_title`). An empty mask draws no contour.

        Without a case (a split without test cases), a figure that says so: a run whose
        split holds no test case still writes its report.

    Raises:
        GeometryMismatchError: if a case's arrays are not 2D of one shape.
    """
    if len(cases) == 0:
        return plot_note(NO_TEST_CASE)
    figure = _new_figure(4.0, 4.0 * len(cases))
    axes = figure.subplots(len(cases), 1, squeeze=False)[:, 0]
    cases = [OverlaySlice(*case) for case in cases]
    by_class = any(np.max(np.asarray(c.reference), initial=0) > 1 or np.max(np.asarray(c.prediction), initial=0) > 1 for c in cases)
    if by_class:  # several classes: a colour per class, reference solid, prediction dashed
        legend_handles = [
            Line2D([], [], color="white", linestyle="solid", label="reference"),
            Line2D([], [], color="white", linestyle="dashed", label="prediction"),
        ]
    else:
        legend_handles = [
            Line2D([], [], color=REFERENCE_COLOR, label="reference"),
            Line2D([], [], color=PREDICTION_COLOR, label="prediction"),
        ]
    for axis, case in zip(axes, cases):
        case = OverlaySlice(*case)
        image = np.asarray(case.image)
        shapes = {np.shape(image), np.shape(case.reference), np.shape(case.prediction)}
        if len(shapes) != 1 or image.ndim != 2:
            raise GeometryMismatchError(
                f"Case {case.case_id}: the image slice {np.shape(image)}, reference "
                f"{np.shape(case.reference)} and prediction {np.shape(case.prediction)} must be 2D arrays "
                "of one shape. Take the same axial index from each volume."
            )
        axis.imshow(image.T, cmap="gray", origin="lower", interpolation="nearest")
        _draw_contour(axis, case.reference, REFERENCE_COLOR, "solid", by_class)
        _draw_contour(axis, case.prediction, PREDICTION_COLOR, "dashed" if by_class else "solid", by_class)
        axis.set_title(overlay_title(case), fontsize="medium")
        axis.set_axis_off()
        axis.legend(handles=legend_handles, loc="upper right", fontsize="small")
    return figure


METRIC_TITLES = {"dice": "Dice", "nsd": "NSD", "iou": "IoU"}


def plot_case_metrics(per_case: pd.DataFrame, summary: Mapping[str, object], metrics: Sequence[str] = ("dice", "nsd")) -> Figure:
    """Each case's score per class, with the mean and its confidence interval.

    Args:
        per_case: the per-case, per-class table (`case_id`, `class` and the metric columns).
        summary: its `summarize_per_class` summary, drawn with a bootstrap (its `classes`
            hold each class's `mean`, `ci_low`, `ci_high`).
        metrics: the metrics to draw, one axis each (those that are columns of `per_case`).

    Returns:
        A Figure with one axis per metric: per class, a dot per case (NaN cases left out) and
        the mean as a black bar with its interval as a whisker, each titled with the summary's
        foreground mean and interval. Without a case, a figure that says so.
    """
    metrics = [m for m in metrics if m in per_case.columns]
    if per_case.empty or not metrics:
        return plot_note(NO_TEST_CASE)
    classes = dict(summary.get("classes") or {})
    names = list(classes) or ["foreground"]
    figure = _new_figure(max(3.5, 1.2 * len(names) + 2.0) * len(metrics), 3.8)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    generator = np.random.default_rng(0)  # the dots' jitter only
    for axis, metric in zip(axes, metrics):
        for position, name in enumerate(names):
            rows = per_case[per_case["class"].astype(str) == name] if "class" in per_case.columns else per_case
            values = pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            axis.scatter(position + generator.uniform(-0.15, 0.15, values.size), values, s=12, alpha=0.6, color="tab:blue")
            stats = classes.get(name, summary).get(metric, {}) if classes else summary.get(metric, {})
            if stats.get("mean") is not None:
                low, high = stats.get("ci_low"), stats.get("ci_high")
                if low is not None and high is not None:
                    axis.errorbar(position, stats["mean"], yerr=[[stats["mean"] - low], [high - stats["mean"]]],
                                  fmt="none", ecolor="black", capsize=6, linewidth=1.5)
                axis.hlines(stats["mean"], position - 0.3, position + 0.3, colors="black", linewidth=2)
        overall = summary.get(metric, {})
        title = METRIC_TITLES.get(metric, metric)
        if overall.get("mean") is not None:
            title += f" {overall['mean']:.3f}"
            if overall.get("ci_low") is not None:
                title += f" (CI {overall['ci_low']:.3f}–{overall['ci_high']:.3f})"
        axis.set_title(title, fontsize="medium")
        axis.set_xticks(range(len(names)), names)
        axis.set_xlim(-0.6, len(names) - 0.4)
        axis.set_ylim(min(0.0, axis.get_ylim()[0]), 1.02)
        axis.grid(True, axis="y", alpha=0.3)
    figure.supxlabel(f"dots: test cases ({summary.get('n_cases', 0)}); bars: mean and "
                     f"{summary.get('confidence_interval', 'no interval')}", fontsize="small", wrap=True)
    return figure
