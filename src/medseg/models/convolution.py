"""A 3D convolution whose weight gradient is computed the way oneDNN does it fastest.

The gradient of a "same" convolution's kernel, dW[k, i, o] = Σ_p dy[p, o] · x[p + k − c, i]
(c the kernel's centre), is the same sum as the kernel gradient of the convolution that runs the
other way, from dy (o channels) to x's shape (i channels), with the kernel flipped in space and
its two channel axes swapped: dW'[k', o, i] = Σ_q x[q, i] · dy[q + k' − c, o], so
dW[k, i, o] = dW'[2c − k, o, i]. Both sums run over the voxels where both factors are inside
the volume, so the zero padding agrees too (for odd kernels, unit strides and dilations).

Why it matters: oneDNN blocks the output channels of its bfloat16 kernels by 16, so a layer
with 8 output channels costs what one with 16 does, and its weight gradient runs a slower
kernel (`jit_bf16` on a plain layout) that pays that twice. The 3D U-Net's first decoder
convolution (16 → 8 channels, at full resolution) took the largest share of a bfloat16 training
step. Measured alone on the AMD EPYC (`avx512_bf16`, no AMX; 2 cores), a batch of four 64³
patches: the weight gradient of 16 → 8 channels 50.5 ms, the same gradient through 8 → 16
25.2 ms; 8 → 8 21.1 / 21.3 ms; 32 → 16 at 32³ 10.5 / 10.9 ms; 1 → 8 4.6 / 21.1 ms. So only a
layer with fewer output channels than input channels, and fewer than 16 of them, takes the
other way (`_swaps`), and only where no GPU is visible (cuDNN's kernels were not measured);
every other convolution and both other gradients (the input's, and the forward pass) are
Keras's own. The two ways agree to the rounding of the dtype (tested), and the layer's weights,
configuration and predictions are Keras's `Conv3D`, so `as_keras_layers` turns it back into one
for an export.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

# oneDNN's channel block for bfloat16 (and float32 on AVX-512): fewer output channels are padded
# to it (the timings per layer: benchmarks/README.md, "The figures behind constants in the code").
_CHANNEL_BLOCK = 16


_UNIT_STRIDES = [1, 1, 1, 1, 1]


def _kernel_gradient_swapped(x, dy, kernel_shape):
    """dW of a "same", unit-stride 3D convolution from x (B, X, Y, Z, i) and dy (B, X, Y, Z, o),
    through the kernel gradient of the swapped convolution (module docstring)."""
    *spatial, channels_in, channels_out = kernel_shape
    swapped = tf.raw_ops.Conv3DBackpropFilterV2(
        input=dy, filter_sizes=[*spatial, channels_out, channels_in], out_backprop=x, strides=_UNIT_STRIDES, padding="SAME"
    )
    return tf.transpose(tf.reverse(swapped, axis=[0, 1, 2]), [0, 1, 2, 4, 3])


@tf.custom_gradient
def _convolve(x, kernel):
    """Keras's "same", unit-stride convolution, with the kernel gradient taken the swapped way."""
    def gradient(dy):
        dx = tf.raw_ops.Conv3DBackpropInputV2(
            input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=_UNIT_STRIDES, padding="SAME"
        )
        return dx, _kernel_gradient_swapped(x, dy, kernel.shape)

    return tf.nn.conv3d(x, kernel, strides=_UNIT_STRIDES, padding="SAME"), gradient


@keras.saving.register_keras_serializable(package="medseg")
class NarrowConv3D(layers.Conv3D):
    """`keras.layers.Conv3D` (same arguments, weights and outputs) whose kernel gradient, for a
    narrowing layer of fewer than 16 output channels, runs the swapped convolution."""

    def _swaps(self) -> bool:
        kernel = tuple(self.kernel_size)
        channels_in, channels_out = self.kernel.shape[-2], self.kernel.shape[-1]
        return (
            keras.backend.backend() == "tensorflow"
            and not tf.config.list_physical_devices("GPU")  # measured with oneDNN only (module docstring)
            and self.padding == "same" and self.data_format == "channels_last" and self.groups == 1
            and all(k % 2 == 1 for k in kernel) and tuple(self.strides) == (1, 1, 1)
            and tuple(self.dilation_rate) == (1, 1, 1)
            and channels_out < _CHANNEL_BLOCK and channels_in > channels_out
        )

    def convolution_op(self, inputs, kernel):
        if self._swaps():
            return _convolve(inputs, tf.cast(kernel, inputs.dtype))
        return super().convolution_op(inputs, kernel)
