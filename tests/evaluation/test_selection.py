"""The best configuration from out-of-fold probabilities, on cases whose Dice is computed by hand."""

import numpy as np
import pandas as pd
import pytest

from medseg.evaluation.selection import (
    Candidate,
    best_candidate,
    candidates_table,
    model_sets,
    plot_candidates,
    registry_name,
    score_model_sets,
)

SHAPE = (6, 6, 2)


def _reference(case_id: str) -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    if case_id == "c1":
        labels[0:2, 0:2, 0] = 1  # 4 voxels
    else:
        labels[2:4, 2:4, 1] = 1
    return labels


def _model_a(case_id: str) -> np.ndarray:
    """Right on both cases, plus one stray voxel far from the structure in c1."""
    probability = 0.9 * _reference(case_id).astype(np.float32)
    if case_id == "c1":
        probability[5, 5, 1] = 0.9
    return probability


def _model_b(case_id: str) -> np.ndarray:
    """Half of the structure in c1 (2 of 4 voxels), all of it in c2."""
    probability = 0.9 * _reference(case_id).astype(np.float32)
    if case_id == "c1":
        probability[0:2, 1:2, 0] = 0.0
    return probability


def test_each_candidate_scores_its_hand_computed_dice_and_the_filter_is_chosen_where_it_gains():
    scores = score_model_sets(["c1", "c2"], {"a": _model_a, "b": _model_b}, _reference, {1: "tumour"}, 0.5)
    by = scores.set_index(["models", "case_id"])
    # a on c1: 4 right + 1 stray: 2*4/(4+5); the largest component drops the stray voxel.
    assert by.loc[("a", "c1"), "dice"] == pytest.approx(8 / 9)
    assert by.loc[("a", "c1"), "dice_largest_component"] == pytest.approx(1.0)
    assert by.loc[("b", "c1"), "dice"] == pytest.approx(2 / 3)  # 2*2/(4+2)
    # The ensemble's mean: 0.9 where both agree, 0.45 (< 0.5) where only one does.
    assert by.loc[("a+b", "c1"), "dice"] == pytest.approx(2 / 3)
    assert by.loc[("a+b", "c2"), "dice"] == pytest.approx(1.0)

    candidates, table = candidates_table(scores)
    assert list(table["candidate"]) == ["a", "a+largest_component", "b", "a+b"]  # b and a+b gain nothing from it
    means = dict(zip(table["candidate"], table["cv_dice_mean"]))
    assert means == pytest.approx({"a": (8 / 9 + 1) / 2, "a+largest_component": 1.0, "b": (2 / 3 + 1) / 2, "a+b": (2 / 3 + 1) / 2})
    assert table.loc[1, "cv_dice_tumour_mean"] == pytest.approx(1.0)
    chosen = best_candidate(candidates, table)
    assert chosen == Candidate(("a",), (1,)) and chosen.name == "a+largest_component"


def test_the_filter_is_decided_per_class():
    """Class 1 has a stray voxel that the filter removes; class 2 is split in two true parts
    that the filter would cut: only class 1 gets it."""
    reference = np.zeros(SHAPE, np.uint8)
    reference[0:2, 0:2, 0] = 1
    reference[4, 0, 0] = 2
    reference[4, 5, 1] = 2  # two separate true regions of class 2
    probability = np.zeros((*SHAPE, 3), np.float32)
    probability[..., 0] = 1.0
    for value in (1, 2):
        probability[reference == value, value] = 2.0
    probability[5, 5, 1, 1] = 2.0  # stray class-1 voxel
    probability[..., 0][probability[..., 1:].max(axis=-1) > 1] = 0.0
    scores = score_model_sets(["c"], {"m": lambda c: probability}, lambda c: reference, {1: "liver", 2: "lesion"}, 0.5)
    candidates, table = candidates_table(scores)
    assert list(table["candidate"]) == ["m", "m+largest_component"]
    assert candidates[1].largest_component == (1,)
    filtered = table.iloc[1]
    assert filtered["cv_dice_liver_mean"] == pytest.approx(1.0)
    assert filtered["cv_dice_lesion_mean"] == pytest.approx(1.0)  # kept unfiltered: both regions stay
    assert table.iloc[0]["cv_dice_liver_mean"] == pytest.approx(8 / 9)
    assert filtered["largest_component"] == "1"


def test_a_tie_keeps_the_simpler_configuration():
    table = pd.DataFrame({"candidate": ["a", "b", "a+b"], "cv_dice_mean": [0.8, 0.8, 0.8]})
    candidates = [Candidate(("a",)), Candidate(("b",)), Candidate(("a", "b"))]
    assert best_candidate(candidates, table) == Candidate(("a",))
    table["cv_dice_mean"] = [0.8, 0.8, 0.81]
    assert best_candidate(candidates, table) == Candidate(("a", "b"))


def test_model_sets_and_registry_names():
    assert model_sets(["unet", "conv3d"]) == [("unet",), ("conv3d",), ("unet", "conv3d")]
    assert len(model_sets(["a", "b", "c"])) == 7
    assert registry_name("Task04_Hippocampus") == "medseg-Task04_Hippocampus"
    assert registry_name("medseg-synthetic") == "medseg-synthetic"
    assert registry_name("Brain tumour/v2") == "medseg-Brain-tumour-v2"


def test_the_plot_has_one_bar_per_candidate():
    table = pd.DataFrame({"candidate": ["a", "b"], "cv_dice_mean": [0.7, 0.9]})
    figure = plot_candidates(table, "b")
    bars = figure.axes[0].patches
    assert sorted(round(bar.get_width(), 3) for bar in bars) == [0.7, 0.9]
