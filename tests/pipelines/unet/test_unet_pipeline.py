"""`kedro run --pipeline unet` through KedroSession on tiny parameters."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_DATA_PARAMS, make_project_copy, mlflow_runs, run_pipeline, surface_hd95_brute_force

TINY_UNET = {
    **TINY_DATA_PARAMS,
    "unet.model.input_size": 32,
    "unet.model.base_filters": 8,
    "unet.training.epochs": 1,
    "unet.training.batch_size": 4,
    "unet.training.steps_per_epoch": 3,
    "unet.training.validation_steps": 1,
    "unet.reporting.n_overlay_cases": 1,
}


@pytest.fixture(scope="module")
def unet_run(tmp_path_factory) -> Path:
    project = make_project_copy(tmp_path_factory.mktemp("unet_run"))
    run_pipeline(project, "unet", TINY_UNET)
    return project


def test_predictions_have_the_source_geometry(unet_run: Path):
    splits = pd.read_csv(unet_run / "data" / "03_primary" / "splits.csv")
    sources = pd.read_csv(unet_run / "data" / "02_intermediate" / "case_fingerprints.csv").set_index("case_id")
    expected = sorted(splits.loc[splits["split"].isin(["val", "test"]), "case_id"])
    written = sorted(p.name[: -len(".nii.gz")] for p in (unet_run / "data" / "07_model_output" / "unet").glob("*.nii.gz"))
    assert written == expected
    for case_id in expected:
        prediction = nib.load(str(unet_run / "data" / "07_model_output" / "unet" / f"{case_id}.nii.gz"))
        source = nib.load(sources.loc[case_id, "image_path"])
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)
        assert nib.aff2axcodes(prediction.affine) == nib.aff2axcodes(source.affine)
        assert prediction.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(prediction.dataobj))) <= {0, 1}


def test_metrics_csv_matches_a_direct_computation(unet_run: Path):
    report = pd.read_csv(unet_run / "data" / "08_reporting" / "unet" / "metrics_per_case.csv")
    splits = pd.read_csv(unet_run / "data" / "03_primary" / "splits.csv")
    sources = pd.read_csv(unet_run / "data" / "02_intermediate" / "case_fingerprints.csv").set_index("case_id")
    assert sorted(report["case_id"]) == sorted(splits.loc[splits["split"] == "test", "case_id"])
    for _, row in report.iterrows():
        label = nib.load(sources.loc[row["case_id"], "label_path"])
        reference = np.asanyarray(label.dataobj) > 0
        prediction = np.asanyarray(nib.load(str(unet_run / "data" / "07_model_output" / "unet" / f"{row['case_id']}.nii.gz")).dataobj) > 0
        overlap = np.logical_and(reference, prediction).sum()
        assert row["dice"] == pytest.approx(2 * overlap / (reference.sum() + prediction.sum()))
        assert row["iou"] == pytest.approx(overlap / np.logical_or(reference, prediction).sum())
        spacing = label.header.get_zooms()[:3]
        assert row["reference_ml"] == pytest.approx(reference.sum() * np.prod(spacing) / 1000, rel=1e-5)
        if prediction.any():
            assert row["hd95_mm"] == pytest.approx(surface_hd95_brute_force(reference, prediction, spacing), rel=1e-6)
    summary = pd.read_json(unet_run / "data" / "08_reporting" / "unet" / "metrics_summary.json", typ="series")
    assert summary["n_cases"] == len(report)


def test_mlflow_run_is_named_and_complete(unet_run: Path):
    import mlflow

    import medseg.models  # noqa: F401  (registers the custom loss and metrics)

    client, runs = mlflow_runs(unet_run)
    run = runs[0]
    assert re.fullmatch(r"UNet-Adam-BCE\+Dice-\d{8}-run1", run.info.run_name)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    report = pd.read_csv(unet_run / "data" / "08_reporting" / "unet" / "metrics_per_case.csv")
    assert metrics["test_dice_mean"] == pytest.approx(report["dice"].mean())
    assert metrics["test_iou_mean"] == pytest.approx(report["iou"].mean())
    for key in ("loss", "dice", "iou", "val_loss", "val_dice", "val_iou"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1  # one epoch
    assert run.data.params["unet.training.epochs"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "unet")}
    for name in ("metrics_per_case.csv", "metrics_summary.json", "history.json", "architecture.json",
                 "model.weights.h5", "training_curves.png", "overlays.png"):
        assert f"unet/{name}" in artifacts
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/unet_model")
    assert model.count_params() > 0 and model.output_shape[-1] == 1


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_same_seed_from_a_subfolder_gives_identical_weights_and_dice(unet_run: Path, tmp_path: Path):
    """The run again, in a fresh copy and from its notebooks/ folder: every output lands at the
    project root, and the weights and test Dice are bit-identical to the first run's."""
    import keras

    import medseg.models  # noqa: F401  (registers the custom loss and metrics)

    project = make_project_copy(tmp_path / "again")
    before = _files_under(project)
    run_pipeline(project, "unet", TINY_UNET, cwd=project / "notebooks")

    new_files = _files_under(project) - before
    # .viz/stats.json is kedro-viz's own hook's, also anchored at the root.
    outside = sorted(f for f in new_files if not f.startswith(("data/", "mlruns/", ".viz/")) and f != "mlflow.db")
    assert outside == [], f"written outside data/, mlruns/ and mlflow.db: {outside}"
    assert not any((project / "notebooks").iterdir())
    assert (project / "mlflow.db").is_file() and (project / "data" / "01_raw" / "synthetic" / "dataset.json").is_file()

    first, second = (keras.models.load_model(p / "data" / "06_models" / "unet" / "model.keras") for p in (unet_run, project))
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    dice = [pd.read_csv(p / "data" / "08_reporting" / "unet" / "metrics_per_case.csv")["dice"].to_numpy() for p in (unet_run, project)]
    np.testing.assert_array_equal(dice[0], dice[1])
