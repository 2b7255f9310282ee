"""`kedro run --pipeline conv3d` through KedroSession on tiny parameters, for both model kinds."""

import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_CONV3D, mlflow_runs, run_pipeline



@pytest.fixture
def conv3d_run(request, trained_conv3d, prepared_project):
    """The project of a conv3d run of the model kind `request.param`: the session's trained
    3D U-Net (TINY_CONV3D), or a run of the patch classifier in a copy of the prepared data."""
    if request.param == "unet3d":
        return trained_conv3d
    run_pipeline(prepared_project, "conv3d", {**TINY_CONV3D, "conv3d.model.network": request.param})
    return prepared_project


@pytest.mark.parametrize("conv3d_run, name", [("unet3d", r"UNet3D-Adam-BCE\+Dice"), ("patch_classifier", "Conv3DClassifier-Adam-BCE")],
                         indirect=["conv3d_run"])
def test_conv3d_pipeline(conv3d_run, name):
    project_copy = conv3d_run
    data = project_copy / "data"
    splits = pd.read_csv(data / "03_primary" / "splits.csv")
    sources = pd.read_csv(data / "02_intermediate" / "case_fingerprints.csv").set_index("case_id")
    for case_id in splits.loc[splits["split"].isin(["val", "test"]), "case_id"]:
        prediction = nib.load(str(data / "07_model_output" / "conv3d" / f"{case_id}.nii.gz"))
        source = nib.load(sources.loc[case_id, "image_path"])
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-5)

    report = pd.read_csv(data / "08_reporting" / "conv3d" / "metrics_per_case.csv")
    assert sorted(report["case_id"]) == sorted(splits.loc[splits["split"] == "test", "case_id"])
    patch_metrics = json.loads((data / "08_reporting" / "conv3d" / "patch_metrics.json").read_text())
    assert patch_metrics["n_patches"] == 6 * len(report)
    assert 0.0 <= patch_metrics["accuracy"] <= 1.0

    client, runs = mlflow_runs(project_copy)
    run = runs[0]
    assert re.fullmatch(rf"{name}-\d{{8}}-run1", run.info.run_name)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_patch_accuracy"] == pytest.approx(patch_metrics["accuracy"])
    assert "test_dice_mean" in run.data.metrics or report["dice"].isna().all()
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "conv3d")}
    assert {"conv3d/metrics_per_case.csv", "conv3d/model.weights.h5", "conv3d/patch_metrics.json"} <= artifacts
