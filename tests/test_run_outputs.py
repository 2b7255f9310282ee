"""Model outputs are published only by a run that succeeds."""

from pathlib import Path

from medseg.run_outputs import OutputTransaction


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _outputs(root: Path, tag: str) -> None:
    for folder, name in (("06_models/unet", "model.keras"), ("07_model_output/unet", "a.nii.gz"), ("08_reporting/unet", "metrics_summary.json")):
        (root / "data" / folder).mkdir(parents=True, exist_ok=True)
        (root / "data" / folder / name).write_text(tag)


def _backup(root: Path, text: str) -> None:
    (root / "data/06_models/unet/backup/abc").mkdir(parents=True, exist_ok=True)
    (root / "data/06_models/unet/backup/abc/training_metadata.json").write_text(text)


def test_a_failed_run_restores_the_previous_outputs_byte_for_byte(tmp_path):
    _outputs(tmp_path, "good")
    _backup(tmp_path, "epoch 1")
    (tmp_path / "data/08_reporting/conv3d").mkdir(parents=True)
    (tmp_path / "data/08_reporting/conv3d/other.json").write_text("not this run's model")
    before = _tree(tmp_path)
    run = OutputTransaction(tmp_path, ["unet"])
    run.begin()
    assert not (tmp_path / "data/06_models/unet/model.keras").exists()
    assert (tmp_path / "data/06_models/unet/backup/abc/training_metadata.json").exists()  # stays for resume
    _outputs(tmp_path, "half-written")
    (tmp_path / "data/07_model_output/unet/b.nii.gz").write_text("new case")
    _backup(tmp_path, "epoch 2")
    run.rollback()
    after = _tree(tmp_path)
    assert after.pop("data/06_models/unet/backup/abc/training_metadata.json") == b"epoch 2"
    before.pop("data/06_models/unet/backup/abc/training_metadata.json")
    assert after == before
    assert not (tmp_path / "data/.medseg-previous").exists()


def test_a_successful_run_replaces_the_previous_outputs(tmp_path):
    _outputs(tmp_path, "old")
    (tmp_path / "data/07_model_output/unet/stale.nii.gz").write_text("a case no longer predicted")
    run = OutputTransaction(tmp_path, ["unet"])
    run.begin()
    _outputs(tmp_path, "new")
    run.commit()
    assert _tree(tmp_path) == {
        "data/06_models/unet/model.keras": b"new",
        "data/07_model_output/unet/a.nii.gz": b"new",
        "data/08_reporting/unet/metrics_summary.json": b"new",
    }


def test_what_a_killed_run_left_aside_is_restored_by_the_next_run(tmp_path, caplog):
    _outputs(tmp_path, "good")
    before = _tree(tmp_path)
    OutputTransaction(tmp_path, ["unet"]).begin()  # then SIGKILL: neither commit nor rollback
    _outputs(tmp_path, "half-written")
    assert (tmp_path / "data/.medseg-previous").exists()
    run = OutputTransaction(tmp_path, ["unet"])
    run.begin()  # the next run restores first, then moves the restored set aside
    assert "restoring its outputs first" in caplog.text
    run.rollback()
    assert _tree(tmp_path) == before


def test_a_run_without_a_model_moves_nothing(tmp_path):
    _outputs(tmp_path, "good")
    before = _tree(tmp_path)
    run = OutputTransaction(tmp_path, [])
    run.begin()
    run.rollback()
    assert _tree(tmp_path) == before
