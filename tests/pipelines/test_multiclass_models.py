"""An MSD folder with two foreground labels through `data`, `unet` and `conv3d`: per-class
reports and runs. That a multi-class network learns every class (not one class alone) is
tests/models/test_multiclass.py's `test_multiclass_unet2d_overfits_a_tiny_set`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import HOST_INDEPENDENT_CONV3D, TINY_UNET, make_project_copy, mlflow_runs, run_pipeline, surface_hd95_brute_force
from medseg.synthetic.shapes import synthesize_case

CLASSES = {1: "anterior", 2: "posterior"}
SMALL = {
    **{key: value for key, value in TINY_UNET.items() if key.startswith("unet.")},  # the data is an MSD folder
    **HOST_INDEPENDENT_CONV3D,
    "conv3d.sampling.patch_size": [16, 16, 16],
    "conv3d.sampling.queue_length": 8,
    "conv3d.training.epochs": 1,
    "conv3d.training.batch_size": 2,
    "conv3d.training.steps_per_epoch": 3,
    "conv3d.training.validation_steps": 1,
    "conv3d.evaluation.patches_per_case": 4,
    "conv3d.reporting.n_overlay_cases": 1,
}


def _msd_with_two_labels(root: Path, n_cases: int = 6) -> Path:
    """Phantoms whose lesions are a rim (1) around a core (2), in mixed orientations."""
    training = []
    for index in range(n_cases):
        image, label, affine = synthesize_case(index, seed=9, in_plane_size=48, n_slices_range=(12, 16), n_classes=2)
        case = f"hippo_{index:03d}"
        for folder, name, data in (("imagesTr", f"{case}_0000", image), ("labelsTr", case, label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(root / folder / f"{name}.nii.gz"))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    labels = {"0": "background", **{str(v): n for v, n in CLASSES.items()}}
    (root / "dataset.json").write_text(json.dumps({"name": "TwoLabels", "modality": {"0": "MR"}, "labels": labels, "training": training}))
    return root


@pytest.fixture(scope="module")
def two_label_project(tmp_path_factory):
    msd = _msd_with_two_labels(tmp_path_factory.mktemp("msd") / "Task99_TwoLabels")
    project = make_project_copy(tmp_path_factory.mktemp("multiclass"))
    params = {"data.source": "msd", "data.msd_dir": str(msd), **SMALL}
    run_pipeline(project, "unet", params)
    run_pipeline(project, "conv3d", params)
    return project


@pytest.mark.parametrize("model", ["unet", "conv3d"])
def test_per_class_reports_match_the_written_masks(two_label_project: Path, model: str):
    project = two_label_project
    fingerprint = json.loads((project / "data" / "03_primary" / "fingerprint.json").read_text())
    assert fingerprint["label_mode"] == "multiclass" and fingerprint["classes"] == {"1": "anterior", "2": "posterior"}
    report = pd.read_csv(project / "data" / "08_reporting" / model / "metrics_per_case.csv", dtype={"case_id": str})
    sources = pd.read_csv(project / "data" / "02_intermediate" / "case_fingerprints.csv", dtype={"case_id": str}).set_index("case_id")
    assert sorted(set(report["class"])) == ["anterior", "posterior"]
    assert len(report) == 2 * report["case_id"].nunique()
    for _, row in report.iterrows():
        label = nib.load(sources.loc[row["case_id"], "label_path"])
        written = nib.load(str(project / "data" / "07_model_output" / model / f"{row['case_id']}.nii.gz"))
        assert written.shape == label.shape and np.allclose(written.affine, label.affine, atol=1e-5)
        predicted_values = np.asanyarray(written.dataobj)
        assert set(np.unique(predicted_values)) <= {0, 1, 2}  # the dataset's own values
        reference = np.asanyarray(label.dataobj) == row["label"]
        prediction = predicted_values == row["label"]
        overlap = np.logical_and(reference, prediction).sum()
        total = reference.sum() + prediction.sum()
        if total:
            assert row["dice"] == pytest.approx(2 * overlap / total)
        if reference.any() and prediction.any():
            spacing = label.header.get_zooms()[:3]
            assert row["hd95_mm"] == pytest.approx(surface_hd95_brute_force(reference, prediction, spacing), rel=1e-6)
    summary = json.loads((project / "data" / "08_reporting" / model / "metrics_summary.json").read_text())
    class_means = [report.loc[report["class"] == name, "dice"].mean() for name in ("anterior", "posterior")]
    assert summary["dice"]["mean"] == pytest.approx(np.nanmean(class_means))
    assert summary["classes"]["posterior"]["dice"]["mean"] == pytest.approx(class_means[1], nan_ok=True)


def test_mlflow_runs_name_the_loss_and_log_each_class(two_label_project: Path):
    client, runs = mlflow_runs(two_label_project)
    by_prefix = {re.sub(r"-\d{8}-run\d+$", "", run.info.run_name): run for run in runs}
    assert set(by_prefix) >= {"UNet-Adam-CE+Dice", "UNet3D-Adam-CE+Dice"}
    for run in (by_prefix["UNet-Adam-CE+Dice"], by_prefix["UNet3D-Adam-CE+Dice"]):
        assert run.info.status == "FINISHED"
        assert {"test_dice_mean", "test_dice_anterior_mean", "test_dice_posterior_mean"} <= set(run.data.metrics)
        assert run.data.tags["medseg.dataset"] == "TwoLabels"
        assert {"dice_1", "dice_2", "val_dice_1", "val_dice_2"} <= set(run.data.metrics)

