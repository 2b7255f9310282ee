"""The OmegaConf resolvers of medseg's configuration (`${medseg.<name>:...}`).

Registered with OmegaConf's `register_resolver` rather than through Kedro's
`CONFIG_LOADER_ARGS["custom_resolvers"]`, which Kedro 1.7 registers with the deprecated
`register_new_resolver` (a warning on every run).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def register_project_root(project_path) -> None:
    """`${medseg.project_root:}` in configuration: the project's absolute root (POSIX)."""
    root = Path(project_path).resolve().as_posix()
    register_resolver("medseg.project_root", lambda: root)


def register_resolver(name: str, resolver) -> None:
    """Register (or replace) an OmegaConf resolver. OmegaConf 2.4 renamed
    `register_new_resolver` (now deprecated, a warning per call) to `register_resolver`."""
    register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
    register(name, resolver, replace=True)


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
    from medseg.serving.model import pip_requirements

    return [r for r in pip_requirements() if r.startswith(("tensorflow", "keras"))]


def register_catalog_resolvers() -> None:
    """`${medseg.tensor_signature:...}` and `${medseg.keras_requirements:}`, which the catalog's
    model exports use; `${medseg.project_root:}` is registered once the project is known
    (`MlflowRunHook.after_context_created`)."""
    register_resolver("medseg.tensor_signature", tensor_signature)
    register_resolver("medseg.keras_requirements", keras_requirements)
