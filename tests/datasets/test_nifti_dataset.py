import numpy as np
import pytest
from kedro_datasets.partitions import PartitionedDataset

from medseg.datasets.nifti import NiftiDataset
from medseg.imaging.io import Volume


def test_partitioned_round_trip_is_lazy_and_keeps_dtype_and_affine(tmp_path):
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    dataset = PartitionedDataset(
        path=str(tmp_path / "labels"),
        dataset={"type": "medseg.datasets.nifti.NiftiDataset", "role": "label"},
        filename_suffix=".nii.gz",
    )
    made = []

    def make(i):
        def build():
            made.append(i)
            return Volume(np.full((3, 4, 5), i, np.uint8), affine)

        return build

    dataset.save({f"case_{i}": make(i) for i in range(3)})
    assert made == [0, 1, 2]  # built one at a time, while saving
    loaded = dataset.load()
    assert sorted(loaded) == ["case_0", "case_1", "case_2"]
    volume = loaded["case_2"]()
    assert volume.data.dtype == np.uint8 and int(volume.data.max()) == 2
    np.testing.assert_allclose(volume.affine, affine)


def test_image_kind_loads_float32(tmp_path):
    path = str(tmp_path / "x.nii.gz")
    NiftiDataset(path).save(Volume(np.arange(8, dtype=np.float64).reshape(2, 2, 2), np.eye(4)))
    assert NiftiDataset(path).load().data.dtype == np.float32
    assert NiftiDataset(path)._exists()


def test_a_bad_role_is_refused(tmp_path):
    from kedro.io.core import DatasetError

    with pytest.raises(DatasetError, match="role"):
        NiftiDataset(str(tmp_path / "x.nii.gz"), role="mask")
