"""A `PartitionedDataset` that replaces its folder only once every partition is written.

kedro-datasets' `overwrite: true` deletes the old partitions before writing the new ones, so a
crash half-way leaves neither set. This subclass writes into a hidden staging folder beside the
target and swaps the two at the end (two renames on the same file system). On failure the
staging folder is removed and the old partitions are left as they were.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kedro.io.core import DatasetError
from kedro_datasets.partitions import PartitionedDataset

from medseg.imaging.io import apply_umask


class StagedPartitionedDataset(PartitionedDataset):
    """`partitions.PartitionedDataset` with an all-or-nothing save (local folders only).

    Takes the same arguments; `overwrite` is implied (the new set replaces the old one).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.pop("overwrite", None)
        super().__init__(*args, overwrite=False, **kwargs)
        if self._protocol != "file":
            raise DatasetError(f"StagedPartitionedDataset writes local folders only, got '{self._path}'.")

    def save(self, data: dict[str, Any]) -> None:
        target = Path(self._path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
        apply_umask(staging, directory=True)
        final_path = self._path
        try:
            self._path = str(staging)
            super().save(data)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._path = final_path
        retired = target.with_name(f".{target.name}.old")
        shutil.rmtree(retired, ignore_errors=True)
        if target.exists():
            os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        self._invalidate_caches()
