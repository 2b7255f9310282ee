"""A model run publishes its model, masks and reports only when it succeeds.

Before a model pipeline runs, the previous outputs of each of its models are moved aside (one
rename per entry, same file system) into `data/.medseg-previous/`. The run writes a fresh set.
When it succeeds, the previous set is deleted; when it fails, the partial new set is deleted and
the previous one moved back, byte for byte. A run that dies without a word (SIGKILL, a power
cut) leaves `data/.medseg-previous/` behind: the next run finds it, restores it first, and says
so. The project lock (`medseg.runs.lock`) guarantees that no live run owns it then.

A model's output folders are where the catalog puts its entries (`output_folders`), one per
data layer, wherever they point: no folder is spelled here. The crash-recovery backups
(`<model>.backup`, inside the models folder) stay where they are: a killed run must be able to
resume from them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from medseg.imaging.io import is_url

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
PREVIOUS = "data/.medseg-previous"
MANIFEST = "folders.json"


def output_folders(catalog, models: Iterable[str]) -> list[Path]:
    """The folders of `models`' published outputs, from the catalog's `OUTPUT_ENTRIES`.

    Args:
        catalog: the run's Kedro catalog (its entries' `filepath` or `path`, absolute).
        models: the model pipelines of the run (`unet`, `conv3d`).

    Returns:
        One folder per entry and model, in order, without repeats. An entry on an fsspec
        store (`s3://...`) is left out, with a log line: its files cannot be moved aside by a
        rename, so a failed run there keeps what it wrote.
    """
    folders: list[Path] = []
    for model in models:
        for pattern, kind in OUTPUT_ENTRIES:
            name = pattern.format(model=model)
            described = catalog.get(name)._describe()
            location = str(described.get("filepath") or described.get("path"))
            if is_url(location):
                logger.info("%s is on a store (%s): a failed run does not restore it.", name, location)
                continue
            folder = Path(location) if kind == "folder" else Path(location).parent
            if folder not in folders:
                folders.append(folder)
    return folders
class OutputTransaction:
    """Moves a run's model outputs aside, then either drops or restores them.

    Args:
        project_path: the Kedro project root (the aside folder is `data/.medseg-previous/`).
        folders: the output folders of the run's models (`output_folders`); none makes every
            method a no-op.
    """

    def __init__(self, project_path: str | os.PathLike, folders: Iterable[str | os.PathLike]):
        self.root = Path(project_path)
        self.folders = [Path(folder) for folder in folders]
        self.previous = self.root / PREVIOUS

    def _aside(self, folder: Path) -> Path:
        """Where `folder`'s entries wait: its path under the root, or its index for a folder
        outside the root."""
        try:
            return self.previous / folder.relative_to(self.root)
        except ValueError:
            return self.previous / "outside" / str(self.folders.index(folder))

    def begin(self) -> None:
        """Restore what a dead run left aside, then move the current outputs aside."""
        if self.previous.exists():
            logger.warning("A previous run ended without finishing (%s exists): restoring its outputs first.", self.previous)
            self._restore_all()
        moves = [
            (entry, self._aside(folder) / entry.name)
            for folder in self.folders if folder.is_dir()
            for entry in folder.iterdir() if entry.name not in KEPT_IN_PLACE
        ]
        if not moves:
            return
        # Written first, so that a run killed half-way still says where each entry belongs.
        self.previous.mkdir(parents=True, exist_ok=True)
        (self.previous / MANIFEST).write_text(json.dumps({str(self._aside(f)): str(f) for f in self.folders}))
        for entry, target in moves:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(entry, target)

    def commit(self) -> None:
        """The run succeeded: its outputs stand, the previous ones go."""
        shutil.rmtree(self.previous, ignore_errors=True)

    def rollback(self) -> None:
        """The run failed: delete what it wrote (but the backups) and put the previous back."""
        for folder in self.folders:
            if folder.is_dir():
                for entry in folder.iterdir():
                    if entry.name not in KEPT_IN_PLACE:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        self._restore_all()

    def _restore_all(self) -> None:
        """Move every entry that `begin` put aside back to its folder (the manifest of the run
        that put it there says which), replacing the failed run's entry of that name."""
        manifest = self.previous / MANIFEST
        places = json.loads(manifest.read_text()) if manifest.is_file() else {}
        for aside, folder in places.items():
            for saved in sorted(Path(aside).glob("*")) if Path(aside).is_dir() else []:
                place = Path(folder) / saved.name
                if place.is_dir() and not place.is_symlink():
                    shutil.rmtree(place)
                elif place.exists() or place.is_symlink():
                    place.unlink()
                place.parent.mkdir(parents=True, exist_ok=True)
                os.replace(saved, place)
        shutil.rmtree(self.previous, ignore_errors=True)
