import gzip

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import ChannelError, CorruptFileError, DatasetNotFoundError, InvalidIntensityError, InvalidLabelError
from medseg.imaging.io import Volume, read_volume, voxel_spacing, write_volume


def _save(path, data, affine=None, dtype=None):
    img = nib.Nifti1Image(data, np.diag([1.0, 2.0, 3.0, 1.0]) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def test_image_reads_as_float32_with_scaling_and_affine(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, np.diag([0.5, 0.5, 2.0, 1.0]))
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, str(tmp_path / "x.nii.gz"))
    volume = read_volume(tmp_path / "x.nii.gz", kind="image")
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data, data * 2.0 + 10.0)
    assert volume.spacing == (0.5, 0.5, 2.0)


def test_label_reads_as_uint8_from_float_storage(tmp_path):
    _save(tmp_path / "l.nii.gz", np.array([[[0.0, 1.0], [2.0, 0.0]]], dtype=np.float32))
    label = read_volume(tmp_path / "l.nii.gz", kind="label")
    assert label.data.dtype == np.uint8
    assert label.data.tolist() == [[[0, 1], [2, 0]]]


def test_non_integer_label_is_refused_with_the_file_name(tmp_path):
    path = _save(tmp_path / "bad_label.nii.gz", np.full((2, 2, 2), 0.5, dtype=np.float32))
    with pytest.raises(InvalidLabelError, match="bad_label.nii.gz.*non-integer"):
        read_volume(path, kind="label")


def test_nan_in_image_is_refused(tmp_path):
    data = np.ones((3, 3, 3), dtype=np.float32)
    data[1, 1, 1] = np.nan
    path = _save(tmp_path / "nan.nii.gz", data)
    with pytest.raises(InvalidIntensityError, match="nan.nii.gz.*1 NaN or Inf"):
        read_volume(path)


def test_trailing_channel_of_one_is_squeezed(tmp_path):
    path = _save(tmp_path / "c1.nii.gz", np.ones((4, 5, 6, 1), dtype=np.float32))
    assert read_volume(path).data.shape == (4, 5, 6)


def test_several_channels_need_a_choice(tmp_path):
    data = np.stack([np.zeros((4, 4, 4)), np.ones((4, 4, 4))], axis=-1).astype(np.float32)
    path = _save(tmp_path / "c2.nii.gz", data)
    with pytest.raises(ChannelError, match="c2.nii.gz.*2 channels.*data.channel"):
        read_volume(path)
    assert read_volume(path, channel=1).data.mean() == 1.0
    with pytest.raises(ChannelError, match="out of range"):
        read_volume(path, channel=2)


def test_wrong_dimensions_are_refused(tmp_path):
    path = _save(tmp_path / "2d.nii.gz", np.ones((4, 5), dtype=np.float32))
    with pytest.raises(ChannelError, match="2 dimensions"):
        read_volume(path)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"this is not a nifti file at all" * 20, "not a readable NIfTI")],
)
def test_empty_or_garbage_file(tmp_path, content, message):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(content)
    with pytest.raises(CorruptFileError, match=f"broken.nii.gz.*{message}"):
        read_volume(path)


def test_truncated_file(tmp_path):
    path = _save(tmp_path / "full.nii.gz", np.random.default_rng(0).random((30, 30, 30)).astype(np.float32))
    raw = gzip.decompress(path.read_bytes())
    truncated = tmp_path / "cut.nii"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError, match="cut.nii"):
        read_volume(truncated)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nothere.nii.gz: file not found"):
        read_volume(tmp_path / "nothere.nii.gz")


def test_write_is_atomic_and_keeps_dtype_and_affine(tmp_path):
    affine = np.array([[-0.9, 0, 0, 10], [0, 0, 2.5, -5], [0, 1.1, 0, 3], [0, 0, 0, 1]])
    label = Volume(np.eye(4, dtype=np.uint8)[:, :, None].repeat(3, axis=2), affine)
    write_volume(label, tmp_path / "out" / "m.nii.gz")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.nii.gz"]  # no temp file left
    back = nib.load(str(tmp_path / "out" / "m.nii.gz"))
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert voxel_spacing(affine) == pytest.approx((0.9, 1.1, 2.5))


def test_failed_write_leaves_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "keep.nii.gz"
    write_volume(Volume(np.zeros((2, 2, 2), np.float32), np.eye(4)), target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", boom)
    with pytest.raises(OSError):
        write_volume(Volume(np.ones((2, 2, 2), np.float32), np.eye(4)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.nii.gz"]
