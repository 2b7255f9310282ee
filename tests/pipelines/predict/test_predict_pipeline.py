"""`kedro run --pipeline predict` on a trained tiny U-Net: masks, geometry, MLflow, bad input."""

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medseg.errors import ConfigurationError, CorruptFileError, DatasetNotFoundError
from conftest import TINY_DATA_PARAMS, copy_project, mlflow_runs, run_pipeline

@pytest.fixture(scope="module")
def trained(trained_unet_postprocessed: Path, tmp_path_factory) -> Path:
    """A copy of the session's U-Net with both postprocessing options on: predict must apply
    the model's own (conftest.TINY_UNET_POSTPROCESSED)."""
    return copy_project(trained_unet_postprocessed, tmp_path_factory.mktemp("predict") / "project")


def _predicted_cases(project: Path) -> list[str]:
    return sorted(p.name[: -len(".nii.gz")] for p in (project / "data" / "07_model_output" / "unet").glob("*.nii.gz"))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def new_scans(trained: Path, tmp_path_factory) -> Path:
    """The val and test scans, named as nnU-Net names them, plus two of them stored differently:
    flipped left-right (with the affine to match) and as (X, Y, Z, 1)."""
    folder = tmp_path_factory.mktemp("scans") / "imagesTs"
    folder.mkdir()
    sources = trained / "data" / "01_raw" / "synthetic" / "imagesTr"
    cases = _predicted_cases(trained)
    for case in cases:
        shutil.copy(sources / f"{case}_0000.nii.gz", folder / f"{case}_0000.nii.gz")
    image = nib.load(sources / f"{cases[0]}_0000.nii.gz")
    data = np.asarray(image.dataobj)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    nib.save(nib.Nifti1Image(np.flip(data, axis=0).copy(), image.affine @ flip), folder / "flipped.nii.gz")
    nib.save(nib.Nifti1Image(data[..., None], image.affine), folder / "channel_axis.nii.gz")
    return folder


@pytest.fixture(scope="module")
def predicted(trained: Path, new_scans: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "masks"
    before = _snapshot(new_scans)
    run_pipeline(trained, "predict", {"predict.input_dir": str(new_scans), "predict.output_dir": str(out)})
    return out, before


def test_masks_equal_the_training_runs_own_predictions(trained: Path, predicted):
    out, _ = predicted
    for case in _predicted_cases(trained):
        mine = nib.load(out / f"{case}.nii.gz")
        pipeline = nib.load(trained / "data" / "07_model_output" / "unet" / f"{case}.nii.gz")
        source = nib.load(trained / "data" / "01_raw" / "synthetic" / "imagesTr" / f"{case}_0000.nii.gz")
        assert mine.get_data_dtype() == np.uint8
        assert mine.shape == source.shape
        np.testing.assert_allclose(mine.affine, source.affine, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(mine.dataobj), np.asarray(pipeline.dataobj))


def test_other_orientations_and_a_channel_axis_get_their_own_grid(trained: Path, predicted, new_scans: Path):
    out, _ = predicted
    case = _predicted_cases(trained)[0]
    reference = np.asarray(nib.load(out / f"{case}.nii.gz").dataobj)
    flipped = nib.load(out / "flipped.nii.gz")
    np.testing.assert_allclose(flipped.affine, nib.load(new_scans / "flipped.nii.gz").affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(flipped.dataobj), np.flip(reference, axis=0))
    channel = nib.load(out / "channel_axis.nii.gz")
    assert channel.shape == reference.shape  # the trailing axis is dropped
    np.testing.assert_array_equal(np.asarray(channel.dataobj), reference)


def test_the_table_the_run_and_the_untouched_input(trained: Path, predicted, new_scans: Path):
    out, before = predicted
    table = pd.read_csv(out / "predictions.csv", dtype={"case_id": str})
    assert sorted(table["case_id"]) == sorted([*_predicted_cases(trained), "flipped", "channel_axis"])
    for row in table.itertuples():
        mask = nib.load(out / f"{row.case_id}.nii.gz")
        voxel_ml = float(np.prod(mask.header.get_zooms()[:3])) / 1000
        assert row.volume_ml == pytest.approx(np.count_nonzero(np.asarray(mask.dataobj)) * voxel_ml)
    assert _snapshot(new_scans) == before
    # Every row says how far to trust its mask: the combined score is 1 or more exactly when a
    # flag is raised; the same scan stored another way scores the same, and a flipped one
    # differs only by its orientation, flagged where training never saw it.
    flags = table["qc_flags"].fillna("")
    assert ((table["qc_score"] >= 1.0) == (flags != "")).all()
    rows, source = table.set_index("case_id"), _predicted_cases(trained)[0]
    assert rows.loc["channel_axis", "qc_score"] == rows.loc[source, "qc_score"]
    qc = json.loads((trained / "data/06_models/unet/segmenter/segmenter.json").read_text())["qc"]
    threshold = qc["thresholds"]["out_of_distribution"]
    seen = {}
    for case, path in (("flipped", new_scans / "flipped.nii.gz"), (source, new_scans / f"{source}_0000.nii.gz")):
        seen[case] = "".join(nib.aff2axcodes(nib.load(path).affine)) in qc["orientations"]
        if not seen[case]:  # an orientation never seen scores 1 before its threshold
            assert rows.loc[case, "qc_out_of_distribution"] * threshold == pytest.approx(1.0, abs=1e-3) or \
                rows.loc[case, "qc_out_of_distribution"] * threshold > 1.0
    if all(seen.values()):
        assert rows.loc["flipped", "qc_out_of_distribution"] == rows.loc[source, "qc_out_of_distribution"]

    client, runs = mlflow_runs(trained)
    training = next(r for r in runs if r.info.run_name.startswith("UNet-"))
    prediction = next(r for r in runs if r.info.run_name.startswith("Predict-"))
    assert prediction.info.run_name == f"Predict-UNet-{dt.date.today():%Y%m%d}-run1"
    assert prediction.info.status == "FINISHED"
    uri = f"runs:/{training.info.run_id}/unet_segmenter"
    assert prediction.data.tags["medseg.source_model_uri"] == uri
    assert set(table["model_uri"]) == {uri}
    logged = client.download_artifacts(prediction.info.run_id, "predict/predictions.csv", str(out.parent))
    assert pd.read_csv(logged, dtype={"case_id": str}).equals(table)


def test_a_broken_scan_fails_naming_it_and_publishes_nothing(trained: Path, new_scans: Path, tmp_path: Path):
    scans = tmp_path / "scans"
    shutil.copytree(new_scans, scans)
    (scans / "zz_broken_0000.nii.gz").write_bytes((scans / "flipped.nii.gz").read_bytes()[:200])  # truncated
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.nii.gz").write_bytes(b"a mask from before")
    with pytest.raises(CorruptFileError, match="zz_broken_0000.nii.gz"):
        run_pipeline(trained, "predict", {"predict.input_dir": str(scans), "predict.output_dir": str(out)})
    assert sorted(p.name for p in out.iterdir()) == ["old.nii.gz"]
    _, runs = mlflow_runs(trained)
    assert runs[0].info.run_name.startswith("Predict-") and runs[0].info.status == "FAILED"


def test_wrong_folders_and_models_are_refused_before_the_run(trained: Path, new_scans: Path, tmp_path: Path):
    _, before = mlflow_runs(trained)
    with pytest.raises(ConfigurationError, match="never writes into the input folder"):
        run_pipeline(trained, "predict", {"predict.input_dir": str(new_scans), "predict.output_dir": str(new_scans / "out")})
    with pytest.raises(ConfigurationError, match="predict.input_dir and predict.output_dir not set"):
        run_pipeline(trained, "predict", {})
    with pytest.raises(DatasetNotFoundError, match=r"conv3d/segmenter/segmenter\.json.*Train one first"):
        run_pipeline(trained, "predict", {"predict.model": "conv3d", "predict.input_dir": str(new_scans), "predict.output_dir": str(tmp_path)})
    with pytest.raises(ConfigurationError, match="MLflow cannot download it"):
        run_pipeline(trained, "predict", {"predict.model": "runs:/0123456789abcdef/unet_segmenter", "predict.input_dir": str(new_scans), "predict.output_dir": str(tmp_path)})
    assert not (new_scans / "out").exists() and not any(tmp_path.iterdir())
    _, after = mlflow_runs(trained)
    # A missing model stops the run before MLflow starts it; a folder mistake fails the run.
    assert len(after) - len(before) == 2 and all(r.info.status == "FAILED" for r in after[: len(after) - len(before)])


def test_the_evaluation_reports_dice_with_and_without_each_option(trained: Path):
    table = pd.read_csv(trained / "data" / "08_reporting" / "unet" / "postprocessing.csv", dtype={"case_id": str})
    assert sorted(table["variant"].unique()) == sorted(["plain", "mirroring", "largest_component", "mirroring+largest_component"])
    client, runs = mlflow_runs(trained)
    metrics = next(r for r in runs if r.info.run_name.startswith("UNet-")).data.metrics
    for variant in table["variant"].unique():
        expected = table[table["variant"] == variant].groupby("case_id")["dice"].mean().mean()
        assert metrics[f"test_dice_mean_{variant.replace('+', '_and_')}"] == pytest.approx(expected)
    # The headline is the model as it predicts: both options on.
    assert metrics["test_dice_mean"] == pytest.approx(metrics["test_dice_mean_mirroring_and_largest_component"])


def test_conv3d_predictions_equal_its_own_evaluation(trained_conv3d: Path, tmp_path: Path):
    project = copy_project(trained_conv3d, tmp_path / "project")
    out = tmp_path / "out"
    scans = project / "data" / "01_raw" / "synthetic" / "imagesTr"
    run_pipeline(project, "predict", {"predict.model": "conv3d", "predict.input_dir": str(scans), "predict.output_dir": str(out)})
    evaluated = sorted((project / "data" / "07_model_output" / "conv3d").glob("*.nii.gz"))
    assert evaluated
    for path in evaluated:
        np.testing.assert_array_equal(np.asarray(nib.load(out / path.name).dataobj), np.asarray(nib.load(path).dataobj))
    assert len(list(out.glob("*.nii.gz"))) == TINY_DATA_PARAMS["data.synthetic.n_cases"]
    _, runs = mlflow_runs(project)
    assert runs[0].info.run_name == f"Predict-UNet3D-{dt.date.today():%Y%m%d}-run1"


def test_predict_on_a_local_cluster_writes_what_sync_writes(trained: Path, predicted, new_scans: Path, tmp_path: Path):
    sync_out, _ = predicted
    out = tmp_path / "masks_local2"
    run_pipeline(trained, "predict", {"predict.input_dir": str(new_scans), "predict.output_dir": str(out), "compute.scheduler": "local:2"})
    # The masks byte for byte; the table and the audit records but for what the clock gives.
    masks = lambda folder: {k: v for k, v in _snapshot(folder).items() if k.endswith(".nii.gz")}  # noqa: E731
    assert masks(out) == masks(sync_out) and len(masks(out)) > 0
    timed = ["seconds", "audit_sha256"]
    tables = [pd.read_csv(f / "predictions.csv", dtype=str, keep_default_na=False).drop(columns=timed, errors="ignore")
              for f in (out, sync_out)]
    pd.testing.assert_frame_equal(*tables)
    for record in sorted(sync_out.glob("*.audit.json")):
        a, b = (json.loads(p.read_text()) for p in (out / record.name, record))
        for key in ("created_at", "seconds"):
            a.pop(key), b.pop(key)
        assert a == b, record.name
    _, runs = mlflow_runs(trained)
    assert runs[0].info.run_name.startswith("Predict-UNet-") and runs[0].data.params["compute.scheduler"] == "local:2"
