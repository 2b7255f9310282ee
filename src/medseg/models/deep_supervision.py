"""nnU-Net's deep supervision for medseg's U-Nets (`training.deep_supervision`).

nnU-Net puts a 1×1 segmentation head on every decoder stage and trains on the weighted sum of
their losses, each stage against the label downsampled to its resolution. The weights halve
from stage to stage, the coarsest stage gets 0, and they are normalized to sum to 1
(`nnUNetTrainer._build_loss`): for a U-Net of depth 3, 2/3 for the full resolution and 1/3 for
the half.

Here the network itself stays one output, as it is saved, served and planned. Training uses a
second graph beside it (`with_deep_supervision`): the same layers, the same output, plus the
auxiliary heads, which are dropped after training as nnU-Net drops them at inference. The
labels follow by `supervision_targets`: each auxiliary stage reads every `s`-th voxel of the
label along an axis pooled by `s` (nearest neighbour, nnU-Net's order 0). The history keeps
the keys it has without deep supervision: `loss` is the weighted sum, which early stopping
watches as nnU-Net's validation loss, and the metrics are the full-resolution output's.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from medseg.errors import ConfigurationError

MAIN_OUTPUT = "mask"  # the U-Nets' head (medseg.models.unet.build_unet)


def supervision_weights(stages: int) -> list[float]:
    """nnU-Net's loss weights for `stages` outputs, finest first: 1/2**i, the last set to 0
    (when there are two or more), normalized to sum to 1."""
    weights = np.array([1.0 / 2**i for i in range(int(stages))])
    if len(weights) > 1:
        weights[-1] = 0.0
    return [float(w) for w in weights / weights.sum()]


@dataclass(frozen=True)
class SupervisedTraining:
    """The training graph of a U-Net with deep supervision: `model` outputs the network's own
    output and one head per supervised decoder stage; `strides[i]` is output i's downsampling
    of the label per spatial axis; `weights[i]` its loss weight."""

    model: keras.Model
    strides: tuple[tuple[int, ...], ...]
    weights: tuple[float, ...]


def _decoder_stages(network: keras.Model) -> int:
    names = {layer.name for layer in network.layers}
    depth = 0
    while f"enc{depth}_pool" in names and f"dec{depth}_relu2" in names:
        depth += 1
    return depth


def with_deep_supervision(network: keras.Model) -> SupervisedTraining:
    """The training graph of `network` (a compiled U-Net of `build_unet`) with nnU-Net's deep
    supervision, compiled with `network`'s own optimizer, loss and metrics; call it where the
    network was built (its dtype policy and distribution strategy).

    Raises:
        ConfigurationError: `network` is not a U-Net with decoder stages (the patch classifier).
    """
    depth = _decoder_stages(network)
    if depth == 0 or MAIN_OUTPUT not in {layer.name for layer in network.layers}:
        raise ConfigurationError(
            f"{network.name}: training.deep_supervision needs a U-Net (decoder stages `dec<i>`); this network has none. "
            "Set training.deep_supervision: false."
        )
    weights = supervision_weights(depth)
    supervised = [stage for stage in range(1, depth) if weights[stage] > 0]
    head = network.get_layer(MAIN_OUTPUT)
    rank = len(network.input_shape) - 2
    conv = keras.layers.Conv2D if rank == 2 else keras.layers.Conv3D
    outputs, strides = [network.output], [(1,) * rank]
    stride = np.ones(rank, dtype=int)
    for stage in range(1, depth):
        stride = stride * np.array(network.get_layer(f"enc{stage - 1}_pool").pool_size, dtype=int)
        if stage in supervised:
            features = network.get_layer(f"dec{stage}_relu2").output
            outputs.append(conv(head.filters, 1, activation=head.activation, dtype="float32", name=f"ds{stage}")(features))
            strides.append(tuple(int(s) for s in stride))
    model = keras.Model(network.inputs, outputs, name=f"{network.name}_deep_supervision")
    output_weights = (weights[0], *(weights[stage] for stage in supervised))
    config = network._compile_config.config  # what `network` was compiled with (Keras 3)
    loss, metrics = config["loss"], config["metrics"]
    model.compile(
        optimizer=network.optimizer,
        loss=[loss] * len(outputs),
        loss_weights=list(output_weights),
        metrics=[metrics, *([] for _ in supervised)],
    )
    return SupervisedTraining(model, tuple(strides), output_weights)


def supervision_targets(strides: tuple[tuple[int, ...], ...]):
    """A `tf.data` map from (image, label) batches to (image, (label, label at each stride))."""

    def split(image, label):
        targets = []
        for stride in strides:
            index = (slice(None), *(slice(None, None, s) for s in stride), slice(None))
            targets.append(label[index])
        return image, tuple(targets)

    return split


def plain_history_keys(logs: dict) -> dict:
    """`logs` of the training graph with the keys the network alone would give: the main
    output's metrics without their `mask_` prefix, the per-output losses left out."""
    plain = {}
    for key, value in logs.items():
        stem = key.removeprefix("val_")
        lead = key[: len(key) - len(stem)]
        if stem == "loss":
            plain[key] = value
        elif stem.endswith("_loss"):
            continue  # each output's own loss: `loss` is their weighted sum
        elif stem.startswith(f"{MAIN_OUTPUT}_"):
            plain[lead + stem.removeprefix(f"{MAIN_OUTPUT}_")] = value
        else:
            plain[key] = value
    return plain


class PlainHistoryKeys(keras.callbacks.Callback):
    """Rewrites each epoch's logs in place with `plain_history_keys`, before the callbacks
    after it (the epoch lines, MLflow's per-epoch metrics, the history) read them."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            plain = plain_history_keys(logs)
            logs.clear()
            logs.update(plain)
