"""How a segmenter runs its network over a preprocessed volume: its window strategy.

A model kind names its strategy in the segmenter's plan (`SegmenterPlan.window`); the segmenter
looks it up here. Two ship with medseg:

- `slice`: a 2D network over whole axial slices, each padded to a multiple of 2**depth
  (`medseg.inference.slices`); mirroring along z is dropped, since each slice is predicted
  alone and a flip along z changes nothing.
- `patch`: a 3D network over Gaussian-weighted sliding windows of the patch size
  (`medseg.patching.sliding_window`); in a cascade the windows carry the low-resolution
  stage's probabilities after the image.

A kind with another way to cover a volume defines a `WindowStrategy` in its own module and
registers it (`register_window`) where it registers itself; the segmenter, prediction and
serving need no change. A segmenter whose window is not registered in the process that loads it
is refused, naming the window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np

from medseg.errors import ConfigurationError
from medseg.inference.engines import OnnxNetwork
from medseg.inference.slices import axial_window, predict_axial_slices, slice_predictor
from medseg.patching.sliding_window import sliding_window_predict, windows_per_batch

if TYPE_CHECKING:
    import keras

# A network on either engine (`medseg.inference.engines`): both answer `predict_on_batch`.
Network = Union["keras.Model", OnnxNetwork]
# `log_batch(batch, what, window)`: the segmenter's one line per volume shape about its batches.
LogBatch = Callable[[int, str, Sequence[int]], None]


class WindowStrategy(Protocol):
    """How a network covers a preprocessed volume.

    Attributes:
        name: the name a segmenter's plan records (`SegmenterPlan.window`).
        takes_context: whether a cascade's low-resolution probabilities go in after the image.
    """

    name: str
    takes_context: bool

    def predictor(self, model: Network) -> Callable[[np.ndarray], np.ndarray]:
        """`predict_batch(windows) -> probabilities` of `model` for this strategy's windows."""

    def predict(self, predict_batch: Callable[[np.ndarray], np.ndarray], image: np.ndarray, plan: Any,
                budget_gb: float, log_batch: LogBatch) -> np.ndarray:
        """Probabilities of a preprocessed (X, Y, Z) or (X, Y, Z, C) `image`: (X, Y, Z) for one
        foreground channel, (X, Y, Z, K + 1) for K classes. `plan` is the `SegmenterPlan`;
        batches of windows hold at most `budget_gb` GiB of activations."""

    def mirror_axes(self, axes: Sequence[int]) -> tuple[int, ...]:
        """The test-time mirroring axes that change this strategy's prediction."""


def window_predictor(model: Network) -> Callable[[np.ndarray], np.ndarray]:
    """`predict_batch` for sliding windows: (B, wx, wy, wz, C) -> (B, wx, wy, wz) foreground
    probabilities, or (B, wx, wy, wz, K + 1) class probabilities for a multi-class model.

    A segmentation model's map is returned as is; a patch classifier's single probability is
    spread over its whole window.
    """

    def predict(windows: np.ndarray) -> np.ndarray:
        out = np.asarray(model.predict_on_batch(windows))
        if out.ndim == 2:  # (B, 1): one probability per window
            return np.broadcast_to(out[:, :, None, None], (len(windows), *windows.shape[1:4]))
        return out[..., 0] if out.shape[-1] == 1 else out

    return predict


class SliceWindows:
    """Whole axial slices, padded to a multiple of 2**`plan.depth`, as many per batch as the
    budget holds (`plan.features_per_voxel`)."""

    name = "slice"
    takes_context = False

    def predictor(self, model: Network) -> Callable[[np.ndarray], np.ndarray]:
        return slice_predictor(model)

    def predict(self, predict_batch, image, plan, budget_gb, log_batch) -> np.ndarray:
        multiple = 2 ** int(plan.depth)
        window = axial_window(image.shape, multiple)
        batch = windows_per_batch(window, plan.features_per_voxel, budget_gb, n_windows=image.shape[2])
        log_batch(batch, "slices", window)
        return predict_axial_slices(predict_batch, image, multiple, batch)

    def mirror_axes(self, axes: Sequence[int]) -> tuple[int, ...]:
        return tuple(a for a in axes if a != 2)


class PatchWindows:
    """Gaussian-weighted sliding windows of `plan.patch_size` (`plan.overlap`,
    `plan.sigma_scale`), as many per batch as the budget holds."""

    name = "patch"
    takes_context = True

    def predictor(self, model: Network) -> Callable[[np.ndarray], np.ndarray]:
        return window_predictor(model)

    def predict(self, predict_batch, image, plan, budget_gb, log_batch) -> np.ndarray:
        window = tuple(int(s) for s in plan.patch_size)
        batch = windows_per_batch(window, plan.features_per_voxel, budget_gb)
        log_batch(batch, "windows", window)
        return sliding_window_predict(
            image, predict_batch, window, overlap=float(plan.overlap), batch_size=batch, sigma_scale=float(plan.sigma_scale),
        )

    def mirror_axes(self, axes: Sequence[int]) -> tuple[int, ...]:
        return tuple(axes)


_WINDOWS: dict[str, WindowStrategy] = {}


def register_window(strategy: WindowStrategy) -> WindowStrategy:
    """Make `strategy` available to segmenters whose plan names it."""
    _WINDOWS[strategy.name] = strategy
    return strategy


def window_strategy(name: str) -> WindowStrategy:
    """The registered strategy called `name`.

    Raises:
        ConfigurationError: no strategy of that name is registered in this process.
    """
    try:
        return _WINDOWS[name]
    except KeyError:
        raise ConfigurationError(
            f"the segmenter's window '{name}' is not one this process knows ({sorted(_WINDOWS)}). Import the module of "
            "the model kind that defines it before loading the segmenter, or retrain with a built-in kind."
        ) from None


register_window(SliceWindows())
register_window(PatchWindows())
