"""The catalog's `<model>.viewer_pages`: a folder of interactive viewer pages
(`medseg.evaluation.viewer`), also logged to the MLflow run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset

from medseg.runs import tracking
from medseg.storage.publishing import apply_umask, staged_folder


class ViewerPagesDataset(AbstractDataset[dict[str, bytes], dict[str, bytes]]):
    """{`<case>.html`: page bytes} as a folder that holds the last run's pages only: saving
    replaces it once every page is written (a staging folder beside it, then a rename), and logs
    each page to the active MLflow run under `artifact_path`. An empty dict removes the folder.

    Example catalog entry::

        "{model}.viewer_pages":
          type: medseg.datasets.viewer.ViewerPagesDataset
          path: data/08_reporting/{model}/viewer
          artifact_path: "{model}/viewer"
    """

    def __init__(self, path: str, artifact_path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self._artifact_path = artifact_path
        self.metadata = metadata

    def load(self) -> dict[str, bytes]:
        if not self._path.is_dir():
            return {}
        return {page.name: page.read_bytes() for page in sorted(self._path.glob("*.html"))}

    def save(self, data: dict[str, bytes]) -> None:
        if not data:
            shutil.rmtree(self._path, ignore_errors=True)
            return
        names = {Path(name).name: page for name, page in data.items()}  # a file name, never a path
        with staged_folder(self._path) as staging:
            for name, page in names.items():
                (staging / name).write_bytes(page)
                apply_umask(staging / name)
        tracking.log_files([self._path / name for name in names], self._artifact_path)

    def _exists(self) -> bool:
        return self._path.is_dir()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "artifact_path": self._artifact_path}
