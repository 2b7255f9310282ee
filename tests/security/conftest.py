"""A tiny segmenter (a 1x1 convolution, no training) served in-process by MLflow's own scoring
app, for the hostile requests of this folder. Every test sends real bytes through
`mlflow.pyfunc.scoring_server.init(...)` and checks the status, the message, that no stack
trace came back, the memory the request cost, and the files."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import os
import resource
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

AFFINE = np.diag([1.0, 1.0, 1.0, 1.0])


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    import keras
    import mlflow

    from medseg.inference.segmenter import Segmenter, SegmenterPlan
    from medseg.serving.model import ARTIFACT, SIGNATURE, SegmenterModel

    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="ones", bias_initializer="zeros")(inputs)
    plan = SegmenterPlan(
        model_key="unet", display_name="UNet", window="slice", target_spacing=(1.0, 1.0, 1.0), interpolation_order=1,
        clip_percentiles=None, crop_margin=None, channel=None, label_mode="binary", classes={"1": "bright"},
        lateralized=[], threshold=0.5, depth=0, patch_size=None, overlap=0.5, sigma_scale=0.125,
        features_per_voxel=8.0, memory_gb=0.25,
    )
    root = tmp_path_factory.mktemp("tiny-segmenter")
    Segmenter(keras.Model(inputs, outputs), plan).save(root / "segmenter")
    mlflow.pyfunc.save_model(
        str(root / "pyfunc"), python_model=SegmenterModel(), artifacts={ARTIFACT: str(root / "segmenter")}, signature=SIGNATURE
    )
    return root / "pyfunc"


@pytest.fixture
def client(tiny_model_path, monkeypatch):
    """A TestClient of MLflow's scoring app over the tiny segmenter, as `mlflow models serve`
    makes it (the server's environment variables set, and restored after the test)."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    for name in ("MEDSEG_SERVE_ROOTS", "MEDSEG_SERVE_READ_ROOTS", "MEDSEG_SERVE_WRITE_ROOTS", "MEDSEG_SERVE_ANY_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("__pyfunc_model_path__", str(tiny_model_path))
    model = mlflow.pyfunc.load_model(str(tiny_model_path))
    return TestClient(scoring_server.init(model))


def nifti_bytes(data: np.ndarray, affine=AFFINE, gz: bool = True, **header) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    for key, value in header.items():
        img.header[key] = value
    raw = img.to_bytes()
    return gzip.compress(raw, mtime=0) if gz else raw


def scan(shape=(16, 16, 8)) -> np.ndarray:
    data = np.zeros(shape, np.float32)
    data[4:12, 4:12, 2:6] = 100.0
    return data


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def invoke(client, rows: list[dict]):
    columns = sorted({key for row in rows for key in row})
    payload = {"dataframe_split": {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}}
    return client.post("/invocations", json=payload)


class PeakMemory:
    """The growth of this process's resident memory while the block runs, sampled every 2 ms
    (the peak over the block, above the resident size at its start), in MiB."""

    def __enter__(self):
        self._stop = threading.Event()
        self.start = self.peak = _rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def grown_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize()


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file and folder under `folders` (and the folders' parents' direct entries): its
    path -> a digest of its bytes, or `dir`/`link`."""
    seen: dict[str, str] = {}
    for folder in folders:
        for base in {folder, folder.parent}:
            for path in [base, *(base.rglob("*") if base == folder else base.iterdir())]:
                if path.is_symlink():
                    seen[str(path)] = f"link:{os.readlink(path)}"
                elif path.is_dir():
                    seen[str(path)] = "dir"
                elif path.is_file():
                    seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def assert_refused(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text[:2000]
    body = response.json()
    assert "stack_trace" not in body and "Traceback" not in response.text
    for word in words:
        assert word in body["message"], body["message"][:2000]
    return body


def zip_bomb(zeros: int = 200 * 2**20, members: int = 1, name: str = "IM{:04d}.dcm") -> bytes:
    """A zip of `members` members of `zeros` zero bytes each, declared honestly in its headers
    (~1000:1), streamed into the archive so the test never holds the zeros."""
    import zipfile

    stream = io.BytesIO()
    chunk = bytes(min(zeros, 2**20))
    with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
        for index in range(members):
            with archive.open(name.format(index), "w", force_zip64=zeros >= 2**31) as out:
                for _ in range(zeros // len(chunk)):
                    out.write(chunk)
    return stream.getvalue()


def gz_bomb(claimed_shape=(16, 16, 8), zeros: int = 200 * 2**20) -> bytes:
    """A valid gzip NIfTI header for `claimed_shape` followed by `zeros` zero bytes (~1000:1)."""
    img = nib.Nifti1Image(np.zeros(claimed_shape, np.float32), AFFINE)
    head = img.to_bytes()
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", mtime=0) as out:
        out.write(head)
        chunk = bytes(2**20)
        for _ in range(zeros // 2**20):
            out.write(chunk)
    return stream.getvalue()
