"""The best configuration from the cross-validation alone, as nnU-Net's
`nnUNetv2_find_best_configuration`: each model, the ensemble of all of them, each with and
without the largest-component filter (decided per class), compared by out-of-fold Dice.

Nothing here sees a test case: the candidates are scored on the out-of-fold probabilities of
the training cases (each predicted by the fold that did not train on it), so the choice is
made on data that no fold fitted, and the test split stays for one final, unbiased score.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medseg.evaluation.metrics import dice_score
from medseg.evaluation.statistics import Bootstrap, PairedComparison, paired_bootstrap
from medseg.inference.postprocessing import keep_largest_component, source_label_map


@dataclass(frozen=True)
class Candidate:
    """One configuration: the models whose out-of-fold probabilities are averaged, and the
    label values whose largest connected region alone is kept."""

    models: tuple[str, ...]
    largest_component: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """`unet`, `unet+conv3d`, `conv3d+largest_component`."""
        return "+".join(self.models) + ("+largest_component" if self.largest_component else "")


def model_sets(models: Sequence[str]) -> list[tuple[str, ...]]:
    """Each model alone, then every ensemble of two or more of them, smallest first: with
    two models, `[(a,), (b,), (a, b)]`. Order matters only for ties (see `best_candidate`)."""
    models = list(dict.fromkeys(models))
    return [combo for size in range(1, len(models) + 1) for combo in combinations(models, size)]


def score_model_sets(
    case_ids: Sequence[str],
    probabilities: Mapping[str, Callable[[str], np.ndarray]],
    references: Callable[[str], np.ndarray],
    classes: Mapping[int, str],
    threshold: float,
) -> pd.DataFrame:
    """Out-of-fold Dice per case and class of every model set, with and without the
    largest-component filter on every class.

    Args:
        case_ids: the cross-validated cases (every training and validation case).
        probabilities: {model: case_id -> its out-of-fold probabilities on the case's source
            grid}, (X, Y, Z) for one sigmoid channel or (X, Y, Z, K + 1); every model on the
            same grid for a case. A model set averages its members' arrays, as the ensemble
            segmenter averages them (`medseg.inference.ensemble`).
        references: case_id -> the reference label map on the same grid (the dataset's values,
            or {0, 1} in binary mode).
        classes: {label value: name} of the foreground classes scored.
        threshold: for one sigmoid channel.

    Returns:
        One row per model set, case and class: `models` ("unet+conv3d"), `case_id`, `class`,
        `label`, `dice` (NaN when both masks are empty) and `dice_largest_component`. One case
        is loaded at a time, and each model's array once per case.
    """
    values = list(classes)
    sets = model_sets(list(probabilities))
    rows = []
    for case_id in case_ids:
        reference = references(case_id)
        arrays = {model: np.asarray(load(case_id), dtype=np.float32) for model, load in probabilities.items()}
        for models in sets:
            mean = arrays[models[0]] if len(models) == 1 else sum(arrays[m] for m in models) / len(models)
            labels = source_label_map(mean, threshold, values)
            filtered = keep_largest_component(labels, values)
            for value, name in classes.items():
                rows.append({
                    "models": "+".join(models), "case_id": case_id, "class": name, "label": int(value),
                    "dice": dice_score(reference == value, labels == value),
                    "dice_largest_component": dice_score(reference == value, filtered == value),
                })
        del arrays
    return pd.DataFrame(rows)


def _mean_of_case_means(table: pd.DataFrame, column: str) -> float:
    """The mean over cases of each case's mean over classes, NaN classes left out: how
    `cv_dice_mean` and `test_dice_mean` average."""
    return float(table.groupby("case_id")[column].mean().mean())


def candidates_table(scores: pd.DataFrame) -> tuple[list[Candidate], pd.DataFrame]:
    """Every candidate and its cross-validation Dice, from `score_model_sets`' table.

    The largest-component filter is decided per class and per model set, as nnU-Net decides
    its postprocessing: a class gets it when it raises that class's mean out-of-fold Dice
    strictly (a tie keeps the simpler pipeline). Each model set gives a candidate without the
    filter and, when some class gained, one with it on the classes that gained.

    Returns:
        The candidates, and a table with one row per candidate: `candidate`, `models`,
        `largest_component` (label values, space-separated), `cv_dice_mean`, and
        `cv_dice_<class>_mean` per class.
    """
    candidates, rows = [], []
    for models, part in scores.groupby("models", sort=False):
        members = tuple(str(models).split("+"))
        gained = []
        for (value, name), per_class in part.groupby(["label", "class"], sort=True):
            if per_class["dice_largest_component"].mean() > per_class["dice"].mean():
                gained.append(int(value))
        for filtered in (False, True) if gained else (False,):
            candidate = Candidate(members, tuple(gained) if filtered else ())
            table = _scored(part, candidate)
            row = {"candidate": candidate.name, "models": "+".join(members),
                   "largest_component": " ".join(str(v) for v in candidate.largest_component),
                   "cv_dice_mean": _mean_of_case_means(table, "score")}
            for name, per_class in table.groupby("class", sort=False):
                row[f"cv_dice_{name}_mean"] = float(per_class["score"].mean())
            candidates.append(candidate)
            rows.append(row)
    return candidates, pd.DataFrame(rows)


def _scored(part: pd.DataFrame, candidate: Candidate) -> pd.DataFrame:
    """One model set's rows with `score`: with the filter, the classes that gained take their
    filtered Dice, the others keep theirs."""
    score = np.where(part["label"].isin(candidate.largest_component), part["dice_largest_component"], part["dice"])
    return part.assign(score=score)


def candidate_case_scores(scores: pd.DataFrame, candidate: Candidate) -> pd.DataFrame:
    """The candidate's out-of-fold Dice per case and class (`case_id`, `class`, `label`,
    `dice`), from `score_model_sets`' table: what its `cv_dice_mean` averages, kept with the
    registered version so that a later candidate can be compared with it case by case."""
    part = scores[scores["models"] == "+".join(candidate.models)]
    scored = _scored(part, candidate)
    return scored[["case_id", "class", "label"]].assign(dice=scored["score"].to_numpy(dtype=float)).reset_index(drop=True)


def best_candidate(candidates: Sequence[Candidate], table: pd.DataFrame) -> Candidate:
    """The candidate with the highest `cv_dice_mean`; on a tie the first in `table`'s order,
    which lists fewer models before more and no filter before the filter: the cheaper pipeline
    wins unless the other is strictly better."""
    scores = table["cv_dice_mean"].to_numpy(dtype=float)
    if not np.isfinite(scores).any():
        return candidates[0]
    return candidates[int(np.nanargmax(scores))]


def plot_candidates(table: pd.DataFrame, chosen: str) -> Figure:
    """A horizontal bar per candidate, its cross-validation Dice, the chosen one highlighted."""
    figure = Figure(figsize=(7, 0.45 * len(table) + 1.2))
    axes = figure.add_subplot()
    order = table.sort_values("cv_dice_mean")
    colours = ["tab:orange" if name == chosen else "tab:blue" for name in order["candidate"]]
    axes.barh(order["candidate"], order["cv_dice_mean"], color=colours)
    for y, value in enumerate(order["cv_dice_mean"]):
        axes.text(value, y, f" {value:.4f}", va="center", fontsize=8)
    axes.set_xlim(0, 1.08)
    axes.set_xlabel("cross-validation Dice (mean over cases of the class mean)")
    axes.set_title(f"Best configuration: {chosen}")
    figure.tight_layout()
    return figure


def registry_name(dataset_name: str) -> str:
    """The MLflow registry name of a dataset's champion: `medseg-<dataset>`, the name kept to
    letters, digits, `-`, `_` and `.` (`Task04_Hippocampus` -> `medseg-Task04_Hippocampus`;
    `medseg-synthetic` stays as it is)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(dataset_name)).strip("-") or "dataset"
    return cleaned if cleaned.startswith("medseg-") else f"medseg-{cleaned}"



# ------------------------------------------------------------------------------ the champion
@dataclass(frozen=True)
class ChampionRecord:
    """The registered champion: its version, and its out-of-fold scores per case and class as
    its `select` run stored them (None for a version registered before they were stored)."""

    version: str
    scores: pd.DataFrame | None


@dataclass(frozen=True)
class ChampionDecision:
    """Whether the new version takes the `champion` alias, and why.

    Attributes:
        promote: the alias moves to the new version.
        reason: one sentence for the log and `champion_decision.json`.
        comparison: the paired comparison with the champion, when there was one.
        champion_version: the version that held the alias, or None.
    """

    promote: bool
    reason: str
    comparison: PairedComparison | None = None
    champion_version: str | None = None

    def as_record(self) -> dict:
        """The decision as JSON (`champion_decision.json`)."""
        record = {"promoted": self.promote, "reason": self.reason, "champion_version": self.champion_version}
        if self.comparison is not None:
            record.update({"paired_cases": self.comparison.n_cases, "dice_difference": self.comparison.difference,
                           "ci_low": self.comparison.low, "ci_high": self.comparison.high,
                           "p_value": self.comparison.p_value})
        return record

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics of the comparison (none without one)."""
        if self.comparison is None or self.comparison.n_cases == 0:
            return {}
        c = self.comparison
        return {"champion_dice_difference": c.difference, "champion_dice_difference_ci_low": c.low,
                "champion_dice_difference_ci_high": c.high, "champion_p_value": c.p_value,
                "champion_paired_cases": float(c.n_cases)}


def _case_means(scores: pd.DataFrame) -> pd.Series:
    """Each case's mean Dice over its classes (NaN classes left out), by `case_id`."""
    return pd.to_numeric(scores["dice"], errors="coerce").groupby(scores["case_id"].astype(str)).mean()


def decide_champion(
    candidate: pd.DataFrame,
    champion: ChampionRecord | None,
    *,
    alpha: float,
    min_cases: int,
    force: bool,
    bootstrap: Bootstrap,
) -> ChampionDecision:
    """Whether a new version replaces the champion: only on evidence, paired by case.

    The test is a paired bootstrap of the mean difference in out-of-fold Dice (each case's mean
    over its classes), one-sided: the candidate must be better. It compares what `select`
    ranks by, the mean, and gives the interval the run reports; a Wilcoxon signed-rank test
    would compare a pseudo-median instead, and drops the cases where both score the same.

    Args:
        candidate: the new version's `candidate_case_scores`.
        champion: the current champion, or None when the registry has none (a first
            champion needs no comparison).
        alpha: the one-sided level the improvement must reach (`cv.champion_alpha`).
        min_cases: the fewest paired cases that can decide (`cv.champion_min_cases`): a
            bootstrap over fewer cases is too narrow to trust.
        force: move the alias whatever the evidence (`cv.force_champion`).
        bootstrap: resamples and seed (`params:evaluation`).
    """
    if champion is None:
        return ChampionDecision(True, "no champion yet: the first one needs no comparison")
    if champion.scores is None or champion.scores.empty:
        comparison, paired = None, 0
        why = f"version {champion.version}, the champion, stored no out-of-fold scores to compare with"
    else:
        ours, theirs = _case_means(candidate), _case_means(champion.scores)
        cases = sorted(set(ours.index) & set(theirs.index))
        comparison = paired_bootstrap(ours[cases].to_numpy(), theirs[cases].to_numpy(), bootstrap)
        paired = comparison.n_cases
        why = (f"out-of-fold Dice {comparison.difference:+.4f} against version {champion.version} over {paired} paired "
               f"cases ({bootstrap.level:.0%} CI {comparison.low:+.4f} to {comparison.high:+.4f}, one-sided p "
               f"{comparison.p_value:.3g})")
    if force:
        return ChampionDecision(True, f"forced (cv.force_champion): {why}", comparison, champion.version)
    if paired < min_cases:
        return ChampionDecision(False, f"the champion stays: {why}; fewer than cv.champion_min_cases={min_cases} paired "
                                       "cases cannot decide. Set cv.force_champion=true to promote anyway.",
                                comparison, champion.version)
    if comparison.significant(alpha):
        return ChampionDecision(True, f"promoted: {why}, significant at {alpha:g}", comparison, champion.version)
    return ChampionDecision(False, f"the champion stays: {why}, not a significant improvement at {alpha:g}",
                            comparison, champion.version)
