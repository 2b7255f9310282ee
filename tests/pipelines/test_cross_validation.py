"""`cv.folds`: folds trained by the template, out-of-fold predictions scored by hand, nested
MLflow runs, and a rerun on Dask workers that keeps a finished fold and trains the other again."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import CV_UNET, copy_project, log_lines, mlflow_runs, run_pipeline
from medseg.datasets.probabilities import ProbabilityDataset
from medseg.imaging.io import read_volume



@pytest.fixture(scope="module")
def cross_validated(cross_validated_unet):
    return cross_validated_unet


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float("nan") if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / float(total)


def test_out_of_fold_predictions_cover_the_folds_and_score_as_computed_by_hand(cross_validated):
    project = cross_validated
    folds = json.loads((project / "data/03_primary/folds.json").read_text())
    splits = pd.read_csv(project / "data/03_primary/splits.csv", dtype={"case_id": str})
    held_out = sorted(c for f in folds["folds"] for c in f["val"])
    assert held_out == sorted(splits.loc[splits.split != "test", "case_id"])
    files = sorted(p.name.removesuffix(".npz") for p in (project / "data/07_model_output/unet_cv").glob("*.npz"))
    assert files == held_out
    table = pd.read_csv(project / "data/08_reporting/unet/cv_metrics_per_case.csv", dtype={"case_id": str})
    summary = json.loads((project / "data/08_reporting/unet/cv_summary.json").read_text())
    dices = []
    for case_id in held_out:
        probability = ProbabilityDataset(str(project / f"data/07_model_output/unet_cv/{case_id}.npz")).load()
        source = read_volume(project / f"data/01_raw/synthetic/labelsTr/{case_id}.nii.gz", role="label")
        assert probability.data.shape == source.data.shape  # the source file's own grid
        np.testing.assert_allclose(probability.affine, source.affine, atol=1e-5)
        dices.append(_dice(source.data > 0, probability.data >= 0.5))
        fold = next(f["fold"] for f in folds["folds"] if case_id in f["val"])
        assert int(table.loc[table.case_id == case_id, "fold"].iloc[0]) == fold
    assert summary["metrics"]["cv_dice_mean"] == pytest.approx(np.nanmean(dices), abs=1e-6)
    per_fold = [np.nanmean([d for c, d in zip(held_out, dices) if c in f["val"]]) for f in folds["folds"]]
    assert [f["dice_mean"] for f in summary["folds"]] == pytest.approx(per_fold, abs=1e-6)
    assert summary["metrics"]["cv_dice_fold_std"] == pytest.approx(np.std(per_fold), abs=1e-6)


def test_each_fold_is_a_run_nested_under_the_pipeline_run_with_its_metrics(cross_validated):
    _, runs = mlflow_runs(cross_validated)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == [f"{parent.info.run_name}/fold0", f"{parent.info.run_name}/fold1"]
    summary = json.loads((cross_validated / "data/08_reporting/unet/cv_summary.json").read_text())
    for child, fold in zip(children, summary["folds"]):
        assert child.data.tags["medseg.fold"] == str(fold["fold"])
        assert child.data.metrics["dice_mean"] == pytest.approx(fold["dice_mean"])
        assert "loss" in child.data.metrics and child.data.params["fold"] == str(fold["fold"])
    assert parent.data.metrics["cv_dice_mean"] == pytest.approx(summary["metrics"]["cv_dice_mean"])


def test_a_rerun_on_dask_workers_keeps_a_finished_fold_and_trains_the_other_to_the_same_bits(cross_validated, tmp_path):
    """A rerun on a LocalCluster (`local:1`: one worker process, which both fold tasks go to),
    with fold 1's network deleted: fold 0's is kept (loaded, not trained again: its files
    untouched), fold 1 trains again in the worker's process, and both
    give exactly the out-of-fold probabilities of the folds trained one after another here,
    bit for bit (the initializers' seeds no longer come from Python's global generator, which a
    Dask worker's own threads also draw from); both folds are logged as nested runs."""
    project = copy_project(cross_validated, tmp_path / "dask")
    backup = project / "data/06_models/unet/cv_backup"
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (backup / "fold0").rglob("*") if p.is_file()}
    assert kept
    shutil.rmtree(backup / "fold1")  # train this fold again, on a worker
    with log_lines("medseg.runs.compute") as lines:
        run_pipeline(project, "unet", {**CV_UNET, "compute.scheduler": "local:1"})
    assert any("unet: cross-validation: 2 cases in" in line for line in lines.text.splitlines())
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (backup / "fold0").rglob("*") if p.is_file()} == kept
    assert list((backup / "fold1").rglob("model.weights.h5"))  # trained again, and kept for the next rerun
    for path in sorted((cross_validated / "data/07_model_output/unet_cv").glob("*.npz")):
        sequential = ProbabilityDataset(str(path)).load()
        distributed = ProbabilityDataset(str(project / "data/07_model_output/unet_cv" / path.name)).load()
        np.testing.assert_array_equal(distributed.data, sequential.data)
        np.testing.assert_allclose(distributed.affine, sequential.affine)
    _, runs = mlflow_runs(project)
    newest = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == newest.info.run_id]) == 2


def test_without_folds_the_run_writes_no_cross_validation(trained_unet):
    assert not list((trained_unet / "data/07_model_output").glob("unet_cv/*.npz"))  # conftest.SHARED_UNET: no cv.folds
    assert not (trained_unet / "data/06_models/unet/cv_ensemble").exists()
    assert json.loads((trained_unet / "data/08_reporting/unet/cv_summary.json").read_text()) == {}
    _, runs = mlflow_runs(trained_unet)
    assert [run for run in runs if "mlflow.parentRunId" in run.data.tags] == []  # no fold runs

