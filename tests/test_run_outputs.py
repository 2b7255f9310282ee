"""Model outputs are published only by a run that succeeds."""

from pathlib import Path

from medseg.runs.outputs import OutputTransaction, output_folders

LAYERS = ("05_model_input", "06_models", "07_model_output", "08_reporting")


def _unet(root: Path) -> list[str]:
    """The unet's output folders, as `output_folders` finds them in the default catalog."""
    return [str(root / "data" / layer / "unet") for layer in LAYERS]


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
    run = OutputTransaction(_unet(tmp_path))
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
    assert not list(tmp_path.rglob("*.medseg-previous"))


def test_a_successful_run_replaces_the_previous_outputs(tmp_path):
    _outputs(tmp_path, "old")
    (tmp_path / "data/07_model_output/unet/stale.nii.gz").write_text("a case no longer predicted")
    run = OutputTransaction(_unet(tmp_path))
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
    OutputTransaction(_unet(tmp_path)).begin()  # then SIGKILL: neither commit nor rollback
    _outputs(tmp_path, "half-written")
    assert (tmp_path / "data/06_models/.unet.medseg-previous/model.keras").read_text() == "good"
    run = OutputTransaction(_unet(tmp_path))
    run.begin()  # the next run restores first, then moves the restored set aside
    assert "restoring its outputs first" in caplog.text
    run.rollback()
    assert _tree(tmp_path) == before


def test_a_run_without_a_model_moves_nothing(tmp_path):
    _outputs(tmp_path, "good")
    before = _tree(tmp_path)
    run = OutputTransaction([])
    run.begin()
    run.rollback()
    assert _tree(tmp_path) == before


class _Entry:
    def __init__(self, described):
        self.described = described

    def _describe(self):
        return self.described


def test_the_output_folders_are_where_the_catalog_points(tmp_path):
    """An entry's file stands for its folder, the predictions' folder for itself, on a store too."""
    elsewhere = tmp_path / "elsewhere"
    catalog = {
        "unet.plan": _Entry({"filepath": str(elsewhere / "plans/unet/plan.json")}),
        "unet.model": _Entry({"filepath": str(elsewhere / "models/unet/model.keras")}),
        "unet.predictions": _Entry({"path": str(elsewhere / "masks/unet")}),
        "unet.metrics_summary": _Entry({"filepath": "s3://bucket/reports/unet/metrics_summary.json"}),
    }
    assert output_folders(catalog, ["unet"]) == [
        str(elsewhere / "plans/unet"), str(elsewhere / "models/unet"), str(elsewhere / "masks/unet"), "s3://bucket/reports/unet",
    ]


def test_folders_outside_the_project_are_restored_too_and_data_is_left_alone(tmp_path):
    """Catalog entries moved out of data/: a failed run restores them, and the files under
    data/ that no entry points at any more are not touched."""
    root, outside = tmp_path / "project", tmp_path / "outside"
    _outputs(root, "old layout")
    (outside / "models").mkdir(parents=True)
    (outside / "models/model.keras").write_text("good")
    before_root, before_outside = _tree(root), _tree(outside)
    run = OutputTransaction([str(outside / "models")])
    run.begin()
    assert not (outside / "models/model.keras").exists()
    (outside / "models/model.keras").write_text("half-written")
    run.rollback()
    assert _tree(outside) == before_outside and _tree(root) == before_root


def test_a_failed_run_restores_outputs_on_a_store_byte_for_byte():
    """The same transaction on an fsspec store (fsspec's in-memory one): moved aside beside the
    folder, then put back by the rollback, or dropped by the commit."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = "memory://medseg-outputs-test"
    fs.rm(root, recursive=True) if fs.exists(root) else None
    fs.pipe({f"{root}/reports/unet/metrics_summary.json": b"good", f"{root}/masks/unet/a.nii.gz": b"mask",
             f"{root}/models/unet/backup/abc/epoch": b"1"})

    def tree():
        return {path: fs.cat_file(path) for path in sorted(fs.find(root))}

    before = tree()
    folders = [f"{root}/reports/unet", f"{root}/masks/unet", f"{root}/models/unet"]
    run = OutputTransaction(folders)
    run.begin()
    assert not fs.exists(f"{root}/reports/unet/metrics_summary.json")
    assert fs.cat_file(f"{root}/reports/.unet.medseg-previous/metrics_summary.json") == b"good"
    assert fs.cat_file(f"{root}/models/unet/backup/abc/epoch") == b"1"  # stays for resume
    fs.pipe({f"{root}/reports/unet/metrics_summary.json": b"half", f"{root}/masks/unet/b.nii.gz": b"new"})
    run.rollback()
    assert tree() == before
    run = OutputTransaction(folders)
    run.begin()
    fs.pipe({f"{root}/reports/unet/metrics_summary.json": b"new"})
    run.commit()
    assert fs.cat_file(f"{root}/reports/unet/metrics_summary.json") == b"new"
    assert not fs.exists(f"{root}/masks/unet/a.nii.gz") and not fs.exists(f"{root}/reports/.unet.medseg-previous")
