"""nnU-Net's deep supervision (medseg.models.deep_supervision): the weights, the heads and
strides of both U-Nets, the targets, the loss as the weighted sum, and a training graph whose
history keeps the network's own keys while the network stays one output."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from medseg.errors import ConfigurationError
from medseg.models import build_patch_classifier, build_unet3d, compile_patch_classifier, compile_segmentation_model
from medseg.models.deep_supervision import (
    plain_history_keys,
    supervision_targets,
    supervision_weights,
    with_deep_supervision,
)
from medseg.models.unet import build_unet


def test_nnunets_weights():
    assert supervision_weights(1) == [1.0]
    np.testing.assert_allclose(supervision_weights(3), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(supervision_weights(5), np.array([1, 0.5, 0.25, 0.125, 0]) / 1.875)


def test_the_history_keeps_the_networks_keys():
    logs = {"loss": 1.0, "mask_loss": 0.8, "ds1_loss": 0.5, "mask_dice": 0.7, "mask_dice_1": 0.6, "val_loss": 2.0,
            "val_mask_loss": 1.5, "val_ds1_loss": 1.2, "val_mask_dice": 0.4, "val_mask_iou": 0.3}
    assert plain_history_keys(logs) == {"loss": 1.0, "dice": 0.7, "dice_1": 0.6, "val_loss": 2.0, "val_dice": 0.4,
                                        "val_iou": 0.3}


def test_heads_and_strides_of_both_unets():
    two_d = compile_segmentation_model(build_unet((16, 16, 1), 4, 3, "u2"))
    supervised = with_deep_supervision(two_d)
    assert len(supervised.model.outputs) == 2  # the network's output and one head (the coarsest stage weighs 0)
    assert supervised.strides == ((1, 1), (2, 2)) and supervised.weights == pytest.approx((2 / 3, 1 / 3))
    assert supervised.model.outputs[1].shape[1:] == (8, 8, 1)
    # A 3D U-Net of depth 4 keeping its thick third axis at the first pooling: strides follow the pools.
    pools = [(2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    three_d = compile_segmentation_model(build_unet3d((16, 16, 8, 1), 2, 4, n_classes=2, pool_sizes=pools))
    supervised = with_deep_supervision(three_d)
    assert supervised.strides == ((1, 1, 1), (2, 2, 1), (4, 4, 2))
    assert supervised.weights == pytest.approx((8 / 14, 4 / 14, 2 / 14))  # 1, 1/2, 1/4 (1/8 of the coarsest set to 0)
    assert [tuple(o.shape[1:]) for o in supervised.model.outputs] == [(16, 16, 8, 3), (8, 8, 8, 3), (4, 4, 4, 3)]
    with pytest.raises(ConfigurationError, match="deep_supervision needs a U-Net"):
        with_deep_supervision(compile_patch_classifier(build_patch_classifier((12, 12, 12, 1))))


def test_the_targets_are_the_label_read_at_each_stride():
    label = tf.constant(np.arange(2 * 8 * 8 * 4).reshape(2, 8, 8, 4, 1) % 3, tf.float32)
    image, (full, half, quarter) = supervision_targets(((1, 1, 1), (2, 2, 1), (4, 4, 2)))(label, label)
    np.testing.assert_array_equal(full, label)
    np.testing.assert_array_equal(half, label.numpy()[:, ::2, ::2, :, :])
    np.testing.assert_array_equal(quarter, label.numpy()[:, ::4, ::4, ::2, :])


def test_the_loss_is_the_weighted_sum_and_the_network_trains_through_the_graph(tmp_path):
    from medseg.models.training import fit_model

    tf.keras.utils.set_random_seed(0)
    network = compile_segmentation_model(build_unet((16, 16, 1), 4, 3, "u"), learning_rate=0.01)
    supervised = with_deep_supervision(network)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
    y = (x > 0.3).astype(np.float32)
    targets = supervision_targets(supervised.strides)(x, y)[1]
    scores = supervised.model.evaluate(x, targets, verbose=0, return_dict=True)
    assert scores["loss"] == pytest.approx(2 / 3 * scores["mask_loss"] + 1 / 3 * scores["ds1_loss"], rel=1e-5)
    before = [w.copy() for w in network.get_weights()]
    head_before = supervised.model.get_layer("ds1").get_weights()[0].copy()
    data = tf.data.Dataset.from_tensors((x, y)).repeat().map(supervision_targets(supervised.strides))
    history = fit_model(supervised.model, data, data, epochs=2, steps_per_epoch=2, validation_steps=1,
                        backup_dir=tmp_path / "backup", patience=5)
    assert set(history) == {"loss", "dice", "iou", "val_loss", "val_dice", "val_iou"}
    assert any(not np.array_equal(a, b) for a, b in zip(before, network.get_weights()))  # the network itself trained
    assert not np.array_equal(head_before, supervised.model.get_layer("ds1").get_weights()[0])
    assert len(network.outputs) == 1 and network.output_shape == (None, 16, 16, 1)


def test_the_patch_classifier_refuses_it_up_front_and_the_settings_read_it():
    import yaml

    from medseg.kinds.conv3d import Conv3dParams
    from medseg.kinds.plans import TrainingSettings
    from conftest import REPO_ROOT

    section = yaml.safe_load((REPO_ROOT / "conf/base/parameters_conv3d.yml").read_text())["conv3d"]
    Conv3dParams(**section)  # the default
    refused = copy.deepcopy(section)
    refused["model"]["network"], refused["training"]["deep_supervision"] = "patch_classifier", True
    with pytest.raises(ValidationError, match="deep_supervision needs a U-Net"):
        Conv3dParams(**refused)
    assert TrainingSettings({"deep_supervision": True}).deep_supervision is True
    assert TrainingSettings({}).deep_supervision is False  # a section written before the parameter
