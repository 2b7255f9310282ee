"""A trained model rebuilt layer by layer, with the same weights."""

from __future__ import annotations

from collections.abc import Callable

import keras


def clone_with_layers(model: keras.Model, make_layer: Callable[[keras.layers.Layer], keras.layers.Layer]) -> keras.Model:
    """A copy of `model` whose layers are `make_layer(layer)` (a layer of the same weights'
    shapes, from its config), holding `model`'s weights."""
    copy = keras.models.clone_model(model, clone_function=make_layer)
    copy.set_weights(model.get_weights())
    return copy
