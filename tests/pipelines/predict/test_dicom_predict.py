"""DICOM in, DICOM SEG out, through `kedro run --pipeline predict`: a phantom written as a DICOM
series (pydicom) is segmented like its NIfTI, the SEG reads back as the NIfTI mask voxel for
voxel, `predictions.csv` traces the mask to its series and model, and the MLflow store holds no
patient identifier."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from conftest import SHARED_UNET, copy_project, mlflow_runs, run_pipeline
from medseg.errors import MedsegError
from medseg.dicom.series import read_dicom_series
from medseg.dicom.rtstruct import read_rtstruct
from medseg.dicom.seg import read_dicom_seg
from medseg.dicom.uids import with_generated_uids
from medseg.synthetic.dicom_series import write_dicom_series
from medseg.imaging.io import read_volume
from tests.imaging.test_dicom_blank_uids import blank

PATIENT_ID = "PID-7731-SECRET"
# Attributes of DICOM PS3.15's basic de-identification profile, each with a marker to search for.
IDENTIFIERS = {"PatientBirthDate": "19010203", "AccessionNumber": "ACC-SECRET-991", "InstitutionName": "St Secret Hospital",
               "ReferringPhysicianName": "DOCTOR^SECRET", "OtherPatientIDs": "OPID-SECRET-5"}


def _canonical(volume_data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(volume_data), affine))
    return np.asarray(image.dataobj), image.affine


@pytest.fixture(scope="module")
def dicom_prediction(trained_unet, tmp_path_factory):
    """One phantom as a NIfTI file, as a DICOM series folder and as a zip of that series, all
    three segmented in one predict run."""
    root = tmp_path_factory.mktemp("dicom_predict")
    project = copy_project(trained_unet, root / "project")
    source = sorted((project / "data/01_raw/synthetic/imagesTr").glob("*_0000.nii.gz"))[0]
    scans = root / "scans"
    scans.mkdir()
    shutil.copy(source, scans / "nifti_0000.nii.gz")
    files = write_dicom_series(read_volume(source), scans / "series", patient_id=PATIENT_ID, seed=3)
    for path in files:  # the patient and study attributes a de-identification profile removes, as markers
        dataset = pydicom.dcmread(path)
        for keyword, marker in IDENTIFIERS.items():
            setattr(dataset, keyword, marker)
        dataset.save_as(path)
    with zipfile.ZipFile(scans / "zipped.zip", "w") as archive:
        for path in files:
            archive.write(path, f"export/{path.name}")
    blank(root / "anonymised", source=scans / "series")  # every UID blank, as some anonymisers leave a series
    with zipfile.ZipFile(scans / "anonymised.zip", "w") as archive:
        for path in sorted((root / "anonymised").iterdir()):
            archive.write(path, f"export/{path.name}")
    if shutil.which("dcm2niix"):  # the same series converted by an independent tool
        converted = root / "dcm2niix"
        converted.mkdir()
        subprocess.run(["dcm2niix", "-z", "y", "-f", "converted", "-o", str(converted), str(scans / "series")],
                       check=True, capture_output=True)
        shutil.copy(converted / "converted.nii.gz", scans / "dcm2niix.nii.gz")
    out = root / "masks"
    run_pipeline(project, "predict", {**SHARED_UNET, "predict.model": "unet", "predict.input_dir": str(scans),
                                      "predict.output_dir": str(out)})
    return project, scans, out


def test_a_dicom_series_is_segmented_as_its_nifti_and_its_seg_reads_back_as_the_mask(dicom_prediction):
    _, scans, out = dicom_prediction
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("dcm2niix"))
    assert names == ["anonymised.audit.json", "anonymised.nii.gz", "nifti.audit.json", "nifti.nii.gz", "predictions.csv",
                     "series.audit.json", "series.nii.gz", "series.seg.dcm", "zipped.audit.json", "zipped.nii.gz",
                     "zipped.seg.dcm"]
    series = read_dicom_series(scans / "series")
    mask = read_volume(out / "series.nii.gz", role="label")
    # The mask is on the series' own grid, the affine built from its IPP/IOP.
    assert mask.data.shape == series.volume.data.shape
    np.testing.assert_allclose(mask.affine, series.volume.affine, atol=1e-4)
    # Same voxels in space as the NIfTI's mask (the series stores intensities as int16, so a few
    # boundary voxels may differ: at most 1 %).
    nifti = read_volume(out / "nifti.nii.gz", role="label")
    a, affine_a = _canonical(mask.data, mask.affine)
    b, affine_b = _canonical(nifti.data, nifti.affine)
    np.testing.assert_allclose(affine_a, affine_b, atol=1e-3)
    assert b.sum() > 0 and np.mean(a != b) <= 0.01
    # The SEG, read back over its source series, is the NIfTI mask voxel for voxel.
    for name in ("series", "zipped"):
        np.testing.assert_array_equal(read_dicom_seg(out / f"{name}.seg.dcm", series), read_volume(out / f"{name}.nii.gz", role="label").data)


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix (Debian's package) is not installed: make dicom-tools")
def test_dcm2niix_s_conversion_of_the_series_gets_the_same_geometry_and_the_same_mask(dicom_prediction):
    _, scans, out = dicom_prediction
    converted = read_volume(scans / "dcm2niix.nii.gz")
    series = read_dicom_series(scans / "series")
    a, affine_a = _canonical(series.volume.data, series.volume.affine)
    b, affine_b = _canonical(converted.data, converted.affine)
    np.testing.assert_allclose(affine_a, affine_b, atol=1e-3)
    np.testing.assert_allclose(a, b, atol=1e-3)  # the same rescaled intensities
    mine = read_volume(out / "series.nii.gz", role="label")
    theirs = read_volume(out / "dcm2niix.nii.gz", role="label")
    np.testing.assert_array_equal(_canonical(mine.data, mine.affine)[0], _canonical(theirs.data, theirs.affine)[0])


def test_predictions_trace_each_mask_to_its_series_and_model(dicom_prediction):
    _, scans, out = dicom_prediction
    table = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False).set_index("case_id")
    series = read_dicom_series(scans / "series")
    for name in ("series", "zipped"):
        row = table.loc[name]
        seg = pydicom.dcmread(out / f"{name}.seg.dcm")
        assert row["series_instance_uid"] == series.series_uid == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert row["study_instance_uid"] == series.study_uid == seg.StudyInstanceUID
        assert row["seg_sop_instance_uid"] == seg.SOPInstanceUID and row["seg_file"] == f"{name}.seg.dcm"
        assert row["model_uri"].startswith("runs:/") and row["model_uri"].endswith("/unet_segmenter")
        assert seg.SegmentSequence[0].SegmentAlgorithmName.startswith("medseg")
        assert seg.PatientID == PATIENT_ID  # the SEG carries the patient module, as the standard requires
    assert table.loc["nifti", "series_instance_uid"] == "" and table.loc["nifti", "seg_file"] == ""


def test_a_series_without_uids_gets_its_mask_and_a_row_that_says_why_it_has_no_seg(dicom_prediction):
    _, _, out = dicom_prediction
    table = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False).set_index("case_id")
    row = table.loc["anonymised"]
    assert row["seg_file"] == "" and row["series_instance_uid"] == "" and row["uids_generated"] == ""
    assert "no StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID, SOPClassUID" in row["dicom_outputs_note"]
    assert "predict.generate_missing_uids=true" in row["dicom_outputs_note"]
    np.testing.assert_array_equal(read_volume(out / "anonymised.nii.gz", role="label").data,
                                  read_volume(out / "series.nii.gz", role="label").data)
    assert table.loc["series", "dicom_outputs_note"] == ""


def test_with_new_uids_asked_for_the_anonymised_series_gets_a_seg_over_them(dicom_prediction, tmp_path):
    project, scans, out = dicom_prediction
    only = tmp_path / "in"
    only.mkdir()
    shutil.copy(scans / "anonymised.zip", only / "anonymised.zip")
    masks = tmp_path / "out"
    run_pipeline(project, "predict", {**SHARED_UNET, "predict.model": "unet", "predict.input_dir": str(only),
                                      "predict.output_dir": str(masks), "predict.generate_missing_uids": True})
    row = pd.read_csv(masks / "predictions.csv", dtype=str, keep_default_na=False).iloc[0]
    assert row["uids_generated"] == "StudyInstanceUID;SeriesInstanceUID;SOPInstanceUID;SOPClassUID;FrameOfReferenceUID"
    assert row["dicom_outputs_note"] == "" and row["seg_file"] == "anonymised.seg.dcm"
    seg = pydicom.dcmread(masks / "anonymised.seg.dcm")
    assert seg.StudyInstanceUID == row["study_instance_uid"] and row["study_instance_uid"].startswith("2.25.")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == row["series_instance_uid"]
    # The SEG reads back as the mask over the series with the same new UIDs (they follow its voxels).
    filled, _ = with_generated_uids(read_dicom_series(only / "anonymised.zip"))
    np.testing.assert_array_equal(read_dicom_seg(masks / "anonymised.seg.dcm", filled),
                                  read_volume(masks / "anonymised.nii.gz", role="label").data)


def _predict_the_series(dicom_prediction, tmp_path: Path, **params) -> tuple[Path, Path]:
    """`predict` on the fixture's series folder alone, with `params` (`predict.<key>`); (its input, its output)."""
    project, scans, _ = dicom_prediction
    only, masks = tmp_path / "in", tmp_path / "out"
    shutil.copytree(scans / "series", only / "series")
    run_pipeline(project, "predict", {**SHARED_UNET, "predict.model": "unet", "predict.input_dir": str(only),
                                      "predict.output_dir": str(masks), **{f"predict.{k}": v for k, v in params.items()}})
    return only, masks


def test_outputs_give_a_structure_set_and_a_labelmap_seg_that_read_back_as_the_mask(dicom_prediction, tmp_path):
    _, _, out = dicom_prediction
    only, masks = _predict_the_series(dicom_prediction, tmp_path, outputs=["seg", "rtstruct"], seg_type="labelmap")
    assert sorted(p.name for p in masks.iterdir()) == ["predictions.csv", "series.audit.json", "series.rtstruct.dcm", "series.seg.dcm"]
    row = pd.read_csv(masks / "predictions.csv", dtype=str, keep_default_na=False).iloc[0]
    assert row["rtstruct_file"] == "series.rtstruct.dcm" and row["seg_file"] == "series.seg.dcm"
    assert pydicom.dcmread(masks / "series.rtstruct.dcm").SOPInstanceUID == row["rtstruct_sop_instance_uid"]
    assert pydicom.dcmread(masks / "series.seg.dcm").SegmentationType == "LABELMAP"
    series = read_dicom_series(only / "series")
    expected = read_volume(out / "series.nii.gz", role="label").data  # the first run's mask, same model and series
    assert expected.sum() > 0
    np.testing.assert_array_equal(read_dicom_seg(masks / "series.seg.dcm", series), expected)
    redrawn = read_rtstruct(masks / "series.rtstruct.dcm", series)
    for value in np.unique(expected[expected > 0]):
        a, b = redrawn == value, expected == value
        assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98  # the bound; the even-odd rule gives 1.0
    np.testing.assert_array_equal(redrawn, expected)


def test_dicom_outputs_only_for_nifti_scans_are_refused_before_any_work(dicom_prediction, tmp_path):
    project, scans, _ = dicom_prediction
    only = tmp_path / "in"
    only.mkdir()
    shutil.copy(scans / "nifti_0000.nii.gz", only / "nifti_0000.nii.gz")
    with pytest.raises(MedsegError, match=r"asks only for DICOM objects, and none of the 1 scans can give one: 1 are NIfTI"):
        run_pipeline(project, "predict", {**SHARED_UNET, "predict.model": "unet", "predict.input_dir": str(only),
                                          "predict.output_dir": str(tmp_path / "out"), "predict.outputs": ["rtstruct"]})
    assert not (tmp_path / "out").exists()


def test_every_scan_has_an_audit_record_that_says_what_went_in_and_came_out(dicom_prediction):
    project, scans, out = dicom_prediction
    table = pd.read_csv(out / "predictions.csv", dtype=str, keep_default_na=False).set_index("case_id")
    series = read_dicom_series(scans / "series")
    for name, source in (("series", f"folder: {scans / 'series'}"), ("zipped", f"zip: {scans / 'zipped.zip'}")):
        row = table.loc[name]
        record = json.loads((out / row["audit_file"]).read_text())
        assert record["schema"] == "medseg-audit/1" and record["case_id"] == name and record["source"] == source
        assert record["input"]["study_instance_uid"] == series.study_uid
        assert record["input"]["series_instance_uid"] == series.series_uid
        assert record["input"]["sop_instance_uids"] == [str(d.SOPInstanceUID) for d in series.datasets]
        assert record["model"]["uri"] == row["model_uri"] and row["model_uri"] == f"runs:/{record['model']['version']}/unet_segmenter"
        assert record["software"]["medseg"] == row["medseg_version"] and {"numpy", "pydicom", "highdicom"} <= set(record["software"])
        kinds = {item["kind"]: item for item in record["outputs"]}
        assert set(kinds) == {"nifti", "seg"}
        for kind, file in (("nifti", f"{name}.nii.gz"), ("seg", f"{name}.seg.dcm")):
            assert kinds[kind]["file"] == file and kinds[kind]["sha256"] == hashlib.sha256((out / file).read_bytes()).hexdigest()
            assert row[f"{kind}_sha256"] == kinds[kind]["sha256"]
        assert kinds["seg"]["sop_instance_uid"] == row["seg_sop_instance_uid"]
        assert record["seconds"]["total"] == pytest.approx(float(row["seconds"])) and record["seconds"]["network"] > 0
        assert record["qc"]["flags"] == row["qc_flags"] and record["volumes_ml"]["volume_ml"] == pytest.approx(float(row["volume_ml"]))
    nifti = json.loads((out / "nifti.audit.json").read_text())
    assert nifti["input"]["sop_instance_uids"] == [] and nifti["source"].startswith("file: ")
    assert json.loads((out / "anonymised.audit.json").read_text())["input"]["study_instance_uid"] == ""


def test_hashed_uids_in_the_audit_record_and_in_mlflow(dicom_prediction, tmp_path):
    project, _, _ = dicom_prediction
    only, masks = _predict_the_series(dicom_prediction, tmp_path, hash_uids=True)
    series = read_dicom_series(only / "series")
    record = json.loads((masks / "series.audit.json").read_text())
    digest = "sha256:" + hashlib.sha256(series.series_uid.encode()).hexdigest()
    assert record["input"]["series_instance_uid"] == digest and record["input"]["uids_hashed"] is True
    assert all(uid.startswith("sha256:") for uid in record["input"]["sop_instance_uids"])
    kept = pd.read_csv(project / "data/08_reporting/predict/predictions.csv", dtype=str, keep_default_na=False)
    assert kept.loc[0, "series_instance_uid"] == digest  # what MLflow logs
    written = pd.read_csv(masks / "predictions.csv", dtype=str, keep_default_na=False)
    assert written.loc[0, "series_instance_uid"] == series.series_uid  # the user's own table keeps them
    client, runs = mlflow_runs(project)
    logged = Path(client.download_artifacts(runs[0].info.run_id, "predict", str(tmp_path / "logged")))
    texts = [p.read_text() for p in logged.rglob("*") if p.is_file()]
    assert len(texts) == 2 and all(series.series_uid not in text and digest in text for text in texts)  # table, record


def test_the_tracking_store_holds_no_patient_identifier_and_the_run_lists_its_inputs(dicom_prediction):
    project, _, out = dicom_prediction
    _, runs = mlflow_runs(project)
    run = [r for r in runs if r.info.run_name.startswith("Predict-UNet-")][-1]  # the fixture's, the first predict run
    identifiers = {PATIENT_ID, "PHANTOM^SYNTHETIC", "PHANTOM", *IDENTIFIERS.values()}
    for what in (run.data.params, run.data.tags, {k: str(v) for k, v in run.data.metrics.items()}):
        for key, value in what.items():
            assert not any(i in str(value) or i in key for i in identifiers), (key, value)
    # Nor any file of the project (the MLflow store and its artifacts: predictions, audit records).
    markers = [m.encode() for m in (PATIENT_ID, *IDENTIFIERS.values())]  # (the phantom's name is in medseg's own code)
    for path in project.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            content = path.read_bytes()
            assert not any(m in content for m in markers), path
    for record in out.glob("*.audit.json"):
        content = record.read_bytes()
        assert not any(m in content for m in markers), record
    inputs = run.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["predict-input"]
    assert inputs[0].tags[0].value == "inference"
    assert PATIENT_ID not in inputs[0].dataset.profile + inputs[0].dataset.schema
    # The training run of the model lists its cases too.
    training = next(r for r in runs if r.info.run_name.startswith("UNet-"))
    assert [i.dataset.name for i in training.inputs.dataset_inputs] == ["unet-cases"]


def test_two_series_in_one_input_are_refused_naming_them_and_nothing_is_written(dicom_prediction, tmp_path):
    project, scans, _ = dicom_prediction
    mixed = tmp_path / "mixed"
    shutil.copytree(scans / "series", mixed / "study")
    source = sorted((project / "data/01_raw/synthetic/imagesTr").glob("*_0000.nii.gz"))[1]
    write_dicom_series(read_volume(source), mixed / "study" / "other", patient_id=PATIENT_ID, seed=4, series_number=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(MedsegError, match="series") as error:
        run_pipeline(project, "predict", {**SHARED_UNET, "predict.model": "unet", "predict.input_dir": str(mixed),
                                          "predict.output_dir": str(out)})
    for uid in {read_dicom_series(scans / "series").series_uid, read_dicom_series(mixed / "study" / "other").series_uid}:
        assert uid in str(error.value)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_the_served_model_takes_a_zip_of_the_series_and_answers_with_its_seg(dicom_prediction, tmp_path):
    """The pyfunc's request path (`segment_requests`) with the series' zip in `image_b64` and
    by path under a read root: the mask of `predict`, and a SEG that reads back as it."""
    import base64

    from medseg.inference import Segmenter
    from medseg.serving.model import segment_requests
    from medseg.serving.files import Roots

    project, scans, out = dicom_prediction
    segmenter = Segmenter.load(project / "data/06_models/unet/segmenter")
    encoded = base64.b64encode((scans / "zipped.zip").read_bytes()).decode("ascii")
    roots = Roots(read=(scans.resolve(),))
    answer = segment_requests(segmenter, pd.DataFrame([{"image_b64": encoded, "case_id": "sent"},
                                                       {"image_path": str(scans / "zipped.zip")}]), roots)
    series = read_dicom_series(scans / "series")
    expected = read_volume(out / "zipped.nii.gz", role="label").data
    for row in answer.to_dict("records"):
        assert row["series_instance_uid"] == series.series_uid and row["study_instance_uid"] == series.study_uid
        mask_file, seg_file = tmp_path / f"{row['case_id']}.nii.gz", tmp_path / f"{row['case_id']}.seg.dcm"
        mask_file.write_bytes(base64.b64decode(row["mask_b64"]))
        seg_file.write_bytes(base64.b64decode(row["seg_b64"]))
        np.testing.assert_array_equal(read_volume(mask_file, role="label").data, expected)
        np.testing.assert_array_equal(read_dicom_seg(seg_file, series), expected)
        assert pydicom.dcmread(seg_file).SOPInstanceUID == row["seg_sop_instance_uid"]
    assert list(answer["case_id"]) == ["sent", "zipped"]
