"""The segmenter as an MLflow model (`{model}_segmenter`, pyfunc flavor).

`SegmenterModel` wraps a :class:`medseg.inference.Segmenter` (the network and its training
plan, shipped as the artifact `segmenter`). medseg's own code travels with it (`code_paths`),
and its requirements pin the TensorFlow build that trained it, so `mlflow models serve` and
`mlflow.pyfunc.load_model` work on a machine that has never seen medseg.

Input: a pandas DataFrame, one row per scan, with
- `image_path`: a NIfTI scan on the server's disk, or `image_b64`: the bytes of a `.nii` or
  `.nii.gz` file, base64-encoded (a client on another machine needs no shared disk);
- optionally `output_path`: where to write the mask; without it the mask comes back in
  `mask_b64` (gzipped NIfTI, base64);
- optionally `case_id`.
Output: a DataFrame with `case_id`, `mask_path`, `mask_b64`, `volume_ml` (and
`volume_ml_<class>` with several classes).

Paths and the server's disk: when `MEDSEG_SERVE_ROOTS` is set (folders separated by `:`), every
`image_path` and `output_path` must lie under one of them once symlinks are resolved; anything
else is refused before a file is read or written. In MLflow's scoring server with the variable
unset, paths are refused altogether and only `image_b64` is accepted. In the user's own Python
(`mlflow.pyfunc.load_model(...).predict(df)`), without the variable, any path is theirs to use.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, Schema

from medseg.errors import ConfigurationError, CorruptFileError, MedsegError
from medseg.imaging.io import Volume, write_volume
from medseg.inference.scans import case_id_of
from medseg.inference.segmenter import Segmenter

SERVE_ROOTS_ENV = "MEDSEG_SERVE_ROOTS"
# MLflow's scoring server sets this in its process (mlflow.pyfunc.scoring_server.init).
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
ARTIFACT = "segmenter"

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "image_path", required=False),
            ColSpec("string", "image_b64", required=False),
            ColSpec("string", "output_path", required=False),
            ColSpec("string", "case_id", required=False),
        ]
    )
)


class PathNotAllowedError(MedsegError):
    """A served model was asked to read or write a path outside `MEDSEG_SERVE_ROOTS`."""


def serve_roots() -> list[Path] | None:
    """The folders that request paths must lie in: those of `MEDSEG_SERVE_ROOTS` (resolved),
    [] (no path at all) inside MLflow's scoring server when it is unset, None (any path) in
    the user's own process."""
    raw = os.environ.get(SERVE_ROOTS_ENV, "")
    roots = [Path(part).expanduser().resolve() for part in raw.split(":") if part.strip()]
    if roots:
        return roots
    return [] if _in_scoring_server() else None


def _in_scoring_server() -> bool:
    return os.environ.get(SERVING_ENV, "").lower() in ("1", "true")


def check_path_allowed(path: str, column: str, roots: list[Path] | None) -> Path:
    """`path` resolved (symlinks followed), or PathNotAllowedError when outside `roots`."""
    resolved = Path(path).expanduser().resolve()
    if roots is None:
        return resolved
    if not roots:
        raise PathNotAllowedError(
            f"{column}={path!r} refused: this model server reads and writes no path unless {SERVE_ROOTS_ENV} "
            "names the folders it may use. Send the scan's bytes in `image_b64` instead, or start the server "
            f"with {SERVE_ROOTS_ENV}=/data/in:/data/out."
        )
    if not any(resolved == root or root in resolved.parents for root in roots):
        raise PathNotAllowedError(
            f"{column}={path!r} refused: it resolves to {resolved}, outside {SERVE_ROOTS_ENV} "
            f"({':'.join(map(str, roots))}). Use a path under those folders, or send `image_b64`."
        )
    return resolved


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


def _decode_scan(encoded: str, row: int, folder: Path) -> Path:
    """Write base64 NIfTI bytes to a temporary file (.nii.gz when gzipped, else .nii)."""
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CorruptFileError(f"row {row}: image_b64 is not valid base64 ({exc}). Encode the file's bytes with base64.") from exc
    suffix = ".nii.gz" if raw[:2] == b"\x1f\x8b" else ".nii"
    path = folder / f"row{row}{suffix}"
    path.write_bytes(raw)
    return path


def _encode_mask(mask: Volume, folder: Path, row: int) -> str:
    path = folder / f"mask{row}.nii.gz"
    write_volume(mask, path)
    return base64.b64encode(path.read_bytes()).decode("ascii")


def segment_requests(segmenter: Segmenter, frame: pd.DataFrame, roots: list[Path] | None) -> pd.DataFrame:
    """Segment each row's scan; see the module docstring for the columns and the path rules.

    Every row is checked before any scan is read. Masks for `output_path` are written beside
    their targets under temporary names and renamed only once every row has succeeded, so a
    failure writes nothing.
    """
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "image_path" not in frame.columns and "image_b64" not in frame.columns:
        raise ConfigurationError(
            f"the input has columns {list(frame.columns)}; it needs `image_path` (a NIfTI file) or `image_b64` "
            "(the file's bytes in base64), one row per scan."
        )
    requests = []
    for row, record in enumerate(frame.to_dict("records")):
        image_path, image_b64 = _text(record.get("image_path")), _text(record.get("image_b64"))
        if (image_path is None) == (image_b64 is None):
            raise ConfigurationError(f"row {row}: give exactly one of image_path and image_b64.")
        output_path = _text(record.get("output_path"))
        source = check_path_allowed(image_path, "image_path", roots) if image_path else None
        target = check_path_allowed(output_path, "output_path", roots) if output_path else None
        if target is not None and source is not None and target == source:
            raise ConfigurationError(f"row {row}: output_path is the input scan {image_path}; it would be overwritten.")
        case_id = _text(record.get("case_id")) or (case_id_of(image_path) if image_path else f"case_{row}")
        requests.append((row, case_id, source, image_b64, target))

    rows, pending = [], []
    with tempfile.TemporaryDirectory(prefix="medseg-serve-") as scratch:
        scratch = Path(scratch)
        try:
            for row, case_id, source, image_b64, target in requests:
                path = source if source is not None else _decode_scan(image_b64, row, scratch)
                mask = segmenter.segment(segmenter.read_scan(path))
                result = {"case_id": case_id, "mask_path": None, "mask_b64": None, **segmenter.volumes_ml(mask)}
                if target is None:
                    result["mask_b64"] = _encode_mask(mask, scratch, row)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp.nii.gz", dir=target.parent)
                    os.close(fd)
                    pending.append((Path(tmp), target))
                    write_volume(mask, tmp)
                    result["mask_path"] = str(target)
                rows.append(result)
            for tmp, target in pending:
                os.replace(tmp, target)
        finally:
            for tmp, _ in pending:
                tmp.unlink(missing_ok=True)
    return pd.DataFrame(rows)


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: `predict(DataFrame) -> DataFrame` (see the module docstring)."""

    def load_context(self, context) -> None:
        self.segmenter = Segmenter.load(context.artifacts[ARTIFACT])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        try:
            return segment_requests(self.segmenter, model_input, serve_roots())
        except MedsegError as exc:
            if not _in_scoring_server():
                raise
            # The scoring server answers any other exception with a generic message (ours only
            # in the traceback); an MlflowException's message reaches the client as a 400.
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_requirements() -> list[str]:
    """What the segmenter needs, pinned to the versions installed here: the TensorFlow build of
    this environment (`tensorflow-cpu`, or `tensorflow[and-cuda]` for the gpu extra), Keras,
    nibabel, SciPy, NumPy, pandas and MLflow. medseg itself travels as code, not a package."""
    requirements = []
    if _version("tensorflow-cpu"):
        requirements.append(f"tensorflow-cpu=={_version('tensorflow-cpu')}")
    elif _version("tensorflow"):
        cuda = any(_version(name) for name in ("nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12"))
        requirements.append(f"tensorflow{'[and-cuda]' if cuda else ''}=={_version('tensorflow')}")
    for name in ("keras", "nibabel", "scipy", "numpy", "pandas", "mlflow"):
        if _version(name):
            requirements.append(f"{name}=={_version(name)}")
    return requirements


def _medseg_code(folder: Path) -> str:
    """A copy of the medseg package (no bytecode caches) for `code_paths`."""
    target = folder / "medseg"
    shutil.copytree(Path(__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def log_segmenter(segmenter_dir: str | os.PathLike, name: str, registered_model_name: str | None = None):
    """Log a segmenter folder to the active MLflow run as a pyfunc model named `name`.

    Returns:
        MLflow's ModelInfo (its `model_uri` loads the model).
    """
    with tempfile.TemporaryDirectory(prefix="medseg-code-") as code:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=SegmenterModel(),
            artifacts={ARTIFACT: str(segmenter_dir)},
            code_paths=[_medseg_code(Path(code))],
            pip_requirements=pip_requirements(),
            signature=SIGNATURE,
            registered_model_name=registered_model_name or None,
        )


def fetch_segmenter(source: str, local_folders: Mapping[str, str]) -> tuple[str, str]:
    """The local segmenter folder of `predict.model`, and the model URI to record.

    Args:
        source: a key of `local_folders` (`unet`, `conv3d`: the model this project last
            trained), or an MLflow model URI (`runs:/<run_id>/<name>`,
            `models:/<name>/<version>`), downloaded to a temporary folder that is deleted
            when the process ends.
        local_folders: {model: its segmenter folder}, from the catalog entries
            `<model>.segmenter_folder` (where the training pipelines save `<model>.segmenter`).

    Returns:
        (folder, uri): the folder `Segmenter.load` reads; the URI of the MLflow model when known
        (`runs:/<id>/<model>_segmenter` for a local model whose training run is known), else
        the folder.
    """
    if source in local_folders:
        folder = Path(local_folders[source])
        run_id = None
        try:
            import json

            run_id = json.loads((folder / "segmenter.json").read_text()).get("provenance", {}).get("mlflow_run_id")
        except (OSError, ValueError):
            pass
        return str(folder), f"runs:/{run_id}/{source}_segmenter" if run_id else str(folder)
    return _download_segmenter(source)


def _download_segmenter(source: str) -> tuple[str, str]:
    if ":/" not in source:
        raise ConfigurationError(
            f"predict.model={source!r}: give `unet` or `conv3d` (this project's last trained model), or an MLflow "
            "model URI such as runs:/<run_id>/unet_segmenter or models:/<name>/<version>."
        )
    local = Path(tempfile.mkdtemp(prefix="medseg-model-"))
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(local)))
    except Exception as exc:
        shutil.rmtree(local, ignore_errors=True)
        raise ConfigurationError(
            f"predict.model={source!r}: MLflow cannot download it ({type(exc).__name__}: {str(exc)[:300]}). Check the "
            "run id or the registered name and version (`kedro mlflow ui`), and the tracking URI."
        ) from exc
    folder = path / "artifacts" / ARTIFACT
    if not (folder / "segmenter.json").is_file():
        raise ConfigurationError(
            f"predict.model={source!r} is not a medseg segmenter (no artifacts/{ARTIFACT}/segmenter.json). Use a "
            "`unet_segmenter` or `conv3d_segmenter` model."
        )
    return str(folder), source
