import json
import os

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
from medseg.cases.msd import list_msd_cases, write_msd_dataset


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


def _pair(root, name):
    _nifti(root / "imagesTr" / f"{name}_0000.nii.gz")
    _nifti(root / "labelsTr" / f"{name}.nii.gz")


@pytest.mark.parametrize("with_training_list", [True, False])
def test_a_symlinked_folder_that_leads_outside_is_refused(tmp_path, with_training_list):
    elsewhere = tmp_path / "elsewhere"
    _pair(elsewhere, "a")
    root = tmp_path / "ds"
    root.mkdir()
    (root / "imagesTr").symlink_to(elsewhere / "imagesTr", target_is_directory=True)
    (root / "labelsTr").symlink_to(elsewhere / "labelsTr", target_is_directory=True)
    if with_training_list:
        _msd(root, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    else:
        (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}}))
    with pytest.raises(UnsafePathError, match=rf"ds/imagesTr.*leads outside the dataset folder.*real path is {elsewhere}/imagesTr"):
        list_msd_cases(root)


def test_a_symlinked_label_file_that_leads_outside_is_refused(tmp_path):
    root = tmp_path / "ds"
    _pair(root, "a")
    _nifti(tmp_path / "secret.nii.gz")
    (root / "labelsTr" / "a.nii.gz").unlink()
    (root / "labelsTr" / "a.nii.gz").symlink_to(tmp_path / "secret.nii.gz")
    _msd(root, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    with pytest.raises(UnsafePathError, match="labelsTr/a.nii.gz.*dataset.json.*secret.nii.gz.*copy the files"):
        list_msd_cases(root)


def test_symlinks_that_stay_inside_and_a_symlinked_root_are_accepted(tmp_path):
    real = tmp_path / "real"
    _pair(real / "store", "a")
    (real / "imagesTr").symlink_to(real / "store" / "imagesTr", target_is_directory=True)
    (real / "labelsTr").symlink_to("store/labelsTr", target_is_directory=True)  # relative link
    _msd(real, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}])
    link = tmp_path / "link_to_real"
    link.symlink_to(real, target_is_directory=True)
    (case,) = list_msd_cases(link)
    assert case.case_id == "a" and case.image_path == str(link / "imagesTr" / "a_0000.nii.gz")


@pytest.mark.parametrize(
    "entry, missing",
    [({"image": "./imagesTr/b.nii.gz"}, "'label'"), ({"label": "./labelsTr/b.nii.gz"}, "'image'"), ("b.nii.gz", "'image' or 'label'")],
)
def test_a_training_entry_without_image_or_label_names_the_entry(tmp_path, entry, missing):
    _pair(tmp_path, "a")
    _msd(tmp_path, [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}, entry])
    with pytest.raises(CorruptFileError, match=rf"dataset.json: entry 1 of 'training' .* has no {missing} path.*fix the entry or remove it"):
        list_msd_cases(tmp_path)


def test_staging_folder_and_files_get_the_umask_mode(tmp_path):
    volume = Volume(np.zeros((3, 3, 3), np.float32), np.eye(4))
    label = Volume(np.zeros((3, 3, 3), np.uint8), np.eye(4))
    previous = os.umask(0o027)
    try:
        write_msd_dataset(tmp_path / "synthetic", [("c0", lambda: (volume, label))], {})
    finally:
        os.umask(previous)
    root = tmp_path / "synthetic"
    assert root.stat().st_mode & 0o777 == 0o750  # mkdtemp alone gives 0700
    assert (root / "imagesTr").stat().st_mode & 0o777 == 0o750
    assert (root / "imagesTr" / "c0_0000.nii.gz").stat().st_mode & 0o777 == 0o640
    assert (root / "dataset.json").stat().st_mode & 0o777 == 0o640


@pytest.mark.skipif(not os.path.exists("/proc/self/fd"), reason="names open files through /proc")
def test_write_msd_dataset_fsyncs_the_manifest_before_the_swap(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    volume = Volume(np.zeros((3, 3, 3), np.float32), np.eye(4))
    root = tmp_path / "synthetic"
    write_msd_dataset(root, [("c0", lambda: (volume, Volume(volume.data.astype(np.uint8), np.eye(4))))], {})
    swap = events.index(("replace", str(root)))
    flushed = {path for kind, path in events[:swap] if kind == "fsync"}
    staging = os.path.dirname(next(p for p in flushed if p.endswith("dataset.json")))
    assert {f"{staging}/dataset.json", f"{staging}/imagesTr", f"{staging}/labelsTr", staging} <= flushed
    assert ("fsync", str(tmp_path)) in events[swap:]  # the rename itself


def test_msd_dir_pointing_at_a_file_says_so(tmp_path):
    manifest = tmp_path / "dataset.json"
    manifest.write_text("{}")
    with pytest.raises(DatasetNotFoundError, match=rf"{manifest}: is a file, not a folder.*Did you mean its folder, {tmp_path}\?"):
        list_msd_cases(manifest)


def test_foreground_classes_read_both_label_forms(tmp_path):
    from medseg.errors import CorruptFileError
    from medseg.cases.msd import foreground_classes

    manifest = tmp_path / "dataset.json"
    msd = {"labels": {"0": "background", "2": "posterior", "1": "anterior"}}
    nnunet_v2 = {"labels": {"background": 0, "anterior": 1, "posterior": 2}}
    assert foreground_classes(msd, manifest) == {1: "anterior", 2: "posterior"}
    assert foreground_classes(nnunet_v2, manifest) == {1: "anterior", 2: "posterior"}
    assert foreground_classes({}, manifest) == {1: "foreground"}
    with pytest.raises(CorruptFileError, match=r"dataset.json: the label value 'x' \(class 'core'\) is not an integer"):
        foreground_classes({"labels": {"core": "x"}}, manifest)
    with pytest.raises(CorruptFileError, match="listed twice"):
        foreground_classes({"labels": {"a": 1, "b": 1}}, manifest)
