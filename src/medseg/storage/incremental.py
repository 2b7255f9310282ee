"""What a per-case output was made from, so that a rerun redoes only the cases that changed.

A source file is known by its size, its modification time and the SHA-256 of its content
(:func:`file_identity`). A rerun that finds the same size and time trusts the recorded hash
and reads nothing; a file that was touched or copied is hashed again, and only a new content
counts as a change. Each output partition carries a key (:func:`content_key`) over the
identities of its inputs and every setting that shapes it; the partitioned datasets
(`medseg.datasets.staged`) keep an unchanged partition instead of computing it again.

Paths may be local or fsspec URLs (`s3://bucket/Task/imagesTr/a_0000.nii.gz`). No Kedro here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from medseg.storage.paths import is_url, url_filesystem

T = TypeVar("T")

_CHUNK = 1 << 20
_STAMP_KEYS = ("mtime", "LastModified", "last_modified", "updated", "created", "ETag", "etag", "md5Hash", "content_md5")


def file_stat(path: str) -> dict[str, Any]:
    """`{"size": bytes, "mtime": str}` of a local file (nanoseconds) or an fsspec object (the
    store's modification time and ETag or hash, as it reports them), without reading it."""
    if not is_url(path):
        stat = os.stat(path)
        return {"size": int(stat.st_size), "mtime": str(stat.st_mtime_ns)}
    fs, inner = url_filesystem(str(path))
    info = fs.info(inner)
    # Object stores give a modification time to the second; their ETag (or a hash) tells a
    # rewrite within that second.
    stamps = [str(info[key]) for key in _STAMP_KEYS if info.get(key) not in (None, "")]
    return {"size": int(info.get("size") or 0), "mtime": "|".join(stamps)}


def sha256_of(path: str) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB chunks), local or through fsspec."""
    digest = hashlib.sha256()
    if is_url(path):
        fs, inner = url_filesystem(str(path))
        opener = fs.open(inner, "rb")
    else:
        opener = open(path, "rb")
    with opener as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`{"size", "mtime", "sha256"}` of a file.

    Args:
        path: a local path or an fsspec URL.
        previous: the identity recorded last time, or None. When its size and mtime equal
            the file's, its sha256 is taken as is and the file is not read.

    Raises:
        OSError (FileNotFoundError) when the file does not exist; the callers' own checks
        turn that into a message naming the file.
    """
    stat = file_stat(path)
    if previous and str(previous.get("mtime")) == stat["mtime"] and int(previous.get("size", -1)) == stat["size"]:
        sha = previous.get("sha256")
        if isinstance(sha, str) and len(sha) == 64:
            return {**stat, "sha256": sha}
    return {**stat, "sha256": sha256_of(path)}


def content_key(*parts: Any) -> str:
    """A hex SHA-256 over `parts` as canonical JSON (sorted keys): equal settings and inputs
    give equal keys, in any process and on any machine."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"content_key cannot hash {type(value).__name__}")


@dataclass(frozen=True)
class KeyedPartition(Generic[T]):
    """A lazily made partition and the key of what it is made from.

    Calling it makes the partition, so a plain `PartitionedDataset` saves it like any lazy
    partition; `StagedPartitionedDataset` keeps the partition already on disk instead when it
    was saved with the same key.
    """

    key: str
    make: Callable[[], T]

    def __call__(self) -> T:
        return self.make()
