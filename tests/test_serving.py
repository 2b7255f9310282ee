"""The segmenter as an MLflow model (`unet_segmenter`, medseg.serving.model): loaded in a fresh
process, served over REST by `mlflow models serve`, registered and used by `predict`.

One tiny `unet` training run (module fixture) and one `predict` run on the phantoms' images
give the reference masks; every other way of running the model must write the same masks.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import REGISTERED_UNET, TINY_DATA_PARAMS, copy_project, free_port, mlflow_runs, run_pipeline, tracking_store

REGISTERED = REGISTERED_UNET
READ_ROOTS, WRITE_ROOTS, ANY_PATH = "MEDSEG_SERVE_READ_ROOTS", "MEDSEG_SERVE_WRITE_ROOTS", "MEDSEG_SERVE_ANY_PATH"
POLICY = ("MEDSEG_SERVE_ROOTS", READ_ROOTS, WRITE_ROOTS, ANY_PATH)
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
REPO_SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass(frozen=True)
class Trained:
    project: Path
    tracking_uri: str
    run_id: str                # the unet training run
    images: list[Path]         # the phantoms' scans
    pipeline_out: Path         # `predict.model=unet` output: <case>.nii.gz + predictions.csv
    scratch: Path              # a module-wide temporary folder

    @property
    def model_uri(self) -> str:
        return f"runs:/{self.run_id}/unet_segmenter"

    def pipeline_mask(self, image: Path) -> Path:
        return self.pipeline_out / f"{case_of(image)}.nii.gz"

    def pipeline_volume(self, image: Path) -> float:
        table = pd.read_csv(self.pipeline_out / "predictions.csv").set_index("case_id")
        return float(table.loc[case_of(image), "volume_ml"])


def case_of(image: Path) -> str:
    """`case_003_0000.nii.gz` -> `case_003`."""
    return re.sub(r"_\d{4}$", "", image.name[: -len(".nii.gz")])


def assert_same_mask(actual: Path, expected: Path) -> None:
    got, want = nib.load(str(actual)), nib.load(str(expected))
    assert got.shape == want.shape
    assert got.get_data_dtype() == want.get_data_dtype()
    np.testing.assert_array_equal(got.affine, want.affine)
    assert np.array_equal(np.asanyarray(got.dataobj), np.asanyarray(want.dataobj)), f"{actual} differs from {expected}"


def clean_env(python: str = sys.executable, **extra: str) -> dict[str, str]:
    """This process's environment without the serving policy variables, plus `extra`; the bin/
    of `python`'s venv first on PATH (`mlflow models serve` starts `uvicorn` by name)."""
    env = {k: v for k, v in os.environ.items() if k not in (*POLICY, SERVING_ENV, "MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def trained(trained_unet: Path, tmp_path_factory) -> Trained:
    scratch = tmp_path_factory.mktemp("serving")
    project = copy_project(trained_unet, scratch / "project")  # conftest.SHARED_UNET, registered as REGISTERED
    client, runs = mlflow_runs(project)
    (training,) = [run for run in runs if run.info.run_name.startswith("UNet-")]
    assert training.info.status == "FINISHED"

    images = sorted((project / "data" / "01_raw" / "synthetic" / "imagesTr").glob("*.nii.gz"))
    assert len(images) == TINY_DATA_PARAMS["data.synthetic.n_cases"]
    pipeline_out = scratch / "pipeline_masks"
    run_pipeline(
        project,
        "predict",
        {"predict.model": "unet", "predict.input_dir": str(images[0].parent), "predict.output_dir": str(pipeline_out)},
    )
    for image in images:  # a constant mask would make every comparison below prove little
        labels = set(np.unique(np.asanyarray(nib.load(str(pipeline_out / f"{case_of(image)}.nii.gz")).dataobj)))
        assert labels == {0, 1}, f"{image.name}: the tiny model's mask holds only {labels}"
    return Trained(project, f"sqlite:///{project / 'mlflow.db'}", training.info.run_id, images, pipeline_out, scratch)


def test_predict_pipeline_writes_one_mask_per_scan_from_the_training_run(trained: Trained):
    table = pd.read_csv(trained.pipeline_out / "predictions.csv")
    assert sorted(table["case_id"]) == sorted(case_of(image) for image in trained.images)
    assert set(table["model_uri"]) == {trained.model_uri}
    for image in trained.images:
        mask, scan = nib.load(str(trained.pipeline_mask(image))), nib.load(str(image))
        assert mask.shape == scan.shape[:3]
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
        data = np.asanyarray(mask.dataobj)
        spacing = np.prod(mask.header.get_zooms()[:3])
        assert trained.pipeline_volume(image) == pytest.approx((data > 0).sum() * spacing / 1000, rel=1e-6)

    _, runs = mlflow_runs(trained.project)
    predict_run = runs[0]
    assert re.fullmatch(r"Predict-UNet-\d{8}-run1", predict_run.info.run_name)
    assert predict_run.info.status == "FINISHED"
    assert predict_run.data.tags["medseg.source_model_uri"] == trained.model_uri


# -- a fresh process: mlflow.pyfunc.load_model, medseg never imported beforehand -------------

LOAD_AND_PREDICT = """
import json, sys
import mlflow
import pandas as pd

assert "medseg" not in sys.modules
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
result = model.predict(pd.DataFrame(json.loads(sys.argv[3])))
import medseg
print("RESULT " + json.dumps({"medseg_file": medseg.__file__, "rows": result.to_dict("records")}))
"""


def test_pyfunc_in_a_fresh_process_runs_the_shipped_code_and_matches_the_pipeline(trained: Trained, tmp_path: Path):
    outputs = [tmp_path / "pyfunc" / f"{case_of(image)}.nii.gz" for image in trained.images]
    frame = {"image_path": [str(p) for p in trained.images], "output_path": [str(p) for p in outputs]}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_PREDICT, trained.tracking_uri, trained.model_uri, json.dumps(frame)],
        cwd=tmp_path, env=clean_env(**{READ_ROOTS: str(trained.images[0].parent), WRITE_ROOTS: str(tmp_path)}),
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line[len("RESULT "):])

    # The medseg that ran is the copy inside the downloaded model: <model>/code/medseg/__init__.py,
    # beside the MLmodel file of this run's unet_segmenter.
    medseg_file = Path(result["medseg_file"]).resolve()
    assert REPO_SRC not in medseg_file.parents
    assert medseg_file.parent.name == "medseg" and medseg_file.parents[1].name == "code"
    mlmodel = (medseg_file.parents[2] / "MLmodel").read_text()
    assert f"run_id: {trained.run_id}" in mlmodel
    assert "python_function" in mlmodel

    rows = result["rows"]
    assert [row["case_id"] for row in rows] == [case_of(image) for image in trained.images]
    for image, output, row in zip(trained.images, outputs, rows):
        assert row["mask_path"] == str(output)
        assert row["mask_b64"] is None
        assert_same_mask(output, trained.pipeline_mask(image))
        assert row["volume_ml"] == pytest.approx(trained.pipeline_volume(image), rel=1e-12, abs=0)
    assert sorted(p.name for p in (tmp_path / "pyfunc").iterdir()) == sorted(p.name for p in outputs)  # no temp files left


# -- requirements ---------------------------------------------------------------------------

def logged_requirements(trained: Trained, name: str, dst: Path) -> list[str]:
    import mlflow

    folder = mlflow.artifacts.download_artifacts(
        artifact_uri=f"runs:/{trained.run_id}/{name}", dst_path=str(dst), tracking_uri=trained.tracking_uri
    )
    lines = (Path(folder) / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def assert_satisfied_here(requirements: list[str]) -> None:
    from packaging.requirements import Requirement

    for line in requirements:
        requirement = Requirement(line)  # raises on -r/-c lines or anything pip-only
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        installed = importlib.metadata.version(requirement.name)
        assert requirement.specifier.contains(installed, prereleases=True), f"{line}: {installed} installed"


@pytest.mark.parametrize("name", ["unet_segmenter", "unet_model"])
def test_logged_requirements_pin_this_environment_and_leave_medseg_out(trained: Trained, tmp_path: Path, name: str):
    requirements = logged_requirements(trained, name, tmp_path)
    names = [re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower().replace("_", "-") for line in requirements]
    assert "medseg" not in names
    assert not any("medseg" in line.lower() for line in requirements)
    assert f"tensorflow-cpu=={importlib.metadata.version('tensorflow-cpu')}" in requirements
    assert f"keras=={importlib.metadata.version('keras')}" in requirements
    assert "tensorflow" not in names  # the cpu build only: never both
    if name == "unet_segmenter":
        # pydicom and highdicom: the segmenter reads DICOM series and writes DICOM SEG.
        for package in ("nibabel", "scipy", "numpy", "pandas", "mlflow", "fsspec", "pydicom", "highdicom"):
            assert f"{package}=={importlib.metadata.version(package)}" in requirements
    assert_satisfied_here(requirements)


# -- REST: mlflow models serve ---------------------------------------------------------------

@contextlib.contextmanager
def model_server(trained: Trained, log: Path, roots: tuple[Path, Path] | None, python: str = sys.executable,
                 model_uri: str | None = None):
    """`mlflow models serve` of the training run's unet_segmenter (or `model_uri`) from the
    environment of `python`; yields its base URL. The server (its own process group: mlflow,
    then uvicorn) is terminated on exit."""
    import httpx

    extra = {"MLFLOW_TRACKING_URI": trained.tracking_uri}
    if roots is not None:
        extra[READ_ROOTS], extra[WRITE_ROOTS] = (str(root) for root in roots)
    port = free_port()
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            [python, "-m", "mlflow", "models", "serve", "-m", model_uri or trained.model_uri, "--env-manager", "local",
             "-p", str(port), "-h", "127.0.0.1"],
            cwd=log.parent, env=clean_env(python, **extra), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the model server exited ({server.returncode}):\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no /ping answer in 120 s:\n{log.read_text()[-4000:]}"
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def invoke(url: str, rows: list[dict]):
    import httpx

    columns = list(rows[0])
    payload = {"dataframe_split": {"columns": columns, "data": [[row[c] for c in columns] for row in rows]}}
    return httpx.post(f"{url}/invocations", json=payload, timeout=120)


def b64_of(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def assert_b64_mask(encoded: str, expected: Path, folder: Path) -> None:
    raw = base64.b64decode(encoded)
    assert raw[:2] == b"\x1f\x8b"  # gzipped NIfTI
    folder.mkdir(parents=True, exist_ok=True)
    decoded = folder / f"decoded_{expected.name}"
    decoded.write_bytes(raw)
    assert_same_mask(decoded, expected)


@pytest.fixture(scope="module")
def served_with_roots(trained: Trained):
    """A server limited to the scans' folder and an output folder: (url, output folder)."""
    out = trained.scratch / "served_out"
    out.mkdir()
    with model_server(trained, trained.scratch / "serve_roots.log", (trained.images[0].parent, out)) as url:
        yield url, out


def test_served_model_writes_masks_under_the_roots(trained: Trained, served_with_roots):
    url, out = served_with_roots
    images = trained.images[:2]
    targets = [out / f"{case_of(image)}.nii.gz" for image in images]
    response = invoke(url, [{"image_path": str(i), "output_path": str(t)} for i, t in zip(images, targets)])
    assert response.status_code == 200, response.text[-4000:]
    predictions = response.json()["predictions"]
    assert [row["case_id"] for row in predictions] == [case_of(image) for image in images]
    for image, target, row in zip(images, targets, predictions):
        assert row["mask_path"] == str(target)
        assert row["mask_b64"] is None
        assert_same_mask(target, trained.pipeline_mask(image))
        assert row["volume_ml"] == pytest.approx(trained.pipeline_volume(image), rel=1e-12, abs=0)


def test_served_model_returns_the_mask_of_image_b64(trained: Trained, served_with_roots, tmp_path: Path):
    url, _ = served_with_roots
    image = trained.images[2]
    response = invoke(url, [{"image_b64": b64_of(image), "case_id": "sent"}])
    assert response.status_code == 200, response.text[-4000:]
    (row,) = response.json()["predictions"]
    assert row["case_id"] == "sent"
    assert row["mask_path"] is None
    assert row["volume_ml"] == pytest.approx(trained.pipeline_volume(image), rel=1e-12, abs=0)
    assert_b64_mask(row["mask_b64"], trained.pipeline_mask(image), tmp_path)


def test_served_model_refuses_an_output_outside_the_roots(trained: Trained, served_with_roots, tmp_path: Path):
    url, out = served_with_roots
    outside = tmp_path / "outside" / "x.nii.gz"
    inside = out / "refused_batch.nii.gz"
    # The allowed row comes first: a refused row fails the whole request before anything is read.
    response = invoke(url, [
        {"image_path": str(trained.images[0]), "output_path": str(inside)},
        {"image_path": str(trained.images[1]), "output_path": str(outside)},
    ])
    assert 400 <= response.status_code < 600
    assert WRITE_ROOTS in response.text
    assert "output_path" in response.text and str(outside) in response.text
    assert not outside.exists() and not outside.parent.exists()
    assert not inside.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".refused_batch")]  # no temporary file left


# -- the registry ----------------------------------------------------------------------------

def test_registered_version_drives_the_predict_pipeline(trained: Trained, tmp_path: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=trained.tracking_uri)
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert [str(v.version) for v in versions] == ["1"]
    version = client.get_model_version(REGISTERED, "1")
    assert version.run_id == trained.run_id
    assert version.source.endswith("unet_segmenter") or version.source.startswith("models:/")

    uri = f"models:/{REGISTERED}/1"
    out = tmp_path / "registry_masks"
    run_pipeline(
        trained.project,
        "predict",
        {"predict.model": uri, "predict.input_dir": str(trained.images[0].parent), "predict.output_dir": str(out)},
    )
    for image in trained.images:
        assert_same_mask(out / f"{case_of(image)}.nii.gz", trained.pipeline_mask(image))
    table = pd.read_csv(out / "predictions.csv")
    assert set(table["model_uri"]) == {uri}
    expected = pd.read_csv(trained.pipeline_out / "predictions.csv")
    np.testing.assert_array_equal(table["volume_ml"].to_numpy(), expected["volume_ml"].to_numpy())

    _, runs = mlflow_runs(trained.project)
    run = runs[0]
    match = re.fullmatch(r"Predict-UNet-(\d{8})-run2", run.info.run_name)
    assert match, run.info.run_name
    started = dt.datetime.fromtimestamp(run.info.start_time / 1000)
    assert match.group(1) in {started.strftime("%Y%m%d"), dt.date.today().strftime("%Y%m%d")}
    assert run.info.status == "FINISHED"
    assert run.data.tags["medseg.source_model_uri"] == uri


# -- the onnxruntime engine: parity, predict, and a served model without TensorFlow -------------

# Built by `make serve-onnx-env` from the requirements the onnxruntime variant logs.
SERVE_ONNX_ENV = REPO_SRC.parent / ".venv-serve-onnx"


def masks_agree(actual: Path, expected: Path) -> bool:
    """Whether two mask files agree within the project's tolerance between engines."""
    from medseg.inference.engines import mask_agreement

    got, want = (np.asanyarray(nib.load(str(p)).dataobj) for p in (actual, expected))
    return mask_agreement(want, got, (1,))["agree"]


def test_onnx_parity_is_logged_and_predict_on_onnxruntime_gives_tensorflows_masks(trained: Trained, tmp_path: Path):
    from medseg.inference.engines import TOLERANCE

    client = mlflow_runs(trained.project)[0]
    metrics = client.get_run(trained.run_id).data.metrics
    record = json.loads((trained.project / "data" / "08_reporting" / "unet" / "onnx_parity.json").read_text())
    saved = json.loads((trained.project / "data" / "06_models" / "unet" / "segmenter" / "onnx.json").read_text())
    assert record == saved and record["status"] == "passed" and record["tolerance"] == TOLERANCE
    splits = pd.read_csv(trained.project / "data" / "03_primary" / "splits.csv")
    assert sorted(record["cases"]) == sorted(splits.loc[splits["split"] == "test", "case_id"])
    assert metrics["onnx_export_passed"] == 1.0
    assert metrics["onnx_parity_min_dice"] == pytest.approx(record["min_dice"])
    assert all(case["agree"] for case in record["cases"].values())
    assert metrics["onnx_parity_cases"] == len(record["cases"])
    artifacts = {a.path for a in client.list_artifacts(trained.run_id, "unet")}
    assert "unet/onnx_parity.json" in artifacts

    out = tmp_path / "onnx_masks"
    run_pipeline(trained.project, "predict", {"predict.model": "unet", "predict.input_dir": str(trained.images[0].parent),
                                              "predict.output_dir": str(out), "predict.engine": "onnxruntime"})
    table = pd.read_csv(out / "predictions.csv")
    assert set(table["engine"]) == {"onnxruntime"}
    assert set(pd.read_csv(trained.pipeline_out / "predictions.csv")["engine"]) == {"tensorflow"}
    for image in trained.images:
        assert masks_agree(out / f"{case_of(image)}.nii.gz", trained.pipeline_mask(image))


def test_the_onnx_variant_requires_no_tensorflow_or_keras(trained: Trained, tmp_path: Path):
    requirements = logged_requirements(trained, "unet_segmenter_onnx", tmp_path)
    names = [re.split(r"[\[<>=!~; ]", line, maxsplit=1)[0].lower() for line in requirements]
    assert not {"tensorflow", "tensorflow-cpu", "keras", "tf2onnx"} & set(names)
    assert f"onnxruntime=={importlib.metadata.version('onnxruntime')}" in requirements
    for package in ("nibabel", "numpy", "mlflow", "fsspec", "pydicom", "highdicom"):
        assert f"{package}=={importlib.metadata.version(package)}" in requirements


def test_the_onnx_variant_serves_from_an_environment_built_from_its_requirements(trained: Trained, tmp_path: Path):
    """The environment `make serve-onnx-env` built, checked against this model's own
    requirements.txt with pip (offline: `--no-index`, so every pin must already be there), has no
    TensorFlow, and `mlflow models serve --env-manager local` of the variant segments a scan as
    the TensorFlow pipeline did."""
    python = SERVE_ONNX_ENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"{SERVE_ONNX_ENV} is missing: `make serve-onnx-env` builds it (make test does)")
    model = f"runs:/{trained.run_id}/unet_segmenter_onnx"
    import mlflow

    folder = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(tmp_path / "model"),
                                                 tracking_uri=trained.tracking_uri)
    pip = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--quiet", "-r",
                          str(Path(folder) / "requirements.txt")], capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, f"the environment lacks a requirement of the model: {pip.stderr[-3000:]}"
    probe = subprocess.run([str(python), "-c", "import tensorflow"], capture_output=True, text=True, env=clean_env(str(python)))
    assert probe.returncode != 0 and "No module named 'tensorflow'" in probe.stderr
    with model_server(trained, tmp_path / "serve_onnx.log", None, python=str(python), model_uri=model) as url:
        image = trained.images[1]
        response = invoke(url, [{"image_b64": b64_of(image), "case_id": case_of(image)}])
        assert response.status_code == 200, response.text[-4000:]
        (row,) = response.json()["predictions"]
    decoded = tmp_path / "served_onnx.nii.gz"
    decoded.write_bytes(base64.b64decode(row["mask_b64"]))
    assert masks_agree(decoded, trained.pipeline_mask(image))
    assert "tensorflow" not in (tmp_path / "serve_onnx.log").read_text().lower()


def test_inference_profiles_are_measured_recorded_and_used_by_predict(trained: Trained, tmp_path: Path):
    from medseg.inference.profiles import BALANCED_DICE, FAST_DICE

    plan = json.loads((trained.project / "data" / "06_models" / "unet" / "segmenter" / "segmenter.json").read_text())
    table = pd.read_csv(trained.project / "data" / "08_reporting" / "unet" / "profiles.csv")
    profiles = plan["profiles"]
    assert set(profiles) == {"fast", "balanced", "accurate"}
    # every candidate the model has: mirroring none and over x, y (z never changes a whole slice),
    # with and without the largest component, on both engines (the export passed)
    assert len(table) == 2 * 2 * 2 and set(table["engine"]) == {"tensorflow", "onnxruntime"}
    best = table["dice"].max()
    assert profiles["accurate"]["dice"] == pytest.approx(best)
    for name, margin in (("balanced", BALANCED_DICE), ("fast", FAST_DICE)):
        within = table[table["dice"] >= best - margin]
        assert profiles[name]["seconds"] == pytest.approx(within["seconds"].min())
        assert name in table.loc[table["label"] == profiles[name]["label"], "profiles"].iloc[0].split()
    assert table["pareto"].any()
    metrics = mlflow_runs(trained.project)[0].get_run(trained.run_id).data.metrics
    assert metrics["profile_accurate_dice"] == pytest.approx(best)

    out = tmp_path / "accurate"
    run_pipeline(trained.project, "predict", {"predict.model": "unet", "predict.input_dir": str(trained.images[0].parent),
                                              "predict.output_dir": str(out), "predict.profile": "accurate",
                                              "predict.viewer": True})
    written = pd.read_csv(out / "predictions.csv")
    assert set(written["profile"]) == {"accurate"} and set(written["engine"]) == {profiles["accurate"]["engine"]}
    # predict.viewer: a page beside each mask, holding that mask over its scan
    pattern = re.compile(r'<script type="application/octet-stream" id="volume-(\w+)">([^<]*)</script>')
    for image in trained.images:
        page = (out / f"{case_of(image)}.html").read_text()
        volumes = dict(pattern.findall(page))
        assert set(volumes) == {"scan", "prediction"}  # no reference for a new scan
        shown = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(volumes["prediction"])))
        mask = nib.load(str(out / f"{case_of(image)}.nii.gz"))
        np.testing.assert_array_equal(np.asanyarray(shown.dataobj), np.asanyarray(mask.dataobj))
        np.testing.assert_allclose(shown.affine, mask.affine, atol=1e-5)
    assert set(pd.read_csv(trained.pipeline_out / "predictions.csv")["profile"]) == {"plan"}


def test_a_load_chooses_the_engine_and_the_profile(trained: Trained):
    """MLflow overrides only the model configuration's logged keys: `engine` and `profile` are
    logged empty, so a load (or a server, through MLFLOW_PYFUNC_INFERENCE_CONFIG) sets them."""
    import mlflow

    with tracking_store(trained.project):
        plain = mlflow.pyfunc.load_model(trained.model_uri).unwrap_python_model()
        chosen = mlflow.pyfunc.load_model(trained.model_uri, model_config={"engine": "onnxruntime", "profile": "fast"})
    assert (plain.engine, plain.profile) == ("tensorflow", "plan")
    model = chosen.unwrap_python_model()
    assert (model.engine, model.profile) == ("onnxruntime", "fast") and model.segmenter.engine == "onnxruntime"
    fast = json.loads((trained.project / "data/06_models/unet/segmenter/segmenter.json").read_text())["profiles"]["fast"]
    assert model.segmenter.plan.mirror_axes == fast["mirror_axes"]
