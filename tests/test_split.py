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
