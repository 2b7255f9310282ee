"""Sliding-window inference of a real 3D U-Net: the result does not depend on the batch."""

from __future__ import annotations

import numpy as np

from medseg.models import build_unet3d
from medseg.patching import sliding_window_grid, sliding_window_predict


def test_3d_unet_result_does_not_depend_on_the_batch_size():
    import keras

    keras.utils.set_random_seed(5)
    model = build_unet3d((8, 8, 8, 1), base_filters=2, depth=1)
    volume = np.random.default_rng(0).normal(size=(13, 11, 9)).astype(np.float32)
    n_windows = len(sliding_window_grid(volume.shape, (8, 8, 8), 0.5))
    outputs = []
    for batch_size in (1, 4, 50):
        seen = []

        def predict(windows):
            seen.append(len(windows))
            return model.predict_on_batch(windows)

        outputs.append(sliding_window_predict(volume, predict, (8, 8, 8), 0.5, batch_size))
        assert max(seen) <= batch_size and sum(seen) == n_windows
    for output in outputs[1:]:
        assert output.dtype == np.float32
        np.testing.assert_allclose(output, outputs[0], rtol=0, atol=1e-6)
