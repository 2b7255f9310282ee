"""Training: the loop with early stopping, crash recovery keyed by a fingerprint of what the
run computes, seeds and determinism, and the timing of a training step.

The precision a model trains in is `medseg.models.precision`; whole-volume inference of a 2D
model is `medseg.inference.slices`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medseg.models.deep_supervision import PlainHistoryKeys

logger = logging.getLogger(__name__)
# The lines a default `kedro run` prints (conf/logging.yml): a line per stage and per epoch.
STAGES = logging.getLogger("medseg.stages")

BACKUP_METADATA = "training_metadata.json"  # written by keras.callbacks.BackupAndRestore
BACKUP_OWNER = "owner.json"


def training_fingerprint(**parts: Any) -> str:
    """A short hash of everything that decides what a training run computes.

    Args:
        parts: JSON-serialisable values (parameters, the split, the preprocessing plan); keys
            are sorted, so the order of arguments and of dict keys does not matter.

    Returns:
        16 hex characters (64 bits of SHA-256).
    """
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ResumeState:
    """Where a run keeps its crash-recovery backup, and what it found there.

    Attributes:
        backup_dir: `<backup_root>/<fingerprint>`; `BackupAndRestore` writes each finished
            epoch there and deletes the folder when training ends.
        resumed_epoch: the epochs already done by an interrupted run with the same
            fingerprint (0: a fresh start).
        previous_owner: what the interrupted run recorded about itself (e.g. its MLflow run
            id), or {}.
        discarded: fingerprints of backups made with other parameters or data, deleted.
    """

    backup_dir: Path
    resumed_epoch: int = 0
    previous_owner: dict = field(default_factory=dict)
    discarded: list[str] = field(default_factory=list)


FINISHED_DIR = "finished"  # a kept network: <backup_root>/<fingerprint>/finished/
FINISHED_WEIGHTS = "model.weights.h5"
FINISHED_RECORD = "training.json"


def load_finished(backup_root: str | Path, fingerprint: str, model: keras.Model) -> dict | None:
    """A network kept by `keep_finished` with this fingerprint, loaded into `model` (built as
    the run would build it); None when there is none.

    Returns:
        {"history": the Keras history, "report": what training recorded (the budget guard)}.
    """
    finished = Path(backup_root) / fingerprint / FINISHED_DIR
    try:
        record = json.loads((finished / FINISHED_RECORD).read_text())
        model.load_weights(finished / FINISHED_WEIGHTS)
    except (OSError, ValueError, KeyError) as error:
        if finished.exists():
            logger.warning("%s: a kept network that cannot be read (%s); training it again.", finished, error)
            shutil.rmtree(finished, ignore_errors=True)
        return None
    return record


def keep_finished(backup_root: str | Path, fingerprint: str, model: keras.Model, history: Mapping[str, Any],
                  report: Mapping[str, Any]) -> Path:
    """Keep a network that finished training under its fingerprint, so that a rerun of the
    same computation (a cascade resumed after a later node failed) loads it and trains nothing.
    Written to a temporary folder first and renamed: it is there whole or not at all."""
    folder = Path(backup_root) / fingerprint
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{FINISHED_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_weights(tmp / FINISHED_WEIGHTS)
    history_json = {k: [float(v) for v in values] for k, values in history.items()}
    (tmp / FINISHED_RECORD).write_text(json.dumps({"history": history_json, "report": dict(report)}, default=str))
    shutil.rmtree(folder / FINISHED_DIR, ignore_errors=True)
    tmp.rename(folder / FINISHED_DIR)
    return folder / FINISHED_DIR


def _finished_epochs(backup_dir: Path) -> int:
    try:
        return int(json.loads((backup_dir / BACKUP_METADATA).read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def prepare_backup(backup_root: str | Path, fingerprint: str, epochs: int, owner: Mapping[str, Any]) -> ResumeState:
    """Choose the backup of this run: resume only a backup with the same fingerprint.

    Backups made with another fingerprint (other parameters, split or preprocessing plan) are
    deleted, never resumed. A backup that already holds `epochs` or more epochs (a run killed
    between its last epoch and the clean-up) is deleted too: resuming it would train nothing.

    Args:
        backup_root: the model's backup folder (the catalog's `<model>.backup`).
        fingerprint: `training_fingerprint(...)` of this run.
        epochs: the epochs this run asks for.
        owner: recorded in the backup (`owner.json`) so that a later run that resumes it
            can tell which run it continues; the previous owner is returned.

    Returns:
        The :class:`ResumeState`.
    """
    root = Path(backup_root)
    root.mkdir(parents=True, exist_ok=True)
    state = ResumeState(root / fingerprint)
    for child in sorted(root.iterdir()):
        if child.name != fingerprint:
            shutil.rmtree(child) if child.is_dir() else child.unlink()
            state.discarded.append(child.name)
    done = _finished_epochs(state.backup_dir)
    if done >= int(epochs):
        shutil.rmtree(state.backup_dir, ignore_errors=True)
        done = 0
    if done:
        try:
            state.previous_owner = json.loads((state.backup_dir / BACKUP_OWNER).read_text())
        except (OSError, ValueError):
            state.previous_owner = {}
    elif state.backup_dir.exists():
        shutil.rmtree(state.backup_dir)  # weights without a finished epoch: nothing to resume
    state.resumed_epoch = done
    state.backup_dir.mkdir(parents=True, exist_ok=True)
    (state.backup_dir / BACKUP_OWNER).write_text(json.dumps(dict(owner)))
    return state


def derive_seed(*seeds: int) -> int:
    """One 31-bit seed from several (e.g. `data.seed` and a model's seed), order-sensitive."""
    return int(np.random.SeedSequence([int(s) for s in seeds]).generate_state(1)[0] % (2**31 - 1))


def wants_determinism(setting: bool | str) -> bool:
    """`training.deterministic`: true, false, or "auto" (on when TensorFlow sees no GPU).

    On CPU, deterministic ops cost little; on GPU some kernels (e.g. cuDNN convolutions'
    fastest algorithms) are non-deterministic, and the deterministic ones are slower.
    """
    if isinstance(setting, str):
        if setting.lower() != "auto":
            raise ValueError(f"training.deterministic must be true, false or 'auto', got '{setting}'.")
        import tensorflow as tf

        return not tf.config.list_physical_devices("GPU")
    return bool(setting)


def seconds_per_training_step(
    model: keras.Model, batch_size: int, steps: int = 3, seed: int = 0, data: tuple[np.ndarray, np.ndarray] | None = None
) -> float:
    """Time of one training step of a compiled model on this machine: the median of `steps`
    steps on random inputs of the model's shape, after one step that traces the graph.

    The time of a step does not depend on the values, so random inputs and all-background
    labels measure what the real batches will cost (the input pipeline runs ahead of it).

    The steps run through `model.fit`, as training runs them, so a model built under a
    `tf.distribute` strategy (`medseg.models.distribute`) is timed as it will train: one step
    of all replicas together, each on its share of `batch_size` and with the gradient
    all-reduce. (`train_on_batch` would hand every replica the whole batch.)

    Args:
        model: a compiled model, built in the strategy's scope if it will train under one.
        batch_size: samples per step, the global batch (per replica × replicas).
        steps: timed steps, after the traced one.
        seed: of the random inputs.
        data: (x, y) of `batch_size` samples to step on instead (the precision check's batch).

    Returns:
        Seconds per step.
    """
    import tensorflow as tf

    if data is None:
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(int(batch_size), *model.input_shape[1:])).astype(np.float32)
        out_shape = model.output_shape
        y = np.zeros((int(batch_size), 1) if len(out_shape) == 2 else (int(batch_size), *out_shape[1:-1], 1), np.float32)
    else:
        x, y = data
    ends: list[float] = []

    class StepClock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # Keras hands a batch-end callback the step's logs as Python numbers, so the step
            # has finished when this runs: the clock does not stop early.
            ends.append(time.perf_counter())

    model.fit(
        tf.data.Dataset.from_tensors((x, y)).repeat(), epochs=1, steps_per_epoch=1 + int(steps),
        callbacks=[StepClock()], shuffle=False, verbose=0,
    )
    return float(np.median(np.diff(ends)))  # the first end closes the traced step: not counted


@contextmanager
def seeded_initializers(seed: int) -> Iterator[None]:
    """While the block builds a model, Keras draws each initializer's seed from a private
    `random.Random(seed)`, not from Python's global generator.

    Keras gives an initializer without a seed one from the module-level `random.randint`. In a
    process where other threads use that generator too (a Dask worker's event loop, heartbeats
    and retries), numbers are taken between `keras.utils.set_random_seed` and the layers'
    creation, so the same seed built other weights in each worker than in one process. With a
    private generator a fold built on a Dask worker starts from the weights it starts from here
    (tests/pipelines/test_cross_validation.py). Keras reads the generator through the module
    attribute `keras.src.random.seed_generator.python_random`; the block swaps it and puts the
    original back, whatever happens.
    """
    from keras.src.random import seed_generator

    original = seed_generator.python_random
    seed_generator.python_random = random.Random(int(seed))
    try:
        yield
    finally:
        seed_generator.python_random = original


def make_reproducible(seed: int, deterministic: bool) -> None:
    """Seed Python's `random`, NumPy and Keras/TensorFlow, and turn on TF op determinism.

    With determinism on, two runs with the same seed, data and parameters give bit-identical
    weights on the same machine and TensorFlow build (a test checks it). TF cannot turn op
    determinism off again in the same process.
    """
    keras.utils.set_random_seed(int(seed))
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()


# A run ends within this share over its budget (the planner's timed step may be too fast: a
# busy machine, another process on the cores).
BUDGET_SLACK = 0.10


class TrainingBudget(keras.callbacks.Callback):
    """Ends training early when its steps run slower than the planner timed them, so that it
    ends within `BUDGET_SLACK` of its budget.

    The first epoch is re-timed: the median of its training steps (the first two, which trace
    the graph, left out) against the planned step. From that speed it computes how many epochs
    fit the budget plus the slack; when fewer than planned, the log says so and training stops
    after them. What it measured and decided is in `report` once training ends.

    Args:
        model_key: the model kind's name, for the log.
        budget_seconds: the training time of all `epochs` (`planning.budget_minutes`).
        epochs: the planned epochs; `steps_per_epoch`, `validation_steps` as planned.
        planned_seconds_per_step: the timed step (with the input pipeline's overhead).
    """

    def __init__(self, model_key: str, budget_seconds: float, epochs: int, steps_per_epoch: int, validation_steps: int,
                 planned_seconds_per_step: float):
        super().__init__()
        self.model_key, self.budget, self.epochs = model_key, float(budget_seconds), int(epochs)
        self.steps, self.validation_steps = int(steps_per_epoch), int(validation_steps)
        self.planned = float(planned_seconds_per_step)
        self.report: dict[str, Any] = {}
        self._first: int | None = None
        self._began = 0.0
        self._durations: list[float] = []
        self._stop_after: int | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._first is None:
            self._first = int(epoch)
            self.budget *= max(1, self.epochs - self._first) / max(1, self.epochs)  # a resumed run: what is left

    def on_train_batch_begin(self, batch, logs=None):
        if not self.report:
            self._began = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if not self.report:
            self._durations.append(time.perf_counter() - self._began)

    def on_epoch_end(self, epoch, logs=None):
        if not self.report:
            timed = self._durations[2:] or self._durations
            measured = float(np.median(timed)) if timed else self.planned
            # A validation step costs about a third of a training step (no backward pass).
            epoch_seconds = measured * (self.steps + self.validation_steps / 3.0)
            left = self.epochs - self._first
            fits = max(1, int(self.budget * (1 + BUDGET_SLACK) // epoch_seconds))
            self.report = {"measured_seconds_per_step": round(measured, 5), "planned_seconds_per_step": round(self.planned, 5),
                           "slower_than_timed": round(measured / self.planned, 3)}
            if fits < left:
                self._stop_after = self._first + fits
                self.report.update({"stopped_after_epoch": self._stop_after, "planned_epochs": self.epochs})
                STAGES.info(
                    "%s: re-timed in the first epoch, a step takes %.3f s, %.2fx the %.3f s the plan timed (a busy machine?): "
                    "%d of the %d epochs fit the %.2f-minute budget; training stops after epoch %d.",
                    self.model_key, measured, measured / self.planned, self.planned, fits, left, self.budget / 60, self._stop_after,
                )
        if self._stop_after is not None and int(epoch) + 1 >= self._stop_after:
            self.model.stop_training = True


# Up to this many steps in all (training and validation, every epoch), on samples of at most
# EAGER_MAX_VOXELS, `fit` runs eagerly: on 2 CPU cores the tiny U-Net of the tests traced its
# steps in about 8 s and ran 4 of them in under 1 s eagerly. A real training (hundreds of steps)
# and a short one on real sizes (a memory benchmark on CT slices) run as graphs.
EAGER_MAX_STEPS = 16
EAGER_MAX_VOXELS = 32**3


class EpochLines(keras.callbacks.Callback):
    """Log lines on the `medseg.stages` logger (what a default `kedro run` shows): an epoch, its
    losses and validation Dice, and its time; at most `MAX_LINES` per training (every k-th epoch
    and the last), so a long training keeps the console short."""

    MAX_LINES = 8

    def __init__(self, epochs: int):
        super().__init__()
        self._epochs = epochs
        self._every = max(1, math.ceil(epochs / self.MAX_LINES))
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self._started = time.monotonic()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if (epoch + 1) % self._every and epoch + 1 != self._epochs:
            return
        logs = logs or {}
        shown = [f"{name} {float(logs[name]):.3f}" for name in ("loss", "val_loss", "val_dice") if name in logs]
        STAGES.info("          epoch %d/%d  %s  (%.0f s)", epoch + 1, self._epochs, "  ".join(shown),
                    time.monotonic() - self._started)


def fit_model(
    model: keras.Model,
    train_data,
    val_data,
    *,
    epochs: int,
    steps_per_epoch: int,
    validation_steps: int,
    backup_dir: str | Path,
    patience: int,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, list[float]]:
    """Train with early stopping (best weights restored) and crash recovery.

    Args:
        model: a compiled model, or the training graph of one with deep supervision
            (`medseg.models.deep_supervision`), whose history keeps the network's own keys.
        train_data, val_data: endless `tf.data` datasets of (image, label) batches (labels
            per output for a training graph).
        epochs: maximum epochs; `steps_per_epoch` and `validation_steps` batches each.
        backup_dir: `BackupAndRestore` keeps the last finished epoch (weights, optimizer
            state, epoch number) there while training runs and deletes it at the end, so a
            killed run resumes from its last finished epoch. Use `prepare_backup` to choose
            it: a backup is only valid for the parameters and data that wrote it.
        patience: epochs without a lower validation loss before stopping. The weights of
            the best epoch are restored at the end, whether training stopped early or not.
            After a resume, "best" is among the epochs of the resumed run.
        callbacks: extra callbacks (e.g. per-epoch metric logging).

    Returns:
        The Keras history as plain floats: {"loss": [...], "val_loss": [...], ...}, one value
        per epoch trained by this call (a resumed run starts at its resumed epoch).

    A training of at most `EAGER_MAX_STEPS` steps (training and validation, all epochs) on
    samples of at most `EAGER_MAX_VOXELS` runs eagerly: tracing the training and validation
    steps into graphs costs seconds, more than a few eager steps of a small network.
    """
    total = int(epochs) * (int(steps_per_epoch) + int(validation_steps))
    voxels = int(np.prod([int(n or 0) for n in model.input_shape[1:-1]]))
    if total <= EAGER_MAX_STEPS and 0 < voxels <= EAGER_MAX_VOXELS:
        model.run_eagerly = True
    history = model.fit(
        train_data,
        validation_data=val_data,
        epochs=int(epochs),
        steps_per_epoch=int(steps_per_epoch),
        validation_steps=int(validation_steps),
        callbacks=[
            # A training graph with deep supervision has several outputs: its epoch logs are
            # given the network's own keys before any other callback reads them.
            *([PlainHistoryKeys()] if len(model.outputs) > 1 else []),
            keras.callbacks.BackupAndRestore(str(backup_dir)),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(patience), restore_best_weights=True),
            EpochLines(int(epochs)),
            *callbacks,
        ],
        # The streams are shuffled by their own bounded queues; Keras' default shuffle=True
        # means nothing for a tf.data input and only warns.
        shuffle=False,
        verbose=0,  # one line per epoch comes from EpochLines, through logging
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}
