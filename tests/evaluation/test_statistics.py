"""The bootstrap intervals of a mean over cases and the paired comparison of two models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medseg.evaluation.reports import flatten_class_means, flatten_summary, plot_case_metrics, summarize_per_class
from medseg.evaluation.statistics import Bootstrap, bootstrap_interval, paired_bootstrap


def test_a_constant_score_has_a_point_interval():
    assert bootstrap_interval(np.full(12, 0.8)) == pytest.approx((0.8, 0.8))


def test_two_cases_give_the_extremes_of_their_resampled_means():
    # A resample of {0, 1} has mean 0, 0.5 or 1, each end with probability 1/4: the 2.5 % and
    # 97.5 % quantiles of 2000 draws are the ends themselves.
    assert bootstrap_interval(np.array([0.0, 1.0])) == pytest.approx((0.0, 1.0))


def test_the_interval_of_a_large_sample_is_the_normal_one():
    values = np.random.default_rng(1).normal(0.85, 0.05, size=400)
    low, high = bootstrap_interval(values, Bootstrap(resamples=4000, seed=3))
    half_width = 1.959964 * values.std(ddof=1) / np.sqrt(values.size)
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert (low + high) / 2 == pytest.approx(values.mean(), abs=0.2 * half_width)


def test_the_seed_fixes_the_interval_and_no_resample_draws_none():
    values = np.random.default_rng(0).uniform(size=30)
    assert bootstrap_interval(values, Bootstrap(500, 7)) == bootstrap_interval(values, Bootstrap(500, 7))
    assert bootstrap_interval(values, Bootstrap(500, 7)) != bootstrap_interval(values, Bootstrap(500, 8))
    assert bootstrap_interval(values, Bootstrap(0, 7)) is None
    assert bootstrap_interval(np.array([0.5, np.nan])) is None  # one finite case
    assert bootstrap_interval(np.array([])) is None  # no case (a metric no case has)
    assert bootstrap_interval(np.empty((0, 2))) is None


def test_several_classes_resample_whole_cases_and_leave_nan_out():
    # Class a is always 1; class b is 0 or NaN (both masks empty): every resample's statistic is
    # mean(1, 0) = 0.5, whichever cases it draws, as long as it draws one with b.
    values = np.array([[1.0, 0.0], [1.0, np.nan], [1.0, 0.0], [1.0, np.nan]])
    low, high = bootstrap_interval(values, Bootstrap(1000, 0))
    assert low == pytest.approx(0.5) and high >= 0.5
    # A resample with only NaN for b scores class a alone (1.0): the upper end may reach it.
    assert high <= 1.0


def test_a_candidate_better_on_every_case_is_significant():
    reference = np.random.default_rng(0).uniform(0.7, 0.9, size=10)
    result = paired_bootstrap(reference + 0.02, reference)
    assert result.n_cases == 10 and result.difference == pytest.approx(0.02)
    assert result.low == pytest.approx(0.02) and result.high == pytest.approx(0.02)
    assert result.p_value == pytest.approx(1 / 2001) and result.significant(0.05)


def test_a_candidate_better_by_noise_is_not():
    reference = np.random.default_rng(0).uniform(0.7, 0.9, size=20)
    noise = np.where(np.arange(20) % 2 == 0, 0.011, -0.010)  # +0.0005 on average
    result = paired_bootstrap(reference + noise, reference)
    assert result.difference == pytest.approx(0.0005)
    assert result.low < 0 < result.high
    assert not result.significant(0.05) and result.p_value > 0.2


def test_paired_cases_must_match_and_nan_pairs_drop_out():
    with pytest.raises(ValueError, match="same cases"):
        paired_bootstrap(np.ones(3), np.ones(4))
    result = paired_bootstrap(np.array([0.9, np.nan, 0.8]), np.array([0.8, 0.7, np.nan]))
    assert result.n_cases == 1 and result.difference == pytest.approx(0.1) and result.p_value == 1.0


def _table() -> pd.DataFrame:
    rows = []
    for index, (left, right) in enumerate([(0.9, 0.8), (0.7, np.nan), (0.8, 0.6), (1.0, 0.9)]):
        rows += [{"case_id": f"c{index}", "class": "left", "dice": left, "nsd": left},
                 {"case_id": f"c{index}", "class": "right", "dice": right, "nsd": right}]
    return pd.DataFrame(rows)


def test_the_summary_carries_each_mean_and_its_interval():
    summary = summarize_per_class(_table(), bootstrap=Bootstrap(1000, 0))
    assert summary["dice"]["mean"] == pytest.approx((0.85 + (0.8 + 0.6 + 0.9) / 3) / 2)
    assert summary["dice"]["ci_low"] <= summary["dice"]["mean"] <= summary["dice"]["ci_high"]
    left = summary["classes"]["left"]["dice"]
    assert left["ci_low"] == pytest.approx(bootstrap_interval(np.array([0.9, 0.7, 0.8, 1.0]), Bootstrap(1000, 0))[0])
    assert "95% percentile bootstrap" in summary["confidence_interval"]
    flat = {**flatten_summary(summary), **flatten_class_means(summary)}
    assert flat["test_dice_ci_low"] == summary["dice"]["ci_low"] and flat["test_nsd_left_ci_high"] == left["ci_high"]
    assert "ci_low" not in summarize_per_class(_table())["dice"]  # no bootstrap, no interval


def test_the_metrics_plot_titles_each_metric_with_its_interval():
    summary = summarize_per_class(_table(), bootstrap=Bootstrap(200, 0))
    figure = plot_case_metrics(_table(), summary)
    titles = [axis.get_title() for axis in figure.axes]
    dice = summary["dice"]
    assert titles[0] == f"Dice {dice['mean']:.3f} (CI {dice['ci_low']:.3f}–{dice['ci_high']:.3f})"
    assert titles[1].startswith("NSD ")
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["left", "right"]
