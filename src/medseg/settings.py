"""Project settings: the project's hooks and where configuration is read from."""

from medseg.hooks import ComputeHook, MlflowRunHook, RunStartedHook, register_resolver
from medseg.runs.credentials import CONFIG_LOADER_ARGS  # noqa: F401  (Kedro reads it here; a Dask worker there)
from medseg.runs.summary import RunSummaryHook

# kedro-mlflow's own hook is registered by its entry point. MlflowRunHook runs before it
# (tryfirst): it locks the project, checks the tracking server and names the run.
# RunStartedHook runs after it (trylast), once the run has started. RunSummaryHook ends a
# model run with its test metrics and where to look next. ComputeHook opens and closes the
# per-case executor of `compute.scheduler` (sync, a LocalCluster, or a Dask cluster).
_RUN_HOOK = MlflowRunHook()
HOOKS = (_RUN_HOOK, RunStartedHook(_RUN_HOOK), RunSummaryHook(), ComputeHook())


def tensor_signature(inputs, outputs=None):
    """`${medseg.tensor_signature:[-1,-1,-1,1],[-1,-1,-1,1]}` in the catalog: an MLflow
    `ModelSignature` of float32 tensors of these shapes (-1: any size), for a Keras model's
    `save_args.signature`; `outputs` may be left out."""
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def schema(shape):
        return Schema([TensorSpec(np.dtype(np.float32), tuple(int(n) for n in shape))])

    return ModelSignature(inputs=schema(inputs), outputs=schema(outputs) if outputs is not None else None)


def keras_requirements():
    """`${medseg.keras_requirements:}` in the catalog: the pip requirements of the Keras flavor,
    this environment's TensorFlow build (CPU or GPU) and Keras, pinned. The exported Keras
    model is saved without its training configuration, so it needs no medseg code."""
    from medseg.serving import pip_requirements

    return [r for r in pip_requirements() if r.startswith(("tensorflow", "keras"))]


# Registered here rather than through CONFIG_LOADER_ARGS["custom_resolvers"], which Kedro 1.7
# registers with OmegaConf's deprecated register_new_resolver (a warning on every run).
register_resolver("medseg.tensor_signature", tensor_signature)
register_resolver("medseg.keras_requirements", keras_requirements)
