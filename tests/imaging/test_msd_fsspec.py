"""The MSD reader on a URL root: the same cases as the local copy, the same refusals."""

import json
import uuid
from dataclasses import replace
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
import pytest

from medseg.errors import DatasetNotFoundError, MissingLabelError, UnsafePathError
from medseg.imaging.io import read_volume
from medseg.cases.msd import UrlPath, dataset_location, list_msd_cases, read_dataset_json


def _nifti(path: Path, value: float, shape=(4, 5, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.full(shape, value, np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.9, 0.9, 2.0, 1.0])), str(path))


def _training_list_dataset(root: Path) -> Path:
    """MSD's `training` list, with images stored either as listed or as nnU-Net `_0000` files."""
    _nifti(root / "imagesTr" / "a_0000.nii.gz", 1)  # listed as ./imagesTr/a.nii.gz
    _nifti(root / "imagesTr" / "b.nii.gz", 2)  # listed as is
    for case in ("a", "b"):
        _nifti(root / "labelsTr" / f"{case}.nii.gz", 1)
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in ("b", "a")]
    (root / "dataset.json").write_text(json.dumps({"name": "Toy", "modality": {"0": "MRI"}, "training": training}))
    return root


def _channel_folder_dataset(root: Path) -> Path:
    """nnU-Net v2: no `training` list, one file per channel, labels paired by name."""
    for case in ("c1", "c2", "c3"):
        _nifti(root / "imagesTr" / f"{case}_0000.nii.gz", 10)
        _nifti(root / "imagesTr" / f"{case}_0001.nii.gz", 20)
        _nifti(root / "labelsTr" / f"{case}.nii.gz", 1)
    _nifti(root / "imagesTr" / "._c1_0001.nii.gz", 0)  # a macOS fork, skipped
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "x": 1}}))
    return root


def _upload(local: Path, url: str) -> None:
    fs, base = fsspec.core.url_to_fs(url)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{base}/{path.relative_to(local).as_posix()}", path.read_bytes())


@pytest.fixture(params=["memory", "s3"])
def store_root(request) -> str:
    if request.param == "memory":
        return f"memory://medseg-{uuid.uuid4().hex[:12]}"
    return request.getfixturevalue("s3_bucket")


def _as_url(case, local: Path, url: str):
    return replace(case, image_path=case.image_path.replace(str(local), url), label_path=case.label_path.replace(str(local), url))


@pytest.mark.parametrize("make, channel", [(_training_list_dataset, None), (_channel_folder_dataset, 1), (_channel_folder_dataset, "T1")])
def test_a_dataset_on_a_store_lists_the_cases_of_its_local_copy(store_root, tmp_path, make, channel):
    local = make(tmp_path / "Task09_Toy")
    url = f"{store_root}/datasets/Task09_Toy"
    _upload(local, url)
    expected = [_as_url(case, local, url) for case in list_msd_cases(local, channel=channel)]
    remote = list_msd_cases(url, channel=channel)
    assert remote == expected
    assert all(case.image_path.startswith(f"{url}/imagesTr/") for case in remote)
    # the channel files are found by their nnU-Net names
    suffix = {None: "_0000", 1: "_0001", "T1": "_0000"}[channel]
    assert any(case.image_path.endswith(f"{suffix}.nii.gz") for case in remote)
    # and read back with the local copy's voxels
    for case in remote:
        local_case = next(c for c in list_msd_cases(local, channel=channel) if c.case_id == case.case_id)
        np.testing.assert_array_equal(
            read_volume(case.image_path, channel=case.channel).data,
            read_volume(local_case.image_path, channel=local_case.channel).data,
        )


def test_a_trailing_slash_and_dot_segments_name_the_same_root(store_root, tmp_path):
    local = _training_list_dataset(tmp_path / "Task09_Toy")
    _upload(local, f"{store_root}/Task09_Toy")
    assert list_msd_cases(f"{store_root}/x/../Task09_Toy/") == list_msd_cases(f"{store_root}/Task09_Toy")
    assert read_dataset_json(f"{store_root}/Task09_Toy")["name"] == "Toy"


@pytest.mark.parametrize(
    "entry",
    [
        "../Task05_Other/imagesTr/a.nii.gz",  # another dataset beside it
        "../Task09_Toyx/imagesTr/a.nii.gz",  # a sibling prefix that merely starts with the same name
        "./imagesTr/../../../secret/a.nii.gz",  # out of the bucket
        "/imagesTr/a.nii.gz",  # absolute
    ],
)
def test_an_entry_leading_outside_the_prefix_is_refused(store_root, tmp_path, entry):
    local = _training_list_dataset(tmp_path / "Task09_Toy")
    _upload(local, f"{store_root}/Task09_Toy")
    _upload(local, f"{store_root}/Task09_Toyx")  # the entry's target exists: only the check stops it
    _upload(local, f"{store_root}/Task05_Other")
    url = f"{store_root}/Task09_Toy"
    training = [{"image": entry, "label": "./labelsTr/a.nii.gz"}]
    fs, path = fsspec.core.url_to_fs(f"{url}/dataset.json")
    fs.pipe_file(path, json.dumps({"training": training}).encode())
    with pytest.raises(UnsafePathError) as error:
        list_msd_cases(url)
    assert str(error.value).startswith(f"{url}/dataset.json: the entry '{entry}' points outside the dataset folder {url}.")


def test_missing_manifest_folder_and_label_name_the_url(store_root, tmp_path):
    local = _training_list_dataset(tmp_path / "Task09_Toy")
    url = f"{store_root}/Task09_Toy"
    with pytest.raises(DatasetNotFoundError, match="dataset folder not found") as error:
        list_msd_cases(url)
    assert str(error.value).startswith(f"{url}: ")
    _upload(local / "imagesTr", f"{url}/imagesTr")
    with pytest.raises(DatasetNotFoundError) as error:
        list_msd_cases(url)
    assert str(error.value).startswith(f"{url}/dataset.json: not found.")
    _upload(local, url)
    with pytest.raises(DatasetNotFoundError, match=f"is a file, not a folder.*Did you mean its folder, {url}\\?"):
        list_msd_cases(f"{url}/dataset.json")
    fs, path = fsspec.core.url_to_fs(f"{url}/labelsTr/a.nii.gz")
    fs.rm(path)
    with pytest.raises(MissingLabelError) as error:
        list_msd_cases(url)
    assert str(error.value).startswith(f"{url}/labelsTr/a.nii.gz: the label of case 'a'")


def test_url_path_is_lexical_and_keeps_its_protocol():
    root = UrlPath("s3://bucket/data/Task04/")
    assert str(root) == "s3://bucket/data/Task04" and root.name == "Task04"
    assert str(root / "./imagesTr/x.nii.gz") == "s3://bucket/data/Task04/imagesTr/x.nii.gz"
    assert str((root / "imagesTr/x.nii.gz").with_name("x_0000.nii.gz")) == "s3://bucket/data/Task04/imagesTr/x_0000.nii.gz"
    assert (root / "a/../b").is_relative_to(root)
    assert not (root / "../Task04x/a").is_relative_to(root)
    assert not UrlPath("gs://bucket/data/Task04/a").is_relative_to(root)
    assert str(UrlPath("simplecache::s3://bucket/T") / "a") == "simplecache::s3://bucket/T/a"
    assert dataset_location("memory://x/T") == UrlPath("memory://x/T")
    assert dataset_location("rel/T") == Path.cwd() / "rel/T"
