"""A Kedro dataset for one NIfTI volume (kedro-datasets has none).

Use it through ``partitions.PartitionedDataset`` for a folder of cases: the partitioned dataset
hands nodes one load function per case, so nothing is read until a node asks for that case.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import PurePosixPath
from typing import Any

import fsspec
from kedro.io.core import AbstractDataset, DatasetError, get_filepath_str, get_protocol_and_path

from medseg.imaging.io import Volume, read_volume, write_volume
from medseg.runs import credentials


class NiftiDataset(AbstractDataset[Volume, Volume]):
    """Loads and saves a :class:`medseg.imaging.io.Volume` as `.nii` / `.nii.gz`, on the local
    disk or any fsspec store (`s3://`, `gs://`, `abfs://`, `memory://`...).

    Images load as float32 and labels as uint8 (``role``), with the affine and header kept.
    A local save is atomic (temporary file, fsync, rename); a save to a store is one object
    serialized in memory and put whole (see :mod:`medseg.imaging.io`).

    Example catalog entry::

        primary_images:
          type: partitions.PartitionedDataset
          path: s3://my-bucket/medseg/03_primary/images
          credentials: s3_medseg   # from conf/local/credentials.yml; passed on to each case
          dataset:
            type: medseg.datasets.nifti.NiftiDataset
            role: image
          filename_suffix: .nii.gz
    """

    def __init__(
        self,
        filepath: str,
        role: str = "image",
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ):
        """Creates a new instance of ``NiftiDataset``.

        Args:
            filepath: a `.nii` / `.nii.gz` file, a local path or a URL with any fsspec protocol.
                Write `memory:///bucket/x.nii.gz` with three slashes: Kedro's
                `get_protocol_and_path` drops the host of a protocol it does not know as a
                cloud store (`memory://bucket/x` would be `/x`), in every Kedro dataset.
            role: "image" (float32) or "label" (uint8), see :func:`medseg.imaging.io.read_volume`.
            credentials: credentials of the filesystem, as kedro-datasets takes them (for S3
                e.g. `{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}`).
                None uses the store's defaults (for S3 the `AWS_*` variables and `~/.aws`).
            fs_args: extra arguments of the filesystem class constructor. (kedro-datasets'
                `open_args_load` / `open_args_save` do not apply: nibabel reads the bytes.)
            metadata: any metadata; ignored by Kedro.
        """
        if role not in ("image", "label"):
            raise DatasetError(f"NiftiDataset role must be 'image' or 'label', got '{role}'.")
        protocol, path = get_protocol_and_path(filepath)
        storage_options = {**deepcopy(credentials or {}), **deepcopy(fs_args or {})}
        self._arguments = (filepath, role, credentials, fs_args, metadata)
        self._protocol = protocol
        self._filepath = PurePosixPath(path)
        self._role = role
        self._storage_options = storage_options
        self._fs = fsspec.filesystem(protocol, **storage_options)
        self.metadata = metadata

    @property
    def _path(self) -> str:
        """The local path, or the URL with its protocol, that medseg.imaging.io reads
        (Kedro's `get_filepath_str` gives an object store's path without its protocol)."""
        path = get_filepath_str(self._filepath, self._protocol)
        return path if self._protocol == "file" else self._fs.unstrip_protocol(path)

    def __reduce__(self):
        """Pickled (a case's load function sent to a Dask worker) with its credentials by name,
        read again on the worker (:mod:`medseg.runs.credentials`): never the secret itself."""
        filepath, role, secret, fs_args, metadata = self._arguments
        named = credentials.name_of(secret) if secret else None
        return _unpickle, (filepath, role, named, fs_args, metadata)

    def __deepcopy__(self, memo: dict) -> NiftiDataset:
        return type(self)(*deepcopy(self._arguments, memo))  # in this process: the credentials stay as they are

    def load(self) -> Volume:
        return read_volume(self._path, role=self._role, storage_options=self._remote_options())

    def save(self, data: Volume) -> None:
        write_volume(data, self._path, storage_options=self._remote_options())
        self._fs.invalidate_cache(self._path)  # a listing cached before the write must not hide it

    def _remote_options(self) -> dict[str, Any] | None:
        # Local files go through medseg's own atomic write, which takes no filesystem options.
        return None if self._protocol == "file" else self._storage_options

    def _exists(self) -> bool:
        return self._fs.exists(self._path)

    def _release(self) -> None:
        super()._release()
        self._fs.invalidate_cache(self._path)

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "protocol": self._protocol, "role": self._role}


def _unpickle(filepath: str, role: str, named, fs_args, metadata) -> NiftiDataset:
    return NiftiDataset(filepath, role, credentials.resolved(named), fs_args, metadata)
