"""A served segmenter under load: good requests mixed with hostile ones, 8 clients at once.

`mlflow models serve` of a small segmenter (a 1x1 convolution on 64 x 64 x 32 scans: the
network is not what is measured, the server's defences are) on loopback, with read and write
roots. For `--seconds` (default 30), `--clients` threads (default 8) send in turn:

- good: a scan by path with a new `output_path` under the write root, and a scan in `image_b64`;
- hostile: a 352-byte header claiming 512 x 512 x 256 int16, a gzip bomb (200 MiB of zeros in
  ~200 KiB), a zip bomb (a `.dcm` member of 200 MiB of zeros, its sizes declared honestly), a
  64 mm spacing, a path through a symlink to outside the roots, an `output_path` onto an
  existing file (the user's own), a body above the cap, and a folder as `output_path`.

It prints the p50 and p95 latency of the good requests, their error rate, the hostile requests
refused (and with which statuses), the server's peak RSS (the server and its children, sampled
every 50 ms) against its RSS after the first good request, and whether any file outside the
write root changed. Exits 1 when a good request failed, a hostile one was not refused, the
server's RSS grew by more than 512 MiB over its warm size, or a file was touched.

Run: .venv/bin/python benchmarks/serve_load.py [--seconds 30] [--clients 8]
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import io
import itertools
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil
from _targets import Target, report_targets

RSS_GROWTH_LIMIT_MIB = 512
AFFINE = np.eye(4)


def build_model(root: Path) -> Path:
    import keras
    import mlflow

    from medseg.inference.segmenter import Segmenter, SegmenterPlan
    from medseg.serving.model import ARTIFACT, SIGNATURE, SegmenterModel

    inputs = keras.Input((None, None, 1))
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid", kernel_initializer="ones")(inputs)
    plan = SegmenterPlan(
        model_key="unet", display_name="UNet", window="slice", target_spacing=(1.0, 1.0, 1.0), interpolation_order=1,
        clip_percentiles=None, crop_margin=None, channel=None, label_mode="binary", classes={"1": "bright"},
        lateralized=[], threshold=0.5, depth=0, patch_size=None, overlap=0.5, sigma_scale=0.125,
        features_per_voxel=8.0, memory_gb=0.25,
    )
    Segmenter(keras.Model(inputs, outputs), plan).save(root / "segmenter")
    mlflow.pyfunc.save_model(str(root / "pyfunc"), python_model=SegmenterModel(),
                             artifacts={ARTIFACT: str(root / "segmenter")}, signature=SIGNATURE)
    return root / "pyfunc"


def nifti(data: np.ndarray, affine=AFFINE) -> bytes:
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return gzip.compress(img.to_bytes(), mtime=0)


def scan() -> np.ndarray:
    data = np.zeros((64, 64, 32), np.float32)
    data[16:48, 16:48, 8:24] = 100.0
    return data


def hostile_payloads(read: Path, write: Path, outside: Path) -> dict[str, list[dict]]:
    forged = nib.Nifti1Image(np.zeros((1, 1, 1), np.int16), AFFINE)
    forged.header.set_data_shape((512, 512, 256))
    forged.header["vox_offset"] = 352
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", mtime=0) as out:
        out.write(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), AFFINE).to_bytes())
        for _ in range(200):
            out.write(bytes(2**20))
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bomb, bomb.open("export/IM0001.dcm", "w") as member:
        for _ in range(200):
            member.write(bytes(2**20))
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return {
        "forged_header": [{"image_b64": b64(forged.header.binaryblock + b"\0" * 4)}],
        "gzip_bomb": [{"image_b64": b64(stream.getvalue())}],
        "zip_bomb": [{"image_b64": b64(archive.getvalue())}],
        "spacing_64mm": [{"image_b64": b64(nifti(np.ones((16, 16, 16), np.float32), np.diag([64.0, 64, 64, 1])))}],
        "symlink_out": [{"image_path": str(read / "escape" / "secret.nii.gz")}],
        "overwrite_users_file": [{"image_path": str(read / "a.nii.gz"), "output_path": str(write / "users_own.nii.gz")}],
        "folder_as_output": [{"image_path": str(read / "a.nii.gz"), "output_path": str(write / "a_folder.nii.gz")}],
        "body_over_cap": [{"image_b64": "A" * (3 * 2**20)}],
    }


def payload(rows: list[dict]) -> dict:
    columns = sorted({key for row in rows for key in row})
    return {"dataframe_split": {"columns": columns, "data": [[row.get(c) for c in columns] for row in rows]}}


def digests(*folders: Path) -> dict[str, str]:
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink():
                out[str(path)] = f"link:{os.readlink(path)}"
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def tree_rss(pid: int) -> int:
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.Error:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
          f"({psutil.cpu_count(logical=False)} physical)")
    with tempfile.TemporaryDirectory(prefix="medseg-serve-load-") as scratch:
        scratch = Path(scratch)
        read, write, outside = scratch / "in", scratch / "out", scratch / "outside"
        for folder in (read, write, outside):
            folder.mkdir()
        (read / "a.nii.gz").write_bytes(nifti(scan()))
        (outside / "secret.nii.gz").write_bytes(nifti(scan()))
        (read / "escape").symlink_to(outside)
        (write / "users_own.nii.gz").write_text("the user's own file")
        (write / "a_folder.nii.gz").mkdir()
        model = build_model(scratch / "model")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env = {**os.environ, "MEDSEG_SERVE_READ_ROOTS": str(read), "MEDSEG_SERVE_WRITE_ROOTS": str(write),
               "MEDSEG_SERVE_MAX_BODY_MB": "2", "KEDRO_DISABLE_TELEMETRY": "true",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        log = open(scratch / "server.log", "wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    print((scratch / "server.log").read_text()[-3000:])
                    return 1
                try:
                    if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            good_b64 = [{"image_b64": base64.b64encode(nifti(scan())).decode()}]
            warm = httpx.post(f"{url}/invocations", json=payload(good_b64), timeout=60)
            assert warm.status_code == 200, warm.text[:2000]
            warm_rss = tree_rss(server.pid)
            before = digests(read, outside) | {k: v for k, v in digests(write).items() if "mask_" not in k}
            hostile = hostile_payloads(read, write, outside)
            counter = itertools.count()
            lock = threading.Lock()
            good_latency, good_failures, refused, not_refused = [], [], {}, []
            peak = [warm_rss]
            stop = time.monotonic() + args.seconds

            def sample():
                while time.monotonic() < stop + 1:
                    peak[0] = max(peak[0], tree_rss(server.pid))
                    time.sleep(0.05)

            def client():
                with httpx.Client(timeout=120) as http:
                    while time.monotonic() < stop:
                        n = next(counter)
                        if n % 2 == 0:
                            rows = ([{"image_path": str(read / "a.nii.gz"), "output_path": str(write / f"mask_{n}.nii.gz")}]
                                    if n % 4 == 0 else good_b64)
                            start = time.perf_counter()
                            response = http.post(f"{url}/invocations", json=payload(rows))
                            with lock:
                                if response.status_code == 200:
                                    good_latency.append(time.perf_counter() - start)
                                else:
                                    good_failures.append(response.text[:300])
                        else:
                            name = list(hostile)[(n // 2) % len(hostile)]
                            response = http.post(f"{url}/invocations", json=payload(hostile[name]))
                            with lock:
                                if 400 <= response.status_code < 600 and "Traceback" not in response.text:
                                    refused.setdefault(name, set()).add(response.status_code)
                                else:
                                    not_refused.append((name, response.status_code, response.text[:300]))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            sampler.join()
            after = digests(read, outside) | {k: v for k, v in digests(write).items() if "mask_" not in k}
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
            log.close()
    latency = np.array(good_latency) * 1000
    growth = (peak[0] - warm_rss) / 2**20
    touched = sorted(set(before.items()) ^ set(after.items()))
    print(f"{args.clients} clients for {args.seconds:.0f} s: {len(good_latency)} good requests answered, "
          f"{len(good_failures)} failed ({len(good_failures) / max(1, len(good_latency) + len(good_failures)):.1%})")
    if len(latency):
        print(f"good latency: p50 {np.percentile(latency, 50):.0f} ms, p95 {np.percentile(latency, 95):.0f} ms")
    print("hostile refused: " + ", ".join(f"{name} {sorted(codes)}" for name, codes in sorted(refused.items())))
    print(f"hostile NOT refused: {not_refused[:5]}")
    print(f"server RSS: warm {warm_rss / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB (+{growth:.0f} MiB; "
          f"limit +{RSS_GROWTH_LIMIT_MIB})")
    print(f"files outside the new masks changed: {touched[:5] or 'none'}")
    if good_failures:
        print(f"first good failure: {good_failures[0]}")
    return report_targets([
        Target("good requests failed", len(good_failures), "<=", 0),
        Target("hostile requests not refused", len(not_refused), "<=", 0),
        Target("server RSS growth over warm (MiB)", growth, "<=", RSS_GROWTH_LIMIT_MIB),
        Target("files changed outside the new masks", len(touched), "<=", 0),
    ])

if __name__ == "__main__":
    sys.exit(main())
