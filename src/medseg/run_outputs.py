"""A model run publishes its model, masks and reports only when it succeeds.

Before a model pipeline runs, the previous outputs of each of its models are moved aside (one
rename per entry, same file system) into `data/.medseg-previous/`. The run writes a fresh set.
When it succeeds, the previous set is deleted; when it fails, the partial new set is deleted and
the previous one moved back, byte for byte. A run that dies without a word (SIGKILL, a power
cut) leaves `data/.medseg-previous/` behind: the next run finds it, restores it first, and says
so. The project lock (`medseg.run_lock`) guarantees that no live run owns it then.

The crash-recovery backups (`data/06_models/<model>/backup/`) stay where they are: a killed run
must be able to resume from them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_OUTPUT_FOLDERS = (
    "data/05_model_input/{model}",
    "data/06_models/{model}",
    "data/07_model_output/{model}",
    "data/08_reporting/{model}",
)
KEPT_IN_PLACE = frozenset({"backup"})
PREVIOUS = "data/.medseg-previous"


class OutputTransaction:
    """Moves a run's model outputs aside, then either drops or restores them.

    Args:
        project_path: the Kedro project root.
        models: the model pipelines of the run (`unet`, `conv3d`); none makes every method a
            no-op.
    """

    def __init__(self, project_path: str | os.PathLike, models: Iterable[str]):
        self.root = Path(project_path)
        self.folders = [self.root / f.format(model=m) for m in models for f in MODEL_OUTPUT_FOLDERS]
        self.previous = self.root / PREVIOUS

    def _aside(self, folder: Path) -> Path:
        return self.previous / folder.relative_to(self.root)

    def begin(self) -> None:
        """Restore what a dead run left aside, then move the current outputs aside."""
        if self.previous.exists():
            logger.warning("A previous run ended without finishing (%s exists): restoring its outputs first.", self.previous)
            self._restore_all()
        for folder in self.folders:
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                if entry.name in KEPT_IN_PLACE:
                    continue
                target = self._aside(folder) / entry.name
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
        """Move every entry under `data/.medseg-previous/` (`data/<layer>/<model>/<entry>`, as
        `begin` put it) back to its place, replacing the failed run's entry of that name."""
        for saved in sorted(self.previous.glob("data/*/*/*")):
            place = self.root / saved.relative_to(self.previous)
            if place.is_dir() and not place.is_symlink():
                shutil.rmtree(place)
            elif place.exists() or place.is_symlink():
                place.unlink()
            place.parent.mkdir(parents=True, exist_ok=True)
            os.replace(saved, place)
        shutil.rmtree(self.previous, ignore_errors=True)
