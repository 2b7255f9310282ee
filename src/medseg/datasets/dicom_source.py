"""The DICOM training set converted to MSD layout (`data.source: dicom`): written by the
catalog, read as a path.

Example catalog entry::

    dicom_cases:
      type: medseg.datasets.dicom_source.DicomCasesDataset
      path: <raw folder>/dicom
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset

from medseg.imaging.dicom_dataset import convert_dicom_dataset


class DicomCasesDataset(AbstractDataset[dict, str]):
    """Saves `{"dicom_dir": <folder>}` as that folder's studies converted to MSD layout
    (`medseg.imaging.dicom_dataset.convert_dicom_dataset`: incremental, swapped in whole);
    loads as the converted folder's absolute path. Saving `{}` (another source) writes
    nothing. `data.dicom_dir` itself is only read."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._path = Path(path)
        self.metadata = metadata

    def save(self, data: dict) -> None:
        if data:
            convert_dicom_dataset(data["dicom_dir"], self._path.absolute())

    def load(self) -> str:
        return str(self._path.absolute())

    def _exists(self) -> bool:
        return (self._path / "dataset.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
