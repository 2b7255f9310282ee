"""A model run that fails midway leaves the previous model, masks and reports byte for byte."""

from pathlib import Path

import pytest

import yaml
from conftest import SHARED_UNET, TINY_UNET, copy_project, make_project_copy, mlflow_runs, run_pipeline


def _outputs(project: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(project)): p.read_bytes()
        for layer in ("06_models", "07_model_output", "08_reporting")
        for p in sorted((project / "data" / layer / "unet").rglob("*"))
        if p.is_file()
    }


def test_a_run_failing_in_evaluation_keeps_the_last_good_outputs(trained_unet, tmp_path, monkeypatch):
    import medseg.pipelines.evaluation as evaluation

    project = copy_project(trained_unet, tmp_path / "project")  # a good unet run (SHARED_UNET)
    good = _outputs(project)
    assert {"data/06_models/unet/model.keras", "data/08_reporting/unet/metrics_summary.json"} <= set(good)
    assert any(name.startswith("data/07_model_output/unet/") for name in good)

    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(evaluation, "summarize_per_class", crash)
    with pytest.raises(Exception, match="evaluation crashed"):
        run_pipeline(project, "unet", {**SHARED_UNET, "unet.training.learning_rate": 0.01})  # new model, new masks
    assert _outputs(project) == good
    assert not list(project.rglob("*.medseg-previous"))
    _, runs = mlflow_runs(project)
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]
    assert runs[0].data.tags["medseg.dataset"] == "medseg-synthetic"
    assert runs[0].data.tags["mlflow.note.content"].startswith("Dataset: medseg-synthetic (synthetic, ")


def _move_every_layer(project: Path, elsewhere: Path) -> None:
    """conf/local/catalog.yml: every catalog entry of conf/base, its `data/...` path moved
    under `elsewhere` (a folder outside the project)."""
    moved = {}
    for path in sorted((project / "conf" / "base").glob("catalog*.yml")):
        for name, entry in yaml.safe_load(path.read_text()).items():
            text = yaml.safe_dump(entry)
            if "data/" in text:
                moved[name] = yaml.safe_load(text.replace("data/", f"{elsewhere}/"))
    (project / "conf" / "local" / "catalog.yml").write_text(yaml.safe_dump(moved))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_with_the_catalog_moved_a_run_writes_nothing_under_data_and_a_failed_one_restores_it(tmp_path, monkeypatch):
    """The catalog owns every file: with every data layer moved elsewhere, a unet run writes
    only the lock under data/, and a run that fails after training puts the previous outputs
    back where the catalog points, byte for byte."""
    import medseg.pipelines.evaluation as evaluation

    project, elsewhere = make_project_copy(tmp_path / "project"), tmp_path / "elsewhere"
    _move_every_layer(project, elsewhere)
    data_before = sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*"))
    run_pipeline(project, "unet", TINY_UNET)
    data_after = sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*"))
    assert sorted(set(data_after) - set(data_before)) == ["data/.medseg.lock"]
    good = _files(elsewhere)
    assert {"06_models/unet/model.keras", "05_model_input/unet/plan.json", "08_reporting/unet/metrics_summary.json",
            "01_raw/synthetic/dataset.json"} <= set(good)
    assert any(name.startswith("07_model_output/unet/") for name in good)

    def crash(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(evaluation, "summarize_per_class", crash)
    with pytest.raises(Exception, match="evaluation crashed"):
        run_pipeline(project, "unet", {**TINY_UNET, "unet.training.learning_rate": 0.01})  # a new model and masks
    assert _files(elsewhere) == good
    assert sorted(str(p.relative_to(project)) for p in (project / "data").rglob("*")) == data_after
