"""The scans that benchmarks/ct_memory.py writes: CT-sized, int16 HU, an MSD folder medseg reads.

The benchmark itself runs two pipelines for minutes and is not a test; this checks only what it
feeds them, on a few slices.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def ct_memory():
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling `_targets`
    try:
        spec = importlib.util.spec_from_file_location("medseg_benchmark_ct_memory", BENCHMARKS / "ct_memory.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_scans_are_ct_sized_int16_with_one_organ(ct_memory, tmp_path):
    import nibabel as nib

    from medseg.imaging.io import read_volume, voxel_spacing
    from medseg.cases.msd import list_msd_cases

    root = tmp_path / "Task00_CT"
    ct_memory.write_ct_dataset(root, n_cases=2, n_slices=8)
    cases = list_msd_cases(root)
    assert [case.case_id for case in cases] == ["ct_000", "ct_001"]
    for case in cases:
        on_disk = nib.load(case.image_path)
        assert on_disk.shape == (512, 512, 8) and on_disk.get_data_dtype() == np.int16
        image = read_volume(case.image_path)
        label = read_volume(case.label_path, role="label")
        assert voxel_spacing(image.affine) == pytest.approx((0.8, 0.8, 2.5))
        assert image.data.min() == pytest.approx(-1024, abs=80)  # air, with noise
        organ = label.data == 1
        assert set(np.unique(label.data)) == {0, 1} and 0.01 < organ.mean() < 0.2
        assert 30 < np.median(image.data[organ]) < 90  # soft-tissue HU
    first, second = (read_volume(case.label_path, role="label").data for case in cases)
    assert not np.array_equal(first, second)  # each scan its own organ


def test_the_peak_is_attributed_to_the_node_running_then(ct_memory):
    import time

    log = "\n".join(
        [
            "[11/25/26 16:44:18] INFO     Running node: export_model: export_model([unet.model]) -> [unet.weights]",
            "[11/25/26 16:44:21] INFO     Running node: predict_unet: predict_unet([unet.model]) -> [unet.predictions]",
            "[11/25/26 16:46:07] INFO     Predicting: case 1 of 2 (ct_000)",
            "                    INFO     Running node: evaluate_predictions: evaluate_predictions([unet.predictions])",
        ]
    )
    at = lambda stamp: time.mktime(time.strptime(stamp, "%m/%d/%y %H:%M:%S"))  # noqa: E731
    assert ct_memory.node_at(log, at("11/25/26 16:44:19")) == "export_model"
    assert ct_memory.node_at(log, at("11/25/26 16:45:00")) == "predict_unet"
    assert ct_memory.node_at(log, at("11/25/26 16:46:07")) == "evaluate_predictions"
    assert ct_memory.node_at(log, at("11/25/26 16:40:00")) == "(before the first node)"


def test_each_node_gets_its_rss_at_start_and_its_peak(ct_memory):
    import time

    log = "\n".join(
        [
            "[11/25/26 16:44:18] INFO     Running node: predict_split: predict_split([unet.segmenter])",
            "[11/25/26 16:44:30] INFO     Running node: evaluate_predictions: evaluate_predictions([unet.predictions])",
        ]
    )
    at = lambda stamp: time.mktime(time.strptime(stamp, "%m/%d/%y %H:%M:%S"))  # noqa: E731
    mib = 2**20
    samples = [(at("11/25/26 16:44:10"), 300 * mib), (at("11/25/26 16:44:19"), 1000 * mib), (at("11/25/26 16:44:25"), 1800 * mib),
               (at("11/25/26 16:44:31"), 1500 * mib), (at("11/25/26 16:44:40"), 2100 * mib), (at("11/25/26 16:44:50"), 1200 * mib)]
    peaks = ct_memory.node_peaks(log, samples)
    assert list(peaks) == ["(before the first node)", "predict_split", "evaluate_predictions"]
    assert peaks["predict_split"] == (1000.0, 1800.0)
    assert peaks["evaluate_predictions"] == (1500.0, 2100.0)
