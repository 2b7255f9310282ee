"""The files of a prediction run: input names, the output folder, all-or-nothing writes."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from medseg.errors import ConfigurationError, CorruptFileError, DatasetNotFoundError, EmptyDatasetError
from medseg.imaging.io import Volume
from medseg.inference.scans import Scan, case_id_of, check_output_folder, list_scans, write_predictions


def _nifti(path: Path, shape=(4, 4, 3)) -> Path:
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), path)
    return path


def test_case_ids_follow_the_nnunet_names():
    assert case_id_of("la_003_0000.nii.gz") == "la_003"
    assert case_id_of("/x/brain.nii") == "brain"
    assert case_id_of("case_12.nii.gz") == "case_12"  # two digits: not a channel suffix


def test_list_scans_picks_one_file_per_case_and_the_trained_channel(tmp_path: Path):
    _nifti(tmp_path / "b_0000.nii.gz")
    _nifti(tmp_path / "a.nii")
    _nifti(tmp_path / "c_0000.nii.gz")
    _nifti(tmp_path / "c_0001.nii.gz")
    (tmp_path / "notes.txt").write_text("not a scan")
    (tmp_path / ".hidden.nii.gz").write_text("")
    scans = list_scans(tmp_path, channel=1)
    assert [(s.case_id, Path(s.path).name) for s in scans] == [("a", "a.nii"), ("b", "b_0000.nii.gz"), ("c", "c_0001.nii.gz")]
    assert [Path(s.path).name for s in list_scans(tmp_path)][2] == "c_0000.nii.gz"


def test_list_scans_refuses_bad_folders_and_files(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        list_scans(tmp_path / "missing")
    with pytest.raises(EmptyDatasetError, match="holds no scan"):
        list_scans(tmp_path)
    _nifti(tmp_path / "a.nii.gz")
    _nifti(tmp_path / "a_0000.nii.gz")
    with pytest.raises(ConfigurationError, match="several files"):
        list_scans(tmp_path)
    (tmp_path / "a_0000.nii.gz").unlink()
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(CorruptFileError, match=r"broken\.nii\.gz"):
        list_scans(tmp_path)


def test_the_output_folder_is_never_the_input_folder(tmp_path: Path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ConfigurationError, match="never writes into the input folder"):
        check_output_folder(tmp_path / "in", tmp_path / "in" / "out")
    (tmp_path / "link").symlink_to(tmp_path / "in")
    with pytest.raises(ConfigurationError, match="inside predict.input_dir"):
        check_output_folder(tmp_path / "in", tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigurationError, match="is a file"):
        check_output_folder(tmp_path / "in", tmp_path / "file")
    assert check_output_folder(tmp_path / "in", tmp_path / "out") == (tmp_path / "out").resolve()


def test_a_failure_publishes_nothing_and_a_success_publishes_all(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's file")
    scans = [Scan("a", "a.nii.gz"), Scan("b", "b.nii.gz")]

    def failing(scan):
        if scan.case_id == "b":
            raise CorruptFileError("b.nii.gz: broken")
        return Volume(np.ones((2, 2, 2), np.uint8), np.eye(4)), {"volume_ml": 0.008}

    with pytest.raises(CorruptFileError, match="b.nii.gz"):
        write_predictions(scans, failing, out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    def working(scan):
        return Volume(np.full((2, 2, 2), 1 if scan.case_id == "a" else 0, np.uint8), np.eye(4)), {"volume_ml": 1.0}

    table = write_predictions(scans, working, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "keep.txt", "predictions.csv"]
    assert pd.read_csv(out / "predictions.csv", dtype={"case_id": str}).equals(table)
    assert np.asarray(nib.load(out / "a.nii.gz").dataobj).sum() == 8
