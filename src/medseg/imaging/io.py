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
    MedsegError,
)
from medseg.storage.limits import Limits, describe, limits
from medseg.storage.paths import is_url, local_or_url, read_object, url_filesystem
from medseg.storage.publishing import atomic_path

VolumeRole = Literal["image", "label"]  # what a volume holds: intensities, or label values


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
# Voxel sizes outside these bounds are a unit mistake in the header, not a scan: the finest
# clinical and preclinical MRI is ~0.01 mm, the coarsest slab a few cm.
MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 1e3
# The qform and the sform of one file may place its corners this far apart (mm) before the file
# counts as ambiguous: the qform cannot hold a shear, so the two differ by rounding when the
# sform has one.
QFORM_SFORM_TOLERANCE_MM = 1.0


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
    if 0 < min(spacing) < MIN_SPACING_MM or max(spacing) > MAX_SPACING_MM:
        raise InvalidGeometryError(
            f"{path}: the voxel spacing {tuple(round(s, 6) for s in spacing)} mm (read from the affine) is outside "
            f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm, which no scanner writes: the header's pixdim or sform/qform is "
            "wrong (a unit of metres or microns?). Set the real voxel size, e.g. with nibabel's header.set_zooms."
        )
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


def inflate(raw: bytes, cap: int, path: str | os.PathLike) -> bytes:
    """The gunzipped bytes of `raw` (every gzip member, as `gzip` reads them), refused as soon
    as they pass `cap` bytes: a gzip of zeros inflates about 1000:1, so the output is never
    allowed to grow past the cap.

    Raises:
        CorruptFileError: more than `cap` bytes, a truncated stream, or one that is not gzip.
    """
    out = bytearray()
    data = raw
    try:
        while True:
            decompressor = zlib.decompressobj(wbits=31)
            chunk = data
            while True:
                out += decompressor.decompress(chunk, cap + 1 - len(out))
                if len(out) > cap:
                    raise CorruptFileError(
                        f"{path}: decompresses to more than {describe(cap, 'bytes')} (what its header claims, within "
                        f"MEDSEG_MAX_SCAN_MB) from {describe(len(raw), 'bytes')}. Refused before it could fill "
                        "memory; send the real scan, or raise MEDSEG_MAX_SCAN_MB for a larger one."
                    )
                chunk = decompressor.unconsumed_tail
                if decompressor.eof or not chunk:
                    break
            if not decompressor.eof:
                raise CorruptFileError(f"{path}: the gzip stream ends early (truncated). Copy or send the whole file.")
            data = decompressor.unused_data
            if data[:2] != GZIP_MAGIC:
                break  # the end, or trailing bytes after the last member, which gzip also ignores
    except zlib.error as exc:
        raise CorruptFileError(f"{path}: not a valid gzip stream ({exc}). Send the .nii.gz file's bytes unchanged.") from exc
    return bytes(out)


def _header_of(head: bytes, path: str | os.PathLike) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header at the start of `head` (sniffed as nib.load does)."""
    for klass in (nib.Nifti2Header, nib.Nifti1Header):
        if len(head) >= klass.sizeof_hdr and klass.may_contain_header(head):
            return klass.from_fileobj(io.BytesIO(head[: klass.sizeof_hdr]), check=False)
    raise CorruptFileError(
        f"{path}: not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header: sizeof_hdr and magic). "
        "Re-export it as .nii or .nii.gz, or remove the case."
    )


def check_header(header: nib.Nifti1Header, path: str | os.PathLike, available: int | None = None,
                 bounds: Limits | None = None) -> int:
    """Refuse a header whose voxels medseg must not allocate, before any is read.

    Args:
        header: the file's NIfTI-1 or NIfTI-2 header.
        path: the file, for the messages.
        available: the bytes of the (uncompressed) file when known: a header claiming more
            voxels than follow is a truncated or forged file.
        bounds: the limits (default: :func:`medseg.storage.limits.limits`).

    Returns:
        The bytes the voxels take once read as stored (vox_offset not included).

    Raises:
        CorruptFileError: a voxel type medseg does not read (RGB, complex), a single-file
            header whose voxels would start inside it (vox_offset), fewer bytes than claimed.
        InvalidGeometryError: more voxels or bytes than the limits, or a qform and an sform
            that place the image in two places.
    """
    bounds = bounds or limits()
    shape = tuple(int(n) for n in header.get_data_shape())
    voxels = 1
    for n in shape:
        voxels *= n
    try:
        dtype = header.get_data_dtype()
    except Exception as exc:  # nibabel: an unknown datatype code
        raise CorruptFileError(f"{path}: unknown voxel datatype code {int(header['datatype'])} ({exc}). Re-export the file.") from exc
    if dtype.fields is not None or dtype.kind not in "uif" or dtype.itemsize > 8:
        raise CorruptFileError(
            f"{path}: its voxels are {_dtype_name(header)} ({dtype}); medseg reads scalar integer or float voxels only "
            "(an RGB or complex volume is not a scan it can segment). Convert it to one grey channel, e.g. with "
            "nibabel: nib.Nifti1Image(np.abs(data) or data.mean(-1), affine)."
        )
    nbytes = voxels * dtype.itemsize
    if voxels > bounds.max_voxels or nbytes > bounds.max_scan_bytes:
        raise InvalidGeometryError(
            f"{path}: its header claims {shape} voxels ({describe(voxels)}, {describe(nbytes, 'bytes')} as "
            f"{dtype}), above the limit of {describe(bounds.max_voxels)} and {describe(bounds.max_scan_bytes, 'bytes')} "
            "(MEDSEG_MAX_VOXELS, MEDSEG_MAX_SCAN_MB). Refused before reading; crop or downsample the scan, or raise "
            "the limits if the scan is real."
        )
    magic = bytes(header["magic"]).rstrip(b"\x00")
    offset = int(header["vox_offset"])
    if magic in (b"n+1", b"n+2"):
        minimum = header.sizeof_hdr + 4  # the header and the 4 extension-flag bytes (NIfTI-1 section 3.3)
        if offset < minimum:
            raise CorruptFileError(
                f"{path}: vox_offset is {offset}, inside the {header.sizeof_hdr}-byte header; the standard requires at "
                f"least {minimum} for a single .nii file, so the header would be read as voxels. Re-save the file "
                "(nibabel: nib.save(nib.load(path), path) sets it)."
            )
        if available is not None and available < offset + nbytes:
            raise CorruptFileError(
                f"{path}: its header claims {describe(nbytes, 'bytes')} of voxels from byte {offset}, but the file "
                f"holds {available} bytes: it is truncated, or the header is wrong. Copy or send the whole file."
            )
    _check_qform_sform(header, shape, path)
    return nbytes


def _dtype_name(header: nib.Nifti1Header) -> str:
    try:
        return header.get_value_label("datatype")
    except Exception:
        return str(int(header["datatype"]))


def _check_qform_sform(header: nib.Nifti1Header, shape: tuple[int, ...], path: str | os.PathLike) -> None:
    """Refuse a file whose qform and sform are both set and place it differently: nibabel
    follows the sform and ITK-based tools the qform, so the same file would be two scans."""
    if int(header["qform_code"]) <= 0 or int(header["sform_code"]) <= 0:
        return
    qform, sform = header.get_qform(), header.get_sform()
    if not (np.all(np.isfinite(qform)) and np.all(np.isfinite(sform))):
        return  # check_affine names the bad matrix
    extent = [max(n - 1, 0) for n in (list(shape[:3]) + [1, 1, 1])[:3]]
    corners = np.array([[i, j, k, 1.0] for i in (0, extent[0]) for j in (0, extent[1]) for k in (0, extent[2])])
    distance = float(np.max(np.linalg.norm((corners @ qform.T - corners @ sform.T)[:, :3], axis=1)))
    if distance > QFORM_SFORM_TOLERANCE_MM:
        raise InvalidGeometryError(
            f"{path}: its qform and sform are both set and disagree by {distance:.1f} mm at the image's corners; nibabel "
            "reads the sform, ITK-based tools the qform, so the scan has no single position. Keep the right one and "
            "copy it over the other (nibabel: img.set_qform(img.get_sform())), or set one code to 0."
        )


def _image_from_bytes(raw: bytes, path: str | os.PathLike = "<bytes>", bounds: Limits | None = None) -> nib.Nifti1Image:
    """A NIfTI-1 or NIfTI-2 image over bytes in memory. Gzipped bytes are inflated first, with
    a cap (the header's claim, checked against the limits), so that no forged size allocates."""
    bounds = bounds or limits()
    if raw[:2] == GZIP_MAGIC:
        header = _header_of(_inflate_head(raw, path), path)
        nbytes = check_header(header, path, bounds=bounds)
        raw = inflate(raw, int(header["vox_offset"]) + nbytes + 2 * MIB_SLACK, path)
    header = _header_of(raw[: nib.Nifti2Header.sizeof_hdr], path)
    check_header(header, path, available=len(raw), bounds=bounds)
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return klass.from_stream(io.BytesIO(raw))


# Bytes allowed past the voxels of a gzipped scan (extensions, padding), before it counts as a bomb.
MIB_SLACK = 2**20


def _inflate_head(raw: bytes, path: str | os.PathLike) -> bytes:
    """The first bytes of a gzip stream once inflated: enough for a NIfTI-2 header."""
    try:
        decompressor = zlib.decompressobj(wbits=31)
        return decompressor.decompress(raw, nib.Nifti2Header.sizeof_hdr)
    except zlib.error as exc:
        raise CorruptFileError(f"{path}: not a valid gzip stream ({exc}). Send the .nii.gz file's bytes unchanged.") from exc


def _open_nifti(path: Path | str, storage_options: dict[str, Any] | None = None) -> nib.Nifti1Image:
    """The image at a local Path (read lazily by nibabel) or a URL (read whole, parsed in memory)."""
    raw = None
    if isinstance(path, str):
        raw = read_object(path, storage_options)
    elif not path.exists():
        raise DatasetNotFoundError(
            f"{path}: file not found. Check the path, or the entry that lists it in dataset.json."
        )
    size = len(raw) if raw is not None else path.stat().st_size
    if size == 0:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes). Replace it with a valid NIfTI file.")
    try:
        if raw is not None:
            img = _image_from_bytes(raw, path)
        else:
            with open(path, "rb") as stream:
                gzipped = stream.read(2) == GZIP_MAGIC
                stream.seek(0)
                head = (gzip.GzipFile(fileobj=stream) if gzipped else stream).read(nib.Nifti2Header.sizeof_hdr)
            check_header(_header_of(head, path), path, available=None if gzipped else size)
            img = nib.load(str(path))  # the header only: voxels are read lazily
    except MedsegError:
        raise
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


def _read_array(img: nib.Nifti1Image, path: Path | str, role: VolumeRole) -> np.ndarray:
    try:
        if role == "image":
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
    :func:`medseg.cases.validation.label_for_storage` maps them to background before a label
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
    role: VolumeRole = "image",
    channel: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Volume:
    """Read a NIfTI file as a 3-D :class:`Volume`.

    Args:
        path: a `.nii` or `.nii.gz` file: a local path or an fsspec URL (`s3://b/x.nii.gz`).
            A URL's object is read whole, then gunzipped when it starts with the gzip magic.
        role: "image" reads float32 (scaling applied, NaN/Inf refused); "label" reads uint8
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
    path = local_or_url(path)
    return _volume_of(_open_nifti(path, storage_options), path, role, channel)


def read_volume_bytes(raw: bytes, name: str, role: VolumeRole = "image", channel: int | None = None) -> Volume:
    """Read the bytes of a `.nii` or `.nii.gz` file (gzipped when they start with the gzip
    magic) as :func:`read_volume` reads a file, `name` standing for it in the messages.

    The header is checked against the limits (`medseg.storage.limits`) and the bytes really there
    before anything is allocated, and a gzip stream is inflated with a cap, so bytes from an
    untrusted client cost no more memory than the limits allow.
    """
    if not raw:
        raise CorruptFileError(f"{name}: the file is empty (0 bytes). Send a valid NIfTI file.")
    try:
        img = _image_from_bytes(raw, name)
    except MedsegError:
        raise
    except Exception as exc:  # nibabel raises many types for a bad file
        raise CorruptFileError(
            f"{name}: not a readable NIfTI file ({type(exc).__name__}: {exc}). Send a .nii or .nii.gz file."
        ) from exc
    return _volume_of(img, name, role, channel)


def _volume_of(img: nib.Nifti1Image, path: Path | str, role: VolumeRole, channel: int | None) -> Volume:
    check_affine(img.affine, path)
    data = _select_channel(_read_array(img, path, role), path, channel)
    if role == "image":
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
    path = local_or_url(path)
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


def _image_of(volume: Volume) -> nib.Nifti1Image:
    img = nib.Nifti1Image(volume.data, volume.affine)
    img.set_data_dtype(volume.data.dtype)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    return img


def volume_bytes(volume: Volume, gzipped: bool) -> bytes:
    """The bytes :func:`write_volume` writes for `volume` to a `.nii.gz` (`gzipped`) or `.nii`."""
    return _nifti_bytes(_image_of(volume), gzipped)


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
    path = local_or_url(path)
    img = _image_of(volume)
    if isinstance(path, str):
        fs, fs_path = url_filesystem(path, storage_options)
        fs.pipe_file(fs_path, _nifti_bytes(img, gzipped=path.endswith(".gz")))
        return
    with atomic_path(path, ".nii.gz" if path.name.endswith(".gz") else ".nii") as tmp:
        nib.save(img, tmp)
