"""`predict` against a real PACS: Orthanc with its DICOMweb plugin, on loopback (`orthanc.py`).

Two studies of phantoms, one with a localizer beside its series: a query run segments the two
series, skips the localizer saying why, and stores two SEGs that Orthanc then serves back and
that read back as the NIfTI masks voxel for voxel; a second query run skips both; a wrong
password and a server that dies mid-run fail with their reason, storing nothing unfinished.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
import yaml

from conftest import SHARED_UNET, copy_project, run_pipeline
from medseg.dicom.rtstruct import read_rtstruct
from medseg.dicom.seg import read_dicom_seg
from medseg.dicom.series import read_dicom_series
from medseg.dicom.web import DicomWebError, DicomWebServer, SeriesRef, find_series, retrieve_series
from medseg.imaging.io import read_volume
from medseg.synthetic.dicom_series import write_dicom_series
from tests.dicomweb import orthanc as pacs_server

pytestmark = pytest.mark.skipif(pacs_server.missing() is not None, reason=pacs_server.missing() or "")

PATIENTS = ("PID-PACS-0001", "PID-PACS-0002")


def _series_files(project, root):
    """Two phantoms as two studies (two patients), and a localizer in the first study."""
    images = sorted((project / "data/01_raw/synthetic/imagesTr").glob("*_0000.nii.gz"))[:2]
    files = []
    for index, (image, patient) in enumerate(zip(images, PATIENTS)):
        files += write_dicom_series(read_volume(image), root / f"study{index}", patient_id=patient, seed=index)
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    localizer = write_dicom_series(read_volume(images[0]), root / "localizer", patient_id=PATIENTS[0], seed=9,
                                   series_description="scout", series_number=99)
    for path in localizer:
        dataset = pydicom.dcmread(path)
        dataset.StudyInstanceUID = study
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        dataset.save_as(path)
    return files + localizer


def _with_credentials(project, password=pacs_server.PASSWORD):
    (project / "conf/local").mkdir(parents=True, exist_ok=True)
    (project / "conf/local/credentials.yml").write_text(yaml.safe_dump({"pacs": {"username": pacs_server.USER, "password": password}}))
    return project


def _params(orthanc, out, **web):
    return {**SHARED_UNET, "predict.model": "unet", "predict.input_dir": None, "predict.output_dir": str(out),
            "predict.outputs": ["nifti", "seg", "rtstruct"],
            "predict.dicomweb": {"url": orthanc.dicomweb, "credentials": "pacs", "query": {"Modality": "CT"}, **web}}


@pytest.fixture(scope="module")
def pacs(trained_unet, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    orthanc = pacs_server.start_orthanc(root / "orthanc")
    project = _with_credentials(copy_project(trained_unet, root / "project"))
    orthanc.upload(_series_files(project, root / "dicom"))
    yield orthanc, project, root
    orthanc.stop()


@pytest.fixture(scope="module")
def first_run(pacs):
    orthanc, project, root = pacs
    out = root / "masks"
    run_pipeline(project, "predict", _params(orthanc, out))
    return out


def _server(orthanc) -> DicomWebServer:
    return DicomWebServer.of(orthanc.dicomweb, {"username": pacs_server.USER, "password": pacs_server.PASSWORD})


def test_a_query_run_segments_both_studies_and_orthanc_serves_their_segs_back_as_the_masks(pacs, first_run, tmp_path):
    orthanc, project, _ = pacs
    table = pd.read_csv(first_run / "predictions.csv", dtype=str, keep_default_na=False)
    assert len(table) == 2  # the localizer is not segmented
    server = _server(orthanc)
    segs = find_series(server, query={"Modality": "SEG"})
    assert len(segs) == 2
    for row in table.to_dict("records"):
        seg_ref = next(ref for ref in segs if ref.study_uid == row["study_instance_uid"])
        source = read_dicom_series(retrieve_series(server, SeriesRef(row["study_instance_uid"], row["series_instance_uid"]),
                                                   tmp_path / row["case_id"])[0].parent)
        retrieve_series(server, seg_ref, tmp_path / f"{row['case_id']}-seg")
        (seg_file,) = (tmp_path / f"{row['case_id']}-seg").iterdir()
        assert pydicom.dcmread(seg_file).SOPInstanceUID == row["seg_sop_instance_uid"]
        mask = read_volume(first_run / f"{row['case_id']}.nii.gz", role="label").data
        assert mask.sum() > 0
        np.testing.assert_array_equal(read_dicom_seg(seg_file, source), mask)
        rt_ref = next(ref for ref in find_series(server, query={"Modality": "RTSTRUCT"}) if ref.study_uid == row["study_instance_uid"])
        (rt_file,) = retrieve_series(server, rt_ref, tmp_path / f"{row['case_id']}-rt")
        assert pydicom.dcmread(rt_file).SOPInstanceUID == row["rtstruct_sop_instance_uid"]
        np.testing.assert_array_equal(read_rtstruct(rt_file, source), mask)
    answers = pd.read_csv(project / "data/07_model_output/dicomweb/answers.csv", dtype=str)
    assert sorted(answers["series_instance_uid"]) == sorted(table["series_instance_uid"])
    assert set(answers["server"]) == {orthanc.dicomweb} and answers["model_uri"].str.startswith("runs:/").all()


def test_a_second_query_run_skips_what_was_answered_and_says_so(pacs, first_run, caplog):
    orthanc, project, root = pacs
    before = sorted(p.name for p in first_run.iterdir())
    stamp = (first_run / "predictions.csv").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="medseg.pipelines.predict.pacs"):
        run_pipeline(project, "predict", _params(orthanc, first_run))
    assert "0 to segment" in caplog.text and caplog.text.count("its results still on the server") == 2
    assert "localizer" in caplog.text  # skipped, with the reader's reason
    assert sorted(p.name for p in first_run.iterdir()) == before
    assert (first_run / "predictions.csv").stat().st_mtime_ns == stamp
    assert len(find_series(_server(orthanc), query={"Modality": "SEG"})) == 2  # nothing stored twice
    # The password is in no log line and nowhere in the MLflow store.
    assert pacs_server.PASSWORD not in caplog.text
    for path in project.rglob("*"):
        if path.is_file() and "credentials.yml" not in path.name and path.stat().st_size < 50_000_000:
            assert pacs_server.PASSWORD.encode() not in path.read_bytes(), path


def test_a_study_run_skips_the_results_already_stored_in_it_without_retrieving_them(pacs, first_run, tmp_path, caplog):
    orthanc, project, _ = pacs
    row = pd.read_csv(first_run / "predictions.csv", dtype=str, keep_default_na=False).iloc[0]
    with caplog.at_level(logging.INFO, logger="medseg.pipelines.predict.pacs"):
        run_pipeline(project, "predict", _params(orthanc, tmp_path / "masks", query=None, study_uid=row["study_instance_uid"]))
    assert "a SEG series, not an image to segment" in caplog.text and "a RTSTRUCT series" in caplog.text
    assert "its results still on the server" in caplog.text and not (tmp_path / "masks").exists()


def test_a_series_named_by_uid_that_is_a_seg_is_refused_naming_it(pacs, first_run, tmp_path):
    orthanc, project, _ = pacs
    seg = find_series(_server(orthanc), query={"Modality": "SEG"})[0]
    with pytest.raises(Exception) as caught:
        run_pipeline(project, "predict", _params(orthanc, tmp_path / "masks", query=None, study_uid=seg.study_uid,
                                                 series_uid=seg.series_uid))
    assert f"series {seg.series_uid} is a SEG series, not an image to segment" in str(caught.value)
    assert not (tmp_path / "masks").exists()


def test_a_compressed_series_is_retrieved_as_stored_without_asking_the_server_to_transcode(pacs, tmp_path):
    # Debian's Orthanc cannot transcode JPEG 2000 (it answers 500 to a request for the default
    # Explicit VR Little Endian); as stored, the reader decodes it or names the package it needs.
    orthanc, _, _ = pacs
    jpeg2000 = pydicom.data.get_testdata_file("MR_small_jp2klossless.dcm")
    orthanc.upload([jpeg2000])
    source = pydicom.dcmread(jpeg2000)
    ref = SeriesRef(str(source.StudyInstanceUID), str(source.SeriesInstanceUID))
    (path,) = retrieve_series(_server(orthanc), ref, tmp_path / "series")
    retrieved = pydicom.dcmread(path)
    assert retrieved.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert retrieved.PixelData == source.PixelData


def test_a_wrong_password_is_refused_naming_the_server_and_the_fix(pacs, tmp_path):
    orthanc, project, root = pacs
    other = _with_credentials(copy_project(project, tmp_path / "project"), password="not-the-password")
    with pytest.raises(Exception) as caught:
        run_pipeline(other, "predict", _params(orthanc, tmp_path / "masks"))
    error = caught.value
    while not isinstance(error, DicomWebError) and error.__cause__ is not None:
        error = error.__cause__
    assert isinstance(error, DicomWebError), caught.value
    message = str(error)
    assert orthanc.dicomweb in message and "HTTP 401" in message and "credentials.yml" in message
    assert "not-the-password" not in message
    assert not (tmp_path / "masks").exists()


def test_a_server_that_dies_mid_run_stores_nothing_unfinished_and_a_rerun_finishes(trained_unet, tmp_path, monkeypatch):
    orthanc = pacs_server.start_orthanc(tmp_path / "orthanc")
    try:
        project = _with_credentials(copy_project(trained_unet, tmp_path / "project"))
        orthanc.upload(_series_files(project, tmp_path / "dicom"))
        from medseg.pipelines.predict import pacs

        real_store, calls = pacs.store, []

        def store_then_die(server, paths, study_uid):
            calls.append(study_uid)
            if len(calls) == 2:
                orthanc.kill()  # the PACS dies after the first SEG was stored
            return real_store(server, paths, study_uid)

        monkeypatch.setattr(pacs, "store", store_then_die)
        with pytest.raises(Exception) as caught:
            run_pipeline(project, "predict", _params(orthanc, tmp_path / "masks"))
        message = str(caught.value)
        assert "unreachable" in message and "1 of 2 series' results were stored" in message and "Run again" in message
        answers = pd.read_csv(project / "data/07_model_output/dicomweb/answers.csv", dtype=str)
        assert len(answers) == 1  # what was stored, and only that
        # The masks and SEGs are all in the output folder, with the table.
        assert len(list((tmp_path / "masks").glob("*.seg.dcm"))) == 2
        monkeypatch.setattr(pacs, "store", real_store)
        orthanc = pacs_server.start_orthanc(tmp_path / "orthanc", orthanc.port)  # the same server: what it had, it has
        run_pipeline(project, "predict", _params(orthanc, tmp_path / "masks"))
        assert len(pd.read_csv(project / "data/07_model_output/dicomweb/answers.csv")) == 2
        assert len(find_series(_server(orthanc), query={"Modality": "SEG"})) == 2
    finally:
        orthanc.stop()
        shutil.rmtree(tmp_path / "orthanc", ignore_errors=True)
