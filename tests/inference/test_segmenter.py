"""The segmenter on hand-made networks: geometry of the masks, the plan on disk, classes."""

import json
from pathlib import Path

import keras
import nibabel as nib
import numpy as np
import pytest

from conftest import slice_plan
from medseg.errors import ConfigurationError, CorruptFileError, DatasetNotFoundError
from medseg.imaging.io import Volume
from medseg.inference import Segmenter, SegmenterPlan


def _plan(**overrides) -> SegmenterPlan:
    return slice_plan(**overrides)


def _above_mean_slices(channels: int = 1) -> keras.Model:
    """A 2D 'network' whose foreground is every voxel above the case's mean: sigmoid(10 z)."""
    inputs = keras.Input((None, None, 1))
    layer = keras.layers.Conv2D(channels, 1, activation="sigmoid" if channels == 1 else "softmax")
    model = keras.Model(inputs, layer(inputs))
    if channels == 1:
        layer.set_weights([np.full((1, 1, 1, 1), 10.0, np.float32), np.zeros(1, np.float32)])
    else:  # background, class a (z > 0.5), class b (z < -0.5)
        layer.set_weights([np.array([[[[0.0, 10.0, -10.0]]]], np.float32), np.array([0.0, -5.0, -5.0], np.float32)])
    return model


def _scan(shape=(12, 10, 6), affine=None, seed=0) -> Volume:
    data = np.round(np.random.default_rng(seed).normal(100, 20, size=shape)).astype(np.float32)  # int16-exact
    return Volume(data, np.diag([1.0, 1.0, 2.0, 1.0]) if affine is None else affine)


def test_the_mask_is_the_hand_computed_one_on_the_scan_grid():
    scan = _scan()  # RAS, already at the target spacing: preprocessing is the z-score alone
    mask = Segmenter(_above_mean_slices(), _plan()).segment(scan)
    z = (scan.data - scan.data.mean(dtype=np.float64)) / scan.data.std(dtype=np.float64)
    assert mask.data.dtype == np.uint8 and mask.data.shape == scan.data.shape
    np.testing.assert_array_equal(mask.affine, scan.affine)
    np.testing.assert_array_equal(mask.data, (z >= 0).astype(np.uint8))


def test_a_reoriented_or_channel_axis_scan_gives_the_same_mask_in_its_own_order(tmp_path: Path):
    segmenter = Segmenter(_above_mean_slices(), _plan())
    scan = _scan()
    reference = segmenter.segment(scan).data
    # The same scan stored LPS-like with x and y swapped: data transposed and flipped, affine to match.
    data = np.flip(np.transpose(scan.data, (1, 0, 2)), axis=(0,))
    affine = scan.affine @ np.array([[0, 1, 0, 0], [-1, 0, 0, 9], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    path = tmp_path / "lps_0000.nii.gz"
    nib.save(nib.Nifti1Image(data[..., None].astype(np.int16), affine), path)  # (X, Y, Z, 1), int16
    mask = segmenter.segment(segmenter.read_scan(path))
    assert mask.data.shape == data.shape
    np.testing.assert_allclose(mask.affine, affine)
    expected = np.flip(np.transpose(reference, (1, 0, 2)), axis=(0,))
    np.testing.assert_array_equal(mask.data, expected)


def test_an_anisotropic_scan_goes_through_the_training_grid_and_back():
    scan = _scan(shape=(15, 9, 7), affine=np.diag([0.6, 1.3, 3.1, 1.0]))
    mask = Segmenter(_above_mean_slices(), _plan()).segment(scan)
    assert mask.data.shape == (15, 9, 7)
    np.testing.assert_array_equal(mask.affine, scan.affine)
    assert 0.2 < mask.data.mean() < 0.8


def test_multiclass_masks_hold_the_dataset_values_and_volumes_are_per_class():
    plan = _plan(label_mode="multiclass", classes={"2": "bright", "5": "dark"})
    segmenter = Segmenter(_above_mean_slices(channels=3), plan)
    scan = _scan()
    mask = segmenter.segment(scan)
    assert set(np.unique(mask.data)) == {0, 2, 5}
    z = (scan.data - scan.data.mean(dtype=np.float64)) / scan.data.std(dtype=np.float64)
    assert np.all(mask.data[z > 1.0] == 2) and np.all(mask.data[z < -1.0] == 5)
    volumes = segmenter.volumes_ml(mask)
    voxel_ml = 2.0 / 1000.0
    assert volumes["volume_ml"] == pytest.approx(np.count_nonzero(mask.data) * voxel_ml)
    assert volumes["volume_ml_bright"] == pytest.approx(np.count_nonzero(mask.data == 2) * voxel_ml)
    assert volumes["volume_ml_dark"] == pytest.approx(np.count_nonzero(mask.data == 5) * voxel_ml)


def test_patch_models_use_sliding_windows_and_their_masks_match_the_slice_result():
    inputs = keras.Input((8, 8, 4, 1))
    layer = keras.layers.Conv3D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.full((1, 1, 1, 1, 1), 10.0, np.float32), np.zeros(1, np.float32)])
    scan = _scan()
    patch = Segmenter(model, _plan(model_key="conv3d", window="patch", depth=0, patch_size=(8, 8, 4), overlap=0.5)).segment(scan)
    slices = Segmenter(_above_mean_slices(), _plan()).segment(scan)
    np.testing.assert_array_equal(patch.data, slices.data)  # a 1x1 network: windows change nothing


def test_mirror_axes_skip_left_right_for_lateralized_classes_and_z_for_slices():
    assert Segmenter(None, _plan(mirror_axes=[0, 1, 2])).effective_mirror_axes() == (0, 1)
    assert Segmenter(None, _plan(mirror_axes=[0, 1, 2], lateralized=[2])).effective_mirror_axes() == (1,)
    patches = _plan(window="patch", patch_size=(8, 8, 4), mirror_axes=[0, 1, 2])
    assert Segmenter(None, patches).effective_mirror_axes() == (0, 1, 2)
    assert Segmenter(None, patches).effective_mirror_axes([2]) == (2,)


class _WholeVolume:
    """A window strategy of a model kind's own: the whole volume through the network at once."""

    name = "whole_volume"
    takes_context = False

    def predictor(self, model):
        return lambda volume: np.asarray(model.predict_on_batch(volume[None, ..., None]))[0, ..., 0]

    def predict(self, predict_batch, image, plan, budget_gb, log_batch):
        log_batch(1, "volumes", image.shape)
        return predict_batch(image)

    def mirror_axes(self, axes):
        return tuple(axes)


def test_a_kind_registers_its_own_window_and_an_unknown_one_is_refused(monkeypatch):
    from medseg.inference import windows

    monkeypatch.setattr(windows, "_WINDOWS", dict(windows._WINDOWS))
    with pytest.raises(ConfigurationError, match="window 'whole_volume' is not one this process knows"):
        Segmenter(None, _plan(window="whole_volume", depth=0))
    windows.register_window(_WholeVolume())
    inputs = keras.Input((None, None, None, 1))
    layer = keras.layers.Conv3D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.full((1, 1, 1, 1, 1), 10.0, np.float32), np.zeros(1, np.float32)])
    scan = _scan()
    whole = Segmenter(model, _plan(window="whole_volume", depth=0, mirror_axes=[2])).segment(scan)
    slices = Segmenter(_above_mean_slices(), _plan()).segment(scan)
    np.testing.assert_array_equal(whole.data, slices.data)  # the same 1x1 network, another way to cover the volume
    assert Segmenter(model, _plan(window="whole_volume", mirror_axes=[0, 2])).effective_mirror_axes() == (0, 2)


def test_variants_report_each_enabled_option():
    segmenter = Segmenter(_above_mean_slices(), _plan(mirror_axes=[0], keep_largest_component=True))
    image = np.random.default_rng(1).normal(size=(8, 8, 3)).astype(np.float32)
    from medseg.imaging.geometry import plan_case_geometry

    geometry = plan_case_geometry(image.shape, np.diag([1.0, 1.0, 2.0, 1.0]), (1.0, 1.0, 2.0))
    variants = segmenter.variants(image, geometry)
    assert list(variants) == ["plain", "mirroring", "largest_component", "mirroring+largest_component"]
    np.testing.assert_array_equal(variants["plain"], (image >= 0).astype(np.uint8))  # 1x1: mirroring changes nothing
    np.testing.assert_array_equal(variants["mirroring+largest_component"], segmenter.segment_preprocessed(image, geometry))
    assert variants["largest_component"].sum() <= variants["plain"].sum()


def test_save_and_load_give_the_same_masks(tmp_path: Path):
    segmenter = Segmenter(_above_mean_slices(), _plan(provenance={"mlflow_run_id": "abc"}))
    segmenter.save(tmp_path / "segmenter")
    assert sorted(p.name for p in (tmp_path / "segmenter").iterdir()) == ["model.keras", "segmenter.json"]
    assert json.loads((tmp_path / "segmenter" / "segmenter.json").read_text())["provenance"] == {"mlflow_run_id": "abc"}
    loaded = Segmenter.load(tmp_path / "segmenter")
    scan = _scan(seed=3)
    np.testing.assert_array_equal(loaded.segment(scan).data, segmenter.segment(scan).data)
    assert loaded.plan.to_dict() == segmenter.plan.to_dict()
    segmenter.save(tmp_path / "segmenter")  # replaced in place, nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["segmenter"]


def test_a_folder_loaded_again_shares_its_network_until_a_new_one_is_saved(tmp_path: Path):
    """Each load has its own plan; the network is read once while its file is unchanged, and a
    segmenter saved again in the same folder (a new training) is read anew."""
    Segmenter(_above_mean_slices(), _plan()).save(tmp_path / "segmenter")
    first, second = Segmenter.load(tmp_path / "segmenter"), Segmenter.load(tmp_path / "segmenter")
    assert first.model is second.model and first.plan is not second.plan
    first.plan.mirror_axes = [0]
    assert second.plan.mirror_axes != [0]

    inverted = _above_mean_slices()
    inverted.layers[-1].set_weights([np.full((1, 1, 1, 1), -10.0, np.float32), np.zeros(1, np.float32)])
    Segmenter(inverted, _plan()).save(tmp_path / "segmenter")
    third = Segmenter.load(tmp_path / "segmenter")
    assert third.model is not first.model
    scan = _scan(seed=4)
    np.testing.assert_array_equal(third.segment(scan).data, 1 - first.segment(scan).data)


def test_a_missing_or_broken_segmenter_names_the_file(tmp_path: Path):
    with pytest.raises(DatasetNotFoundError, match=r"segmenter\.json.*Train one first"):
        Segmenter.load(tmp_path / "nothing")
    Segmenter(_above_mean_slices(), _plan()).save(tmp_path / "s")
    (tmp_path / "s" / "segmenter.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"s/segmenter\.json"):
        Segmenter.load(tmp_path / "s")
    (tmp_path / "s" / "segmenter.json").write_text(json.dumps({**_plan().to_dict(), "format_version": 99}))
    with pytest.raises(ConfigurationError, match="format 99"):
        Segmenter.load(tmp_path / "s")
    (tmp_path / "s" / "segmenter.json").write_text(json.dumps(_plan().to_dict()))
    (tmp_path / "s" / "model.keras").write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match=r"model\.keras"):
        Segmenter.load(tmp_path / "s")


def _patch_model(channels_in: int, weights: list[float], bias: float = 0.0) -> keras.Model:
    inputs = keras.Input((8, 8, 4, channels_in))
    layer = keras.layers.Conv3D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.array(weights, np.float32).reshape(1, 1, 1, channels_in, 1), np.full(1, bias, np.float32)])
    return model


def _cascade(mirror_axes=()) -> tuple[Segmenter, Segmenter]:
    """A two-stage segmenter of 1x1 networks: the stage says sigmoid(10 z) at half the
    resolution; the full network ignores the image and passes the stage's probability on."""
    patch = dict(model_key="conv3d", window="patch", depth=0, patch_size=(8, 8, 4), overlap=0.5)
    stage = Segmenter(_patch_model(1, [10.0]), _plan(**patch, target_spacing=(2.0, 2.0, 4.0)))
    full = Segmenter(_patch_model(2, [0.0, 40.0], bias=-20.0), _plan(**patch, mirror_axes=list(mirror_axes)), context=[stage])
    return full, stage


def test_a_cascade_computes_its_context_once_however_many_flips(monkeypatch):
    full, stage = _cascade(mirror_axes=[0, 1, 2])
    calls = []
    original = stage.predict_volume
    monkeypatch.setattr(stage, "predict_volume", lambda image: calls.append(image.shape) or original(image))
    image = np.random.default_rng(2).normal(size=(16, 12, 8)).astype(np.float32)
    mirrored = full.probabilities(image)
    assert calls == [(8, 6, 4)]  # once, at the stage's (half) resolution, not once per flip (8)
    plain = full.probabilities(image, mirror_axes=[])
    # A 1x1 network on a flipped input flipped back is the same map: mirroring changes nothing.
    np.testing.assert_allclose(mirrored, plain, atol=1e-5)
    # The full network passes the stage's probability through: sigmoid(40 (p - 0.5)) > 0.5 iff p > 0.5.
    from medseg.inference.cascade import context_channels

    context = context_channels([stage], image, full.plan.target_spacing)[..., 0]
    np.testing.assert_array_equal(plain > 0.5, context > 0.5)


def test_a_cascade_segmenter_saves_its_stages_and_refuses_a_missing_one(tmp_path: Path):
    import shutil

    full, _ = _cascade()
    assert full.plan.context_stages == 1
    full.save(tmp_path / "segmenter")
    assert json.loads((tmp_path / "segmenter/segmenter.json").read_text())["context_stages"] == 1
    (tmp_path / "segmenter/context/notes").mkdir()  # not a stage: ignored
    loaded = Segmenter.load(tmp_path / "segmenter")
    scan = _scan(shape=(16, 12, 8), seed=5)
    assert len(loaded.context) == 1
    np.testing.assert_array_equal(loaded.segment(scan).data, full.segment(scan).data)
    shutil.rmtree(tmp_path / "segmenter/context/0")
    with pytest.raises(CorruptFileError, match=r"1 low-resolution stage.*\['0'\].*holds \[\]"):
        Segmenter.load(tmp_path / "segmenter")
