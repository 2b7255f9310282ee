import pytest

from medseg.errors import ConfigurationError, SplitError
from medseg.cases.split import split_cases


def test_split_is_by_case_deterministic_and_complete():
    ids = [f"c{i:02d}" for i in range(20)]
    first = split_cases(ids, 0.6, 0.2, 0.2, seed=1)
    again = split_cases(list(reversed(ids)), 0.6, 0.2, 0.2, seed=1)
    assert first.equals(again)
    assert sorted(first["case_id"]) == ids
    assert first["split"].value_counts().to_dict() == {"train": 12, "val": 4, "test": 4}
    assert not split_cases(ids, 0.6, 0.2, 0.2, seed=2).equals(first)


def test_every_requested_set_gets_a_case():
    split = split_cases(["a", "b", "c"], 0.8, 0.1, 0.1, seed=0)
    assert sorted(split["split"]) == ["test", "train", "val"]


def test_too_few_cases():
    with pytest.raises(SplitError, match="2 cases are too few"):
        split_cases(["a", "b"], 0.6, 0.2, 0.2, seed=0)


def test_bad_fractions():
    with pytest.raises(ConfigurationError, match="sum to 1"):
        split_cases(["a", "b", "c"], 0.5, 0.2, 0.2, seed=0)


def test_split_sizes_are_known_before_any_case_is_read():
    from medseg.cases.split import split_sizes

    assert split_sizes(6, 0.6, 0.2, 0.2) == {"train": 4, "val": 1, "test": 1}
    assert split_sizes(3, 1.0, 0.0, 0.0) == {"train": 3, "val": 0, "test": 0}
    with pytest.raises(SplitError, match=r"2 cases are too few.*\(3 cases at least\).*Add cases or change data.split"):
        split_sizes(2, 0.6, 0.2, 0.2)


def test_case_ids_that_look_like_numbers_stay_text():
    split = split_cases(["001", "002", "010", "NA", "nan"], 0.6, 0.2, 0.2, seed=0)
    assert sorted(split["case_id"]) == ["001", "002", "010", "NA", "nan"]
    with pytest.raises(ConfigurationError, match=r"case ids as strings, got \[1, 2\].*dtype: \{case_id: str\}"):
        split_cases([1, 2, "NA"], 0.6, 0.2, 0.2, seed=0)


def test_classes_that_no_training_case_holds_are_named_with_the_cases_that_do():
    import logging

    import pandas as pd

    from medseg.cases.split import classes_not_in_training
    from medseg.pipelines.data.nodes import split_dataset

    splits = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "split": ["train", "train", "val", "test"]})
    multiclass = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "foreground_voxels": [5, 5, 9, 9],
                               "share_1": [0.1, 0.2, 0.1, 0.1], "share_2": [0.0, 0.0, 0.05, 0.02], "share_3": [0.0] * 4})
    assert classes_not_in_training(splits, multiclass) == {"label 2": ["c", "d"], "label 3": []}
    binary = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "foreground_voxels": [0, 0, 3, 0]})
    assert classes_not_in_training(splits, binary) == {"foreground": ["c"]}
    binary.loc[1, "foreground_voxels"] = 1
    assert classes_not_in_training(splits, binary) == {}

    # The data pipeline's split says so, naming the split of each case that holds the class.
    data = {"seed": 0, "split": {"train": 0.5, "val": 0.25, "test": 0.25}}
    made = split_dataset(multiclass, data)
    held = [case for case in ("a", "b", "c", "d") if made.set_index("case_id").loc[case, "split"] != "train"]
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("medseg.pipelines.data.nodes").addHandler(handler)
    try:
        split_dataset(multiclass.assign(share_2=[1.0 if case in held else 0.0 for case in "abcd"], share_3=0.1), data)
    finally:
        logging.getLogger("medseg.pipelines.data.nodes").removeHandler(handler)
    [warning] = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert warning.startswith("label 2 is in no training case (only in ") and "Change data.seed or data.split" in warning
    for case in held:
        assert f"{case} ({made.set_index('case_id').loc[case, 'split']})" in warning
