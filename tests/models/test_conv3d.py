"""3D U-Net and Conv3D patch classifier: shapes, one training step, validation."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.models import (
    build_patch_classifier,
    build_unet3d,
    compile_patch_classifier,
    compile_segmentation_model,
)


@pytest.fixture
def patches() -> tuple[np.ndarray, np.ndarray]:
    """Two 16³ single-channel patches with a bright cube as foreground (uint8 labels)."""
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
    labels = np.zeros((2, 16, 16, 16, 1), dtype=np.uint8)
    labels[0, 4:10, 4:10, 4:10] = 1
    images[labels == 1] += 3.0
    return images, labels


def test_default_shapes_build():
    assert tuple(build_unet3d().output_shape) == (None, 32, 32, 32, 1)
    assert tuple(build_patch_classifier().output_shape) == (None, 1)


def test_unet3d_output_matches_input_and_one_step_trains(patches):
    images, labels = patches
    model = compile_segmentation_model(build_unet3d((16, 16, 16, 1), base_filters=4, depth=2))
    model.run_eagerly = True  # one step costs less than tracing it into a graph
    assert tuple(model.output_shape) == (None, 16, 16, 16, 1)
    logs = model.train_on_batch(images, labels, return_dict=True)
    assert set(logs) == {"loss", "dice", "iou"}
    assert all(np.isfinite(v) for v in logs.values())
    assert model.predict(images, verbose=0).shape == images.shape


def test_patch_classifier_is_the_small_conv3d_block_and_one_step_trains(patches):
    images, labels = patches
    model = compile_patch_classifier(build_patch_classifier((16, 16, 16, 1)), "sgd", 1e-2)
    model.run_eagerly = True
    kinds = [type(layer).__name__ for layer in model.layers[1:]]
    assert kinds == ["Conv3D", "MaxPooling3D", "Conv3D", "MaxPooling3D", "Flatten", "Dense"]
    assert [model.layers[i].filters for i in (1, 3)] == [16, 32]
    # 16 → conv 14 → pool 7 → conv 5 → pool 2: 2³·32 features.
    assert tuple(model.get_layer("flatten").output.shape) == (None, 256)
    targets = labels.reshape(len(labels), -1).max(axis=1, keepdims=True).astype(np.float32)
    logs = model.train_on_batch(images, targets, return_dict=True)
    assert set(logs) == {"loss", "accuracy", "auc"}
    assert np.isfinite(logs["loss"])


def test_patch_not_divisible_by_two_to_the_depth_names_the_parameter():
    with pytest.raises(ConfigurationError, match=r"conv3d\.sampling\.patch_size"):
        build_unet3d((18, 18, 18, 1), depth=2)
    with pytest.raises(ConfigurationError, match=r"conv3d\.sampling\.patch_size"):
        build_unet3d((16, 16, 1))  # a 2D shape


def test_patch_too_small_for_the_classifier_names_the_parameter():
    with pytest.raises(ConfigurationError, match=r"conv3d\.sampling\.patch_size"):
        build_patch_classifier((8, 8, 8, 1))
