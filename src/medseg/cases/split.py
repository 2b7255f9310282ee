"""Train/validation/test split by case, never by slice or patch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medseg.errors import ConfigurationError, SplitError


def split_sizes(n_cases: int, train: float, val: float, test: float) -> dict[str, int]:
    """How many cases each set gets, checked before any case is read.

    Args:
        n_cases: the number of (unique) cases.
        train, val, test: fractions that sum to 1. A set with a fraction above 0 gets at least
            one case; val and test are rounded, train takes the rest.

    Returns:
        {"train": n, "val": n, "test": n}, summing to `n_cases`.

    Raises:
        ConfigurationError: fractions negative or not summing to 1.
        SplitError: too few cases to give every requested set at least one case.
    """
    fractions = {"train": train, "val": val, "test": test}
    if min(fractions.values()) < 0 or not np.isclose(sum(fractions.values()), 1.0, atol=1e-6):
        raise ConfigurationError(
            f"data.split fractions {fractions} must be non-negative and sum to 1. Adjust data.split.*."
        )
    n_val = max(int(round(val * n_cases)), 1 if val > 0 else 0)
    n_test = max(int(round(test * n_cases)), 1 if test > 0 else 0)
    n_train = n_cases - n_val - n_test
    if n_train < 1 or (train == 0 and n_train > 0):
        needed = int(train > 0) + int(val > 0) + int(test > 0)
        raise SplitError(
            f"{n_cases} cases are too few for the split {fractions}: every set needs at least one case "
            f"({needed} cases at least). Add cases or change data.split."
        )
    return {"train": n_train, "val": n_val, "test": n_test}


def require_validation_cases(val: float, models: Sequence[str]) -> None:
    """Refuse, before any work, a run that trains `models` on a split without validation cases.

    Training keeps the epoch of lowest validation loss and stops early on it, so a model run
    with `data.split.val` 0 would otherwise prepare every case and fail when training starts.

    Raises:
        SplitError: `val` is 0 and `models` is not empty.
    """
    if models and float(val) == 0:
        raise SplitError(
            f"data.split.val=0 leaves no validation case, and training {', '.join(models)} needs one: it keeps the "
            "epoch of lowest validation loss and stops early on it. Set data.split.val above 0 (0.1 holds out one "
            "case in ten; train + val + test must still sum to 1), or run only `--pipeline data`."
        )


def split_cases(case_ids: Sequence[str], train: float, val: float, test: float, seed: int) -> pd.DataFrame:
    """Assign each case to one of train, val and test, deterministically from `seed`.

    Args:
        case_ids: unique case ids, as strings (order does not matter: they are sorted first, so
            the same set of cases and seed always give the same split).
        train, val, test: fractions that sum to 1 (see :func:`split_sizes`).
        seed: `data.seed`.

    Returns:
        A DataFrame with columns `case_id` (str) and `split`, sorted by case id.

    Raises:
        ConfigurationError: fractions negative or not summing to 1, duplicate or non-string ids.
        SplitError: too few cases to give every requested set at least one case.
    """
    not_text = [i for i in case_ids if not isinstance(i, str)]
    if not_text:
        raise ConfigurationError(
            f"split_cases needs case ids as strings, got {not_text[:3]} ({type(not_text[0]).__name__}): "
            "a CSV was probably read without `load_args: {dtype: {case_id: str}}` in the catalog."
        )
    ids = sorted(set(case_ids))
    if len(ids) != len(case_ids):
        raise ConfigurationError("split_cases got duplicate case ids.")
    sizes = split_sizes(len(ids), train, val, test)
    order = np.random.default_rng(seed).permutation(len(ids))
    labels = np.array(["train"] * sizes["train"] + ["val"] * sizes["val"] + ["test"] * sizes["test"])
    assigned = dict(zip((ids[i] for i in order), labels))
    return pd.DataFrame({"case_id": ids, "split": [assigned[i] for i in ids]})


def classes_not_in_training(splits: pd.DataFrame, case_fingerprints: pd.DataFrame) -> dict[str, list[str]]:
    """The classes that no training case holds, each with the cases that do hold it.

    A model cannot learn such a class: its predictions of it are noise, and its scores zero.

    Args:
        splits: the case split (`splits.csv`).
        case_fingerprints: `case_fingerprints.csv`: each class's voxel share per case
            (`share_<label value>`, multi-class mode) or the foreground voxels (binary mode).

    Returns:
        {"label <value>" (or "foreground"): [case ids holding it, in split order]}, for the
        classes absent from every training case.
    """
    shares = [column for column in case_fingerprints.columns if str(column).startswith("share_")]
    present = (
        {f"label {column.removeprefix('share_')}": case_fingerprints[column].astype(float) > 0 for column in shares}
        if shares
        else {"foreground": case_fingerprints["foreground_voxels"].astype(float) > 0}
    )
    split_of = dict(zip(splits["case_id"].astype(str), splits["split"]))
    ids = case_fingerprints["case_id"].astype(str)
    missing = {}
    for name, holds in present.items():
        holders = [case for case, held in zip(ids, holds) if held]
        if not any(split_of.get(case) == "train" for case in holders):
            missing[name] = sorted(holders, key=lambda case: (("train", "val", "test").index(split_of.get(case, "test")), case))
    return missing


def cases_in_split(splits: pd.DataFrame, *names: str) -> list[str]:
    """Case ids assigned to any of the named sets (`train`, `val`, `test`), sorted."""
    return sorted(splits.loc[splits["split"].isin(names), "case_id"])


# Cross-validation folds (`cv.folds`) ----------------------------------------------------------
def assign_folds(splits: pd.DataFrame, n_folds: int, seed: int, saved: dict | None = None) -> dict:
    """The training and validation cases in `n_folds` folds, as nnU-Net's `splits_final.json`.

    The test cases stay out of every fold. The folds are made once, from `seed`: the cases are
    shuffled and dealt in turn, so fold sizes are within one of each other. A saved assignment
    with the same number of folds is kept as it is, so that the folds stay fixed when cases are
    added: a new case goes to the smallest fold (the first of them on a tie), in sorted order,
    and a case that left the training and validation sets leaves its fold.

    Args:
        splits: the case split (`splits.csv`).
        n_folds: `cv.folds`, at least 2.
        seed: `data.seed`.
        saved: the last run's `folds.json`, or empty.

    Returns:
        `{"n_folds": K, "seed": seed, "folds": [{"fold": i, "train": [...], "val": [...]}]}`:
        `val` is the held-out fold, `train` the other folds' cases.

    Raises:
        SplitError: fewer training and validation cases than folds.
        ConfigurationError: a saved file with another number of folds.
    """
    cases = cases_in_split(splits, "train", "val")
    if n_folds < 2:
        raise ConfigurationError(f"cv.folds={n_folds}: cross-validation needs at least 2 folds (0 turns it off).")
    if len(cases) < n_folds:
        raise SplitError(
            f"cv.folds={n_folds} needs at least {n_folds} training and validation cases; the split has {len(cases)}. "
            "Lower cv.folds or add cases."
        )
    if saved and saved.get("folds"):
        if int(saved.get("n_folds", len(saved["folds"]))) != n_folds:
            raise ConfigurationError(
                f"folds.json holds {saved.get('n_folds')} folds, but cv.folds={n_folds}. Set "
                f"cv.folds={saved.get('n_folds')} to keep them, or delete folds.json (the catalog's `folds`) to split "
                "the cases anew."
            )
        held_out = [[c for c in fold["val"] if c in set(cases)] for fold in saved["folds"]]
        placed = {c for fold in held_out for c in fold}
        for case in sorted(set(cases) - placed):
            smallest = min(range(n_folds), key=lambda i: (len(held_out[i]), i))
            held_out[smallest].append(case)
        seed = int(saved.get("seed", seed))
    else:
        order = np.random.default_rng(int(seed)).permutation(len(cases))
        held_out = [[cases[i] for i in order[fold::n_folds]] for fold in range(n_folds)]
    held_out = [sorted(fold) for fold in held_out]
    if any(not fold for fold in held_out):
        raise SplitError("a fold of folds.json (the catalog's `folds`) holds no case after the cases changed; delete "
                         "folds.json to split the cases anew.")
    return {
        "n_folds": n_folds,
        "seed": int(seed),
        "folds": [
            {"fold": i, "train": sorted(c for j, other in enumerate(held_out) if j != i for c in other), "val": fold}
            for i, fold in enumerate(held_out)
        ],
    }


def fold_split(splits: pd.DataFrame, folds: dict, fold: int) -> pd.DataFrame:
    """The split one fold trains with, in the columns of `splits.csv`.

    The held-out fold is `heldout`: neither fitted nor used to stop early, so its predictions
    are out-of-fold. The other folds keep their own set: `train` cases are fitted, `val` cases
    stop training early, as in the single split. When the other folds hold no `val` case, the
    last of their training cases (in sorted order) stops training early instead. The test
    cases stay `test`.

    Raises:
        SplitError: the other folds hold fewer than 2 cases.
    """
    held_out = set(folds["folds"][fold]["val"])
    table = splits[["case_id", "split"]].copy()
    table.loc[table["case_id"].isin(held_out), "split"] = "heldout"
    if not (table["split"] == "val").any():
        train = sorted(table.loc[table["split"] == "train", "case_id"])
        if len(train) >= 2:
            table.loc[table["case_id"] == train[-1], "split"] = "val"
    for needed in ("train", "val"):
        if not (table["split"] == needed).any():
            raise SplitError(
                f"fold {fold}: the other folds hold no {needed} case ({len(held_out)} held out of "
                f"{len(cases_in_split(splits, 'train', 'val'))}). Lower cv.folds, or add cases."
            )
    return table
