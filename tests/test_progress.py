"""medseg.casework.progress: "case i of N" lines with the time left, quiet for quick runs (fake clock)."""

from __future__ import annotations

import logging

import pytest

from medseg.casework.progress import CaseProgress, format_duration, track_cases, track_partitions


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def tick(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def logged(caplog):
    caplog.set_level(logging.INFO, logger="medseg.casework.progress")
    return caplog


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.42, "0.4 s"), (9.96, "10.0 s"), (12.4, "12 s"), (65, "1:05"), (3723, "1:02:03"), (float("nan"), "?")],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_slow_cases_log_each_case_with_the_time_left(clock, logged):
    progress = CaseProgress("predict", 4, clock=clock)
    for case_id in ("a", "b", "c", "d"):
        clock.tick(40.0)
        progress.advance(case_id)
    assert logged.messages == [
        "predict: case 1 of 4 (a), 40 s elapsed, about 2:00 left",
        "predict: case 2 of 4 (b), 1:20 elapsed, about 1:20 left",
        "predict: case 3 of 4 (c), 2:00 elapsed, about 40 s left",
        "predict: 4 of 4 cases done in 2:40",
    ]


def test_a_quick_run_logs_only_its_last_case(clock, logged):
    progress = CaseProgress("validate_cases", 6, clock=clock)
    lines = []
    for i in range(6):
        clock.tick(0.2)
        lines.append(progress.advance(f"case_{i}"))
    assert lines[:5] == [None] * 5
    assert logged.messages == ["validate_cases: 6 of 6 cases done in 1.2 s"]


def test_many_quick_cases_log_at_most_every_tenth_and_every_few_seconds(clock, logged):
    progress = CaseProgress("evaluate", 1000, clock=clock, every_s=5.0, every_fraction=0.1)
    for i in range(1000):
        clock.tick(0.1)  # 100 s in all: time alone would allow 20 lines
        progress.advance(str(i))
    # A line once 100 cases (10 %) and 5 s have passed since the last one, plus the last.
    assert len(logged.messages) == 10
    assert logged.messages[0] == "evaluate: case 100 of 1000 (99), 10.0 s elapsed, about 1:30 left"
    assert logged.messages[-1] == "evaluate: 1000 of 1000 cases done in 1:40"


def test_track_cases_counts_each_item_when_the_next_is_asked_for(clock, logged):
    progress = CaseProgress("canonicalize", 2, clock=clock, every_s=0, every_fraction=0)
    seen = []
    for item in track_cases(["x", "y"], progress):
        seen.append((item, progress.done))
        clock.tick(3.0)
    assert seen == [("x", 0), ("y", 1)]
    assert logged.messages == ["canonicalize: case 1 of 2 (x), 3.0 s elapsed, about 3.0 s left", "canonicalize: 2 of 2 cases done in 6.0 s"]


def test_lazy_partitions_start_the_clock_at_the_first_call_and_keep_results(clock, logged):
    def make(value):
        def run():
            clock.tick(10.0)
            return value

        return run

    tracked = track_partitions({"a": make(1), "b": make(2), "c": make(3)}, "preprocess (images)", clock=clock)
    clock.tick(500.0)  # the catalog saves later: this wait is not part of the estimate
    assert [tracked[key]() for key in ("a", "b", "c")] == [1, 2, 3]
    assert logged.messages == [
        "preprocess (images): case 1 of 3 (a), 10 s elapsed, about 20 s left",
        "preprocess (images): case 2 of 3 (b), 20 s elapsed, about 10 s left",
        "preprocess (images): 3 of 3 cases done in 30 s",
    ]


def test_remaining_time_is_unknown_before_the_first_case(clock):
    progress = CaseProgress("x", 3, clock=clock)
    assert progress.remaining_s() is None
    clock.tick(2.0)
    progress.advance()
    assert progress.remaining_s() == pytest.approx(4.0)


def test_a_single_case_is_one_case(clock, logged):
    progress = CaseProgress("Evaluating", 1, clock=clock)
    clock.tick(0.5)
    progress.advance("a")
    assert logged.messages == ["Evaluating: 1 of 1 case done in 0.5 s"]


def test_folds_are_counted_as_folds_with_the_time_left():
    import logging

    now = [0.0]
    progress = CaseProgress("unet: cross-validation", 3, logger=logging.getLogger("test"), unit="fold",
                            every_s=0.0, every_fraction=0.0, clock=lambda: now[0])
    now[0] = 60.0
    assert progress.advance() == "unet: cross-validation: fold 1 of 3, 1:00 elapsed, about 2:00 left"
    now[0] = 130.0
    assert progress.advance() == "unet: cross-validation: fold 2 of 3, 2:10 elapsed, about 1:05 left"
    assert progress.advance() == f"unet: cross-validation: 3 of 3 folds done in {format_duration(130.0)}"
