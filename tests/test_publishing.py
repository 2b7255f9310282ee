"""`medseg.storage.publishing`: what the target holds after a publish, a failure, and a crash."""

from __future__ import annotations

import os

import pytest

from medseg.storage.publishing import publish_files, recover_interrupted_swap, retired_path, staged_folder, staging_folder


def _contents(folder):
    return {path.name: path.read_text() for path in sorted(folder.iterdir())}


def _folder(path, **files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _replace_failing_on_call(monkeypatch, failing_call):
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == failing_call:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_a_publish_replaces_the_folder_and_leaves_nothing_beside_it(tmp_path):
    target = _folder(tmp_path / "out", a="old", stale="old")
    with staged_folder(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.staging-")
        (staging / "a").write_text("new")
        (staging / "sub").mkdir()
        (staging / "sub" / "b").write_text("new b")
    assert (target / "a").read_text() == "new" and (target / "sub" / "b").read_text() == "new b"
    assert sorted(p.name for p in target.iterdir()) == ["a", "sub"]  # `stale` went with the old folder
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_first_publish_creates_the_folder_and_its_parent(tmp_path):
    with staged_folder(tmp_path / "new" / "out") as staging:
        (staging / "a").write_text("1")
    assert _contents(tmp_path / "new" / "out") == {"a": "1"}
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["out"]


def test_an_error_while_writing_keeps_the_previous_folder(tmp_path):
    target = _folder(tmp_path / "out", a="old")
    with pytest.raises(RuntimeError, match="half-way"):
        with staged_folder(target) as staging:
            (staging / "a").write_text("new")
            raise RuntimeError("half-way")
    assert _contents(target) == {"a": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_crash_between_the_two_renames_restores_the_previous_folder(tmp_path, monkeypatch):
    target = _folder(tmp_path / "out", a="old")
    calls = _replace_failing_on_call(monkeypatch, failing_call=2)
    with pytest.raises(OSError, match="simulated crash"):
        with staged_folder(target) as staging:
            (staging / "a").write_text("new")
    assert calls[0] == (str(target), str(tmp_path / ".out.old"))  # the first rename happened
    assert _contents(target) == {"a": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_crash_between_the_two_renames_of_a_first_publish_leaves_no_folder(tmp_path, monkeypatch):
    _replace_failing_on_call(monkeypatch, failing_call=1)
    with pytest.raises(OSError, match="simulated crash"):
        with staged_folder(tmp_path / "out") as staging:
            (staging / "a").write_text("new")
    assert list(tmp_path.iterdir()) == []


def test_a_leftover_old_folder_without_a_target_is_restored_before_writing(tmp_path):
    """A kill between the renames left `.out.old` and no `out`: the next publish puts it back
    first, so `out` shows the previous content while the new one is written."""
    _folder(tmp_path / ".out.old", a="previous")
    target = tmp_path / "out"
    with staged_folder(target) as staging:
        assert _contents(target) == {"a": "previous"}
        (staging / "a").write_text("new")
    assert _contents(target) == {"a": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_publish_after_a_kill_still_recovers_the_previous_folder(tmp_path):
    _folder(tmp_path / ".out.old", a="previous")
    with pytest.raises(RuntimeError):
        with staged_folder(tmp_path / "out"):
            raise RuntimeError
    assert _contents(tmp_path / "out") == {"a": "previous"}


def test_a_leftover_old_folder_beside_the_target_is_stale_and_removed(tmp_path):
    """A kill after the swap left `.out.old` beside the new `out`: it is not restored."""
    target = _folder(tmp_path / "out", a="current")
    _folder(tmp_path / ".out.old", a="before")
    assert recover_interrupted_swap(target) is False
    assert _contents(target) == {"a": "current"}
    with staged_folder(target) as staging:
        (staging / "a").write_text("new")
    assert _contents(target) == {"a": "new"}
    assert not retired_path(target).exists()


def test_recover_interrupted_swap_says_whether_it_restored(tmp_path):
    target = tmp_path / "out"
    assert recover_interrupted_swap(target) is False
    _folder(retired_path(target), a="previous")
    assert recover_interrupted_swap(target) is True
    assert _contents(target) == {"a": "previous"}
    assert not retired_path(target).exists()


def test_the_staging_folder_gets_the_umask_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        with staged_folder(tmp_path / "out") as staging:
            (staging / "a").write_text("1")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750  # mkdtemp alone gives 0700


def test_publish_files_replaces_files_of_the_same_name_and_keeps_the_others(tmp_path):
    folder = _folder(tmp_path / "masks", **{"a.nii.gz": "old a", "mine.txt": "the user's"})
    with staging_folder(folder, prefix=".staging-") as staging:
        (staging / "a.nii.gz").write_text("new a")
        (staging / "b.nii.gz").write_text("new b")
        (staging / "ignored").write_text("not listed")
        publish_files(staging, folder, ["a.nii.gz", "b.nii.gz"])
    assert _contents(folder) == {"a.nii.gz": "new a", "b.nii.gz": "new b", "mine.txt": "the user's"}


def test_publish_files_renames_in_the_order_given(tmp_path, monkeypatch):
    folder = _folder(tmp_path / "out")
    calls = _replace_failing_on_call(monkeypatch, failing_call=0)
    with staging_folder(folder, prefix=".staging-") as staging:
        for name in ("z", "table.csv", "a"):
            (staging / name).write_text(name)
        publish_files(staging, folder, ["z", "a", "table.csv"])
    assert [os.path.basename(dst) for _, dst in calls] == ["z", "a", "table.csv"]
    assert _contents(folder) == {"a": "a", "table.csv": "table.csv", "z": "z"}


def test_a_failure_while_staging_files_leaves_the_folder_as_it_was(tmp_path):
    folder = _folder(tmp_path / "out", a="old")
    with pytest.raises(RuntimeError):
        with staging_folder(folder, prefix=".staging-") as staging:
            (staging / "a").write_text("new")
            raise RuntimeError
    assert _contents(folder) == {"a": "old"}
