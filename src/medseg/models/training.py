"""Training: the loop with early stopping, crash recovery keyed by a fingerprint of what the
run computes, seeds and determinism, and the timing of a training step.

The precision a model trains in is `medseg.models.precision`; whole-volume inference of a 2D
model is `medseg.inference.slices`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

logger = logging.getLogger(__name__)

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


def seconds_per_training_step(model: keras.Model, batch_size: int, steps: int = 3, seed: int = 0) -> float:
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

    Returns:
        Seconds per step.
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(int(batch_size), *model.input_shape[1:])).astype(np.float32)
    out_shape = model.output_shape
    y = np.zeros((int(batch_size), 1) if len(out_shape) == 2 else (int(batch_size), *out_shape[1:-1], 1), np.float32)
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
    """Ends training early when the epochs run slower than the planner timed them, so that it
    ends within `BUDGET_SLACK` of its budget.

    After each epoch it measures the mean epoch so far (validation included) and stops when
    one more epoch would end past the budget plus the slack. The first epoch is re-timed
    against the plan: when it ran slower, the log says by how much and how many epochs will
    fit. What it decided is in `report` once training ends.

    Args:
        model_key: the model kind's name, for the log.
        budget_seconds: the training time of all `epochs` (`planning.budget_minutes`).
        epochs: the planned epochs.
        planned_epoch_seconds: one epoch as the plan expected it (timed step × steps), or None.
    """

    def __init__(self, model_key: str, budget_seconds: float, epochs: int, planned_epoch_seconds: float | None = None):
        super().__init__()
        self.model_key, self.budget, self.epochs = model_key, float(budget_seconds), int(epochs)
        self.planned_epoch = planned_epoch_seconds
        self.report: dict[str, Any] = {}
        self._start: float | None = None
        self._first = 0

    def on_epoch_begin(self, epoch, logs=None):
        if self._start is None:
            self._start, self._first = time.perf_counter(), int(epoch)
            # A resumed run has the budget of the epochs it has left.
            self.budget *= max(1, self.epochs - self._first) / max(1, self.epochs)

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self._start
        done = int(epoch) - self._first + 1
        per_epoch = elapsed / done
        left = self.epochs - int(epoch) - 1
        if done == 1 and self.planned_epoch:
            ratio = per_epoch / self.planned_epoch
            fits = max(1, int(self.budget * (1 + BUDGET_SLACK) // per_epoch))
            self.report = {"first_epoch_seconds": round(per_epoch, 2), "planned_epoch_seconds": round(self.planned_epoch, 2),
                           "slower_than_timed": round(ratio, 3)}
            if fits < self.epochs - self._first:
                logger.warning(
                    "%s: the first epoch took %.1f s, %.2fx the %.1f s the timed step planned (a busy machine?): %d of the %d "
                    "epochs fit the %.1f-minute budget; training stops after them.",
                    self.model_key, per_epoch, ratio, self.planned_epoch, fits, self.epochs - self._first, self.budget / 60,
                )
        if left > 0 and elapsed + per_epoch > self.budget * (1 + BUDGET_SLACK):
            self.model.stop_training = True
            self.report.update({"stopped_after_epoch": int(epoch) + 1, "planned_epochs": self.epochs})
            logger.info("%s: stopping after epoch %d of %d: another epoch (%.1f s) would end past the %.1f-minute budget.",
                        self.model_key, int(epoch) + 1, self.epochs, per_epoch, self.budget / 60)


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
        model: a compiled model.
        train_data, val_data: endless `tf.data` datasets of (image, label) batches.
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
    """
    history = model.fit(
        train_data,
        validation_data=val_data,
        epochs=int(epochs),
        steps_per_epoch=int(steps_per_epoch),
        validation_steps=int(validation_steps),
        callbacks=[
            keras.callbacks.BackupAndRestore(str(backup_dir)),
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=int(patience), restore_best_weights=True),
            *callbacks,
        ],
        # The streams are shuffled by their own bounded queues; Keras' default shuffle=True
        # means nothing for a tf.data input and only warns.
        shuffle=False,
        verbose=2,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}
