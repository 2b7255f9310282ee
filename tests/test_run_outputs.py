"""Model outputs are published only by a run that succeeds, and the published ones are never
moved away while a run works (`medseg.runs.outputs`)."""

from pathlib import Path

import fsspec
import pytest
from kedro.io import DataCatalog
from kedro.pipeline import Pipeline, node

import medseg.runs.outputs as outputs
from medseg.runs.outputs import JOURNAL_NAME, OutputFolder, OutputStaging, output_folders



@pytest.fixture(autouse=True)
def logged(monkeypatch) -> list[tuple[str, str]]:
    """The artifacts that the catalog's `MlflowArtifactDataset` logs, as (local path, artifact
    path), instead of a run in the current folder's `mlruns/`."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr("mlflow.log_artifact", lambda local, artifact_path=None: calls.append((local, artifact_path)))
    return calls


def _catalog(root: str) -> DataCatalog:
    """The unet's output entries as the default catalog lays them out, under `root`, with
    text files standing for the plan, model, masks and report."""
    text = "text.TextDataset"
    return DataCatalog.from_config({
        "unet.plan": {"type": text, "filepath": f"{root}/05_model_input/unet/plan.json"},
        "unet.model": {"type": "kedro_mlflow.io.artifacts.MlflowArtifactDataset", "artifact_path": "unet",
                       "dataset": {"type": text, "filepath": f"{root}/06_models/unet/model.keras"}},
        "unet.model_alias": {"type": text, "filepath": f"{root}/06_models/unet/model.keras"},
        "unet.predictions": {"type": "partitions.PartitionedDataset", "path": f"{root}/07_model_output/unet",
                             "dataset": text, "filename_suffix": ".nii.gz"},
        "unet.metrics_summary": {"type": text, "filepath": f"{root}/08_reporting/unet/metrics_summary.json"},
        "unet.backup": {"type": text, "filepath": f"{root}/06_models/unet/backup/abc/epoch"},
        "raw": {"type": text, "filepath": f"{root}/01_raw/scan.txt"},
    })


def _pipeline(writes=("unet.plan", "unet.model", "unet.predictions", "unet.metrics_summary")) -> Pipeline:
    """A run that reads the raw data and the backup, writes `writes`, and reads the model back
    through its alias after writing it."""
    return Pipeline([
        node(lambda raw, backup: [raw] * len(writes), ["raw", "unet.backup"], list(writes), name="write"),
        node(lambda model: model, "unet.model_alias", "model_again", name="read_back"),
    ])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _published(root: Path, tag: str) -> None:
    for relative in ("05_model_input/unet/plan.json", "06_models/unet/model.keras", "07_model_output/unet/a.nii.gz",
                     "08_reporting/unet/metrics_summary.json", "08_reporting/unet/overlays.png"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(tag)
    (root / "01_raw").mkdir(exist_ok=True)
    (root / "01_raw/scan.txt").write_text("scan")


def _start(root: Path, writes=("unet.plan", "unet.model", "unet.predictions", "unet.metrics_summary")):
    catalog, pipeline = _catalog(str(root)), _pipeline(writes)
    run = OutputStaging(output_folders(catalog, ["unet"]), root / JOURNAL_NAME)
    run.recover()
    redirected = run.redirect(catalog, pipeline)
    return run, catalog, redirected


def _write_new(catalog: DataCatalog, tag: str, cases=("a", "b")) -> None:
    catalog.save("unet.plan", tag)
    catalog.save("unet.model", tag)
    catalog.save("unet.predictions", {case: tag for case in cases})
    catalog.save("unet.metrics_summary", tag)


def test_the_output_folders_are_where_the_catalog_points(tmp_path):
    """A file entry stands for its folder, the predictions for their own folder, on a store too."""
    elsewhere = tmp_path / "elsewhere"
    catalog = DataCatalog.from_config({
        "unet.plan": {"type": "text.TextDataset", "filepath": f"{elsewhere}/plans/unet/plan.json"},
        "unet.model": {"type": "kedro_mlflow.io.artifacts.MlflowArtifactDataset", "artifact_path": "unet",
                       "dataset": {"type": "text.TextDataset", "filepath": f"{elsewhere}/models/unet/model.keras"}},
        "unet.predictions": {"type": "partitions.PartitionedDataset", "path": f"{elsewhere}/masks/unet", "dataset": "text.TextDataset"},
        "unet.metrics_summary": {"type": "text.TextDataset", "filepath": "s3://bucket/reports/unet/metrics_summary.json"},
    })
    assert output_folders(catalog, ["unet"]) == [
        OutputFolder(f"{elsewhere}/plans/unet"), OutputFolder(f"{elsewhere}/models/unet"),
        OutputFolder(f"{elsewhere}/masks/unet", whole=True), OutputFolder("s3://bucket/reports/unet"),
    ]


def test_a_run_writes_beside_the_published_outputs_and_a_failed_one_leaves_them_byte_for_byte(tmp_path, logged):
    _published(tmp_path, "good")
    before = _tree(tmp_path)
    run, catalog, redirected = _start(tmp_path)
    # What the run writes, and the alias of a path it writes; not the backup, not the raw data.
    assert redirected == ["unet.metrics_summary", "unet.model", "unet.model_alias", "unet.plan", "unet.predictions"]
    _write_new(catalog, "half-written")
    assert catalog.load("unet.model_alias") == "half-written"  # the run reads back what it wrote
    assert logged == [(f"{tmp_path}/06_models/.unet.medseg-staging/model.keras", "unet")]  # the run's own file
    assert _tree(tmp_path / "06_models/.unet.medseg-staging") == {"model.keras": b"half-written"}
    assert {k: v for k, v in _tree(tmp_path).items() if ".medseg-staging" not in k} == before  # published: untouched
    run.rollback()
    assert _tree(tmp_path) == before
    assert not list(tmp_path.rglob("*.medseg-staging"))
    assert catalog.load("unet.model") == "good"  # the catalog points at the published outputs again


def test_a_successful_run_replaces_what_it_wrote_keeps_the_rest_and_replaces_the_masks_whole(tmp_path):
    _published(tmp_path, "old")
    (tmp_path / "07_model_output/unet/stale.nii.gz").write_text("a case no longer predicted")
    (tmp_path / "06_models/unet/backup/abc").mkdir(parents=True)
    (tmp_path / "06_models/unet/backup/abc/epoch").write_text("3")
    run, catalog, _ = _start(tmp_path)
    _write_new(catalog, "new")
    run.commit()
    assert _tree(tmp_path) == {
        "01_raw/scan.txt": b"scan",
        "05_model_input/unet/plan.json": b"new",
        "06_models/unet/backup/abc/epoch": b"3",  # the backups stay where they are
        "06_models/unet/model.keras": b"new",
        "07_model_output/unet/a.nii.gz": b"new",
        "07_model_output/unet/b.nii.gz": b"new",  # no stale.nii.gz: the new set replaces the masks
        "08_reporting/unet/metrics_summary.json": b"new",
        "08_reporting/unet/overlays.png": b"old",  # not written by this run: kept
    }
    assert not list(tmp_path.glob("**/.*")), "no staging folder, journal or leftover"
    assert catalog.load("unet.model") == "new"


def test_a_partial_run_publishes_only_what_it_wrote(tmp_path):
    _published(tmp_path, "old")
    run, catalog, redirected = _start(tmp_path, writes=("unet.metrics_summary",))
    assert redirected == ["unet.metrics_summary"]
    catalog.save("unet.metrics_summary", "new")
    run.commit()
    after = _tree(tmp_path)
    assert after.pop("08_reporting/unet/metrics_summary.json") == b"new"
    assert set(after.values()) <= {b"old", b"scan"} and len(after) == 5


def test_what_a_killed_run_wrote_is_deleted_by_the_next_run_and_the_published_set_stays(tmp_path, caplog):
    _published(tmp_path, "good")
    before = _tree(tmp_path)
    _, catalog, _ = _start(tmp_path)
    _write_new(catalog, "half-written")  # then SIGKILL: neither commit nor rollback
    assert {k: v for k, v in _tree(tmp_path).items() if ".medseg-staging" not in k} == before
    run, _, _ = _start(tmp_path)
    assert "deleting what a run that did not finish had written" in caplog.text
    run.rollback()
    assert _tree(tmp_path) == before


def test_a_kill_in_the_middle_of_publishing_is_finished_by_the_next_run(tmp_path, monkeypatch, caplog):
    """Killed after two of the four folders were swapped in: the next run completes the publish
    from the journal, so the outputs are never half old, half new."""
    _published(tmp_path, "old")
    run, catalog, _ = _start(tmp_path)
    _write_new(catalog, "new")
    publish, calls = outputs._publish, []

    def killed_after_two(folder):
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands for the kill
        calls.append(folder)
        publish(folder)

    monkeypatch.setattr(outputs, "_publish", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        run.commit()
    assert (tmp_path / JOURNAL_NAME).exists()
    assert (tmp_path / "06_models/unet/model.keras").read_text() == "new"
    assert (tmp_path / "05_model_input/unet/plan.json").read_text() == "old"  # half old, half new
    monkeypatch.setattr(outputs, "_publish", publish)
    _start(tmp_path, writes=())[0].rollback()
    assert "finishing the publish" in caplog.text
    after = _tree(tmp_path)
    assert after.pop("08_reporting/unet/overlays.png") == b"old" and after.pop("01_raw/scan.txt") == b"scan"
    assert set(after.values()) == {b"new"} and len(after) == 5
    assert not (tmp_path / JOURNAL_NAME).exists() and not list(tmp_path.rglob("*.medseg-staging"))


def test_outputs_that_an_older_run_set_aside_are_put_back(tmp_path):
    """Runs before the staging design moved the outputs into `.<folder>.medseg-previous` at
    their start; one killed then left them there. The next run puts them back."""
    _published(tmp_path, "good")
    before = _tree(tmp_path)
    aside = tmp_path / "06_models/.unet.medseg-previous"
    aside.mkdir()
    (tmp_path / "06_models/unet/model.keras").rename(aside / "model.keras")
    _start(tmp_path, writes=())[0].rollback()
    assert _tree(tmp_path) == before


def test_a_run_without_a_model_stages_nothing(tmp_path):
    _published(tmp_path, "good")
    before = _tree(tmp_path)
    run = OutputStaging([], tmp_path / JOURNAL_NAME)
    assert run.redirect(_catalog(str(tmp_path)), _pipeline()) == []
    run.commit()
    assert _tree(tmp_path) == before


def test_on_a_store_the_outputs_are_staged_and_copied_over_only_on_success(tmp_path):
    """The same on an fsspec store (fsspec's in-memory one): a failed run leaves the published
    objects as they were; a successful one copies its own over them."""
    fs = fsspec.filesystem("memory")
    root = "memory:///medseg-outputs-test"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.pipe({f"{root}/08_reporting/unet/metrics_summary.json": b"good", f"{root}/07_model_output/unet/stale.nii.gz": b"mask",
             f"{root}/06_models/unet/backup/abc/epoch": b"1", f"{root}/01_raw/scan.txt": b"scan"})

    def tree():
        return {path: fs.cat_file(path) for path in sorted(fs.find(root))}

    before = tree()
    catalog, pipeline = _catalog(root), _pipeline()
    run = OutputStaging(output_folders(catalog, ["unet"]), tmp_path / JOURNAL_NAME)
    run.redirect(catalog, pipeline)
    _write_new(catalog, "half")
    assert {k: v for k, v in tree().items() if ".medseg-staging" not in k} == before
    run.rollback()
    assert tree() == before


def test_on_a_store_a_successful_run_replaces_the_masks_and_keeps_the_backup(tmp_path):
    fs = fsspec.filesystem("memory")
    root = "memory:///medseg-outputs-commit"
    if fs.exists(root):
        fs.rm(root, recursive=True)
    fs.pipe({f"{root}/07_model_output/unet/stale.nii.gz": b"mask", f"{root}/06_models/unet/backup/abc/epoch": b"1",
             f"{root}/08_reporting/unet/overlays.png": b"old", f"{root}/01_raw/scan.txt": b"scan"})
    catalog = _catalog(root)
    run = OutputStaging(output_folders(catalog, ["unet"]), tmp_path / JOURNAL_NAME)
    run.redirect(catalog, _pipeline())
    _write_new(catalog, "new")
    run.commit()
    files = {path[len("/medseg-outputs-commit/"):]: fs.cat_file(path) for path in sorted(fs.find(root))}
    assert files == {
        "01_raw/scan.txt": b"scan", "05_model_input/unet/plan.json": b"new", "06_models/unet/backup/abc/epoch": b"1",
        "06_models/unet/model.keras": b"new", "07_model_output/unet/a.nii.gz": b"new", "07_model_output/unet/b.nii.gz": b"new",
        "08_reporting/unet/metrics_summary.json": b"new", "08_reporting/unet/overlays.png": b"old",
    }
    assert not (tmp_path / JOURNAL_NAME).exists()
