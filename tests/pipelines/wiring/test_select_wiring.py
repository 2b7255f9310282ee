"""Wiring: the `select` pipeline run with Kedro's SequentialRunner on an in-memory DataCatalog.
Two "models" were cross-validated on two folds of four cases: their out-of-fold probabilities
are written by hand, and their fold networks are the hand-made above-mean segmenter, so the
candidates' Dice, the choice, the test score and the champion are all known exactly: no
session, no MLflow store, no training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from conftest import REPO_ROOT, above_mean_segmenter, kept_dataset
from medseg.imaging.geometry import CaseGeometry, PreprocessingPlan
from medseg.imaging.io import Volume
from medseg.inference.ensemble import Ensemble
from medseg.kinds import model_kinds
from medseg.pipelines.evaluation import SegmenterExport
from medseg.pipelines.selection import create_pipeline

SHAPE = (12, 10, 6)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # RAS already: the canonical copy is the source file's voxels
FOLDS = {"n_folds": 2, "folds": [{"train": ["c3", "c4"], "val": ["c1", "c2"]}, {"train": ["c1", "c2"], "val": ["c3", "c4"]}]}
CV_CASES = ["c1", "c2", "c3", "c4"]


def _defaults(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / "conf" / "base" / f"parameters_{name}.yml").read_text())[name]


def _reference(case_id: str) -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    start = CV_CASES.index(case_id) if case_id in CV_CASES else 4
    label[start:start + 4, 2:6, 1:3] = 1  # 32 voxels
    return label


def _unet(case_id: str) -> np.ndarray:
    """Right on every case."""
    return 0.9 * _reference(case_id).astype(np.float32)


def _conv3d(case_id: str) -> np.ndarray:
    """Half of the structure in c1 (16 of 32 voxels), all of it elsewhere."""
    probability = _unet(case_id)
    if case_id == "c1":
        probability[:, :, 1] = 0.0
    return probability


def _geometry() -> CaseGeometry:
    return CaseGeometry(original_shape=SHAPE, original_affine=AFFINE.tolist(), canonical_shape=SHAPE, crop_start=(0, 0, 0),
                        crop_stop=SHAPE, target_spacing=(1.0, 1.0, 2.0), preprocessed_shape=SHAPE)


def _test_scan() -> np.ndarray:
    return np.round(np.random.default_rng(1).normal(100, 20, size=SHAPE)).astype(np.float32)


def _partitions(arrays: dict[str, np.ndarray]) -> dict:
    return {case_id: (lambda array=array: Volume(array, AFFINE)) for case_id, array in arrays.items()}


def _fingerprints(images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> pd.DataFrame:
    """The `case_fingerprints` rows the QC ranges read, from the cases' arrays (RAS, AFFINE)."""
    return pd.DataFrame([{
        "case_id": case_id, "original_shape": json.dumps(list(SHAPE)), "original_affine": json.dumps(AFFINE.tolist()),
        "spacing_x": 1.0, "spacing_y": 1.0, "spacing_z": 2.0, "orientation": "RAS",
        "intensity_mean": float(images[case_id].mean()), "intensity_std": float(images[case_id].std()),
        "foreground_voxels": int((labels[case_id] > 0).sum()),
    } for case_id in images])


def _catalog(root: Path) -> DataCatalog:
    cases = CV_CASES + ["t1"]
    labels = {case_id: _reference(case_id) for case_id in cases}
    labels["t1"] = ((_test_scan() >= _test_scan().mean(dtype=np.float64)) & (np.arange(SHAPE[0]) < 6)[:, None, None]).astype(np.uint8)
    images = {case_id: np.zeros(SHAPE, np.float32) for case_id in CV_CASES} | {"t1": _test_scan()}
    fold_networks = {model: Ensemble([above_mean_segmenter(), above_mean_segmenter()], f"{model}-2folds", description={"folds": 2})
                     for model in ("unet", "conv3d")}
    probabilities = {"unet": _unet, "conv3d": _conv3d}
    entries = {}
    for model in model_kinds():
        trained = model in probabilities
        entries[f"{model}.cv_probabilities"] = MemoryDataset(
            _partitions({c: probabilities[model](c) for c in CV_CASES}) if trained else {})
        entries[f"{model}.cv_ensemble"] = MemoryDataset(fold_networks[model] if trained else None, copy_mode="assign")
    return DataCatalog({
        **entries,
        "intermediate_labels": MemoryDataset(_partitions(labels), copy_mode="assign"),
        "intermediate_images": MemoryDataset(_partitions(images), copy_mode="assign"),
        "case_geometry": MemoryDataset(PreprocessingPlan({case_id: _geometry() for case_id in cases}), copy_mode="assign"),
        "folds": MemoryDataset(FOLDS),
        "case_fingerprints": MemoryDataset(_fingerprints(images, labels)),
        "splits": MemoryDataset(pd.DataFrame({"case_id": cases, "split": ["train", "train", "val", "val", "test"]})),
        "dataset_fingerprint": MemoryDataset({"classes": {"1": "lesion"}, "label_mode": "binary"}),
        "params:data": MemoryDataset(_defaults("data")),
        "params:evaluation": MemoryDataset(_defaults("evaluation")),
        "params:cv": MemoryDataset({**_defaults("cv"), "registered_model_name": "medseg-wiring"}),
        "project_root": MemoryDataset(str(root)),
        "synthetic_phantoms": MemoryDataset(str(root / "raw")),
        **{name: kept_dataset() for name in ("selection.best_configuration", "selection.metrics_per_case",
                                              "selection.mlflow_metrics_cv", "selection.mlflow_metrics_test",
                                              "selection.mlflow_params_choice", "selection.mlflow_segmenter",
                                              "selection.candidates_plot", "selection.oof_scores",
                                              "selection.champion_decision", "selection.mlflow_metrics_champion",
                                              "selection.mlflow_params_promotion")},
    })


def test_the_select_pipeline_on_an_in_memory_catalog(tmp_path: Path):
    catalog = _catalog(tmp_path)

    SequentialRunner().run(create_pipeline(), catalog)

    configuration = catalog.load("selection.best_configuration")
    # Out-of-fold Dice by hand: unet 1 on every case; conv3d 2*16/(32+16) on c1, 1 elsewhere;
    # their mean probability is 0.9 where both agree and 0.45 (< 0.5) where only unet does.
    means = {row["candidate"]: row["cv_dice_mean"] for row in configuration["candidates"]}
    assert means == pytest.approx({"unet": 1.0, "conv3d": (2 / 3 + 3) / 4, "unet+conv3d": (2 / 3 + 3) / 4})
    assert configuration["chosen"] == {"candidate": "unet", "models": ["unet"], "largest_component": [],
                                       "cv_dice_mean": 1.0, "members": 2, "threshold": 0.5}
    assert (configuration["folds"], configuration["cases"], configuration["registered_model_name"]) == (2, 4, "medseg-wiring")
    assert catalog.load("selection.mlflow_params_choice")["selection.chosen"] == "unet"
    assert catalog.load("selection.mlflow_metrics_cv")["best_cv_dice_mean"] == 1.0
    # Calibrated on the out-of-fold cases: unet says 0.9 where the reference is 1 and 0 elsewhere,
    # so a sharper temperature (T < 1) lowers the ECE from about 0.05 (half the weight, 0.1 off).
    calibration = configuration["calibration"]
    assert calibration["fitted_on"] == "out-of-fold" and calibration["n_cases_fitted"] == 4
    assert calibration["oof_ece_before"] == pytest.approx(0.05, abs=1e-3) and calibration["oof_ece_after"] < 0.01
    assert calibration["temperature"] == calibration["fitted_temperature"] < 1.0
    assert catalog.load("selection.mlflow_metrics_cv")["cv_calibration_temperature"] == calibration["temperature"]

    # The test case, segmented once by the chosen fold networks: every voxel above the scan's
    # mean; its reference keeps those in x < 6 only.
    scan = _test_scan()
    found = scan >= scan.mean(dtype=np.float64)
    kept = found & (np.arange(SHAPE[0]) < 6)[:, None, None]
    table = catalog.load("selection.metrics_per_case")
    assert list(table["case_id"]) == ["t1"]
    expected = 2 * kept.sum() / (found.sum() + kept.sum())
    assert table.loc[0, "dice"] == pytest.approx(expected)
    assert catalog.load("selection.mlflow_metrics_test")["best_test_dice_mean"] == pytest.approx(expected)

    export = catalog.load("selection.mlflow_segmenter")
    # MLflow is off here: nothing is registered, so no alias moves, and the decision says why.
    assert isinstance(export, SegmenterExport) and (export.registered_model_name, export.alias) == ("medseg-wiring", None)
    assert [m.plan.model_key for m in export.segmenter.members] == ["unet", "unet"]
    assert export.segmenter.temperature == calibration["temperature"] and export.segmenter.qc["held_out_cases"] == 4
    assert export.segmenter.qc["thresholds"] == calibration["qc_thresholds"]
    assert catalog.load("selection.champion_decision")["reason"].startswith("MLflow is off")
    # The choice's out-of-fold Dice per case, kept with the version for the next comparison.
    oof = catalog.load("selection.oof_scores")
    assert list(oof["case_id"]) == CV_CASES and list(oof["dice"]) == [1.0, 1.0, 1.0, 1.0]


def _select_against(monkeypatch, tmp_path: Path, champion, **cv):
    """The pipeline with MLflow "on" and the registry's champion replaced by `champion`."""
    from medseg.runs import tracking

    monkeypatch.setattr(tracking, "active_run_id", lambda: "run")
    monkeypatch.setattr(tracking, "champion_record", lambda name, alias: champion)
    catalog = _catalog(tmp_path)
    catalog["params:cv"] = MemoryDataset({**_defaults("cv"), "registered_model_name": "medseg-wiring", **cv})
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog.load("selection.mlflow_segmenter").alias, catalog.load("selection.champion_decision")


def _champion_scores(dice: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"case_id": CV_CASES, "class": "lesion", "label": 1, "dice": dice})


def test_the_champion_moves_only_on_evidence(monkeypatch, tmp_path: Path):
    from medseg.evaluation.selection import ChampionRecord

    # The first champion needs no comparison.
    alias, decision = _select_against(monkeypatch, tmp_path, None)
    assert alias == "champion" and decision["promoted"] and decision["reason"].startswith("no champion yet")

    # Better on every case (1.0 against 0.9): the alias moves; the difference is exact.
    alias, decision = _select_against(monkeypatch, tmp_path, ChampionRecord("3", _champion_scores([0.9] * 4)),
                                      champion_min_cases=2)
    assert alias == "champion" and decision["promoted"] and decision["champion_version"] == "3"
    assert decision["dice_difference"] == pytest.approx(0.1) and decision["ci_low"] == pytest.approx(0.1)
    assert decision["paired_cases"] == 4 and decision["p_value"] < 0.05

    # The same scores (nothing changed): the champion stays, and the run says why.
    alias, decision = _select_against(monkeypatch, tmp_path, ChampionRecord("3", _champion_scores([1.0] * 4)),
                                      champion_min_cases=2)
    assert alias is None and not decision["promoted"]
    assert "not a significant improvement" in decision["reason"] and decision["dice_difference"] == 0.0

    # Better by noise (+0.04 on one case, -0.02 on two): not significant.
    alias, decision = _select_against(monkeypatch, tmp_path, ChampionRecord("3", _champion_scores([0.96, 1.0, 1.02, 1.02])),
                                      champion_min_cases=2)
    assert alias is None and decision["dice_difference"] == pytest.approx(0.0)
    assert decision["ci_low"] < 0 < decision["ci_high"]

    # Better on every case, but fewer paired cases than the minimum (6 by default): it stays,
    # unless forced.
    worse = ChampionRecord("3", _champion_scores([0.9] * 4))
    alias, decision = _select_against(monkeypatch, tmp_path, worse)
    assert alias is None and "fewer than cv.champion_min_cases=6 paired cases" in decision["reason"]
    alias, decision = _select_against(monkeypatch, tmp_path, worse, force_champion=True)
    assert alias == "champion" and decision["reason"].startswith("forced")

    # A champion that stored no scores cannot be compared with: it stays.
    alias, decision = _select_against(monkeypatch, tmp_path, ChampionRecord("2", None), champion_min_cases=2)
    assert alias is None and "stored no out-of-fold scores" in decision["reason"]


def test_select_refuses_parameters_that_name_other_data(tmp_path: Path):
    from medseg.errors import ConfigurationError

    catalog = _catalog(tmp_path)
    catalog["dataset_fingerprint"] = MemoryDataset({"classes": {"1": "lesion"}, "label_mode": "binary",
                                                    "dataset": "Task04_Hippocampus"})
    with pytest.raises(ConfigurationError, match=r"cross-validated on the dataset 'Task04_Hippocampus'.*"
                                                 r"parameters name 'medseg-synthetic'.*data\.msd_dir"):
        SequentialRunner().run(create_pipeline(), catalog)


def test_select_without_a_cross_validated_model_names_the_fix(tmp_path: Path):
    from medseg.errors import ConfigurationError

    catalog = _catalog(tmp_path)
    for model in model_kinds():
        catalog[f"{model}.cv_probabilities"] = MemoryDataset({})
        catalog[f"{model}.cv_ensemble"] = MemoryDataset(None)
    with pytest.raises(ConfigurationError, match=r"no model was cross-validated.*cv\.folds=5"):
        SequentialRunner().run(create_pipeline(), catalog)
