"""Errors raised on bad input.

Every error names the file (or parameter) at fault, says what is wrong and says what to do,
so that a user never has to read a numpy or nibabel traceback to fix their data.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of every error medseg raises on bad input or bad configuration."""


class DatasetNotFoundError(MedsegError):
    """A dataset folder, `dataset.json` or a file it lists does not exist."""


class EmptyDatasetError(MedsegError):
    """A dataset holds no usable case."""


class MissingLabelError(MedsegError):
    """An image has no matching label file."""


class CorruptFileError(MedsegError):
    """A file is empty, truncated or not NIfTI."""


class GeometryMismatchError(MedsegError):
    """An image and its label disagree in shape or affine."""


class InvalidGeometryError(MedsegError):
    """A file's affine cannot place its voxels in space: a zero voxel spacing, a singular or a
    non-finite matrix."""


class InvalidLabelError(MedsegError):
    """A label holds non-integer or negative values, or foreground values above 255."""


class InvalidIntensityError(MedsegError):
    """An image holds NaN or Inf values."""


class ChannelError(MedsegError):
    """An image has several channels and none was chosen, or the wrong number of dimensions."""


class SplitError(MedsegError):
    """Too few cases for the requested train/val/test split."""


class UnsafePathError(MedsegError):
    """A path in `dataset.json`, or the real file behind a symlink, lies outside the dataset folder."""


class TrackingError(MedsegError):
    """The MLflow tracking server cannot be reached or refused the run."""


class ConfigurationError(MedsegError):
    """A parameter has a value medseg cannot use."""
