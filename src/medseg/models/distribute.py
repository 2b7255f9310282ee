"""Training on several devices of one machine: the `tf.distribute` strategy of a training run.

`training.distribute` chooses it:

- `none` (the default): TensorFlow's default strategy, one device, one replica. Its `scope()`
  changes nothing, so the one-device code path is the plain Keras one.
- `mirrored`: `tf.distribute.MirroredStrategy` over the visible GPUs, or, on a machine without
  one, over the visible logical CPU devices (one unless the process split its CPU with
  `tf.config.set_logical_device_configuration`). Each replica holds a copy of the weights and
  trains on its share of each batch; the gradients are summed across replicas (an all-reduce)
  before every step, so the copies stay identical.

The model must be built and compiled inside `strategy.scope()` (Keras 3 records the strategy
when the model object is created and distributes `fit`'s `tf.data` input over the replicas).
`training.batch_size` is per replica: the streams deliver `global_batch_size(...)` samples per
step, which Keras splits evenly. The learning rate is not scaled with the replicas (see the
README): a larger global batch with the same rate takes fewer, larger steps per epoch.

Several machines (`MultiWorkerMirroredStrategy`) are not implemented here.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from medseg.errors import ConfigurationError

if TYPE_CHECKING:
    import tensorflow as tf

logger = logging.getLogger(__name__)

DISTRIBUTE = ("none", "mirrored")
NO_STRATEGY = "none"  # the name logged for TensorFlow's default (one-device) strategy


def distribution_strategy(setting: str) -> "tf.distribute.Strategy":
    """The strategy of `training.distribute`.

    Args:
        setting: `none` or `mirrored` (see the module docstring).

    Returns:
        `tf.distribute.get_strategy()` (the default, one replica) for `none`; a
        `MirroredStrategy` for `mirrored`, with one replica per visible GPU, or per visible
        logical CPU device when there is no GPU. With a single device it still works, with
        one replica, and the log says so.

    Raises:
        ConfigurationError: any other setting.
    """
    import tensorflow as tf

    if setting == "none":
        return tf.distribute.get_strategy()
    if setting != "mirrored":
        raise ConfigurationError(f"training.distribute must be one of {list(DISTRIBUTE)}, got '{setting}'.")
    # MirroredStrategy() with no devices takes the GPUs or else only /CPU:0, so a machine
    # without a GPU would never use the logical CPU devices it was split into: list them.
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    names = tuple(device.name for device in devices)
    if len(names) == 1:
        logger.info(
            "training.distribute=mirrored: only one device is visible (%s), so training runs with one replica.",
            names[0],
        )
    return _mirrored_strategy(names)


@functools.cache
def _mirrored_strategy(devices: tuple[str, ...]) -> "tf.distribute.Strategy":
    # One strategy per device set and process: a second MirroredStrategy over the same devices
    # numbers its all-reduces from the same keys as the first, and TensorFlow aborts training
    # at the first one whose shape differs ("Shape mismatch in the collective instance 100",
    # TF 2.21, logical CPU devices). The planner's timing and the training share this one.
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices=list(devices))


def strategy_name(strategy: "tf.distribute.Strategy") -> str:
    """The strategy's class name (`MirroredStrategy`), or `none` for the default strategy."""
    name = type(strategy).__name__
    # TensorFlow has no public test for its default strategy; its class is private.
    return NO_STRATEGY if name.startswith("_Default") else name


def global_batch_size(per_replica: int, replicas: int) -> int:
    """Samples per training step across all replicas: `per_replica` × `replicas`.

    Args:
        per_replica: `training.batch_size` (planned per device when `auto`, since the memory
            budget `planning.memory_gb` is one device's).
        replicas: `strategy.num_replicas_in_sync`.

    Returns:
        The batch the `tf.data` streams deliver; Keras splits it evenly over the replicas.
    """
    per_replica, replicas = int(per_replica), int(replicas)
    if per_replica < 1 or replicas < 1:
        raise ConfigurationError(f"batch size per replica ({per_replica}) and replicas ({replicas}) must be >= 1.")
    return per_replica * replicas
