"""U-Net training throughput: the pipeline's own input pipeline against bare `model.fit`.

Measured side by side in one run, with the same model, batch size and slices:
  1. the pipeline: `slice_stream` -> `make_tf_dataset` (augmentation on, as by default) -> fit;
  2. bare Keras: `model.fit` on the same slices held as in-memory numpy arrays.
Prints samples/s for both, their ratio (target >= 0.95) and the GFLOP/s the model reaches.
The script exits 1 when the ratio misses the target, so `make benchmarks` fails.

Run: .venv/bin/python benchmarks/unet_throughput.py [--size 48] [--batch 16] [--steps 25]
It uses synthetic phantoms written to a temporary folder, so it needs no data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from _targets import Target, report_targets  # noqa: E402

from medseg.imaging.geometry import plan_case_geometry, to_canonical, to_training_grid  # noqa: E402
from medseg.imaging.io import Volume  # noqa: E402
from medseg.imaging.normalization import zscore_normalize  # noqa: E402
from medseg.synthetic.shapes import synthesize_case  # noqa: E402
from medseg.models import build_unet2d, compile_segmentation_model  # noqa: E402
from medseg.patching import make_tf_dataset, slice_stream  # noqa: E402


def preprocessed_cases(n_cases: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    cases = {}
    for index in range(n_cases):
        image, label, affine = synthesize_case(index, seed=0)
        geometry = plan_case_geometry(image.shape, affine, (1.0, 1.0, 2.2))
        img = to_training_grid(to_canonical(Volume(image, affine)), geometry, order=1).data
        lbl = to_training_grid(to_canonical(Volume(label, affine)), geometry, order=0).data
        cases[f"case_{index:03d}"] = (zscore_normalize(img), lbl)
    return cases


def training_flops_per_sample(model) -> float:
    """Forward FLOPs from TensorFlow's profiler, times 3 for forward + backward."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    spec = tf.TensorSpec([1, *model.input_shape[1:]], tf.float32)
    frozen = convert_variables_to_constants_v2(tf.function(lambda x: model(x, training=False)).get_concrete_function(spec))
    options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    profile = tf.compat.v1.profiler.profile(graph=frozen.graph, options=options)
    return 3.0 * profile.total_float_ops


def timed_fit(model, data, steps: int, epochs: int, batch: int | None = None) -> float:
    """Samples per second over `epochs` epochs after one warm-up epoch (tracing excluded)."""
    kwargs = {"batch_size": batch} if batch else {"steps_per_epoch": steps}
    model.fit(*data, epochs=1, verbose=0, **kwargs) if isinstance(data, tuple) else model.fit(data, epochs=1, verbose=0, **kwargs)
    start = time.perf_counter()
    if isinstance(data, tuple):
        model.fit(*data, epochs=epochs, verbose=0, **kwargs)
    else:
        model.fit(data, epochs=epochs, verbose=0, **kwargs)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48)  # unet.model.input_size
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cases", type=int, default=8)
    args = parser.parse_args()

    cases = preprocessed_cases(args.cases)
    ids = sorted(cases)
    load_case = cases.__getitem__
    shape = (args.size, args.size)
    n_samples = args.steps * args.batch

    # The same slices for both: drawn once from the pipeline's own stream.
    stream = slice_stream(load_case, ids, shape, samples_per_volume=16, queue_length=128, seed=0)
    pairs = [next(stream) for _ in range(n_samples)]
    x = np.stack([p[0] for p in pairs])
    y = np.stack([p[1] for p in pairs])

    def fresh_model():
        tf.keras.utils.set_random_seed(0)
        return compile_segmentation_model(build_unet2d((*shape, 1)))

    pipeline_data = make_tf_dataset(
        lambda: slice_stream(load_case, ids, shape, samples_per_volume=16, queue_length=128, seed=0),
        (*shape, 1),
        args.batch,
        augment=True,
    )
    pipeline_seconds = timed_fit(fresh_model(), pipeline_data, args.steps, args.epochs)
    bare_seconds = timed_fit(fresh_model(), (x, y), args.steps, args.epochs, batch=args.batch)

    total = n_samples * args.epochs
    pipeline_rate, bare_rate = total / pipeline_seconds, total / bare_seconds
    flops = training_flops_per_sample(fresh_model())
    print(f"input {args.size}x{args.size}, batch {args.batch}, {total} samples per measurement, {os.cpu_count()} CPUs")
    print(f"pipeline (slice_stream + tf.data): {pipeline_rate:8.1f} samples/s")
    print(f"bare model.fit on numpy:           {bare_rate:8.1f} samples/s")
    print(f"ratio pipeline / bare:             {pipeline_rate / bare_rate:8.3f}")
    print(f"training GFLOP per sample:         {flops / 1e9:8.2f}")
    print(f"GFLOP/s reached (pipeline):        {pipeline_rate * flops / 1e9:8.1f}")
    return report_targets([Target("throughput ratio pipeline / bare", pipeline_rate / bare_rate, ">=", 0.95)])


if __name__ == "__main__":
    sys.exit(main())
