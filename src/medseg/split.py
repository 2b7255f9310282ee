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


def cases_in_split(splits: pd.DataFrame, *names: str) -> list[str]:
    """Case ids assigned to any of the named sets (`train`, `val`, `test`), sorted."""
    return sorted(splits.loc[splits["split"].isin(names), "case_id"])
