"""A model run publishes its model, masks and reports only when it succeeds.

Before a model pipeline runs, the previous outputs of each of its models are moved aside, into
a hidden sibling of each output folder (`<parent>/.<folder>.medseg-previous/`). The run writes
a fresh set. When it succeeds, the previous set is deleted; when it fails, the partial new set
is deleted and the previous one moved back, byte for byte. A run that dies without a word
(SIGKILL, a power cut) leaves the sibling behind: the next run finds it, restores it first, and
says so. The project lock (`medseg.runs.lock`) guarantees that no live run owns it then.

A model's output folders are where the catalog puts its entries (`output_folders`), wherever
they point: no folder is spelled here, and nothing is written outside those folders' parents.
A folder on an fsspec store (`s3://...`) is moved aside and back through fsspec (a copy and a
delete per object there, not a rename). The crash-recovery backups (`<model>.backup`, inside
the models folder) stay where they are: a killed run must be able to resume from them.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable

import fsspec

logger = logging.getLogger(__name__)

# The catalog entries that place a model's outputs, one per layer: a file entry stands for the
# folder that holds it, a folder entry (the partitioned predictions) for itself.
OUTPUT_ENTRIES = (
    ("{model}.plan", "file"),
    ("{model}.model", "file"),
    ("{model}.predictions", "folder"),
    ("{model}.metrics_summary", "file"),
)
KEPT_IN_PLACE = frozenset({"backup"})
ASIDE_SUFFIX = ".medseg-previous"


def output_folders(catalog, models: Iterable[str]) -> list[str]:
    """The folders of `models`' published outputs, from the catalog's `OUTPUT_ENTRIES`.

    Args:
        catalog: the run's Kedro catalog (its entries' `filepath` or `path`: absolute local
            paths, or URLs of an fsspec store).
        models: the model kinds of the run.

    Returns:
        One folder per entry and model, in order, without repeats.
    """
    folders: list[str] = []
    for model in models:
        for pattern, kind in OUTPUT_ENTRIES:
            described = catalog.get(pattern.format(model=model))._describe()
            location = str(described.get("filepath") or described.get("path")).rstrip("/")
            folder = location if kind == "folder" else _parent(location)
            if folder not in folders:
                folders.append(folder)
    return folders


def _parent(location: str) -> str:
    protocol, sep, path = location.rpartition("://")
    return f"{protocol}{sep}{posixpath.dirname(path)}"


def aside_folder(folder: str) -> str:
    """Where `folder`'s entries wait while a run makes new ones: its hidden sibling."""
    protocol, sep, path = folder.rpartition("://")
    parent, name = posixpath.split(path.rstrip("/"))
    return f"{protocol}{sep}{posixpath.join(parent, f'.{name}{ASIDE_SUFFIX}')}"


class OutputTransaction:
    """Moves a run's model outputs aside, then either drops or restores them.

    Args:
        folders: the output folders of the run's models (`output_folders`): local paths or
            URLs; none makes every method a no-op.
    """

    def __init__(self, folders: Iterable[str]):
        self.folders = [str(folder) for folder in folders]

    @staticmethod
    def _fs(folder: str):
        fs, path = fsspec.core.url_to_fs(folder)
        return fs, path.rstrip("/")

    @staticmethod
    def _entries(fs, path: str) -> list[str]:
        """The entries of `path` (files and folders), but the backups; none if it is missing."""
        if not fs.isdir(path):
            return []
        return [entry.rstrip("/") for entry in fs.ls(path, detail=False)
                if posixpath.basename(entry.rstrip("/")) not in KEPT_IN_PLACE and entry.rstrip("/") != path]

    def begin(self) -> None:
        """Restore what a dead run left aside, then move the current outputs aside."""
        for folder in self.folders:
            fs, path = self._fs(folder)
            _, aside = self._fs(aside_folder(folder))
            if fs.exists(aside):
                logger.warning("A previous run ended without finishing (%s exists): restoring its outputs first.", aside)
                self._restore(folder)
            entries = self._entries(fs, path)
            if entries:
                fs.makedirs(aside, exist_ok=True)
            for entry in entries:
                fs.mv(entry, posixpath.join(aside, posixpath.basename(entry)), recursive=True)

    def commit(self) -> None:
        """The run succeeded: its outputs stand, the previous ones go."""
        for folder in self.folders:
            fs, aside = self._fs(aside_folder(folder))
            if fs.exists(aside):
                fs.rm(aside, recursive=True)

    def rollback(self) -> None:
        """The run failed: delete what it wrote (but the backups) and put the previous back."""
        for folder in self.folders:
            fs, path = self._fs(folder)
            for entry in self._entries(fs, path):
                fs.rm(entry, recursive=True)
            self._restore(folder)

    def _restore(self, folder: str) -> None:
        """Move every entry that `begin` put aside back into `folder`, replacing an entry of
        that name that a failed run wrote, then remove the aside folder."""
        fs, path = self._fs(folder)
        _, aside = self._fs(aside_folder(folder))
        if not fs.exists(aside):
            return
        for saved in self._entries(fs, aside):
            place = posixpath.join(path, posixpath.basename(saved))
            if fs.exists(place):
                fs.rm(place, recursive=True)
            fs.makedirs(path, exist_ok=True)
            fs.mv(saved, place, recursive=True)
        fs.rm(aside, recursive=True)
