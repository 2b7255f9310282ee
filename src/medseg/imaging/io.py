"""Reading and writing NIfTI volumes with medseg's conventions.

Images come back as float32 and labels as uint8, never as nibabel's float64 default. Every
failure raises a :class:`medseg.errors.MedsegError` that names the file and says what to do.
Writes are atomic: the volume goes to a temporary file in the same folder, then is renamed.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from medseg.errors import (
    ChannelError,
    CorruptFileError,
    DatasetNotFoundError,
    InvalidIntensityError,
    InvalidLabelError,
)

VolumeKind = Literal["image", "label"]


@dataclass
class Volume:
    """A 3D array with the geometry it came with.

    Attributes:
        data: (X, Y, Z) array, float32 for images and uint8 for labels.
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


def _open_nifti(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise DatasetNotFoundError(
            f"{path}: file not found. Check the path, or the entry that lists it in dataset.json."
        )
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path}: the file is empty (0 bytes). Replace it with a valid NIfTI file.")
    try:
        img = nib.load(str(path))
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


def _read_array(img: nib.Nifti1Image, path: Path, kind: VolumeKind) -> np.ndarray:
    try:
        if kind == "image":
            return img.get_fdata(dtype=np.float32, caching="unchanged")
        return np.asanyarray(img.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, gzip.BadGzipFile) as exc:
        raise CorruptFileError(
            f"{path}: the voxel data cannot be read ({type(exc).__name__}: {exc}); the file is "
            "probably truncated. Copy or download it again."
        ) from exc


def _select_channel(data: np.ndarray, path: Path, channel: int | None) -> np.ndarray:
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


def _as_label(data: np.ndarray, path: Path) -> np.ndarray:
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
    if low < 0 or high > 255:
        raise InvalidLabelError(
            f"{path}: label values range over [{low}, {high}]; medseg needs class values in 0..255."
        )
    return data.astype(np.uint8)


def read_volume(path: str | os.PathLike, kind: VolumeKind = "image", channel: int | None = None) -> Volume:
    """Read a NIfTI file as a 3-D :class:`Volume`.

    Args:
        path: a `.nii` or `.nii.gz` file.
        kind: "image" reads float32 (scaling applied, NaN/Inf refused); "label" reads uint8
            (non-integer values refused).
        channel: for a 4-D (X, Y, Z, C) file with C > 1, the channel to keep. A trailing axis of
            size 1 is always squeezed.

    Returns:
        The volume with its affine and header.

    Raises:
        DatasetNotFoundError, CorruptFileError, ChannelError, InvalidIntensityError,
        InvalidLabelError: each message names the file and the fix.
    """
    path = Path(path)
    img = _open_nifti(path)
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


def read_header_geometry(path: str | os.PathLike) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI file, read from its header alone (no voxel data)."""
    path = Path(path)
    img = _open_nifti(path)
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def write_volume(volume: Volume, path: str | os.PathLike) -> None:
    """Write a volume atomically: to a temporary file beside `path`, then rename.

    A label (uint8) is stored as uint8 and an image as float32, whatever the header said.
    The sform and qform both carry the affine, so any viewer overlays it on its source scan.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(volume.data, volume.affine)
    img.set_data_dtype(volume.data.dtype)
    img.set_sform(volume.affine, code=1)
    img.set_qform(volume.affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
