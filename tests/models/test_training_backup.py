"""Crash-recovery backups: resumed only with the same fingerprint; seeds; determinism switch."""

import json

import keras
import numpy as np
import pytest

from medseg.models.training import derive_seed, prepare_backup, training_fingerprint, wants_determinism


def _fake_backup(root, fingerprint, epoch, owner):
    folder = root / fingerprint
    folder.mkdir(parents=True)
    (folder / "training_metadata.json").write_text(json.dumps({"epoch": epoch}))
    (folder / "owner.json").write_text(json.dumps(owner))


def test_fingerprint_changes_with_any_part_and_ignores_key_order():
    base = training_fingerprint(section={"lr": 0.001, "epochs": 6}, splits=[{"case_id": "a", "split": "train"}])
    assert base == training_fingerprint(splits=[{"split": "train", "case_id": "a"}], section={"epochs": 6, "lr": 0.001})
    assert base != training_fingerprint(section={"lr": 0.002, "epochs": 6}, splits=[{"case_id": "a", "split": "train"}])
    assert base != training_fingerprint(section={"lr": 0.001, "epochs": 6}, splits=[{"case_id": "a", "split": "val"}])


def test_a_matching_backup_is_resumed_with_its_owner(tmp_path):
    _fake_backup(tmp_path, "abc", 3, {"mlflow_run_id": "dead"})
    state = prepare_backup(tmp_path, "abc", epochs=6, owner={"mlflow_run_id": "new"})
    assert (state.resumed_epoch, state.previous_owner, state.discarded) == (3, {"mlflow_run_id": "dead"}, [])
    assert json.loads((tmp_path / "abc" / "owner.json").read_text()) == {"mlflow_run_id": "new"}
    assert (tmp_path / "abc" / "training_metadata.json").exists()


def test_a_backup_of_other_parameters_is_deleted_not_resumed(tmp_path):
    _fake_backup(tmp_path, "old", 4, {"mlflow_run_id": "dead"})
    state = prepare_backup(tmp_path, "new", epochs=6, owner={})
    assert (state.resumed_epoch, state.discarded, state.previous_owner) == (0, ["old"], {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    assert not (tmp_path / "new" / "training_metadata.json").exists()


def test_a_backup_with_every_epoch_done_is_not_resumed(tmp_path):
    # Killed after its last epoch but before Keras deleted the backup: resuming trains nothing.
    _fake_backup(tmp_path, "abc", 6, {})
    state = prepare_backup(tmp_path, "abc", epochs=6, owner={})
    assert state.resumed_epoch == 0
    assert not (tmp_path / "abc" / "training_metadata.json").exists()


def test_derived_seeds_are_stable_and_distinct():
    assert derive_seed(42, 7) == derive_seed(42, 7)
    assert len({derive_seed(42, 7), derive_seed(42, 11), derive_seed(43, 7), derive_seed(7, 42)}) == 4
    assert 0 <= derive_seed(2**40, 3) < 2**31


def test_determinism_setting():
    assert wants_determinism(True) is True and wants_determinism(False) is False
    assert wants_determinism("auto") is True  # no GPU on the test machines
    with pytest.raises(ValueError, match="true, false or 'auto'"):
        wants_determinism("sometimes")
    assert np.isscalar(derive_seed(1))


def _dense() -> keras.Model:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return model


def test_a_kept_network_loads_whole_and_a_broken_one_is_trained_again(tmp_path):
    from medseg.models.training import keep_finished, load_finished

    trained = _dense()
    trained.set_weights([np.arange(6, dtype=np.float32).reshape(3, 2), np.array([1.0, -1.0], np.float32)])
    assert load_finished(tmp_path, "fp1", _dense()) is None  # nothing kept yet
    folder = keep_finished(tmp_path, "fp1", trained, {"loss": [0.5, 0.25]}, {"epochs_planned": 8, "epochs_run": 6})
    assert folder == tmp_path / "fp1" / "finished" and not (tmp_path / "fp1" / ".finished.tmp").exists()
    fresh = _dense()
    record = load_finished(tmp_path, "fp1", fresh)
    assert record == {"history": {"loss": [0.5, 0.25]}, "report": {"epochs_planned": 8, "epochs_run": 6}}
    for got, want in zip(fresh.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert load_finished(tmp_path, "other", _dense()) is None  # another fingerprint: not this network
    # A truncated weights file: not loaded, deleted, so the run trains the network again.
    weights = folder / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:100])
    assert load_finished(tmp_path, "fp1", _dense()) is None and not folder.exists()


@pytest.mark.parametrize(("shape", "steps", "eager"), [((8, 8), 3, True), ((8, 8), 20, False), ((40, 40, 24), 1, False)])
def test_a_short_training_on_small_samples_runs_eagerly_and_the_others_as_graphs(tmp_path, shape, steps, eager):
    import tensorflow as tf

    from medseg.models.training import EAGER_MAX_STEPS, EAGER_MAX_VOXELS, fit_model

    conv = keras.layers.Conv2D if len(shape) == 2 else keras.layers.Conv3D
    inputs = keras.Input((*shape, 1))
    model = keras.Model(inputs, conv(1, 1, activation="sigmoid")(inputs))
    model.compile("sgd", "binary_crossentropy")
    data = tf.data.Dataset.from_tensors((np.zeros((1, *shape, 1), np.float32), np.zeros((1, *shape, 1), np.float32))).repeat()
    fit_model(model, data, data, epochs=1, steps_per_epoch=steps, validation_steps=1, backup_dir=tmp_path / "b", patience=1)
    assert model.run_eagerly is eager
    assert (steps + 1 <= EAGER_MAX_STEPS and int(np.prod(shape)) <= EAGER_MAX_VOXELS) == eager
