"""The DICOM training set converted to MSD layout (`data.source: dicom`): written by the
catalog, read as a path.

Example catalog entry::

    dicom_cases:
      type: medseg.datasets.dicom_source.DicomCasesDataset
      path: <raw folder>/dicom
"""

from __future__ import annotations

from medseg.datasets.phantoms import PhantomDataset
from medseg.dicom.training_set import convert_dicom_dataset


class DicomCasesDataset(PhantomDataset):
    """Saves `{"dicom_dir": <folder>}` as that folder's studies converted to MSD layout
    (`medseg.dicom.training_set.convert_dicom_dataset`: incremental, swapped in whole);
    loads as the converted folder's absolute path, like the phantoms' folder it stands beside
    (a local folder, never a store). Saving `{}` (another source) writes nothing.
    `data.dicom_dir` itself is only read."""

    def save(self, data: dict) -> None:
        if data:
            convert_dicom_dataset(data["dicom_dir"], self._path.absolute())
