"""A model run publishes its model, masks and reports only when it succeeds, and never moves
the published ones away.

Before a model pipeline runs, every catalog entry that it writes under one of its models'
output folders is pointed at a hidden staging sibling of that folder
(`<parent>/.<folder>.medseg-staging/`), and so is every entry that shares such an entry's path
(the segmenter and its folder). The published folders are not touched while the run works:
the notebook, `predict.model=unet` and the reports go on showing the previous run's outputs,
and the run reads what it does not write from them.

When the run succeeds (`commit`):
1. each staging folder takes, as hard links, the published entries that the run did not
   write (a partial run, `--to-nodes`, keeps the rest), but for a folder that one entry owns
   whole (the predictions), whose new set replaces the old;
2. a journal, `data/.medseg-publish.json` beside the project lock, names the staging
   folders: from then on the run's outputs count as published;
3. each staging folder is swapped in place of its folder (`medseg.storage.publishing.swap_folder_in`),
   then the journal is deleted.

A run that fails deletes its staging folders (`rollback`). A run that dies without a word
(SIGKILL, a power cut, Ctrl-C) leaves them; the next run, holding the project lock, finishes a
journaled publish and deletes the staging folders that no journal names (`recover`). After a
kill at any moment, the published outputs are either the previous run's, in place, byte for
byte, or the new run's complete set.

On an fsspec store (`s3://...`) a folder has no rename: the swap copies each staged entry over
the published one, then deletes the staging prefix. A kill during that copy is finished by the
next run from the journal, which repeats the copies.

The crash-recovery backups (`<model>.backup`, inside the models folder) stay in the published
folder: a killed run resumes from them.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
from kedro.io import AbstractDataset

from medseg.storage.publishing import atomic_path, fsync_directory, link_or_copy, retired_path, swap_folder_in

logger = logging.getLogger(__name__)

# The catalog entries that place a model's outputs, one per layer: a file entry stands for the
# folder that holds it, a folder entry (the partitioned predictions) for itself.
OUTPUT_ENTRIES = (
    ("{model}.plan", "file"),
    ("{model}.model", "file"),
    ("{model}.predictions", "folder"),
    ("{model}.metrics_summary", "file"),
)
KEPT_IN_PLACE = frozenset({"backup", "context_backup"})
STAGING_SUFFIX = ".medseg-staging"
ASIDE_SUFFIX = ".medseg-previous"  # where runs before the staging design moved outputs aside
JOURNAL_NAME = ".medseg-publish.json"


@dataclass(frozen=True)
class OutputFolder:
    """A folder of a model's published outputs.

    Attributes:
        path: an absolute local path, or the URL of an fsspec store.
        whole: one entry owns the whole folder (the predictions): its new set replaces the old
            one, where other folders keep the entries that a run did not write.
    """

    path: str
    whole: bool = False


def dataset_config(catalog, name: str) -> dict[str, Any]:
    """The entry's configuration as the catalog resolved it (absolute paths, factories
    applied); empty for an entry made in code."""
    return catalog.config_resolver.resolve_pattern(name) or {}


def config_location(config: dict[str, Any]) -> str | None:
    """Where an entry's configuration puts its file or folder: its `filepath` or `path`, or
    those of the dataset it wraps (kedro-mlflow's `MlflowArtifactDataset`)."""
    for key in ("filepath", "path"):
        if isinstance(config.get(key), str):
            return config[key].rstrip("/")
    inner = config.get("dataset")
    return config_location(inner) if isinstance(inner, dict) else None


def output_folders(catalog, models: Iterable[str]) -> list[OutputFolder]:
    """The folders of `models`' published outputs, from the catalog's `OUTPUT_ENTRIES`.

    Args:
        catalog: the run's Kedro catalog.
        models: the model kinds of the run.

    Returns:
        One folder per entry and model, in order, without repeats.
    """
    folders: list[OutputFolder] = []
    for model in models:
        for pattern, kind in OUTPUT_ENTRIES:
            location = config_location(dataset_config(catalog, pattern.format(model=model)))
            if location is None:
                continue
            folder = OutputFolder(location, whole=True) if kind == "folder" else OutputFolder(_parent(location))
            if folder.path not in {known.path for known in folders}:
                folders.append(folder)
    return folders


def _parent(location: str) -> str:
    protocol, sep, path = location.rpartition("://")
    return f"{protocol}{sep}{posixpath.dirname(path)}"


def _sibling(folder: str, suffix: str) -> str:
    protocol, sep, path = folder.rpartition("://")
    parent, name = posixpath.split(path.rstrip("/"))
    return f"{protocol}{sep}{posixpath.join(parent, f'.{name}{suffix}')}"


def staging_path(folder: str) -> str:
    """Where a run writes `folder`'s new entries until it succeeds: its hidden sibling."""
    return _sibling(folder, STAGING_SUFFIX)


def published_path(location: str) -> str:
    """The published counterpart of a path under a staging folder (itself for any other path)."""
    parts = location.split("/")
    for index, part in enumerate(parts):
        if part.startswith(".") and part.endswith(STAGING_SUFFIX):
            parts[index] = part[1 : -len(STAGING_SUFFIX)]
    return "/".join(parts)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _local(url: str) -> str | None:
    """The local path of `url`, or None for a store."""
    if url.startswith("file://"):
        return url[len("file://") :]
    return None if "://" in url else url


def _rebase(value: Any, old: str, new: str) -> Any:
    """`value` (a dataset's configuration) with every path under `old` moved under `new`."""
    if isinstance(value, dict):
        return {key: _rebase(item, old, new) for key, item in value.items()}
    if isinstance(value, list):
        return [_rebase(item, old, new) for item in value]
    if isinstance(value, str) and _under(value, old):
        return new + value[len(old.rstrip("/")) :]
    return value


@contextmanager
def _quiet_replacing():
    """Kedro warns `Replacing dataset` for each entry given a new instance: not news here."""
    catalog_logger = logging.getLogger("kedro.io.data_catalog")
    level = catalog_logger.level
    catalog_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        catalog_logger.setLevel(level)


class OutputStaging:
    """Stages a run's model outputs beside the published ones, and publishes them only when
    the run succeeds.

    Args:
        folders: the output folders of the run's models (`output_folders`); none makes
            `redirect`, `commit` and `rollback` no-ops.
        journal: the publish journal, `data/.medseg-publish.json` beside the project lock.
    """

    def __init__(self, folders: Iterable[OutputFolder], journal: str | os.PathLike):
        self.folders = list(folders)
        self.journal = Path(journal)
        self._staged: list[OutputFolder] = []
        self._originals: dict[str, AbstractDataset] = {}
        self._catalog = None

    # -- at the start of a run, under the lock ---------------------------------------------
    def recover(self) -> None:
        """Finish a publish that a kill cut short, then delete the staging folders and put
        back the set-aside outputs that dead runs left beside this run's folders."""
        if self.journal.exists():
            staged = [OutputFolder(**entry) for entry in json.loads(self.journal.read_text())["folders"]]
            logger.warning("A run that succeeded was stopped while publishing its outputs (%s): finishing the publish.", self.journal)
            for folder in staged:
                _publish(folder)
            self._end_journal()
        for folder in self.folders:
            _restore_aside(folder.path)
            fs, staging = fsspec.core.url_to_fs(staging_path(folder.path))
            if fs.exists(staging):
                logger.warning("%s: deleting what a run that did not finish had written there; its published outputs are as they were.",
                               staging_path(folder.path))
                fs.rm(staging, recursive=True)

    def redirect(self, catalog, pipeline) -> list[str]:
        """Point the entries that `pipeline` writes under the output folders (and the entries
        of the same paths) at the staging folders, in `catalog`.

        Returns:
            The names of the entries redirected.
        """
        configs = {name: dataset_config(catalog, name) for name in sorted(pipeline.datasets())}
        located = {name: location for name, config in configs.items() if (location := config_location(config))}
        written = {located[name] for name in pipeline.all_outputs() if name in located}
        self._catalog = catalog
        for name, location in located.items():
            folder = self._folder_of(location)
            if folder is None or location not in written:
                continue
            original = catalog.get(name)
            with _quiet_replacing():
                catalog[name] = AbstractDataset.from_config(name, _rebase(configs[name], folder.path, staging_path(folder.path)))
            self._originals[name] = original
            if folder not in self._staged:
                self._staged.append(folder)
                fs, staging = fsspec.core.url_to_fs(staging_path(folder.path))
                fs.makedirs(staging, exist_ok=True)
        if self._originals:
            logger.info("Writing this run's model outputs beside the published ones (%s); they replace them only if the run succeeds.",
                        ", ".join(staging_path(folder.path) for folder in self._staged))
        return sorted(self._originals)

    def _folder_of(self, location: str) -> OutputFolder | None:
        for folder in self.folders:
            kept = any(_under(location, posixpath.join(folder.path, name)) for name in KEPT_IN_PLACE)
            if _under(location, folder.path) and not kept:
                return folder
        return None

    # -- at the end of a run ---------------------------------------------------------------
    def commit(self) -> None:
        """The run succeeded: swap its staged outputs in, and point the catalog back at them."""
        if self._staged:
            for folder in self._staged:
                if not folder.whole:
                    _keep_unwritten(folder)
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.journal) as tmp:
                Path(tmp).write_text(json.dumps({"folders": [asdict(folder) for folder in self._staged]}, indent=1))
            for folder in self._staged:
                _publish(folder)
            self._end_journal()
        self._restore_catalog()

    def rollback(self) -> bool:
        """The run failed: delete its staging folders; the published outputs were never touched.

        Returns:
            Whether there was anything staged to delete.
        """
        staged = bool(self._staged)
        for folder in self._staged:
            fs, staging = fsspec.core.url_to_fs(staging_path(folder.path))
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        self._restore_catalog()
        return staged

    def _restore_catalog(self) -> None:
        with _quiet_replacing():
            for name, dataset in self._originals.items():
                self._catalog[name] = dataset
        self._originals, self._staged = {}, []

    def _end_journal(self) -> None:
        self.journal.unlink()
        fsync_directory(self.journal.parent)


def _keep_unwritten(folder: OutputFolder) -> None:
    """Hard-link into the staging folder the published entries that the run did not write, so
    that the swap keeps them (a store keeps them anyway: its swap copies over, deleting none)."""
    target, staging = _local(folder.path), _local(staging_path(folder.path))
    if target is None or not os.path.isdir(target):
        return
    for name in os.listdir(target):
        source, destination = os.path.join(target, name), os.path.join(staging, name)
        if os.path.lexists(destination):
            continue
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, destination, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(source, destination)


def _publish(folder: OutputFolder) -> None:
    """Swap `folder`'s staging folder in; nothing to do where it is gone (already swapped).
    Safe to repeat after a kill at any point."""
    target, staging = _local(folder.path), _local(staging_path(folder.path))
    if target is not None:
        if os.path.isdir(staging):
            swap_folder_in(staging, target)
        else:
            shutil.rmtree(retired_path(target), ignore_errors=True)
        return
    fs, path = fsspec.core.url_to_fs(folder.path)
    _, staged = fsspec.core.url_to_fs(staging_path(folder.path))
    if not fs.exists(staged):
        return
    new = {posixpath.basename(entry.rstrip("/")): entry.rstrip("/") for entry in fs.ls(staged, detail=False) if entry.rstrip("/") != staged}
    if folder.whole and fs.isdir(path):
        for entry in fs.ls(path, detail=False):
            if posixpath.basename(entry.rstrip("/")) not in new and entry.rstrip("/") != path:
                fs.rm(entry, recursive=True)
    for name, entry in sorted(new.items()):
        place = posixpath.join(path, name)
        if fs.exists(place):
            fs.rm(place, recursive=True)
        fs.copy(entry, place, recursive=True)
    fs.rm(staged, recursive=True)


def _restore_aside(folder: str) -> None:
    """Put back what a run of the earlier design (outputs moved aside at its start) left in
    `.<folder>.medseg-previous` when it was killed, where the folder does not have it."""
    fs, path = fsspec.core.url_to_fs(folder)
    _, aside = fsspec.core.url_to_fs(_sibling(folder, ASIDE_SUFFIX))
    if not fs.exists(aside):
        return
    logger.warning("%s: restoring the outputs that a killed run had set aside.", _sibling(folder, ASIDE_SUFFIX))
    fs.makedirs(path, exist_ok=True)
    for saved in fs.ls(aside, detail=False):
        place = posixpath.join(path, posixpath.basename(saved.rstrip("/")))
        if saved.rstrip("/") != aside and not fs.exists(place):
            fs.mv(saved, place, recursive=True)
    fs.rm(aside, recursive=True)
