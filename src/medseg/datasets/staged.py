"""A `PartitionedDataset` that replaces its folder only once every partition is written, keeps
the partitions that did not change, and makes the others on the run's Dask workers.

kedro-datasets' `overwrite: true` deletes the old partitions before writing the new ones, so a
crash half-way leaves neither set. This subclass writes into a hidden staging folder beside the
target and swaps the two at the end (:func:`medseg.storage.publishing.staged_folder`: two renames on
the same file system). On failure the staging folder is removed and the old partitions are left
as they were.

Incremental: a partition given as a :class:`medseg.storage.incremental.KeyedPartition` whose key equals
the key it was last saved with (recorded in `.partition-keys.json` inside the folder) is not
made again; the file already there is kept (hard-linked into the staging folder).

Parallel: the partitions to make are mapped over `medseg.runs.compute.current()`, one task per
partition that makes it and saves it on the worker, so only `sync` makes them in this process.
A task names the catalog entry's credentials and the worker reads them from the project's
credentials files (:mod:`medseg.runs.credentials`): no secret travels in a task.
A :class:`medseg.casework.DriverThenWorker` partition runs its driver part (a network) here
first, and only its worker part in the task.

Any fsspec store: on a local folder the swap is two renames. An object store (`s3://`) has no
rename of a folder: the new partitions are written under a staging prefix, and only once
every one of them is written are they copied over the old ones (one object at a time) and the
partitions that are gone deleted, then the staging prefix removed.
"""

from __future__ import annotations

import json
import logging
import uuid
from copy import deepcopy
from functools import partial
from pathlib import Path
from typing import Any

from kedro_datasets.partitions import PartitionedDataset

from medseg.casework import DriverThenWorker
from medseg.runs import compute, credentials
from medseg.storage.incremental import KeyedPartition
from medseg.storage.publishing import link_or_copy, staged_folder

logger = logging.getLogger(__name__)

KEYS_FILE = ".partition-keys.json"


def _save_partition(job: tuple[type, dict[str, Any], Any]) -> None:
    """Make one partition and save it (on a Dask worker, or here under `sync`); credentials
    sent by name are read here (:mod:`medseg.runs.credentials`)."""
    dataset_type, kwargs, data = job
    if "credentials" in kwargs:
        kwargs = {**kwargs, "credentials": credentials.resolved(kwargs["credentials"])}
    dataset_type(**kwargs).save(data() if callable(data) else data)


def _driver_part(job: tuple[type, dict[str, Any], Any]) -> tuple[type, dict[str, Any], Any]:
    """Run a partition's driver part here (a segmenter's network), leaving its worker part to
    the task (:class:`medseg.casework.DriverThenWorker`)."""
    dataset_type, kwargs, data = job
    if isinstance(data, DriverThenWorker):
        data = partial(data.worker, data.driver())
    return dataset_type, kwargs, data


class StagedPartitionedDataset(PartitionedDataset):
    """`partitions.PartitionedDataset` with an all-or-nothing save that skips unchanged partitions.

    Takes the same arguments; `overwrite` is implied (the new set replaces the old one).
    `allow_empty: true` loads an empty or missing folder as no partitions (a model's
    low-resolution grid, which a full-resolution plan leaves empty); otherwise that is
    `PartitionedDataset`'s error, which names the folder.
    """

    def __init__(self, *args: Any, allow_empty: bool = False, **kwargs: Any):
        kwargs.pop("overwrite", None)
        super().__init__(*args, overwrite=False, **kwargs)
        self._allow_empty = bool(allow_empty)

    # -- what is there ---------------------------------------------------------------------
    def _is_local(self) -> bool:
        return self._protocol == "file"

    def _fs_path(self, *parts: str) -> str:
        return "/".join([self._filesystem._strip_protocol(self._normalized_path).rstrip("/"), *parts])

    def _recorded_keys(self) -> dict[str, str]:
        path = self._fs_path(KEYS_FILE)
        try:
            with self._filesystem.open(path, "r") as stream:
                keys = json.load(stream).get("partitions", {})
        except (FileNotFoundError, ValueError, OSError):
            return {}
        existing = set(self._list_partitions_uncached())
        return {pid: key for pid, key in keys.items() if self._partition_to_path(pid) in existing}

    def _list_partitions_uncached(self) -> list[str]:
        self._invalidate_caches()
        return self._list_partitions()

    def _job(self, root: str, partition_id: str, data: Any) -> tuple[type, dict[str, Any], Any]:
        """The partition's dataset type and arguments with its file under `root` instead of
        the target folder (the staging folder), and what to save."""
        kwargs = deepcopy(self._dataset_config)
        relative = self._partition_to_path(partition_id)[len(self._fs_path()):].lstrip("/")
        kwargs[self._filepath_arg] = self._join_protocol(f"{root.rstrip('/')}/{relative}")
        return self._dataset_type, kwargs, data

    def load(self) -> dict[str, Any]:
        """The partitions, as `PartitionedDataset` loads them; with `allow_empty`, none (not
        an error) for an empty or missing folder."""
        if self._allow_empty and not self._list_partitions_uncached():
            return {}
        return super().load()

    # -- save ------------------------------------------------------------------------------
    def save(self, data: dict[str, Any]) -> None:
        keyed = {pid: value.key for pid, value in data.items() if isinstance(value, KeyedPartition)}
        recorded = self._recorded_keys() if keyed else {}
        kept = sorted(pid for pid, key in keyed.items() if recorded.get(pid) == key)
        to_make = sorted(set(data) - set(kept))
        if keyed:
            logger.info(
                "%s: %d of %d cases unchanged since the last run (same source files and plan), kept; %d to make.",
                self._path, len(kept), len(data), len(to_make),
            )
        # _recorded_keys has just listed the folder (cached): no second listing of a store.
        if not to_make and keyed == recorded and len(recorded) == len(self._list_partitions()):
            return  # every partition is there, made from the same inputs: nothing to write
        if self._is_local():
            self._save_local(data, kept, to_make, keyed)
        else:
            self._save_remote(data, kept, to_make, keyed)
        self._invalidate_caches()

    def _make(self, root: str, data: dict[str, Any], to_make: list[str]) -> None:
        jobs = [self._job(root, pid, data[pid]) for pid in to_make]
        if jobs and jobs[0][1].get("credentials") and not isinstance(compute.current(), compute.SyncExecutor):
            # A task goes through the scheduler to a worker: it names the credentials, never holds them.
            name = credentials.name_of(jobs[0][1]["credentials"])
            jobs = [(kind, {**kwargs, "credentials": name}, value) for kind, kwargs, value in jobs]
        two_parts = any(isinstance(data[pid], DriverThenWorker) for pid in to_make)
        compute.current().map(
            _save_partition, jobs, task=f"Writing {self._path}", case_ids=to_make, prepare=_driver_part if two_parts else None
        )

    def _save_local(self, data: dict[str, Any], kept: list[str], to_make: list[str], keyed: dict[str, str]) -> None:
        target = Path(self._filesystem._strip_protocol(self._normalized_path))
        with staged_folder(target) as staging:
            for pid in kept:
                destination = Path(self._job(str(staging), pid, None)[1][self._filepath_arg])
                destination.parent.mkdir(parents=True, exist_ok=True)
                link_or_copy(Path(self._partition_to_path(pid)), destination)
            self._make(str(staging), data, to_make)
            if keyed:
                (staging / KEYS_FILE).write_text(json.dumps({"partitions": keyed}, indent=1, sort_keys=True))

    def _save_remote(self, data: dict[str, Any], kept: list[str], to_make: list[str], keyed: dict[str, str]) -> None:
        fs = self._filesystem
        target = self._fs_path()
        staging = f"{target.rsplit('/', 1)[0]}/.{target.rsplit('/', 1)[-1]}.staging-{uuid.uuid4().hex[:12]}"
        try:
            self._make(staging, data, to_make)
            # The keys go first: a publish cut short must not leave new files under old keys.
            if fs.exists(self._fs_path(KEYS_FILE)):
                fs.rm(self._fs_path(KEYS_FILE))
            new_paths = set()
            for pid in to_make:
                source = self._job(staging, pid, None)[1][self._filepath_arg]
                destination = self._partition_to_path(pid)
                fs.copy(fs._strip_protocol(source), destination)
                new_paths.add(destination)
            new_paths.update(self._partition_to_path(pid) for pid in kept)
            for stale in set(self._list_partitions_uncached()) - new_paths:
                fs.rm(stale)
            if keyed:
                with fs.open(self._fs_path(KEYS_FILE), "w") as stream:
                    stream.write(json.dumps({"partitions": keyed}, indent=1, sort_keys=True))
        finally:
            if fs.exists(staging):
                fs.rm(staging, recursive=True)

