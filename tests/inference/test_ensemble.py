"""The ensemble segmenter: probabilities averaged on the scan's own grid."""

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.imaging.io import Volume
from medseg.inference import Segmenter, SegmenterPlan
from medseg.inference.ensemble import Ensemble, load_segmenter


def _segmenter(weight: float, bias: float, spacing=(1.5, 1.5, 2.5), classes=None) -> Segmenter:
    """A 1x1 sigmoid 'network': probability = sigmoid(weight * z-scored image + bias)."""
    import keras

    inputs = keras.Input((None, None, 1))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.full((1, 1, 1, 1), weight, np.float32), np.full(1, bias, np.float32)])
    return Segmenter(model, SegmenterPlan(
        model_key="unet", display_name="UNet", window="slice", target_spacing=spacing, interpolation_order=1,
        clip_percentiles=None, crop_margin=None, channel=None, label_mode="binary", classes=classes or {"1": "lesion"},
        lateralized=[], threshold=0.5, depth=2, patch_size=None, overlap=0.0, sigma_scale=0.125,
        features_per_voxel=10.0, memory_gb=0.05,
    ))


@pytest.fixture(scope="module")
def scan() -> Volume:
    data = np.random.default_rng(0).normal(100, 20, size=(20, 18, 9)).astype(np.float32)
    return Volume(data, np.diag([1.1, 0.9, 2.0, 1.0]))


def test_one_member_gives_its_own_segmenters_mask(scan):
    member = _segmenter(10.0, 0.0)
    expected = member.segment(scan).data
    assert expected.any() and not expected.all()
    assert np.array_equal(Ensemble([member], "one").segment(scan).data, expected)


def test_members_on_other_grids_are_averaged_on_the_scans_grid(scan):
    fine, coarse = _segmenter(10.0, 0.0), _segmenter(-10.0, 0.0, spacing=(2.2, 1.8, 4.0))
    ensemble = Ensemble([fine, coarse], "two")
    mean = (fine.source_probabilities(scan) + coarse.source_probabilities(scan)) / 2
    assert mean.shape == scan.data.shape
    mask = ensemble.segment(scan)
    assert mask.data.shape == scan.data.shape and np.allclose(mask.affine, scan.affine)
    assert np.array_equal(mask.data, (mean >= 0.5).astype(np.uint8))
    # Opposite members: the mean differs from either one's own mask.
    assert not np.array_equal(mask.data, fine.segment(scan).data)


def test_the_largest_component_is_kept_for_the_chosen_classes_only(scan):
    member = _segmenter(10.0, 0.0)
    plain = Ensemble([member], "plain").segment(scan).data
    filtered = Ensemble([member], "lcc", largest_component=[1]).segment(scan).data
    from scipy import ndimage

    labelled, n = ndimage.label(plain, structure=np.ones((3, 3, 3)))
    assert n > 1
    sizes = np.bincount(labelled.ravel())[1:]
    assert filtered.sum() == sizes.max()


def test_an_ensemble_folder_loads_as_an_ensemble_that_segments_the_same(tmp_path, scan):
    ensemble = Ensemble([_segmenter(10.0, 0.0), _segmenter(5.0, -1.0)], "saved", largest_component=[1])
    ensemble.save(tmp_path / "champion")
    loaded = load_segmenter(tmp_path / "champion")
    assert isinstance(loaded, Ensemble) and loaded.name == "saved" and loaded.largest_component == (1,)
    assert np.array_equal(loaded.segment(scan).data, ensemble.segment(scan).data)


def test_members_with_other_classes_are_refused():
    with pytest.raises(ConfigurationError, match="only models of the same dataset"):
        Ensemble([_segmenter(1.0, 0.0), _segmenter(1.0, 0.0, classes={"1": "liver"})], "mixed")


def test_a_calibrated_ensemble_keeps_its_masks_moves_its_probabilities_and_says_its_qc(tmp_path, scan):
    from medseg.inference.qc import QualityReference, scan_features
    from medseg.inference.temperature import apply_temperature

    members = [_segmenter(1.0, 0.3), _segmenter(0.5, -0.2)]
    plain = Ensemble(members, "plain")
    features = scan_features(scan.data, scan.affine)
    reference = QualityReference.from_training([features], [{"1": 100.0}]).calibrated([])
    calibrated = Ensemble(members, "calibrated", threshold=0.6, temperature=2.0, qc=reference.to_dict())
    raw = plain.source_probabilities(scan)
    # The mean is calibrated, the threshold moves with it: the masks stay those of 0.6 on the raw mean.
    np.testing.assert_allclose(calibrated.source_probabilities(scan), apply_temperature(raw, 2.0, True), atol=1e-6)
    assert np.array_equal(calibrated.segment(scan).data, (raw >= 0.6).astype(np.uint8))
    row = calibrated.quality(scan, calibrated.source_probabilities(scan))
    assert set(row) >= {"qc_score", "qc_flags", "qc_implausible_size"} and plain.quality(scan, raw) == {}
    # The volume is far from the 100 ml of the one training case: an implausible size.
    assert "implausible_size" in row["qc_flags"]
    calibrated.save(tmp_path / "champion")
    loaded = load_segmenter(tmp_path / "champion")
    assert (loaded.temperature, loaded.qc) == (2.0, calibrated.qc)
    assert np.array_equal(loaded.segment(scan).data, calibrated.segment(scan).data)
