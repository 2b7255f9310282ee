"""NiftiDataset and PartitionedDataset of NIfTI on fsspec stores (S3 on loopback, memory://)."""

import uuid

import fsspec
import numpy as np
import pytest
from kedro_datasets.partitions import PartitionedDataset

from conftest import s3_storage_options
from medseg.storage.paths import anchor_path
from medseg.datasets.nifti import NiftiDataset
from medseg.imaging.io import Volume

AFFINE = np.diag([0.7, 0.7, 3.0, 1.0])


@pytest.fixture(params=["memory", "s3"])
def store_root(request) -> str:
    if request.param == "memory":
        return f"memory:///medseg-{uuid.uuid4().hex[:12]}"  # three slashes: Kedro drops a memory URL's host
    return request.getfixturevalue("s3_bucket")


def test_save_load_exists_on_a_store(store_root):
    url = f"{store_root}/03_primary/labels/case_1.nii.gz"
    dataset = NiftiDataset(filepath=url, role="label")
    assert not dataset.exists()
    label = Volume(np.arange(60, dtype=np.uint8).reshape(3, 4, 5) % 3, AFFINE)
    dataset.save(label)
    assert dataset.exists()
    loaded = NiftiDataset(url, role="label").load()
    assert loaded.data.dtype == np.uint8
    np.testing.assert_array_equal(loaded.data, label.data)
    np.testing.assert_allclose(loaded.affine, AFFINE, atol=1e-6)
    fs, path = fsspec.core.url_to_fs(url)
    assert fs.cat_file(path)[:2] == b"\x1f\x8b"  # one gzipped object, as nib.save writes it


def test_partitioned_dataset_on_s3_with_catalog_credentials(s3_server, s3_bucket, monkeypatch):
    # Only the catalog's credentials know the endpoint here, as on a machine without the env route.
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    config = {
        "path": f"{s3_bucket}/03_primary/images",
        "dataset": {"type": "medseg.datasets.nifti.NiftiDataset", "role": "image"},
        "filename_suffix": ".nii.gz",
        "credentials": s3_storage_options(s3_server),
    }
    images = {f"case_{i}": Volume(np.full((3, 4, 5), i, np.float32), AFFINE) for i in range(3)}
    PartitionedDataset(**config).save(images)
    loaded = PartitionedDataset(**config).load()
    assert sorted(loaded) == ["case_0", "case_1", "case_2"]
    for key, volume in images.items():
        back = loaded[key]()
        assert back.data.dtype == np.float32
        np.testing.assert_array_equal(back.data, volume.data)
    s3fs.S3FileSystem.clear_instance_cache()


def test_describe_names_the_protocol():
    assert NiftiDataset("s3://b/x.nii.gz")._describe() == {"filepath": "b/x.nii.gz", "protocol": "s3", "role": "image"}


@pytest.mark.parametrize("url", ["s3://bucket/Task04", "memory://x/Task04", "gs://b/T", "simplecache::s3://b/T"])
def test_anchor_path_returns_a_url_as_is(tmp_path, url):
    assert anchor_path(url, tmp_path) == url


def test_anchor_path_still_anchors_local_paths_at_the_root(tmp_path):
    assert anchor_path("data/Task04", tmp_path) == tmp_path / "data/Task04"
    assert anchor_path("/abs/Task04", tmp_path) == anchor_path("/abs/Task04", "/elsewhere")
