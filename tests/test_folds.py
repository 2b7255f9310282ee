"""Cross-validation folds (`medseg.cases.split.assign_folds`, `fold_split`): by case, test held out,
fixed once written."""

import pandas as pd
import pytest

from medseg.errors import ConfigurationError, SplitError
from medseg.cases.split import assign_folds, fold_split


def _splits(n_train: int, n_val: int, n_test: int) -> pd.DataFrame:
    rows = [(f"t{i:02d}", "train") for i in range(n_train)] + [(f"v{i:02d}", "val") for i in range(n_val)]
    rows += [(f"x{i:02d}", "test") for i in range(n_test)]
    return pd.DataFrame(rows, columns=["case_id", "split"])


def test_folds_cover_every_training_and_validation_case_once_and_never_a_test_case():
    splits = _splits(9, 3, 2)
    folds = assign_folds(splits, 3, seed=42)
    held_out = [c for f in folds["folds"] for c in f["val"]]
    assert sorted(held_out) == sorted(c for c in splits.case_id if not c.startswith("x"))
    assert len(held_out) == len(set(held_out)) == 12
    assert [len(f["val"]) for f in folds["folds"]] == [4, 4, 4]
    for fold in folds["folds"]:
        assert set(fold["train"]) == set(held_out) - set(fold["val"])
    assert assign_folds(splits, 3, seed=42) == folds  # deterministic from the seed
    assert assign_folds(splits, 3, seed=7) != folds


def test_saved_folds_are_kept_and_a_new_case_joins_the_smallest_fold():
    splits = _splits(7, 2, 2)
    saved = assign_folds(splits, 3, seed=42)  # 9 cases: 3 + 3 + 3
    grown = pd.concat([splits, pd.DataFrame({"case_id": ["t99"], "split": ["train"]})], ignore_index=True)
    kept = assign_folds(grown, 3, seed=0, saved=saved)  # another seed: the file wins
    for before, after in zip(saved["folds"], kept["folds"]):
        assert set(before["val"]) <= set(after["val"])
    assert kept["folds"][0]["val"] == sorted(saved["folds"][0]["val"] + ["t99"])
    assert kept["seed"] == 42
    with pytest.raises(ConfigurationError, match="folds.json holds 3 folds, but cv.folds=2"):
        assign_folds(grown, 2, seed=42, saved=saved)


def test_too_few_cases_for_the_folds_are_refused():
    with pytest.raises(SplitError, match="cv.folds=5 needs at least 5"):
        assign_folds(_splits(2, 1, 1), 5, seed=1)


def test_a_fold_holds_out_its_cases_and_stops_early_on_the_others_validation_cases():
    splits = _splits(6, 3, 1)
    folds = assign_folds(splits, 3, seed=3)
    for index, fold in enumerate(folds["folds"]):
        table = fold_split(splits, folds, index)
        assert sorted(table.loc[table.split == "heldout", "case_id"]) == fold["val"]
        assert list(table.loc[table.split == "test", "case_id"]) == ["x00"]
        fitted = set(table.loc[table.split.isin(["train", "val"]), "case_id"])
        assert fitted == set(fold["train"]) and not fitted & set(fold["val"])


def test_without_validation_cases_in_the_other_folds_a_training_case_stops_early():
    splits = _splits(4, 0, 1)
    folds = assign_folds(splits, 2, seed=0)
    table = fold_split(splits, folds, 0)
    others = sorted(folds["folds"][0]["train"])
    assert list(table.loc[table.split == "val", "case_id"]) == [others[-1]]
