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
        ("sgd_nesterov", keras.optimizers.SGD, "SGDNesterov"),
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
    with pytest.raises(ConfigurationError, match="'adam', 'adamw', 'sgd', 'sgd_nesterov', 'rmsprop'"):
        make_optimizer("adagrad", 1e-3)
    with pytest.raises(ConfigurationError):
        optimizer_display_name("adagrad")


def test_sgd_nesterov_is_nnunets_sgd_and_plain_sgd_keeps_no_momentum():
    nesterov, plain = make_optimizer("sgd_nesterov", 0.01), make_optimizer("sgd", 0.01)
    assert nesterov.momentum == pytest.approx(0.99) and nesterov.nesterov is True
    assert plain.momentum == 0.0 and plain.nesterov is False


def test_the_poly_schedule_decays_to_zero_over_the_training_steps_as_nnunets():
    optimizer = make_optimizer("sgd_nesterov", 0.01, "poly", total_steps=100)
    schedule = optimizer.learning_rate if callable(optimizer.learning_rate) else optimizer._learning_rate
    for step, expected in [(0, 0.01), (50, 0.01 * 0.5 ** 0.9), (90, 0.01 * 0.1 ** 0.9), (100, 0.0), (150, 0.0)]:
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-9), step
    # Without the steps (a model built to time its steps, before they are planned): constant.
    assert float(make_optimizer("adam", 0.01, "poly", total_steps=None).learning_rate) == pytest.approx(0.01)
    assert float(make_optimizer("adam", 0.01, "constant", total_steps=100).learning_rate) == pytest.approx(0.01)
    with pytest.raises(ConfigurationError, match="lr_schedule.*constant, poly"):
        make_optimizer("adam", 0.01, "cosine", total_steps=100)


def test_a_poly_model_steps_down_its_rate_and_reloads_with_its_schedule(tiny_data, tmp_path):
    images, labels = tiny_data
    keras.utils.set_random_seed(0)
    model = compile_segmentation_model(build_unet2d((16, 16, 1), base_filters=4, depth=2), "sgd_nesterov", 0.01,
                                       lr_schedule="poly", total_steps=10)
    model.run_eagerly = True
    model.fit(images, labels, batch_size=2, epochs=2, verbose=0)  # 4 of the 10 steps
    assert int(model.optimizer.iterations) == 4
    assert float(model.optimizer.learning_rate) == pytest.approx(0.01 * 0.6 ** 0.9, rel=1e-5)
    model.save(tmp_path / "poly.keras")
    reloaded = keras.models.load_model(tmp_path / "poly.keras", safe_mode=True)
    assert int(reloaded.optimizer.iterations) == 4  # a resumed training goes on down the same curve
    assert float(reloaded.optimizer.learning_rate) == pytest.approx(0.01 * 0.6 ** 0.9, rel=1e-5)


def test_the_kinds_build_their_schedule_over_the_planned_steps():
    from medseg.kinds.plans import TrainingSettings
    from medseg.kinds.unet import build_unet

    training = {"optimizer": "sgd_nesterov", "learning_rate": 0.01, "loss": "bce+dice", "lr_schedule": "poly",
                "epochs": 3, "steps_per_epoch": 5}
    assert TrainingSettings(training).total_steps == 15
    assert TrainingSettings({**training, "epochs": "auto"}).total_steps is None
    assert TrainingSettings({k: v for k, v in training.items() if k != "lr_schedule"}).lr_schedule == "constant"
    model = build_unet({"model": {"input_size": 16, "base_filters": 4, "depth": 2}, "training": training}, 1)
    schedule = model.optimizer._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.PolynomialDecay) and schedule.decay_steps == 15


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
