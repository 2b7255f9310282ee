"""The segmenter as an MLflow model (`{model}_segmenter`, pyfunc flavor).

`SegmenterModel` wraps a :class:`medseg.inference.Segmenter` (the network and its training
plan, shipped as the artifact `segmenter`). medseg's own code travels with it (`code_paths`),
and its requirements pin the TensorFlow build that trained it, so `mlflow models serve` and
`mlflow.pyfunc.load_model` work on a machine that has never seen medseg.

Engines and profiles (`medseg.inference.engines`, `medseg.inference.profiles`): the model's
configuration holds an `engine` and a `profile` (`fast`, `balanced`, `accurate`), empty by
default: the segmenter's own setting on TensorFlow. A load sets them
(`mlflow.pyfunc.load_model(uri, model_config={"profile": "fast"})`), and so does a server
(`MLFLOW_PYFUNC_INFERENCE_CONFIG='{"profile": "fast"}' mlflow models serve ...`). A
segmenter whose ONNX export passed its parity check is also logged as `<name>_onnx`, whose
engine is `onnxruntime` and whose requirements hold no TensorFlow and no Keras: it serves from
an environment without them.

Input: a pandas DataFrame, one row per scan, with
- `image_path`: a NIfTI scan on the server's disk, or `image_b64`: the bytes of a `.nii` or
  `.nii.gz` file, base64-encoded (a client on another machine needs no shared disk). Either may
  also be a `.zip` of one DICOM series (`medseg.dicom.series`), whose answer then carries a
  DICOM SEG referring to the series (`seg_b64`) and its lineage (`study_instance_uid`,
  `series_instance_uid`, `seg_sop_instance_uid`);
- optionally `output_path`: where to write the mask; without it the mask comes back in
  `mask_b64` (gzipped NIfTI, base64);
- optionally `case_id`, `overwrite` (`true` to replace an existing mask file), and
  `request_id` (one per request: a retry with the same id is answered from the first run and
  never computes or writes twice; a retry while the first still runs is refused with 409).
Output: a DataFrame with `case_id`, `mask_path`, `mask_b64`, `volume_ml` (and
`volume_ml_<class>` with several classes).

Paths and the server's disk (`medseg.serving.files`): an `image_path` must lie strictly under a
folder of `MEDSEG_SERVE_READ_ROOTS`, an `output_path` under one of `MEDSEG_SERVE_WRITE_ROOTS`
(each colon-separated), reached without any symlink below the root and opened once. Without
them no path is accepted, only `image_b64` (fail closed), in the scoring server and in the
user's own Python alike, unless the user opts in with `MEDSEG_SERVE_ANY_PATH=1`. A mask never
replaces an existing file unless its row says `overwrite`, is written in the format its suffix
names (`.nii` or `.nii.gz`), and is published only when every row succeeded before the server's
timeout. The limits of `medseg.storage.limits` (body, rows, voxels, decompressed bytes, spacing) are
checked before anything is allocated. In the scoring server every failure reaches the client as
a message with no stack trace.
"""

from __future__ import annotations

import atexit
import base64
import binascii
import collections
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import (
    DEADLINE_EXCEEDED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    RESOURCE_CONFLICT,
    RESOURCE_EXHAUSTED,
)
from mlflow.types import ColSpec, Schema

from medseg.serving import files as serving_files
from medseg.errors import ConfigurationError, CorruptFileError, MedsegError
from medseg.dicom.series import read_dicom_series
from medseg.imaging.io import Volume, read_volume_bytes, volume_bytes
from medseg.inference.scans import SegWriter, case_id_of, lineage
from medseg.inference.engines import ONNXRUNTIME, PASSED, TENSORFLOW, check_engine
from medseg.inference.segmenter import Segmenter
from medseg.inference.ensemble import Ensemble, is_ensemble, load_for_profile, load_segmenter  # noqa: F401 (re-exported)
from medseg.storage.limits import Limits, describe, limits
from medseg.serving.files import PathNotAllowedError, Roots, serve_roots  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

# MLflow's scoring server sets this in its process (mlflow.pyfunc.scoring_server.init).
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
# ... and `mlflow models serve` names the model in this one before the app is made.
SERVER_MODEL_ENV = "__pyfunc_model_path__"
TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"
ARTIFACT = "segmenter"
TRUE = ("1", "true", "yes")

SIGNATURE = ModelSignature(
    inputs=Schema(
        [
            ColSpec("string", "image_path", required=False),
            ColSpec("string", "image_b64", required=False),
            ColSpec("string", "output_path", required=False),
            ColSpec("string", "case_id", required=False),
            ColSpec("string", "overwrite", required=False),
            ColSpec("string", "request_id", required=False),
        ]
    )
)


def _in_scoring_server() -> bool:
    return os.environ.get(SERVING_ENV, "").lower() in TRUE


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value)
    return text if text.strip() else None


class RequestTooLargeError(MedsegError):
    """A request above the serving limits (`medseg.storage.limits`)."""


class DeadlineExceededError(MedsegError):
    """The request ran past the scoring server's timeout; nothing was published."""


def _decode_scan(encoded: str, row: int, bounds: Limits) -> bytes:
    """The bytes of a base64 `image_b64`, refused above MEDSEG_MAX_SCAN_MB before decoding."""
    if len(encoded) * 3 // 4 > bounds.max_scan_bytes:
        raise RequestTooLargeError(
            f"row {row}: image_b64 holds {describe(len(encoded) * 3 // 4, 'bytes')}, above MEDSEG_MAX_SCAN_MB "
            f"({describe(bounds.max_scan_bytes, 'bytes')}). Send a smaller scan."
        )
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CorruptFileError(f"row {row}: image_b64 is not valid base64 ({exc}). Encode the file's bytes with base64.") from exc


def _overwrite(value: Any, row: int) -> bool:
    text = (_text(value) or "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise ConfigurationError(f"row {row}: overwrite={value!r}; give true or false.")
    return text in ("true", "1")


def request_deadline() -> float | None:
    """When a request that starts now must be done (monotonic seconds): a second before the
    scoring server's own timeout (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, 60 s by default),
    after which it has already answered 504; None outside the server."""
    if not _in_scoring_server():
        return None
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV, "60"))
    except ValueError:
        timeout = 60.0
    return time.monotonic() + timeout - min(1.0, 0.1 * timeout)


def _check_deadline(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceededError(
            f"the request ran past the server's timeout ({TIMEOUT_ENV}) {what}; nothing was published. Send fewer "
            "rows per request, or start the server with a longer timeout."
        )


class _Row(NamedTuple):
    """One checked row: its scan is `source` (an open descriptor and its size) or `image_b64`."""

    row: int
    case_id: str
    image_path: str | None
    source: tuple[int, int] | None
    image_b64: str | None
    output_path: str | None
    overwrite: bool


def segment_requests(segmenter: Segmenter, frame: pd.DataFrame, roots: Roots, deadline: float | None = None) -> pd.DataFrame:
    """Segment each row's scan; see the module docstring for the columns and the rules.

    Every row is checked before any scan is computed: the limits, the paths (read roots for
    `image_path`, write roots for `output_path`, never a symlink, never an existing file
    unless `overwrite`). Each scan is read through the descriptor that was checked. Masks for
    `output_path` are written beside their targets under temporary names and published only
    once every row has succeeded and the deadline has not passed; a failure publishes nothing
    and leaves no file or folder behind.
    """
    bounds = limits()
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "image_path" not in frame.columns and "image_b64" not in frame.columns:
        raise ConfigurationError(
            f"the input has columns {list(frame.columns)[:20]}; it needs `image_path` (a NIfTI file) or `image_b64` "
            "(the file's bytes in base64), one row per scan."
        )
    if len(frame) > bounds.max_rows:
        raise RequestTooLargeError(
            f"the request has {len(frame)} rows, above MEDSEG_SERVE_MAX_ROWS ({bounds.max_rows}). Send the scans in "
            "several requests."
        )
    requests, opened, sources = [], [], set()
    try:
        for row, record in enumerate(frame.to_dict("records")):
            image_path, image_b64 = _text(record.get("image_path")), _text(record.get("image_b64"))
            if (image_path is None) == (image_b64 is None):
                raise ConfigurationError(f"row {row}: give exactly one of image_path and image_b64.")
            output_path = _text(record.get("output_path"))
            source = None
            if image_path is not None:
                fd, info = serving_files.open_scan(image_path, roots, bounds.max_scan_bytes)
                opened.append(fd)
                sources.add((info.st_dev, info.st_ino))
                source = (fd, info.st_size)
            case_id = _text(record.get("case_id")) or (case_id_of(image_path) if image_path else f"case_{row}")
            requests.append(_Row(row, case_id, image_path, source, image_b64, output_path, _overwrite(record.get("overwrite"), row)))
        targets = [r.output_path for r in requests if r.output_path is not None]
        if len(set(targets)) != len(targets):
            raise ConfigurationError("two rows have the same output_path; give each mask its own file.")
        for request in requests:
            if request.output_path is not None:
                serving_files.check_target(request.output_path, roots, request.overwrite, sources)
        return _segment_checked(segmenter, requests, roots, bounds, deadline)
    finally:
        for fd in opened:
            os.close(fd)


def _segment_checked(segmenter: Segmenter, requests: list[_Row], roots: Roots, bounds: Limits, deadline: float | None) -> pd.DataFrame:
    rows, pending, voxels = [], [], 0
    try:
        for row, case_id, image_path, source, image_b64, output_path, overwrite in requests:
            if source is not None:
                raw, name = serving_files.read_all(source[0], source[1]), image_path
            else:
                raw, name = _decode_scan(image_b64, row, bounds), f"row {row} (image_b64)"
            series = read_dicom_series(raw) if raw[:4] == ZIP_MAGIC else None
            scan = series.volume if series is not None else read_volume_bytes(raw, name, role="image", channel=segmenter.plan.channel)
            del raw
            voxels += int(scan.data.size)
            if voxels > bounds.max_request_voxels:
                raise RequestTooLargeError(
                    f"row {row}: the request's scans hold {describe(voxels)} together, above "
                    f"MEDSEG_SERVE_MAX_REQUEST_VOXELS ({describe(bounds.max_request_voxels)}). Send fewer scans per request."
                )
            _check_deadline(deadline, f"before row {row}")
            parts = segmenter.network_part(scan, name)
            qc = segmenter.quality(scan, parts[0])  # how far to trust this mask (medseg.inference.qc)
            mask = segmenter.finisher()(parts)
            del parts
            result = {"case_id": case_id, "mask_path": None, "mask_b64": None, **segmenter.volumes_ml(mask), **qc}
            if series is not None:
                result.update(_dicom_seg_answer(segmenter, series, mask))
            if output_path is None:
                result["mask_b64"] = base64.b64encode(volume_bytes(mask, gzipped=True)).decode("ascii")
            else:
                payload = volume_bytes(mask, gzipped=output_path.endswith(".gz"))
                pending.append(serving_files.stage_mask(output_path, payload, roots, overwrite))
                result["mask_path"] = output_path
            rows.append(result)
        _check_deadline(deadline, "before its masks were published")
        try:
            for mask in pending:
                serving_files.publish(mask)
        except BaseException:
            for mask in pending:
                serving_files.unpublish(mask)
            raise
    finally:
        for mask in pending:
            serving_files.discard(mask)
    return pd.DataFrame(rows)


ZIP_MAGIC = b"PK\x03\x04"


def _dicom_seg_answer(segmenter: Segmenter, series, mask: Volume) -> dict[str, str]:
    """A DICOM scan's SEG (base64) and lineage columns for the answer; the model is named by
    its segmenter (the served model's own URI is not known inside the server)."""
    classes = {int(value): name for value, name in segmenter.plan.classes.items()}
    if series.missing_uids:  # the mask, and its note saying why there is no SEG
        return {**lineage(series), "seg_sop_instance_uid": None, "seg_b64": None}
    with tempfile.TemporaryDirectory(prefix="medseg-seg-") as folder:
        path = Path(folder) / "mask.seg.dcm"
        uid = SegWriter(series, classes, segmenter.plan.display_name, f"served:{segmenter.plan.display_name}")(mask, path)
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return {**lineage(series), "seg_sop_instance_uid": uid, "seg_b64": encoded}


class RequestConflictError(MedsegError):
    """A request id that is still being computed."""


class _Idempotency:
    """Requests by `request_id`: a retry of one still running is refused (no second
    computation), a retry of one done gets the same answer without recomputing or rewriting.
    Bounded: the last 64 answers, those under 8 MiB."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.done: collections.OrderedDict[str, tuple[str, pd.DataFrame]] = collections.OrderedDict()

    def begin(self, key: str, digest: str) -> pd.DataFrame | None:
        with self.lock:
            if key in self.running:
                raise RequestConflictError(f"request_id={key!r} is still being computed; retry it later for its answer.")
            if key in self.done:
                known, answer = self.done[key]
                if known != digest:
                    raise ConfigurationError(f"request_id={key!r} was already used for another request; use a new id.")
                return answer.copy()
            self.running.add(key)
            return None

    def end(self, key: str, digest: str, answer: pd.DataFrame | None) -> None:
        with self.lock:
            self.running.discard(key)
            if answer is not None and int(answer.memory_usage(deep=True).sum()) < 8 * 2**20:
                self.done[key] = (digest, answer.copy())
                while len(self.done) > 64:
                    self.done.popitem(last=False)


_ERROR_CODES = {RequestTooLargeError: RESOURCE_EXHAUSTED, DeadlineExceededError: DEADLINE_EXCEEDED, RequestConflictError: RESOURCE_CONFLICT}


def _install_body_limit() -> None:
    """Cap the body of every request that MLflow's scoring app reads (`Request.body`: it reads
    the whole body, with no limit and no hook). Refused above MEDSEG_SERVE_MAX_BODY_MB, from
    the Content-Length before anything is read, else as soon as the streamed bytes pass it."""
    from starlette.requests import Request

    if getattr(Request.body, "_medseg_limited", False):
        return
    unlimited = Request.body

    async def body(self) -> bytes:
        if not hasattr(self, "_body") and self.scope.get("type") == "http":
            cap = limits().max_body_bytes
            declared = self.headers.get("content-length", "")
            message = (f"the request body is above MEDSEG_SERVE_MAX_BODY_MB ({describe(cap, 'bytes')}); send fewer or "
                       "smaller scans per request.")
            if declared.isdigit() and int(declared) > cap:
                raise MlflowException(message, error_code=RESOURCE_EXHAUSTED)
            chunks, total = [], 0
            async for chunk in self.stream():
                total += len(chunk)
                if total > cap:
                    raise MlflowException(message, error_code=RESOURCE_EXHAUSTED)
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return await unlimited(self)

    body._medseg_limited = True
    Request.body = body


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: `predict(DataFrame) -> DataFrame` (see the module docstring)."""

    def load_context(self, context) -> None:
        serve_roots()  # a misconfigured server fails to start, with the message
        if os.environ.get(SERVER_MODEL_ENV) or _in_scoring_server():
            _install_body_limit()
        config = getattr(context, "model_config", None) or {}
        engine = config.get("engine") or None
        self.segmenter, self.engine, self.profile = load_for_profile(
            context.artifacts[ARTIFACT], config.get("profile") or None, engine and check_engine(str(engine), "the model's engine"))
        self._requests = _Idempotency()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        key = digest = None
        try:
            deadline = request_deadline()
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            if "request_id" in frame.columns:
                ids = {str(v) for v in frame["request_id"] if _text(v)}
                if len(ids) > 1:
                    raise ConfigurationError("request_id differs between rows; give one id per request.")
                key = ids.pop() if ids else None
                frame = frame.drop(columns="request_id")
            if key is not None:
                digest = hashlib.sha256(frame.to_json(orient="split").encode()).hexdigest()
                answer = self._requests.begin(key, digest)
                if answer is not None:
                    return answer
            answer = None
            try:
                answer = segment_requests(self.segmenter, frame, serve_roots(), deadline)
                return answer
            finally:
                if key is not None:
                    self._requests.end(key, digest, answer)
        except MedsegError as exc:
            if not _in_scoring_server():
                raise
            # The scoring server answers any other exception with its traceback; an
            # MlflowException's message alone reaches the client, as a 4xx.
            code = next((c for t, c in _ERROR_CODES.items() if isinstance(exc, t)), INVALID_PARAMETER_VALUE)
            raise MlflowException(str(exc), error_code=code) from None
        except MlflowException:
            raise
        except Exception as exc:
            if not _in_scoring_server():
                raise
            logger.exception("medseg segmenter: unexpected error")
            raise MlflowException(
                f"the segmenter failed ({type(exc).__name__}); nothing was written. The server's log has the details.",
                error_code=INTERNAL_ERROR,
            ) from None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_requirements(engine: str = TENSORFLOW) -> list[str]:
    """What the segmenter needs on `engine`, pinned to the versions installed here: the
    TensorFlow build of this environment (`tensorflow-cpu`, or `tensorflow[and-cuda]` for the
    gpu extra) and Keras, or for `onnxruntime` onnxruntime instead of both; then nibabel, SciPy,
    NumPy, pandas, MLflow, fsspec (scans by path or URL), and pydicom with highdicom (DICOM series
    in, DICOM SEG out). medseg itself travels as code, not a package."""
    requirements = [f"onnxruntime=={_version('onnxruntime')}"]  # both: a TensorFlow variant may be loaded for onnxruntime
    if engine != ONNXRUNTIME and _version("tensorflow-cpu"):
        requirements.append(f"tensorflow-cpu=={_version('tensorflow-cpu')}")
    elif engine != ONNXRUNTIME and _version("tensorflow"):
        cuda = any(_version(name) for name in ("nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12"))
        requirements.append(f"tensorflow{'[and-cuda]' if cuda else ''}=={_version('tensorflow')}")
    for name in ("keras", "nibabel", "scipy", "numpy", "pandas", "mlflow", "fsspec", "pydicom", "highdicom"):
        if _version(name) and not (engine == ONNXRUNTIME and name == "keras"):
            requirements.append(f"{name}=={_version(name)}")
    return requirements


def _medseg_code(folder: Path) -> str:
    """A copy of the medseg package (no bytecode caches) for `code_paths`."""
    target = folder / "medseg"
    shutil.copytree(Path(__file__).parents[1], target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def log_segmenter(segmenter_dir: str | os.PathLike, name: str, registered_model_name: str | None = None,
                  engine: str = TENSORFLOW):
    """Log a segmenter folder to the active MLflow run as a pyfunc model named `name`, whose
    network runs on `engine` (`onnxruntime`: a folder whose ONNX export passed, and no
    TensorFlow or Keras in its requirements).

    Returns:
        MLflow's ModelInfo (its `model_uri` loads the model).
    """
    with tempfile.TemporaryDirectory(prefix="medseg-code-") as code:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=SegmenterModel(),
            artifacts={ARTIFACT: str(segmenter_dir)},
            code_paths=[_medseg_code(Path(code))],
            pip_requirements=pip_requirements(engine),
            signature=SIGNATURE,
            registered_model_name=registered_model_name or None,
            # The keys a load may set (MLflow overrides only keys logged here): the onnxruntime
            # variant's engine is set (its environment has no TensorFlow); "" is the default.
            model_config={"engine": engine if engine != TENSORFLOW else "", "profile": ""},
        )


def onnx_ready(segmenter: Segmenter | Ensemble) -> bool:
    """Whether every network of `segmenter` (an ensemble's members, a cascade's stages) has an
    ONNX export whose parity passed: what the `<name>_onnx` variant needs."""
    if isinstance(segmenter, Ensemble):
        return all(onnx_ready(member) for member in segmenter.members)
    return (segmenter.onnx is not None and segmenter.parity is not None and segmenter.parity.status == PASSED
            and all(onnx_ready(stage) for stage in segmenter.context))


def fetch_segmenter(source: str, local_folders: Mapping[str, str]) -> tuple[str, str]:
    """The local segmenter folder of `predict.model`, and the model URI to record.

    Args:
        source: a key of `local_folders` (`unet`, `conv3d`: the model this project last
            trained), `champion` (`champion_uri`), or an MLflow model URI (`runs:/<run_id>/<name>`,
            `models:/<name>/<version>`), downloaded to a temporary folder that is deleted
            when the process ends.
        local_folders: {model: its segmenter folder}, from the catalog entries
            `<model>.segmenter_folder` (where the training pipelines save `<model>.segmenter`).

    Returns:
        (folder, uri): the folder `Segmenter.load` reads; the URI of the MLflow model when known
        (`runs:/<id>/<model>_segmenter` for a local model whose training run is known), else
        the folder.
    """
    if source == CHAMPION:
        source = champion_uri()
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


CHAMPION = "champion"
REGISTRY_PREFIX = "medseg-"


def champion_uri() -> str:
    """`models:/<name>/<version>` of the version that holds the alias `champion` (set by
    `kedro run --pipeline select`), for the one medseg model in the registry
    (`medseg-<dataset>`) that has it: the version, not the alias, so that what a run records
    still names the model that made its masks after the alias has moved.

    Raises:
        ConfigurationError: none holds it, or several do (then the message lists them and asks
            for the full URI).
    """
    client = mlflow.MlflowClient()
    try:
        registered = client.search_registered_models(filter_string=f"name LIKE '{REGISTRY_PREFIX}%'")
    except Exception as exc:
        raise ConfigurationError(f"predict.model=champion: the model registry cannot be read ({type(exc).__name__}: "
                                 f"{str(exc)[:300]}). Check the tracking URI.") from exc
    names = sorted(model.name for model in registered if CHAMPION in (model.aliases or {}))
    if not names:
        raise ConfigurationError(
            "predict.model=champion: no registered medseg model has the alias `champion`. Choose one first: train with "
            "`kedro run --params cv.folds=5`, then `kedro run --pipeline select`; or give a model URI."
        )
    if len(names) > 1:
        raise ConfigurationError(
            f"predict.model=champion: several datasets have a champion ({', '.join(names)}). Name one: "
            f"predict.model=models:/{names[0]}@champion."
        )
    version = client.get_model_version_by_alias(names[0], CHAMPION).version
    logger.info("predict.model=champion: %s version %s.", names[0], version)
    return f"models:/{names[0]}/{version}"


def _download_segmenter(source: str) -> tuple[str, str]:
    if ":/" not in source:
        raise ConfigurationError(
            f"predict.model={source!r}: give `unet` or `conv3d` (this project's last trained model), `champion` (the "
            "registered champion of `kedro run --pipeline select`), or an MLflow model URI such as "
            "runs:/<run_id>/unet_segmenter or models:/<name>/<version>."
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
    if not (folder / "segmenter.json").is_file() and not is_ensemble(folder):
        raise ConfigurationError(
            f"predict.model={source!r} is not a medseg segmenter (no artifacts/{ARTIFACT}/segmenter.json). Use a "
            "`unet_segmenter` or `conv3d_segmenter` model."
        )
    return str(folder), source
