import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import (
    ChannelError,
    CorruptFileError,
    DatasetNotFoundError,
    InvalidGeometryError,
    InvalidIntensityError,
    InvalidLabelError,
)
from medseg.imaging.io import Volume, read_header_geometry, read_volume, voxel_spacing, write_volume
from medseg.storage.publishing import current_umask


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
    volume = read_volume(tmp_path / "x.nii.gz", role="image")
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data, data * 2.0 + 10.0)
    assert volume.spacing == (0.5, 0.5, 2.0)


def test_label_reads_as_uint8_from_float_storage(tmp_path):
    _save(tmp_path / "l.nii.gz", np.array([[[0.0, 1.0], [2.0, 0.0]]], dtype=np.float32))
    label = read_volume(tmp_path / "l.nii.gz", role="label")
    assert label.data.dtype == np.uint8
    assert label.data.tolist() == [[[0, 1], [2, 0]]]


def test_non_integer_label_is_refused_with_the_file_name(tmp_path):
    path = _save(tmp_path / "bad_label.nii.gz", np.full((2, 2, 2), 0.5, dtype=np.float32))
    with pytest.raises(InvalidLabelError, match="bad_label.nii.gz.*non-integer"):
        read_volume(path, role="label")


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


def test_label_values_above_255_keep_a_wider_dtype(tmp_path):
    data = np.array([[[0, 1], [300, 70000]]], dtype=np.int32)
    label = read_volume(_save(tmp_path / "wide.nii.gz", data), role="label")
    assert label.data.dtype == np.uint32
    assert label.data.tolist() == [[[0, 1], [300, 70000]]]
    assert read_volume(_save(tmp_path / "u16.nii.gz", np.array([[[0, 300]]], np.int16)), role="label").data.dtype == np.uint16
    assert read_volume(_save(tmp_path / "u8.nii.gz", np.array([[[0, 255]]], np.int16)), role="label").data.dtype == np.uint8


def test_negative_label_is_refused_with_the_file_name(tmp_path):
    path = _save(tmp_path / "neg.nii.gz", np.array([[[0, -1]]], np.int16))
    with pytest.raises(InvalidLabelError, match="neg.nii.gz.*negative values.*-1"):
        read_volume(path, role="label")


def _save_with_sform(path, affine):
    """A file whose sform is `affine` (qform unset): nibabel cannot build it from a singular one."""
    header = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).header
    header.set_sform(affine, code=1)
    header.set_qform(None, code=0)
    nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), None, header=header).to_filename(str(path))
    return path


def test_zero_voxel_spacing_is_refused(tmp_path):
    path = _save_with_sform(tmp_path / "flat.nii.gz", np.diag([1.0, 0.0, 2.0, 1.0]))
    with pytest.raises(InvalidGeometryError, match=r"flat.nii.gz: the voxel spacing is zero along y.*set_zooms"):
        read_volume(path)
    with pytest.raises(InvalidGeometryError, match="flat.nii.gz.*zero along y"):
        read_volume(path, role="label")
    with pytest.raises(InvalidGeometryError, match="flat.nii.gz.*zero"):
        read_header_geometry(path)


def test_singular_affine_is_refused(tmp_path):
    parallel = np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    path = _save_with_sform(tmp_path / "singular.nii.gz", parallel)
    with pytest.raises(InvalidGeometryError, match="singular.nii.gz: the affine is singular.*sform/qform"):
        read_volume(path)


def test_oblique_and_flipped_affines_are_accepted(tmp_path):
    angle = np.deg2rad(30)
    oblique = np.array(
        [[-0.8 * np.cos(angle), -0.8 * np.sin(angle), 0, 5], [0.8 * np.sin(angle), -0.8 * np.cos(angle), 0, 2], [0, 0, 3.0, 1], [0, 0, 0, 1]]
    )
    volume = read_volume(_save_with_sform(tmp_path / "oblique.nii.gz", oblique))
    assert volume.spacing == pytest.approx((0.8, 0.8, 3.0))


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)

    def set_umask(mask):
        os.umask(mask)

    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_file_mode_follows_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    target = tmp_path / "m.nii.gz"
    write_volume(Volume(np.zeros((2, 2, 2), np.uint8), np.eye(4)), target)
    assert target.stat().st_mode & 0o777 == mode


def test_write_fsyncs_the_file_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_volume(Volume(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "d.nii.gz")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"]  # the data, the rename, the folder entry
    assert events[0][1] == events[1][1]  # the temporary file itself was flushed
    if os.path.exists("/proc/self/fd"):
        assert events[2][1] == str(tmp_path)
