import json

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import (
    ChannelError,
    CorruptFileError,
    DatasetNotFoundError,
    EmptyDatasetError,
    MissingLabelError,
    UnsafePathError,
)
from medseg.imaging.io import Volume
from medseg.imaging.msd import list_msd_cases, write_msd_dataset


def _nifti(path, shape=(4, 4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), str(path))


def _msd(root, training, modality=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"modality": modality or {"0": "MRI"}, "training": training}))
    return root


def test_msd_training_list_with_channel_suffix(tmp_path):
    _nifti(tmp_path / "imagesTr" / "a_0000.nii.gz")
    _nifti(tmp_path / "labelsTr" / "a.nii.gz")
    _msd(tmp_path, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    (case,) = list_msd_cases(tmp_path)
    assert case.case_id == "a"
    assert case.image_path.endswith("imagesTr/a_0000.nii.gz") and case.channel is None


def test_multimodal_4d_needs_a_channel_and_accepts_a_name(tmp_path):
    _nifti(tmp_path / "imagesTr" / "b.nii.gz", (4, 4, 4, 2))
    _nifti(tmp_path / "labelsTr" / "b.nii.gz")
    _msd(tmp_path, [{"image": "./imagesTr/b.nii.gz", "label": "./labelsTr/b.nii.gz"}], {"0": "FLAIR", "1": "T1w"})
    with pytest.raises(ChannelError, match="dataset.json.*2 channels.*data.channel"):
        list_msd_cases(tmp_path)
    assert list_msd_cases(tmp_path, channel="t1w")[0].channel == 1
    assert list_msd_cases(tmp_path, channel=0)[0].channel == 0


def test_nnunet_v2_layout_without_training_list(tmp_path):
    for case in ("x", "y"):
        _nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz")
        _nifti(tmp_path / "labelsTr" / f"{case}.nii.gz")
    (tmp_path / "imagesTr" / "._x_0000.nii.gz").write_bytes(b"apple double")
    (tmp_path / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    assert [c.case_id for c in list_msd_cases(tmp_path)] == ["x", "y"]


def test_missing_label(tmp_path):
    _nifti(tmp_path / "imagesTr" / "a.nii.gz")
    _msd(tmp_path, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    with pytest.raises(MissingLabelError, match="labelsTr/a.nii.gz.*missing"):
        list_msd_cases(tmp_path)


@pytest.mark.parametrize("entry", ["../outside/a.nii.gz", "/etc/passwd", "./imagesTr/../../a.nii.gz"])
def test_paths_outside_the_folder_are_refused(tmp_path, entry):
    root = tmp_path / "ds"
    _nifti(tmp_path / "outside" / "a.nii.gz")
    _msd(root, [{"image": entry, "label": "./labelsTr/a.nii.gz"}])
    with pytest.raises(UnsafePathError, match="outside the dataset folder"):
        list_msd_cases(root)


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="data.msd_dir"):
        list_msd_cases(tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match="dataset.json"):
        list_msd_cases(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        list_msd_cases(tmp_path)


def test_empty_dataset(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"modality": {"0": "MR"}, "training": []}))
    with pytest.raises(EmptyDatasetError, match="no training case"):
        list_msd_cases(tmp_path)


def test_write_msd_dataset_replaces_atomically_and_keeps_old_on_failure(tmp_path):
    root = tmp_path / "synthetic"
    volume = Volume(np.zeros((3, 3, 3), np.float32), np.eye(4))
    label = Volume(np.zeros((3, 3, 3), np.uint8), np.eye(4))
    write_msd_dataset(root, [("c0", lambda: (volume, label))], {"medseg_synthesis": {"v": 1}})
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1

    def broken():
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError):
        write_msd_dataset(root, [("c0", lambda: (volume, label)), ("c1", broken)], {"medseg_synthesis": {"v": 2}})
    assert json.loads((root / "dataset.json").read_text())["medseg_synthesis"] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]  # no staging folder left
