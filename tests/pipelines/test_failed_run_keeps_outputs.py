"""A model run that fails midway leaves the previous model, masks and reports byte for byte."""

from pathlib import Path

import pytest

from conftest import SHARED_UNET, copy_project, mlflow_runs, run_pipeline



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
    assert not (project / "data" / ".medseg-previous").exists()
    _, runs = mlflow_runs(project)
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]
    assert runs[0].data.tags["medseg.dataset"] == "medseg-synthetic"
    assert runs[0].data.tags["mlflow.note.content"].startswith("Dataset: medseg-synthetic (synthetic, ")
