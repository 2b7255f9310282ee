"""Reading and writing NIfTI volumes with medseg's conventions.

Images come back as float32 and labels as uint8, never as nibabel's float64 default (a label
file that holds values above 255 keeps a wider unsigned dtype until it is binarized). Every
failure raises a :class:`medseg.errors.MedsegError` that names the file and says what to do.
Local writes are atomic and durable: the volume goes to a temporary file in the same folder, is
flushed to disk, then renamed; the file gets the mode the umask gives (like any new file), not
the 0600 of a temporary file.

Every path may also be an fsspec URL (`s3://bucket/x.nii.gz`, `gs://...`, `memory://...`), so
that workers on other machines read and write the same layers. A URL is read as the whole
object in one request and parsed in memory; it is written as one object, serialized in memory
first, then put whole (`fs.pipe_file`: one S3 PUT, or above 100 MB a multipart upload that S3
publishes only once complete): an object store replaces an object whole, so a failed write
leaves no half-written volume. Credentials and endpoints come from the store's usual sources
(for S3: the `AWS_*` variables, `~/.aws`, `FSSPEC_S3_*`), or from `storage_options`.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import nibabel as nib
import numpy as np
from fsspec.core import split_protocol

from medseg.errors import (
    ChannelError,
    ConfigurationError,
    CorruptFileError,
    DatasetNotFoundError,
    InvalidGeometryError,
    InvalidIntensityError,
    InvalidLabelError,
)
from medseg.publishing import atomic_path

VolumeKind = Literal["image", "label"]


@dataclass
class Volume:
    """A 3D array with the geometry it came with.

    Attributes:
        data: (X, Y, Z) array, float32 for images and uint8 for labels (a wider unsigned dtype
            only for a source label that holds values above 255, before binarization).
        affine: (4, 4) voxel-to-world matrix in mm.
        header: the NIfTI header the file had, or None for a new volume.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis, read from the affine."""
        return voxel_spacing(self.affine)


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the column norms of the affine's 3x3 part."""
    return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


# Below this, |det| / (product of the voxel sizes) calls an affine singular: its voxel axes are
# (nearly) parallel, so distinct voxels would land on one point in space.
SINGULAR_AFFINE_TOLERANCE = 1e-6


def check_affine(affine: np.ndarray, path: str | os.PathLike) -> None:
    """Refuse an affine that cannot place voxels in space.

    Args:
        affine: (4, 4) voxel-to-world matrix in mm, as nibabel reads it from the header.
        path: the file it came from, for the message.

    Raises:
        InvalidGeometryError: a non-finite entry, a zero voxel spacing along some axis, or a
            singular (or nearly singular) 3x3 part. Resampling, orientation and the mapping of
            a prediction back to the scan all need an invertible affine.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InvalidGeometryError(
            f"{path}: the affine (sform/qform) holds NaN or Inf values: {affine.tolist()}. Fix the "
            "header (e.g. re-export the file from its source with a valid orientation)."
        )
    spacing = voxel_spacing(affine)
    if min(spacing) == 0:
        axis = "xyz"[spacing.index(0.0)]
        raise InvalidGeometryError(
            f"{path}: the voxel spacing is zero along {axis} (spacing {spacing} mm, read from the "
            "affine). Set the real voxel size in the header (pixdim and sform/qform), e.g. with "
            "nibabel's header.set_zooms, or re-export the file."
        )
    volume_ratio = abs(np.linalg.det(affine[:3, :3])) / float(np.prod(spacing))
    if volume_ratio < SINGULAR_AFFINE_TOLERANCE:
        raise InvalidGeometryError(
            f"{path}: the affine is singular (its voxel axes are parallel), so voxels cannot be "
            f"placed in space: {np.round(affine, 4).tolist()}. Fix the sform/qform in the header or "
            "re-export the file."
        )


# The first two bytes of every gzip stream (RFC 1952), whatever the object's name says.
GZIP_MAGIC = b"\x1f\x8b"


def is_url(path: str | os.PathLike) -> bool:
    """True when `path` names a file on an fsspec store other than the local disk
    (`s3://b/k`, `memory://x`, `simplecache::s3://...`); False for a local path or `file://`."""
    protocol, _ = split_protocol(os.fspath(path))
    return protocol not in (None, "file", "local")


def _location(path: str | os.PathLike) -> Path | str:
    """A URL as its string; a local path as a Path, a `file://` prefix dropped (pathlib would
    keep it as a folder named `file:`)."""
    text = os.fspath(path)
    if is_url(text):
        return text
    protocol, local = split_protocol(text)
    return Path(local if protocol else text)


def url_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of `url` and the path on it (`fsspec.core.url_to_fs`).

    Args:
        url: e.g. `s3://bucket/Task04/dataset.json`.
        storage_options: keyword arguments of the filesystem (credentials, `endpoint_url`...);
            None uses the store's defaults (environment variables, config files).

    Raises:
        ConfigurationError: the protocol is unknown, or its fsspec package is not installed.
    """
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as exc:  # fsspec's two ways of saying "no such filesystem"
        raise ConfigurationError(
            f"{url}: no filesystem for this URL ({exc}). Install the fsspec package of its store "
            "(for s3:// `pip install -e '.[s3]'`, gs:// gcsfs, abfs:// adlfs), or use a local path."
        ) from exc


def _read_object(url: str, storage_options: dict[str, Any] | None) -> bytes:
    """The whole object at `url`, in one request."""
    fs, fs_path = url_filesystem(url, storage_options)
    try:
        return fs.cat_file(fs_path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise DatasetNotFoundError(
            f"{url}: file not found. Check the path, or the entry that lists it in dataset.json."
        ) from exc


def _image_from_bytes(raw: bytes) -> nib.Nifti1Image:
    """A NIfTI-1 or NIfTI-2 image over bytes in memory, gunzipped lazily as nib.load does, so
    that a truncated `.nii.gz` fails where the voxels are read, as a local file does."""
    stream = gzip.GzipFile(fileobj=io.BytesIO(raw)) if raw[:2] == GZIP_MAGIC else io.BytesIO(raw)
    head = stream.read(nib.Nifti2Header.sizeof_hdr)
    stream.seek(0)
    for klass in (nib.Nifti2Image, nib.Nifti1Image):
        if klass.header_class.may_contain_header(head):  # sizeof_hdr and magic, as nib.load sniffs
            return klass.from_stream(stream)
    raise ValueError("no NIfTI-1 or NIfTI-2 header (sizeof_hdr and magic) at the start")


def _open_nifti(path: Path | str, storage_options: dict[str, Any] | None = None) -> nib.Nifti1Image:
    """The image at a local Path (read lazily by nibabel) or a URL (read whole, parsed in memory)."""
    raw = None
    if isinstance(path, str):
        raw = _read_object(path, storage_options)
    elif not path.exists():
        raise DatasetNotFoundError(
            f"{path}: file not found. Check the path, or the entry that lists it in dataset.json."
        )
    if (len(raw) if raw is not None else path.stat().st_size) == 0:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes). Replace it with a valid NIfTI file.")
    try:
        img = nib.load(str(path)) if raw is None else _image_from_bytes(raw)
    except Exception as exc:  # nibabel raises many types for a bad file
        raise CorruptFileError(
            f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc}). "
            "Re-export it as .nii or .nii.gz, or remove the case from dataset.json."
        ) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CorruptFileError(
            f"{path}: nibabel reads it as {type(img).__name__}, not NIfTI. Convert it to .nii.gz."
        )
    return img


def _read_array(img: nib.Nifti1Image, path: Path | str, kind: VolumeKind) -> np.ndarray:
    try:
        if kind == "image":
            return img.get_fdata(dtype=np.float32, caching="unchanged")
        return np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptFileError(
            f"{path}: the voxel data cannot be read ({type(exc).__name__}: {exc}); the file is "
            "probably truncated. Copy or download it again."
        ) from exc


def _select_channel(data: np.ndarray, path: Path | str, channel: int | None) -> np.ndarray:
    """Reduce a 4-D (X, Y, Z, C) array to 3-D: squeeze C == 1, else take `channel`."""
    if data.ndim == 3:
        return data
    if data.ndim != 4:
        raise ChannelError(
            f"{path}: has {data.ndim} dimensions {data.shape}; medseg needs a 3-D volume "
            "(X, Y, Z) or a 4-D one (X, Y, Z, C). Convert it to 3-D."
        )
    n_channels = data.shape[3]
    if n_channels == 1:
        return data[..., 0]
    if channel is None:
        raise ChannelError(
            f"{path}: has {n_channels} channels {data.shape} and no channel was chosen. "
            f"Set data.channel to an index in 0..{n_channels - 1} (or a modality name)."
        )
    if not 0 <= channel < n_channels:
        raise ChannelError(
            f"{path}: data.channel={channel} is out of range for {n_channels} channels. "
            f"Use an index in 0..{n_channels - 1}."
        )
    return np.ascontiguousarray(data[..., channel])


def _as_label(data: np.ndarray, path: Path | str) -> np.ndarray:
    """Non-negative integer class values as uint8, or the smallest unsigned dtype that holds them.

    Values above 255 are allowed here; validation checks that none of them is foreground, and
    :func:`medseg.imaging.validation.label_for_storage` maps them to background before a label
    is written.
    """
    if data.dtype == np.uint8:
        return data
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise InvalidLabelError(f"{path}: the label holds NaN or Inf. Labels must be integer class values.")
        if not np.array_equal(data, np.round(data)):
            raise InvalidLabelError(
                f"{path}: the label holds non-integer values (e.g. {data[data != np.round(data)][:3]}). "
                "Labels must be integer class values; was an image given as a label, or was the label "
                "resampled with linear interpolation? Re-export it with nearest-neighbour interpolation."
            )
    low, high = data.min(initial=0), data.max(initial=0)
    if low < 0:
        raise InvalidLabelError(
            f"{path}: the label holds negative values (down to {low}); medseg needs class values of 0 "
            "or more. Relabel them (e.g. as 0, background) and save the label again."
        )
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if high <= np.iinfo(dtype).max:
            return data.astype(dtype, copy=False)
    raise InvalidLabelError(f"{path}: label values up to {high} do not fit a 64-bit integer. Relabel the file.")


def read_volume(
    path: str | os.PathLike,
    kind: VolumeKind = "image",
    channel: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Volume:
    """Read a NIfTI file as a 3-D :class:`Volume`.

    Args:
        path: a `.nii` or `.nii.gz` file: a local path or an fsspec URL (`s3://b/x.nii.gz`).
            A URL's object is read whole, then gunzipped when it starts with the gzip magic.
        kind: "image" reads float32 (scaling applied, NaN/Inf refused); "label" reads uint8
            (non-integer and negative values refused; a label with values above 255 reads as
            the smallest unsigned dtype that holds them).
        channel: for a 4-D (X, Y, Z, C) file with C > 1, the channel to keep. A trailing axis of
            size 1 is always squeezed.
        storage_options: for a URL, keyword arguments of its fsspec filesystem (credentials,
            `endpoint_url`...); None uses the store's defaults. Ignored for a local path.

    Returns:
        The volume with its affine and header.

    Raises:
        DatasetNotFoundError, CorruptFileError, ChannelError, InvalidGeometryError,
        InvalidIntensityError, InvalidLabelError: each message names the file and the fix.
        ConfigurationError: a URL whose filesystem is not installed.
    """
    path = _location(path)
    img = _open_nifti(path, storage_options)
    check_affine(img.affine, path)
    data = _select_channel(_read_array(img, path, kind), path, channel)
    if kind == "image":
        data = data.astype(np.float32, copy=False)
        if not np.all(np.isfinite(data)):
            n_bad = int(np.count_nonzero(~np.isfinite(data)))
            raise InvalidIntensityError(
                f"{path}: the image holds {n_bad} NaN or Inf voxels. Fix or remove the case "
                "(e.g. replace them with the background value before training)."
            )
    else:
        data = _as_label(data, path)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header)


def read_header_geometry(
    path: str | os.PathLike, storage_options: dict[str, Any] | None = None
) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI file, read from its header alone (no voxel data is parsed;
    a URL's object is still fetched whole, as :func:`read_volume` fetches it).

    Raises:
        DatasetNotFoundError, CorruptFileError, InvalidGeometryError, ConfigurationError.
    """
    path = _location(path)
    img = _open_nifti(path, storage_options)
    check_affine(img.affine, path)
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def _nifti_bytes(img: nib.Nifti1Image, gzipped: bool) -> bytes:
    """The bytes `nib.save` writes for `img` to a `.nii.gz` (`gzipped`) or `.nii` file.

    nibabel writes gzip with its `DeterministicGzipFile`: no file name, mtime 0, its default
    level. Doing the same here makes an object on a store byte-identical to a local file.
    """
    raw = img.to_bytes()
    if not gzipped:
        return raw
    buffer = io.BytesIO()
    level = nib.openers.Opener.default_compresslevel
    with gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=buffer, mtime=0) as stream:
        stream.write(raw)
    return buffer.getvalue()


def write_volume(volume: Volume, path: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> None:
    """Write a volume atomically: a local file through `atomic_path`; a URL as one object,
    serialized in memory and put whole (see the module docstring).

    A label (uint8) is stored as uint8 and an image as float32, whatever the header said.
    The sform and qform both carry the affine, so any viewer overlays it on its source scan.
    A name ending in `.gz` is gzipped, any other is written as plain `.nii`.

    Args:
        volume: the volume to write.
        path: a local path or an fsspec URL.
        storage_options: for a URL, keyword arguments of its fsspec filesystem; None uses the
            store's defaults. Ignored for a local path.
    """
    path = _location(path)
    img = nib.Nifti1Image(volume.data, volume.affine)
    img.set_data_dtype(volume.data.dtype)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    if isinstance(path, str):
        fs, fs_path = url_filesystem(path, storage_options)
        fs.pipe_file(fs_path, _nifti_bytes(img, gzipped=path.endswith(".gz")))
        return
    with atomic_path(path, ".nii.gz" if path.name.endswith(".gz") else ".nii") as tmp:
        nib.save(img, tmp)
