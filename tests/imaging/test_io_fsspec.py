"""medseg.imaging.io on fsspec URLs: S3 through moto's server on loopback, and memory://."""

import gzip
import uuid

import fsspec
import nibabel as nib
import numpy as np
import pytest

from medseg.errors import ConfigurationError, CorruptFileError, DatasetNotFoundError
from medseg.imaging import io as medseg_io
from medseg.imaging.io import Volume, read_header_geometry, read_volume, write_volume
from medseg.storage.paths import is_url
from conftest import s3_storage_options

AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [0.7, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 4.0], [0.0, 0.0, 0.0, 1.0]])


def _image() -> Volume:
    data = np.random.default_rng(7).normal(100.0, 20.0, size=(6, 5, 4)).astype(np.float32)
    return Volume(data, AFFINE)


def _label() -> Volume:
    return Volume(np.random.default_rng(8).integers(0, 4, size=(6, 5, 4)).astype(np.uint8), AFFINE)


@pytest.fixture(params=["memory", "s3"])
def store_root(request) -> str:
    """A fresh folder URL on each store; the S3 server starts only for the s3 cases."""
    if request.param == "memory":
        return f"memory://medseg-{uuid.uuid4().hex[:12]}"
    return request.getfixturevalue("s3_bucket")


def _put(url: str, raw: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(path, raw)


def _get(url: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.cat_file(path)


@pytest.mark.parametrize("name", ["case.nii.gz", "case.nii"])
@pytest.mark.parametrize("role, make", [("image", _image), ("label", _label)])
def test_volume_round_trip_on_a_store_keeps_data_dtype_and_affine(store_root, name, role, make):
    volume = make()
    url = f"{store_root}/layer/{name}"
    write_volume(volume, url)
    back = read_volume(url, role=role)
    assert back.data.dtype == volume.data.dtype == (np.float32 if role == "image" else np.uint8)
    np.testing.assert_array_equal(back.data, volume.data)
    np.testing.assert_array_equal(back.affine, AFFINE.astype(np.float32).astype(np.float64))
    assert (_get(url)[:2] == medseg_io.GZIP_MAGIC) is name.endswith(".gz")


def test_object_on_s3_is_byte_identical_to_a_local_write_and_loads_after_download(s3_bucket, tmp_path):
    volume = _image()
    url = f"{s3_bucket}/07_model_output/unet/case_001.nii.gz"
    write_volume(volume, url)
    write_volume(volume, tmp_path / "local.nii.gz")  # nib.save through the atomic local path
    raw = _get(url)
    assert raw == (tmp_path / "local.nii.gz").read_bytes()
    fsspec.filesystem("s3").get(url, str(tmp_path / "downloaded.nii.gz"))
    img = nib.load(str(tmp_path / "downloaded.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), volume.data)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)
    assert int(img.header["sform_code"]) == int(img.header["qform_code"]) == 1
    assert gzip.decompress(raw)[:4] == np.int32(348).tobytes()  # a NIfTI-1 header, little-endian


def test_header_geometry_from_a_url(store_root):
    url = f"{store_root}/x.nii.gz"
    write_volume(_image(), url)
    shape, affine = read_header_geometry(url)
    assert shape == (6, 5, 4)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)


def test_nifti2_object_reads(store_root, tmp_path):
    volume = _image()
    nib.save(nib.Nifti2Image(volume.data, AFFINE), str(tmp_path / "n2.nii.gz"))
    url = f"{store_root}/n2.nii.gz"
    _put(url, (tmp_path / "n2.nii.gz").read_bytes())
    np.testing.assert_array_equal(read_volume(url).data, volume.data)


@pytest.mark.parametrize("name", ["cut.nii.gz", "cut.nii"])
def test_truncated_object_fails_as_the_same_local_file_does(store_root, name, tmp_path):
    data = np.random.default_rng(9).normal(size=(32, 32, 16)).astype(np.float32)  # cut inside the voxels
    whole = f"{store_root}/whole/{name}"
    write_volume(Volume(data, AFFINE), whole)
    raw = _get(whole)
    url = f"{store_root}/{name}"
    _put(url, raw[: len(raw) // 2])
    (tmp_path / name).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match="truncated") as error:
        read_volume(url)
    with pytest.raises(CorruptFileError, match="truncated") as local_error:
        read_volume(tmp_path / name)
    # Named by its URL, and refused before the voxels are allocated: the bytes there are fewer
    # than the header claims (an uncompressed object), or the gzip stream ends early.
    assert str(error.value).startswith(f"{url}: ")
    assert str(local_error.value).startswith(f"{tmp_path / name}: ")
    if name.endswith(".nii"):
        assert str(error.value).replace(url, "X") == str(local_error.value).replace(str(tmp_path / name), "X")


def test_missing_and_empty_objects_name_the_url(store_root):
    missing = f"{store_root}/imagesTr/nope.nii.gz"
    with pytest.raises(DatasetNotFoundError, match="file not found") as error:
        read_volume(missing)
    assert str(error.value).startswith(f"{missing}: ")
    empty = f"{store_root}/empty.nii.gz"
    _put(empty, b"")
    with pytest.raises(CorruptFileError, match=r"empty \(0 bytes\)") as error:
        read_volume(empty)
    assert str(error.value).startswith(f"{empty}: ")


def test_an_object_that_is_not_nifti_is_a_corrupt_file(store_root):
    url = f"{store_root}/notes.nii"
    _put(url, b"not a nifti header" * 40)
    with pytest.raises(CorruptFileError, match="not a readable NIfTI file") as error:
        read_volume(url)
    assert str(error.value).startswith(f"{url}: ")


def test_missing_bucket_is_not_found(s3_server):
    url = f"s3://medseg-absent-{uuid.uuid4().hex[:8]}/x.nii.gz"
    with pytest.raises(DatasetNotFoundError, match="file not found"):
        read_volume(url)


def test_failed_write_leaves_the_previous_object(store_root, monkeypatch):
    url = f"{store_root}/case.nii.gz"
    write_volume(_label(), url)
    before = _get(url)

    def boom(img, gzipped):
        raise RuntimeError("serialization failed")

    monkeypatch.setattr(medseg_io, "_nifti_bytes", boom)
    with pytest.raises(RuntimeError, match="serialization failed"):
        write_volume(_image(), url)
    assert _get(url) == before


def test_storage_options_reach_the_store_without_the_environment(s3_server, s3_bucket, monkeypatch):
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    s3fs.S3FileSystem.clear_instance_cache()
    options = s3_storage_options(s3_server)
    url = f"{s3_bucket}/explicit.nii.gz"
    write_volume(_label(), url, storage_options=options)
    np.testing.assert_array_equal(read_volume(url, role="label", storage_options=options).data, _label().data)
    assert read_header_geometry(url, storage_options=options)[0] == (6, 5, 4)
    s3fs.S3FileSystem.clear_instance_cache()  # the next test's default instance must see the env again


def test_a_url_without_its_filesystem_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="nosuchstore://bucket/x.nii.gz: no filesystem"):
        read_volume("nosuchstore://bucket/x.nii.gz")


@pytest.mark.parametrize(
    "path, expected",
    [
        ("s3://bucket/x.nii.gz", True),
        ("memory://x.nii.gz", True),
        ("simplecache::s3://bucket/x.nii.gz", True),
        ("/data/x.nii.gz", False),
        ("data/x.nii.gz", False),
        ("file:///data/x.nii.gz", False),
    ],
)
def test_is_url(path, expected):
    assert is_url(path) is expected


def test_a_file_url_is_read_as_the_local_file(tmp_path):
    write_volume(_label(), tmp_path / "x.nii.gz")
    np.testing.assert_array_equal(read_volume(f"file://{tmp_path}/x.nii.gz", role="label").data, _label().data)
