"""A Kedro dataset that stands for a folder: it loads as the folder's absolute path.

Kedro anchors every relative `path` in the catalog at the project root, whatever the current
directory. Declaring a folder here (the project root, a model's crash-recovery backups) gives
nodes that same anchoring, and shows the folder in `kedro viz`. The node that receives the path
reads or writes inside it: use this only where a library owns the files (Keras'
`BackupAndRestore`), or to anchor user-given relative paths (`data.msd_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from medseg.storage.paths import is_url


class FolderDataset(AbstractDataset[str, None]):
    """Loads as the absolute path of `path` (a string); read-only.

    Example catalog entry::

        "{model}.backup":
          type: medseg.datasets.folder.FolderDataset
          path: <models folder>/{model}/backup
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def load(self) -> str:
        return str(self._path.absolute())

    def save(self, data: Any) -> None:
        raise DatasetError(f"{self._path}: a FolderDataset only hands out its path; nodes write inside it.")

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
