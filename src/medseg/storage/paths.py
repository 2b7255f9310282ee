"""Where data lives: a local path or an fsspec URL (`s3://bucket/x.nii.gz`, `memory://...`),
and paths in parameters anchored at the project root, never at the current directory.

No Kedro here: the readers (`medseg.imaging.io`, `medseg.cases.msd`), the incremental cache
and the catalog's datasets all use these helpers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import split_protocol

from medseg.errors import ConfigurationError, DatasetNotFoundError


def is_url(path: str | os.PathLike) -> bool:
    """True when `path` names a file on an fsspec store other than the local disk
    (`s3://b/k`, `memory://x`, `simplecache::s3://...`); False for a local path or `file://`."""
    protocol, _ = split_protocol(os.fspath(path))
    return protocol not in (None, "file", "local")


def local_or_url(path: str | os.PathLike) -> Path | str:
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


def read_object(url: str, storage_options: dict[str, Any] | None) -> bytes:
    """The whole object at `url`, in one request."""
    fs, fs_path = url_filesystem(url, storage_options)
    try:
        return fs.cat_file(fs_path)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise DatasetNotFoundError(
            f"{url}: file not found. Check the path, or the entry that lists it in dataset.json."
        ) from exc


def anchor_path(path: str | Path, root: str | Path) -> Path | str:
    """`path` itself when absolute, else `root / path`: the project root, never the cwd.

    A URL on an fsspec store (`s3://bucket/Task04`, `memory://x`: any protocol but `file`) is
    returned as is, a string: it names the same data from every machine, so it is never
    anchored at the project root.
    """
    if is_url(path):
        return str(path)
    path = Path(path).expanduser()
    return path if path.is_absolute() else Path(root) / path
