"""The synthetic phantoms' folder: written by the catalog, read as a path.

Example catalog entry::

    synthetic_phantoms:
      type: medseg.datasets.phantoms.PhantomDataset
      path: <raw folder>/synthetic
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kedro.io.core import AbstractDataset, DatasetError

from medseg.storage.paths import is_url
from medseg.synthetic.phantoms import ensure_synthetic_dataset


class PhantomDataset(AbstractDataset[dict, str]):
    """Saves phantom settings (`medseg.synthetic.phantoms.synthesis_settings`) as the phantoms
    themselves, in MSD layout; loads as the folder's absolute path.

    Saving is incremental: a folder whose `dataset.json` records the same settings is kept as
    it is; other settings write the phantoms again, in a staging folder swapped in once every
    case is written. Saving `{}` (the source is not synthetic) writes nothing.

    Args:
        path: a local folder (a relative path is anchored at the project root by Kedro). The
            phantoms are made on this machine; a store is refused, with the fix.
    """

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        if is_url(path):
            raise DatasetError(
                f"synthetic_phantoms: path {path} is on a store, but the phantoms are written to a local folder. "
                "Set a local path in the catalog; a dataset on a store is read with data.source=msd,data.msd_dir=<URL>."
            )
        self._path = Path(path)
        self.metadata = metadata

    def save(self, data: dict) -> None:
        if data:
            ensure_synthetic_dataset(self._path.absolute(), data)

    def load(self) -> str:
        return str(self._path.absolute())

    def _exists(self) -> bool:
        return (self._path / "dataset.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}
