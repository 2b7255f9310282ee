"""Training on several devices (`training.distribute: mirrored`, `medseg.models.distribute`).

The machine of the tests has no GPU, so the replicas are two logical CPU devices. TensorFlow
splits a CPU into logical devices only before it initializes its devices, which the pytest
process has usually done already; the training that needs them runs in a child process
(`train_on_two_cpus`), once for the module, and the tests assert on what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.errors import ConfigurationError
from medseg.models.distribute import distribution_strategy, global_batch_size, strategy_name

TESTS = Path(__file__).resolve().parents[1]

# The child's first lines: split the CPU before anything initializes TensorFlow's devices.
CHILD = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path[:0] = [sys.argv[2], sys.argv[3]]
import test_distribute

test_distribute.train_on_two_cpus(sys.argv[1], sys.argv[4])
"""


def train_on_two_cpus(out: str, prepared: str) -> None:
    """In the child process, with two logical CPU devices: the learning task of
    `test_learning.unet2d_dice` mirrored over both (test_learning's own test trains it on one
    device, to the same target), then the tiny `unet` pipeline with
    `unet.training.distribute=mirrored` in a copy of the `prepared` project (its data layers
    made). Writes `<out>/result.json`."""
    import tensorflow as tf

    from conftest import TINY_UNET, copy_project, mlflow_runs, run_pipeline
    from test_learning import SEED, unet2d_dice

    result: dict = {"cpu_devices": len(tf.config.list_logical_devices("CPU"))}
    mirrored = distribution_strategy("mirrored")
    result["mirrored_replicas"] = int(mirrored.num_replicas_in_sync)
    # The same task: the same global batch of 4 (2 per replica), epochs and learning rate.
    result["mirrored"] = unet2d_dice(SEED, strategy=mirrored)

    project = copy_project(Path(prepared), Path(out) / "project")
    run_pipeline(project, "unet", {**TINY_UNET, "unet.training.distribute": "mirrored"})
    import mlflow

    _, runs = mlflow_runs(project)
    run = runs[0]
    logged = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list"
    )
    result["project"] = str(project)
    result["run"] = {"status": run.info.status, "params": run.data.params, "metrics": run.data.metrics,
                     "logged_models": sorted(model.name for model in logged)}
    (Path(out) / "result.json").write_text(json.dumps(result))


@pytest.fixture(scope="module")
def two_cpu_run(tmp_path_factory, prepared_data) -> dict:
    out = tmp_path_factory.mktemp("two_cpus")
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), str(TESTS), str(TESTS / "models"), str(prepared_data)],
        capture_output=True, text=True, timeout=600,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def test_the_global_batch_is_the_per_replica_batch_times_the_replicas():
    assert global_batch_size(4, 1) == 4
    assert global_batch_size(4, 2) == 8
    assert global_batch_size(3, 8) == 24
    with pytest.raises(ConfigurationError, match="must be >= 1"):
        global_batch_size(0, 2)


def test_none_is_the_default_strategy_and_anything_else_is_refused():
    import tensorflow as tf

    strategy = distribution_strategy("none")
    assert strategy is tf.distribute.get_strategy() and strategy.num_replicas_in_sync == 1
    assert strategy_name(strategy) == "none"
    with pytest.raises(ConfigurationError, match=r"training.distribute must be one of \['none', 'mirrored'\]"):
        distribution_strategy("multiworker")


class TwoReplicas:
    """Stands in for a strategy with two replicas in a process that has one device."""

    num_replicas_in_sync = 2

    def scope(self):
        return contextlib.nullcontext()


def test_train_model_streams_the_global_batch_and_builds_in_the_scope(tmp_path: Path, monkeypatch):
    """`train_model` hands both streams per-replica batch × replicas, and builds the model
    inside the strategy's scope, whatever the pipeline."""
    import keras
    import tensorflow as tf

    from medseg.imaging.geometry import PreprocessingPlan
    from medseg.pipelines import training as modeling

    built_in, batches = [], []
    strategy = TwoReplicas()
    scopes = []

    def scope():
        scopes.append("entered")
        return contextlib.nullcontext()

    strategy.scope = scope
    monkeypatch.setattr(modeling, "distribution_strategy", lambda setting: strategy)

    def build() -> keras.Model:
        built_in.append(len(scopes))
        inputs = keras.Input((8, 8, 1))
        model = keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs))
        model.compile(optimizer="adam", loss="binary_crossentropy")
        return model

    def make_stream(case_ids, seed, augment, flip_axes, *, batch_size):
        batches.append(batch_size)
        return tf.data.Dataset.from_tensors((np.zeros((batch_size, 8, 8, 1), np.float32),) * 2).repeat()

    splits = pd.DataFrame({"case_id": ["a", "b"], "split": ["train", "val"]})
    training = {"batch_size": 3, "epochs": 1, "steps_per_epoch": 1, "validation_steps": 1, "augment": False,
                "early_stopping_patience": 1, "deterministic": False, "flip_axes": [0, 1], "precision": "float32",
                "distribute": "mirrored"}
    section = {"seed": 1, "model": {}, "training": training}
    model, history, decided = modeling.train_model(
        "unet", build, make_stream, splits, PreprocessingPlan({}), {}, {"seed": 0}, section, str(tmp_path / "backup")
    )
    assert batches == [6, 6]  # training and validation streams: 3 per replica × 2 replicas
    assert built_in == [1]  # built after the scope was entered
    assert len(history["loss"]) == 1
    assert decided["unet.training.global_batch_size"] == 6 and decided["unet.training.replicas"] == 2


def test_mirrored_training_learns_what_one_device_learns(two_cpu_run: dict):
    from test_learning import TARGET

    assert two_cpu_run["cpu_devices"] == 2
    assert two_cpu_run["mirrored_replicas"] == 2
    for name in ("mirrored",):  # one device: test_learning.test_unet2d_overfits_a_tiny_set
        before, after = two_cpu_run[name]
        assert before < 0.5, f"{name}: untrained 2D U-Net already scores Dice {before:.3f}"
        assert after >= TARGET, f"{name}: 2D U-Net reached Dice {after:.3f} (untrained {before:.3f})"


def test_a_mirrored_pipeline_run_logs_its_strategy_and_replicas(two_cpu_run: dict):
    run = two_cpu_run["run"]
    assert run["status"] == "FINISHED"
    params = run["params"]
    assert params["unet.training.distribute"] == "mirrored"
    assert params["unet.training.distribute_strategy"] == "MirroredStrategy"
    assert params["unet.training.replicas"] == "2"
    assert params["unet.training.batch_size"] == "4"  # per replica, as given
    assert params["unet.training.global_batch_size"] == "8"
    assert "test_dice_mean" in run["metrics"] and "val_loss" in run["metrics"]


def test_a_model_trained_under_the_strategy_is_saved_plain_and_logged(two_cpu_run: dict):
    """In this one-device process, without a strategy: the saved `.keras` and the segmenter
    load and compute the same probabilities; the run logged both MLflow models (exported
    from the saved `.keras`, as in a one-device run)."""
    import keras

    from medseg.inference import Segmenter

    project = Path(two_cpu_run["project"])
    model = keras.models.load_model(project / "data" / "06_models" / "unet" / "model.keras")
    segmenter = Segmenter.load(project / "data" / "06_models" / "unet" / "segmenter")
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(segmenter.model(x, training=False)), np.asarray(model(x, training=False)), atol=1e-6)
    assert two_cpu_run["run"]["logged_models"] == ["unet_model", "unet_segmenter"]
