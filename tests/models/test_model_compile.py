"""Optimizers, compile settings, history keys and `.keras` save/reload."""

from __future__ import annotations

import json
import zipfile

import keras
import numpy as np
import pytest

from medseg.errors import ConfigurationError
from medseg.models import (
    bce_dice_loss,
    build_unet2d,
    compile_segmentation_model,
    dice_loss,
    make_optimizer,
    optimizer_display_name,
)


@pytest.mark.parametrize(
    ("name", "cls", "display"),
    [
        ("adam", keras.optimizers.Adam, "Adam"),
        ("AdamW", keras.optimizers.AdamW, "AdamW"),
        ("SGD", keras.optimizers.SGD, "SGD"),
        ("rmsprop", keras.optimizers.RMSprop, "RMSprop"),
    ],
)
def test_make_optimizer_and_display_name(name, cls, display):
    optimizer = make_optimizer(name, 0.01)
    assert type(optimizer) is cls
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    assert optimizer_display_name(name) == display


def test_make_optimizer_returns_a_fresh_instance():
    assert make_optimizer("adam", 1e-3) is not make_optimizer("adam", 1e-3)


def test_unknown_optimizer_lists_the_valid_names():
    with pytest.raises(ConfigurationError, match="'adam', 'adamw', 'sgd', 'rmsprop'"):
        make_optimizer("adagrad", 1e-3)
    with pytest.raises(ConfigurationError):
        optimizer_display_name("adagrad")


@pytest.mark.parametrize("learning_rate", [0, -1e-3, "fast", True])
def test_bad_learning_rate_is_rejected(learning_rate):
    with pytest.raises(ConfigurationError, match="learning_rate"):
        make_optimizer("adam", learning_rate)


@pytest.fixture
def tiny_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.random((4, 16, 16, 1), dtype=np.float32)
    return images, (images > 0.5).astype(np.uint8)


def _tiny_unet(loss: str = "bce+dice") -> keras.Model:
    """Run eagerly: a test's few steps cost less than tracing them into graphs (seconds)."""
    keras.utils.set_random_seed(0)
    model = compile_segmentation_model(build_unet2d((16, 16, 1), base_filters=4, depth=2), loss=loss)
    model.run_eagerly = True
    return model


def test_fit_history_keys_are_exactly_loss_dice_iou(tiny_data):
    images, labels = tiny_data
    history = _tiny_unet("dice").fit(
        images, labels, validation_data=(images, labels), epochs=1, batch_size=2, verbose=0
    )
    assert set(history.history) == {"loss", "dice", "iou", "val_loss", "val_dice", "val_iou"}
    # With the Dice loss, loss + dice == 1 on the same batches (validation: one pass, no update).
    assert history.history["val_loss"][0] + history.history["val_dice"][0] == pytest.approx(1.0, abs=1e-5)


def test_saved_model_reloads_in_safe_mode_with_custom_loss_and_metrics(tiny_data, tmp_path):
    images, labels = tiny_data
    model = _tiny_unet()
    model.train_on_batch(images, labels)  # move weights and BatchNorm statistics off init
    path = tmp_path / "unet2d.keras"
    model.save(path)

    compile_config = json.loads(zipfile.ZipFile(path).read("config.json"))["compile_config"]
    assert compile_config["loss"]["config"] == "medseg>bce_dice_loss"
    assert [m["config"] for m in compile_config["metrics"]] == ["medseg>dice", "medseg>iou"]

    reloaded = keras.models.load_model(path, safe_mode=True, compile=True)
    assert reloaded.loss is bce_dice_loss
    reloaded.run_eagerly = True
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), model.predict(images, verbose=0), rtol=1e-6, atol=1e-6
    )
    expected = model.evaluate(images, labels, verbose=0, return_dict=True)
    got = reloaded.evaluate(images, labels, verbose=0, return_dict=True)
    assert set(got) == {"loss", "dice", "iou"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5)


def test_compile_uses_the_named_loss():
    assert _tiny_unet("DICE").loss is dice_loss
