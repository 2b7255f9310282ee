"""The onnxruntime engine: the ONNX export, its parity with TensorFlow, and the refusals."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import slice_plan
from medseg.errors import ConfigurationError
from medseg.imaging.io import Volume
from medseg.inference import Segmenter, SegmenterPlan
from medseg.inference.engines import (
    BORDER_SHARE,
    FAILED,
    MASK_AGREEMENT_DICE,
    OFF,
    ONNXRUNTIME,
    PASSED,
    TENSORFLOW,
    TOLERANCE,
    ParityRecord,
    mask_agreement,
    parity_status,
)
from medseg.inference.parity import export_with_parity
from medseg.models.conv3d import build_unet3d
from medseg.models.unet import with_input_shape
from medseg.models.unet2d import build_unet2d

REPO_SRC = Path(__file__).resolve().parents[2] / "src"


def _plan(**overrides) -> SegmenterPlan:
    return slice_plan(**{**dict(overlap=0.5, features_per_voxel=50.0, memory_gb=2.0), **overrides})


def _unet2d(classes: int = 1) -> keras.Model:
    keras.utils.set_random_seed(0)
    return with_input_shape(build_unet2d((32, 32, 1), base_filters=4, depth=2, n_classes=classes), (None, None, 1))


def _scan(shape=(30, 22, 7), seed=0) -> Volume:
    data = np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)
    return Volume(data, np.diag([1.0, 1.0, 2.0, 1.0]))


def _images(*scans: Volume, segmenter: Segmenter) -> dict:
    return {f"case_{i}": (lambda s=scan: segmenter.preprocess(s)[0]) for i, scan in enumerate(scans)}


def test_mask_agreement_is_the_hand_computed_dice_per_class():
    a = np.zeros((4, 4, 1), np.uint8)
    b = a.copy()
    a[:2, :2] = 1  # 4 voxels
    b[:2, :1] = 1  # 2 of them
    a[3, 3] = b[3, 3] = 2  # class 2 equal
    agreement = mask_agreement(a, b, (1, 2, 3))  # class 3 empty in both: 1
    assert agreement == {"equal": False, "dice": pytest.approx(2 * 2 / 6), "differing_voxels": 2, "border_only": True,
                         "border_share": pytest.approx(2 / 9), "agree": False}  # on the border, but 2 of its 9 voxels
    assert mask_agreement(a, a, (1, 2))["equal"] and mask_agreement(a, a, (1, 2))["agree"]


def _blob() -> np.ndarray:
    """A 12x12x12 cube of class 1 in a 20^3 volume: 1,728 voxels, the size of a phantom's lesion."""
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[4:16, 4:16, 4:16] = 1
    return mask


def test_rounding_at_the_border_agrees_where_moved_or_shifted_voxels_do_not():
    reference = _blob()
    border = reference.copy()
    border[4, 4:9, 4] = 0  # five voxels of the surface flip, as rounding at the threshold does
    agreement = mask_agreement(reference, border, (1,))
    assert agreement["dice"] < MASK_AGREEMENT_DICE and agreement["border_only"] and agreement["agree"]

    inside = reference.copy()
    inside[10, 10, 10] = 0  # one voxel deep inside: Dice alone still passes
    agreement = mask_agreement(reference, inside, (1,))
    assert agreement["dice"] > MASK_AGREEMENT_DICE and not agreement["border_only"] and agreement["agree"]
    inside[9:12, 9:12, 9] = 0  # ten inside: below 0.999, and not on the border
    assert not mask_agreement(reference, inside, (1,))["agree"]

    away = reference.copy()
    away[0, 0, 0] = away[19, 19, 19] = away[0, 19, 0] = 1  # voxels far from the structure
    assert not mask_agreement(reference, away, (1,))["border_only"]

    shifted = np.roll(reference, 1, axis=0)  # a one-voxel shift: every difference on the border, but 288 of its 3,096
    agreement = mask_agreement(reference, shifted, (1,))
    assert agreement["border_only"] and agreement["border_share"] > BORDER_SHARE and not agreement["agree"]

    small = np.zeros((9, 9, 9), np.uint8)
    small[3:6, 3:6, 3:6] = 1  # 27 voxels: one border flip costs 0.019 Dice, and is rounding all the same
    flipped = small.copy()
    flipped[3, 3, 3] = 0
    agreement = mask_agreement(small, flipped, (1,))
    assert agreement["dice"] < 0.99 and agreement["agree"]


def test_parity_fails_naming_each_case_outside_the_tolerance():
    cases = {"a": {"equal": True, "dice": 1.0}, "b": {"equal": False, "dice": MASK_AGREEMENT_DICE + 1e-4},
             "c": {"equal": False, "dice": 0.98, "border_only": True, "border_share": 0.05},
             "d": {"equal": False, "dice": 0.98, "border_only": True, "border_share": 0.01}}
    status, reason = parity_status(cases)
    assert (status, reason) == (FAILED, f"1 case(s) outside the tolerance ({TOLERANCE}) against TensorFlow's masks "
                                        "(c; lowest Dice 0.9800)")
    assert parity_status({k: v for k, v in cases.items() if k != "c"}) == (PASSED, "")


@pytest.mark.parametrize("classes", [1, 2])
def test_a_2d_unet_on_onnxruntime_gives_tensorflows_masks_saved_and_loaded(tmp_path: Path, classes: int):
    plan = _plan() if classes == 1 else _plan(label_mode="multiclass", classes={"3": "a", "7": "b"})
    segmenter = Segmenter(_unet2d(classes), plan)
    scans = [_scan(seed=1), _scan((17, 41, 5), seed=2)]  # sizes not a multiple of 2**depth: padded slices
    record = export_with_parity(segmenter, _images(*scans, segmenter=segmenter))
    assert record.status == PASSED and set(record.cases) == {"case_0", "case_1"}
    assert record.tensorflow_precision == "float32" and record.versions["onnxruntime"]
    assert segmenter.engine == TENSORFLOW  # left as it was
    expected = [segmenter.segment(scan).data for scan in scans]

    segmenter.save(tmp_path / "segmenter")
    assert {"model.onnx", "onnx.json", "model.keras"} <= {p.name for p in (tmp_path / "segmenter").iterdir()}
    assert json.loads((tmp_path / "segmenter" / "onnx.json").read_text())["status"] == PASSED
    loaded = Segmenter.load(tmp_path / "segmenter", ONNXRUNTIME)
    assert loaded.model is None and loaded.engine == ONNXRUNTIME
    for scan, mask in zip(scans, expected):
        got = loaded.segment(scan).data
        assert mask_agreement(mask, got, plan.class_values)["agree"]
    with pytest.raises(ConfigurationError, match="onnxruntime only"):
        loaded.save(tmp_path / "again")


def test_a_3d_unet_over_patches_on_onnxruntime_gives_the_same_masks():
    keras.utils.set_random_seed(0)
    network = build_unet3d((16, 16, 8, 1), base_filters=4, depth=2)
    segmenter = Segmenter(network, _plan(model_key="conv3d", window="patch", depth=0, patch_size=(16, 16, 8)))
    scan = _scan((26, 20, 11), seed=3)
    record = export_with_parity(segmenter, _images(scan, segmenter=segmenter))
    assert record.status == PASSED
    tensorflow = segmenter.segment(scan).data
    onnx = segmenter.use_engine(ONNXRUNTIME).segment(scan).data
    assert mask_agreement(tensorflow, onnx, (1,))["agree"]
    assert segmenter.use_engine(TENSORFLOW).engine == TENSORFLOW


def test_a_conversion_that_fails_is_recorded_and_refused_by_onnxruntime(tmp_path: Path, monkeypatch):
    import medseg.models.onnx_export as onnx_export

    def broken(model, slices):
        raise ValueError("unsupported op FancyConv")

    monkeypatch.setattr(onnx_export, "export_onnx", broken)
    segmenter = Segmenter(_unet2d(), _plan())
    record = export_with_parity(segmenter, _images(_scan(), segmenter=segmenter))
    assert record.status == FAILED and "FancyConv" in record.reason and record.metrics() == {"onnx_export_passed": 0.0}
    segmenter.save(tmp_path / "segmenter")
    assert not (tmp_path / "segmenter" / "model.onnx").exists()
    with pytest.raises(ConfigurationError, match=r"failed its parity check .*FancyConv.*tensorflow engine"):
        Segmenter.load(tmp_path / "segmenter", ONNXRUNTIME)


def test_an_export_whose_parity_failed_or_was_off_is_refused_with_the_reason(tmp_path: Path):
    segmenter = Segmenter(_unet2d(), _plan())
    export_with_parity(segmenter, _images(_scan(), segmenter=segmenter))
    segmenter.parity = ParityRecord(FAILED, "1 case(s) below Dice 0.999 against TensorFlow's masks (case_9; lowest 0.9712)")
    segmenter.save(tmp_path / "failed")
    with pytest.raises(ConfigurationError, match=r"parity check with TensorFlow \(1 case\(s\) below .*case_9.*predict.engine: tensorflow"):
        Segmenter.load(tmp_path / "failed", ONNXRUNTIME)
    with pytest.raises(ConfigurationError, match="parity check"):
        segmenter.use_engine(ONNXRUNTIME)
    segmenter.parity = ParityRecord(OFF, "unet.export.onnx is false")
    with pytest.raises(ConfigurationError, match="export.onnx: false"):
        segmenter.use_engine(ONNXRUNTIME)
    with pytest.raises(ConfigurationError, match="'jax' is not an engine"):
        segmenter.use_engine("jax")


# A served model on onnxruntime runs where TensorFlow is not installed: importing it fails here.
WITHOUT_TENSORFLOW = """
import importlib.abc, json, sys
import numpy as np

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx"):
            raise ImportError(f"{name} is not installed here")

sys.meta_path.insert(0, NoTensorFlow())
from medseg.imaging.io import Volume
from medseg.inference.ensemble import load_segmenter

scan = Volume(np.load(sys.argv[2]), np.diag([1.0, 1.0, 2.0, 1.0]))
mask = load_segmenter(sys.argv[1], "onnxruntime").segment(scan)
np.save(sys.argv[3], mask.data)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))))
"""


def test_the_onnxruntime_engine_segments_without_tensorflow(tmp_path: Path):
    segmenter = Segmenter(_unet2d(), _plan())
    scan = _scan(seed=5)
    export_with_parity(segmenter, _images(scan, segmenter=segmenter))
    segmenter.save(tmp_path / "segmenter")
    np.save(tmp_path / "scan.npy", scan.data)
    done = subprocess.run([sys.executable, "-c", WITHOUT_TENSORFLOW, str(tmp_path / "segmenter"), str(tmp_path / "scan.npy"),
                           str(tmp_path / "mask.npy")], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO_SRC), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    np.testing.assert_array_equal(np.load(tmp_path / "mask.npy"), segmenter.use_engine(ONNXRUNTIME).segment(scan).data)


def test_an_export_that_does_not_compute_the_network_is_caught_on_its_probe():
    from medseg.models.onnx_export import _check_probe, export_onnx

    exported = export_onnx(_unet2d(), slices=True)
    keras.utils.set_random_seed(1)  # another network of the same shape: other weights
    other = with_input_shape(build_unet2d((32, 32, 1), base_filters=4, depth=2), (None, None, 1))
    with pytest.raises(ValueError, match="differ from the network's"):
        _check_probe(exported, other, (1, 64, 64, 1))


def test_an_export_that_fails_to_run_is_recorded_not_raised(monkeypatch):
    import medseg.inference.engines as engines

    def broken(self, x):
        raise RuntimeError("Non-zero status code returned while running Conv node")

    monkeypatch.setattr(engines.OnnxNetwork, "predict_on_batch", broken)
    segmenter = Segmenter(_unet2d(), _plan())
    record = export_with_parity(segmenter, _images(_scan(), segmenter=segmenter))
    assert record.status == FAILED and "could not run the export" in record.reason and "Conv node" in record.reason
    assert segmenter.engine == TENSORFLOW and segmenter.onnx is None


def test_no_case_to_compare_is_no_proof(tmp_path: Path):
    segmenter = Segmenter(_unet2d(), _plan())
    record = export_with_parity(segmenter, {})
    assert record.status == FAILED and "no case to compare" in record.reason and segmenter.onnx is None
    with pytest.raises(ConfigurationError, match="no case to compare"):
        segmenter.use_engine(ONNXRUNTIME)


def test_a_segmenter_on_onnxruntime_copies_and_pickles(tmp_path: Path):
    """A Dask worker or a MemoryDataset copies a segmenter: its onnxruntime session does not pickle,
    so the copy opens its own, and segments as the original does."""
    import copy
    import pickle

    segmenter = Segmenter(_unet2d(), _plan())
    scan = _scan(seed=7)
    export_with_parity(segmenter, _images(scan, segmenter=segmenter))
    expected = segmenter.use_engine(ONNXRUNTIME).segment(scan).data
    for clone in (copy.deepcopy(segmenter), pickle.loads(pickle.dumps(segmenter))):
        assert clone.engine == ONNXRUNTIME
        np.testing.assert_array_equal(clone.segment(scan).data, expected)
