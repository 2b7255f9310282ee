"""The staged partitioned dataset: a new set replaces the old one only once it is complete."""

import os

import numpy as np
import pytest
from kedro.io.core import DatasetError

from medseg.datasets.staged import StagedPartitionedDataset
from medseg.imaging.io import Volume, read_volume


def _dataset(path):
    return StagedPartitionedDataset(
        path=str(path), dataset={"type": "medseg.datasets.nifti.NiftiDataset", "role": "label"}, filename_suffix=".nii.gz"
    )


def _mask(value):
    return Volume(np.full((4, 4, 2), value, dtype=np.uint8), np.eye(4))


def test_a_crash_half_way_keeps_the_old_set(tmp_path):
    folder = tmp_path / "predictions"
    _dataset(folder).save({"a": _mask(1), "b": _mask(1)})

    def crash():
        raise RuntimeError("killed while predicting case c")

    with pytest.raises(DatasetError, match="case c"):
        _dataset(folder).save({"a": lambda: _mask(0), "c": crash})
    assert sorted(p.name for p in folder.iterdir()) == ["a.nii.gz", "b.nii.gz"]
    assert read_volume(folder / "a.nii.gz", role="label").data.max() == 1  # not overwritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]  # no staging left behind


def test_a_complete_save_replaces_the_whole_set(tmp_path):
    folder = tmp_path / "predictions"
    _dataset(folder).save({"a": _mask(1), "b": _mask(1)})
    old_umask = os.umask(0o022)
    try:
        _dataset(folder).save({"c": lambda: _mask(0)})
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in folder.iterdir()) == ["c.nii.gz"]
    assert sorted(_dataset(folder).load()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions"]
    assert folder.stat().st_mode & 0o777 == 0o755
