"""`kedro run --pipeline select` in a session: the best configuration from the cross-validated
U-Net, promoted in the MLflow registry, and used by `predict.model=champion`. The choice among
several models and their ensemble, scored by hand, is the wiring test
(tests/pipelines/wiring/test_select_wiring.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import CV_UNET, copy_project, mlflow_runs, run_pipeline, tracking_store
from medseg.imaging.io import read_volume

@pytest.fixture(scope="module")
def selected(cross_validated_unet, tmp_path_factory):
    """The cross-validated U-Net's project, then `select` twice (the second registers a new
    version, and the champion stays: nothing changed)."""
    project = copy_project(cross_validated_unet, tmp_path_factory.mktemp("select") / "project")
    run_pipeline(project, "select", CV_UNET)
    first = json.loads((project / "data/08_reporting/best_configuration.json").read_text())
    run_pipeline(project, "select", CV_UNET)
    return project, first


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float("nan") if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / float(total)


def _source_label(project, case_id: str) -> np.ndarray:
    return read_volume(project / f"data/01_raw/synthetic/labelsTr/{case_id}.nii.gz", role="label").data > 0


def test_the_selection_scores_the_candidates_on_the_out_of_fold_predictions(selected):
    project, first = selected
    configuration = json.loads((project / "data/08_reporting/best_configuration.json").read_text())
    assert configuration == first  # the same inputs choose the same configuration
    table = {row["candidate"]: row for row in configuration["candidates"]}
    assert set(table) <= {"unet", "unet+largest_component"} and "unet" in table
    # The model alone scores what its own cross-validation reported, by hand there.
    summary = json.loads((project / "data/08_reporting/unet/cv_summary.json").read_text())
    assert table["unet"]["cv_dice_mean"] == pytest.approx(summary["metrics"]["cv_dice_mean"], abs=1e-9)
    best = max(configuration["candidates"], key=lambda row: row["cv_dice_mean"])
    assert configuration["chosen"]["cv_dice_mean"] == pytest.approx(best["cv_dice_mean"])
    assert configuration["chosen"]["members"] == 2  # every fold
    assert (project / "data/08_reporting/best_configuration.png").stat().st_size > 0


def test_the_champion_is_registered_and_predict_uses_it_with_the_test_score_it_reported(selected, tmp_path):
    project, _ = selected
    client, runs = mlflow_runs(project)
    select_runs = [r for r in runs if r.info.run_name.startswith("Select-")]
    assert sorted(r.info.run_name.rsplit("-", 1)[1] for r in select_runs) == ["run1", "run2"]
    configuration = json.loads((project / "data/08_reporting/best_configuration.json").read_text())
    newest = select_runs[0]
    assert newest.data.params["selection.chosen"] == configuration["chosen"]["candidate"]
    assert newest.data.metrics["best_cv_dice_mean"] == pytest.approx(configuration["chosen"]["cv_dice_mean"])
    name = configuration["registered_model_name"]
    assert name == "medseg-synthetic"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    assert versions == [1, 2]  # each select registers its choice
    # The second select chose the same, with the same out-of-fold scores: no evidence, so the
    # alias stays on the first version, and the run says why.
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    decision = json.loads((project / "data/08_reporting/champion_decision.json").read_text())
    assert not decision["promoted"] and decision["champion_version"] == "1"
    assert decision["dice_difference"] == 0.0 and decision["paired_cases"] == configuration["cases"]
    assert newest.data.params["selection.promoted"] == "False"
    stored = pd.read_csv(project / "data/08_reporting/oof_scores.csv", dtype={"case_id": str})
    assert stored.groupby("case_id")["dice"].mean().mean() == pytest.approx(configuration["chosen"]["cv_dice_mean"])

    # predict.model=champion on the test scans gives the masks whose Dice the selection logged.
    splits = pd.read_csv(project / "data/03_primary/splits.csv", dtype={"case_id": str})
    test_cases = sorted(splits.loc[splits.split == "test", "case_id"])
    scans = tmp_path / "scans"
    scans.mkdir()
    for case_id in test_cases:
        shutil.copy(project / f"data/01_raw/synthetic/imagesTr/{case_id}_0000.nii.gz", scans)
    run_pipeline(project, "predict", {**CV_UNET, "predict.model": "champion", "predict.input_dir": str(scans),
                                      "predict.output_dir": str(tmp_path / "masks")})
    dices = [_dice(_source_label(project, c), read_volume(tmp_path / "masks" / f"{c}.nii.gz", role="label").data > 0)
             for c in test_cases]
    assert newest.data.metrics["best_test_dice_mean"] == pytest.approx(np.nanmean(dices), abs=1e-6)
    _, runs = mlflow_runs(project)
    assert runs[0].info.run_name.startswith(f"Predict-{configuration['chosen']['candidate']}-")
    assert runs[0].data.tags["medseg.source_model_uri"] == f"models:/{name}/1"  # the version the alias named
    table = pd.read_csv(tmp_path / "masks" / "predictions.csv", dtype=str)
    assert set(table["model_uri"]) == {f"models:/{name}/1"}
    # The champion has its own QC, thresholds from the out-of-fold cases, and its temperature.
    assert table["qc_score"].astype(float).notna().all()
    assert {"qc_out_of_distribution", "qc_low_confidence", "qc_implausible_size"} <= set(table.columns)
    calibration = configuration["calibration"]
    assert calibration["fitted_on"] == "out-of-fold" and calibration["n_cases_fitted"] == configuration["cases"]
    assert newest.data.metrics["cv_calibration_temperature"] == pytest.approx(calibration["temperature"])
    audit = json.loads((tmp_path / "masks" / f"{test_cases[0]}.audit.json").read_text())
    assert audit["model"] == {"uri": f"models:/{name}/1", "version": "1", "alias": "champion"}

    # Each fold's network was exported and checked on its own validation cases, so the champion
    # ensemble also runs on onnxruntime (and was logged as best_segmenter_onnx) with its masks.
    from medseg.inference.engines import mask_agreement

    members = sorted((project / "data/06_models/best/segmenter/members").iterdir())
    assert members and all(json.loads((m / "onnx.json").read_text())["status"] == "passed" for m in members)
    import mlflow

    with tracking_store(project):
        variant = Path(mlflow.artifacts.download_artifacts(f"runs:/{newest.info.run_id}/best_segmenter_onnx",
                                                           dst_path=str(tmp_path / "variant")))
    requirements = (variant / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "tensorflow" not in requirements and "keras" not in requirements
    run_pipeline(project, "predict", {**CV_UNET, "predict.model": "champion", "predict.input_dir": str(scans),
                                      "predict.output_dir": str(tmp_path / "onnx"), "predict.engine": "onnxruntime"})
    for c in test_cases:
        tensorflow, onnx = (read_volume(tmp_path / folder / f"{c}.nii.gz", role="label").data for folder in ("masks", "onnx"))
        assert mask_agreement(tensorflow, onnx, (1,))["agree"]

