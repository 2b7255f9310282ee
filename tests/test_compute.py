"""Per-case work on Dask (`medseg.runs.compute`): order, where each part runs, errors, bounded work."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from kedro.io.core import DatasetError

from conftest import data_files_written, make_project_copy, mlflow_runs, run_pipeline
from medseg.casework import DriverThenWorker
from medseg.runs import compute
from medseg.datasets.staged import KEYS_FILE, StagedPartitionedDataset
from medseg.errors import ConfigurationError, CorruptFileError
from medseg.imaging.io import Volume, read_volume
from medseg.storage.incremental import KeyedPartition


@pytest.fixture(scope="module")
def local2():
    """One LocalCluster of two worker processes for the tests of this module."""
    with compute.using_scheduler("local:2") as executor:
        yield executor


@pytest.mark.parametrize("spec", ["sync", "local:1", "local:16", "tcp://10.0.0.5:8786", "tls://scheduler:8786"])
def test_valid_schedulers(spec):
    assert compute.check_scheduler(spec) == spec


@pytest.mark.parametrize("spec", ["local", "local:0", "local:-1", "dask", "8786", "threads:2", ""])
def test_invalid_schedulers_name_the_valid_forms(spec):
    with pytest.raises(ValueError, match=r"compute\.scheduler=.*'sync', 'local:N'.*tcp://host:8786"):
        compute.check_scheduler(spec)


def _square_and_pid(value):
    return value * value, os.getpid()


def _fails_on_three(value):
    if value == 3:
        raise CorruptFileError(f"/data/case_{value}.nii.gz: the file is empty (0 bytes). Replace it.")
    return value


def test_dask_map_keeps_order_runs_on_workers_and_prepares_here(local2):
    prepared_in = []

    def prepare(value):
        prepared_in.append(os.getpid())
        return value + 1

    items = list(range(9))
    results = local2.map(_square_and_pid, items, task="Squaring", prepare=prepare)
    assert [r[0] for r in results] == [(i + 1) ** 2 for i in items]
    worker_pids = {r[1] for r in results}
    assert os.getpid() not in worker_pids and 1 <= len(worker_pids) <= 2
    assert prepared_in == [os.getpid()] * len(items)  # the driver-side step stays in this process


def test_a_failing_case_raises_its_own_error_as_sync_does(local2):
    with pytest.raises(CorruptFileError) as sync_error:
        compute.SyncExecutor().map(_fails_on_three, list(range(6)), task="Reading")
    with pytest.raises(CorruptFileError) as dask_error:
        local2.map(_fails_on_three, list(range(6)), task="Reading")
    assert str(dask_error.value) == str(sync_error.value) == "/data/case_3.nii.gz: the file is empty (0 bytes). Replace it."


def _mask(value):
    return Volume(np.full((4, 4, 2), value, dtype=np.uint8), np.eye(4))


def _dataset(path):
    return StagedPartitionedDataset(
        path=str(path), dataset={"type": "medseg.datasets.nifti.NiftiDataset", "role": "label"}, filename_suffix=".nii.gz"
    )


def test_partitions_are_written_by_the_workers_all_or_nothing(tmp_path, local2):
    folder = tmp_path / "labels"
    _dataset(folder).save({c: (lambda i=i: _mask(i)) for i, c in enumerate("abcd")})
    assert [int(read_volume(folder / f"{c}.nii.gz", role="label").data.max()) for c in "abcd"] == [0, 1, 2, 3]

    def crash():
        raise RuntimeError("worker killed while making case e")

    with pytest.raises(DatasetError, match="case e"):
        _dataset(folder).save({"a": lambda: _mask(9), "e": crash})
    assert sorted(p.name for p in folder.iterdir()) == [f"{c}.nii.gz" for c in "abcd"]
    assert read_volume(folder / "a.nii.gz", role="label").data.max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels"]  # no staging folder left


def test_keyed_partitions_are_kept_when_their_key_is_unchanged(tmp_path):
    folder = tmp_path / "labels"
    _dataset(folder).save({"a": KeyedPartition("k1", lambda: _mask(1)), "b": KeyedPartition("k2", lambda: _mask(2))})
    inode = (folder / "a.nii.gz").stat().st_ino
    # Same key for a: kept as it is (a maker that would give 7 is not called); new key for b: made.
    _dataset(folder).save({"a": KeyedPartition("k1", lambda: _mask(7)), "b": KeyedPartition("k2-new", lambda: _mask(5))})
    assert read_volume(folder / "a.nii.gz", role="label").data.max() == 1
    assert (folder / "a.nii.gz").stat().st_ino == inode  # the same file, linked, not rewritten
    assert read_volume(folder / "b.nii.gz", role="label").data.max() == 5
    assert (folder / KEYS_FILE).is_file()
    (folder / "a.nii.gz").unlink()  # a partition that is gone is made again, whatever its key
    _dataset(folder).save({"a": KeyedPartition("k1", lambda: _mask(7)), "b": KeyedPartition("k2-new", lambda: _mask(5))})
    assert read_volume(folder / "a.nii.gz", role="label").data.max() == 7


def test_a_bad_scheduler_stops_the_run_before_any_work(tmp_path: Path):
    project = make_project_copy(tmp_path / "project")
    with pytest.raises(ConfigurationError, match=r"Parameter 'compute'.*'local:0'.*local:N"):
        run_pipeline(project, "data", {"compute.scheduler": "local:0"})
    assert data_files_written(project) == []
    assert not (project / "mlflow.db").exists() or mlflow_runs(project)[1] == []


def test_an_unreachable_cluster_fails_the_run_saying_what_to_do(tmp_path: Path, monkeypatch):
    import socket

    monkeypatch.setattr(compute, "CONNECT_TIMEOUT_S", 1)  # a refused port is retried until then

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    project = make_project_copy(tmp_path / "project")
    params = {"data.synthetic.n_cases": 6, "data.synthetic.in_plane_size": 32, "data.synthetic.n_slices_range": [8, 10]}
    with pytest.raises(ConfigurationError, match=rf"tcp://127.0.0.1:{port}: no Dask scheduler answers.*dask scheduler"):
        run_pipeline(project, "data", {**params, "compute.scheduler": f"tcp://127.0.0.1:{port}"})
    assert data_files_written(project) == []
    _, runs = mlflow_runs(project)
    assert runs[0].info.status == "FAILED"


def _worker_has_tensorflow() -> bool:
    import sys

    return "tensorflow" in sys.modules or "keras" in sys.modules


def test_predictions_map_back_on_workers_while_the_network_stays_here(tmp_path: Path, local2):
    import keras
    import nibabel as nib
    from functools import partial

    from medseg.inference import Segmenter, SegmenterPlan
    from medseg.inference.scans import Scan, segmented_scan, write_predictions

    inputs = keras.Input((None, None, 1))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid")
    segmenter = Segmenter(keras.Model(inputs, layer(inputs)), SegmenterPlan(
        model_key="unet", display_name="UNet", window="slice", target_spacing=(1.5, 1.5, 2.5), interpolation_order=1,
        clip_percentiles=None, crop_margin=None, channel=None, label_mode="binary", classes={"1": "lesion"},
        lateralized=[], threshold=0.5, depth=2, patch_size=None, overlap=0.0, sigma_scale=0.125,
        features_per_voxel=10.0, memory_gb=0.01,
    ))
    layer.set_weights([np.full((1, 1, 1, 1), 10.0, np.float32), np.zeros(1, np.float32)])  # foreground: above the mean
    scans = []
    for index in range(4):
        data = np.random.default_rng(index).normal(100, 20, size=(20, 18, 7 + index)).astype(np.float32)
        affine = np.diag([1.1, 0.9, 2.0, 1.0])
        nib.save(nib.Nifti1Image(data, affine), tmp_path / f"s{index}.nii.gz")
        scans.append(Scan(f"s{index}", str(tmp_path / f"s{index}.nii.gz")))

    def segment(scan):
        def network():
            return segmenter.network_part(segmenter.read_scan(scan.path))

        worker = partial(segmented_scan, finish=segmenter.finisher(), classes=segmenter.plan.classes, extra={})
        return DriverThenWorker(network, worker)

    here = write_predictions(scans, segment, tmp_path / "sync")
    there = write_predictions(scans, segment, tmp_path / "dask", mapper=local2.map)
    assert here.equals(there) and here["volume_ml"].gt(0).all()
    for scan in scans:
        mask = nib.load(tmp_path / "dask" / f"{scan.case_id}.nii.gz")
        assert mask.shape == nib.load(scan.path).shape  # the scan's own grid, not the resampled one
        assert (tmp_path / "sync" / f"{scan.case_id}.nii.gz").read_bytes() == (tmp_path / "dask" / f"{scan.case_id}.nii.gz").read_bytes()
        assert segmenter.segment(segmenter.read_scan(scan.path)).data.tolist() == np.asarray(mask.dataobj).tolist()
    assert set(local2.client.run(_worker_has_tensorflow).values()) == {False}


def _dies_on_fold_one(fold):
    if fold == 1:
        os._exit(1)  # as a worker killed mid-fold (out of memory, kill -9) ends
    return fold


def test_a_worker_that_dies_mid_fold_fails_the_run_naming_the_fold():
    import dask

    from medseg.runs.compute import ComputeError

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        with compute.using_scheduler("local:2") as executor:
            with pytest.raises(ComputeError, match=r"cross-validation: the Dask worker died while working on case\(s\) fold 1"):
                executor.map(_dies_on_fold_one, [0, 1], task="unet: cross-validation", case_ids=["fold 0", "fold 1"])
