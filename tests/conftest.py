"""Shared fixtures: a throw-away copy of the Kedro project and a runner for its pipelines."""

from __future__ import annotations

import inspect
import os
import re
import shutil
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import pytest

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]


# The modules that train several models, longest first (as --durations measured them), then
# the rest in their usual order: with --dist loadscope a module runs whole on one worker, and a
# long one drawn last would keep the suite waiting while the other workers sit idle.
LONG_MODULES = (
    "test_cross_validation.py", "test_resume.py", "test_planned_runs.py", "test_failed_run_keeps_outputs.py",
    "test_distribute.py", "test_cascade.py", "test_predict_pipeline.py", "test_learning.py", "test_serving.py",
    "test_multiclass.py", "test_cli.py", "test_notebook.py", "test_precision.py", "test_multiclass_models.py",
    "test_unet_pipeline.py", "test_precision_runs.py", "test_scale_out.py", "test_layers_on_s3.py",
    "test_model_compile.py", "test_viz.py", "test_context.py", "test_best_configuration.py",
)


# The integration tier: a test is marked `integration` when it, or a fixture it uses (at any
# depth), runs a KedroSession, trains a network, starts a subprocess or a server, or executes
# the notebook. Everything else (unit tests of the domain on in-memory data, and wiring tests
# that run a pipeline with SequentialRunner on a DataCatalog) is `make test-quick`.
INTEGRATION_CALLS = re.compile(
    r"\brun_pipeline\(|\bKedroSession\b|\bsubprocess\.|\bPopen\(|\.fit\(|\bfit_model\(|\bmeasure_precisions?\(|"
    r"\bseconds_per_training_step\(|\bTestClient\(|\bnbclient\b|\bLocalCluster\(|\bThreadedMotoServer\(|"
    r"\bcompute\.executor\(|\blocal:\d|\bplan_model\(|\bplan_precision\(|\bplan_training_steps\("
)


@lru_cache(maxsize=None)
def _calls_integration(function, depth: int = 3) -> bool:
    """Whether `function`'s source, or that of a test helper it calls (a function of the tests'
    own modules, `depth` calls deep), matches INTEGRATION_CALLS."""
    function = inspect.unwrap(function)
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    if INTEGRATION_CALLS.search(source):
        return True
    if depth == 0 or not hasattr(function, "__code__"):
        return False
    tests = str(Path(__file__).parent)
    names = set(function.__code__.co_names)
    for const in function.__code__.co_consts:  # nested functions and lambdas
        if hasattr(const, "co_names"):
            names.update(const.co_names)
    for name in names:
        helper = function.__globals__.get(name)
        if inspect.isfunction(helper) and helper is not function and str(inspect.getsourcefile(helper) or "").startswith(tests):
            if _calls_integration(helper, depth - 1):
                return True
    return False


def _needs_integration(item) -> bool:
    if item.get_closest_marker("integration"):
        return True
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    for definitions in (info.name2fixturedefs.values() if info else ()):
        functions.extend(definition.func for definition in definitions)
    return any(function is not None and _calls_integration(function) for function in functions)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if _needs_integration(item):
            item.add_marker(pytest.mark.integration)
    rank = {name: index for index, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4: each worker trains TensorFlow models of its
    own (about 2 GiB at its peak), and past 4 the longest module sets the suite's time."""
    return max(1, min(os.cpu_count() or 1, 4))

# Small enough for a 2-core CI machine, big enough for every split to hold a case.
TINY_DATA_PARAMS = {
    "data.synthetic.n_cases": 6,
    "data.synthetic.in_plane_size": 48,
    "data.synthetic.n_slices_range": [12, 16],
}

# The settings whose default (`auto`) asks the host: `training.precision` (bfloat16 on a CPU or
# GPU with bfloat16 units, float32 elsewhere) and `training.deterministic` (off with a GPU).
# A test that is not about them pins them, so that it proves the same on every machine of the
# fleet; the tests about precision set the probe's answer with `bfloat16_hardware`.
HOST_INDEPENDENT_UNET = {"unet.training.precision": "float32", "unet.training.deterministic": True}
HOST_INDEPENDENT_CONV3D = {"conv3d.training.precision": "float32", "conv3d.training.deterministic": True}

# One epoch of a few steps: models that run end to end in seconds, not models that learn.
TINY_UNET = {
    **TINY_DATA_PARAMS,
    **HOST_INDEPENDENT_UNET,
    "unet.model.input_size": 32,
    "unet.model.base_filters": 8,
    "unet.training.epochs": 1,
    "unet.training.batch_size": 4,
    "unet.training.steps_per_epoch": 3,
    "unet.training.validation_steps": 1,
    "unet.reporting.n_overlay_cases": 1,
    "unet.export.onnx": False,
    "unet.inference.profiles": False,
}
TINY_CONV3D = {
    **TINY_DATA_PARAMS,
    **HOST_INDEPENDENT_CONV3D,
    "conv3d.sampling.patch_size": [16, 16, 16],
    "conv3d.sampling.queue_length": 8,
    "conv3d.model.base_filters": 4,
    "conv3d.training.epochs": 1,
    "conv3d.training.batch_size": 2,
    "conv3d.training.steps_per_epoch": 2,
    "conv3d.training.validation_steps": 1,
    "conv3d.evaluation.patches_per_case": 6,
    "conv3d.reporting.n_overlay_cases": 1,
    "conv3d.export.onnx": False,
    "conv3d.inference.profiles": False,
}


# /proc/cpuinfo of a CPU with and without bfloat16 units, for `bfloat16_hardware`.
CPUINFO_WITH_BF16 = "processor\t: 0\nmodel name\t: Test CPU with AMX\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
CPUINFO_WITHOUT_BF16 = "processor\t: 0\nmodel name\t: Test CPU without bfloat16\nflags\t\t: fpu sse2 avx2 avx512f\n"


@contextmanager
def bfloat16_hardware(cpu: bool, gpu: bool = False):
    """While the block runs, medseg's precision probe sees a CPU with (or without) bfloat16
    units and a GPU with (or without) them, whatever this machine has: `read_cpuinfo` returns
    `CPUINFO_WITH_BF16` or `CPUINFO_WITHOUT_BF16`, `gpu_has_bfloat16` returns `gpu`. Usable in a
    fixture of any scope; in-process runs only (a child process probes its own host)."""
    import medseg.models.precision as training

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "read_cpuinfo", lambda: CPUINFO_WITH_BF16 if cpu else CPUINFO_WITHOUT_BF16)
        patch.setattr(training, "cpu_has_bfloat16", _REAL_PROBES["cpu"])
        patch.setattr(training, "gpu_has_bfloat16", lambda: gpu)
        yield


@contextmanager
def measured_precision(train_speedup: float, infer_speedup: float, dice_drift: float = 0.0):
    """While the block runs, the planner's precision measurement
    (`medseg.kinds.plans.measure_precisions`) reports each policy beyond float32 as
    `train_speedup` and `infer_speedup` times faster, its check Dice `dice_drift` away:
    the choice then follows from these figures on every machine, not from this one's speed."""
    import medseg.kinds.plans as planning
    from medseg.models.precision import PrecisionMeasurement

    def measure(candidates, build_model, batch_size):
        base = PrecisionMeasurement(1.0, 0.5, 0.9, 0.9)
        faster = PrecisionMeasurement(1.0 / train_speedup, 0.5 / infer_speedup, 0.9 - dice_drift, 0.9 - dice_drift)
        return {name: base if name == "float32" else faster for name in candidates}

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planning, "measure_precisions", measure)
        yield


_REAL_PROBES: dict = {}


@pytest.fixture(scope="session", autouse=True)
def precision_probe_is_never_the_hosts():
    """No test may depend on whether this machine has bfloat16 units: a test that reaches the
    hardware probe without `bfloat16_hardware` (or a pinned `training.precision`) fails,
    naming the fix, on every machine, not only on those whose answer differs."""
    import medseg.models.precision as training

    _REAL_PROBES["cpu"] = real_cpu = training.cpu_has_bfloat16
    advice = ("asked the host whether it has bfloat16 units: pin training.precision (conftest's "
              "HOST_INDEPENDENT_UNET / _CONV3D) or set the answer with conftest.bfloat16_hardware")

    # AssertionError, not pytest.fail's BaseException: Kedro and kedro-mlflow then end the run
    # (FAILED) as for any error in a node, and the next test finds no MLflow run left open.
    def cpu_probe(cpuinfo: str | None = None) -> bool:
        if cpuinfo is None:
            raise AssertionError(f"The test {advice}.")
        return real_cpu(cpuinfo)

    def gpu_probe() -> bool:
        raise AssertionError(f"The test {advice}.")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "cpu_has_bfloat16", cpu_probe)
        patch.setattr(training, "gpu_has_bfloat16", gpu_probe)
        yield


def make_project_copy(root: Path, tracking_store: bool = True) -> Path:
    """A copy of conf/ and pyproject.toml in `root`, with empty data folders and (unless
    `tracking_store` is False) an empty MLflow store, `mlflow.db`, as MLflow would create it."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(REPO_ROOT / "conf", root / "conf", dirs_exist_ok=True)
    shutil.copy(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    (root / "conf" / "local").mkdir(exist_ok=True)
    (root / "src").mkdir(exist_ok=True)  # bootstrap_project wants it; medseg itself is installed
    (root / "notebooks").mkdir(exist_ok=True)
    # conf/base/mlflow.yml anchors `mlflow.db` at the project root, so each copy has its own store.
    for layer in ("01_raw", "02_intermediate", "03_primary", "05_model_input", "06_models", "07_model_output", "08_reporting"):
        (root / "data" / layer).mkdir(parents=True, exist_ok=True)
    if tracking_store:
        template = _empty_tracking_store()
        shutil.copy(template / "mlflow.db", root / "mlflow.db")
        _repoint_store(root / "mlflow.db", template, root)
    return root


@lru_cache(maxsize=None)
def _empty_tracking_store() -> Path:
    """An empty MLflow store made once per test process. MLflow builds a new SQLite store by
    running its ~60 schema migrations (about 2.5 s); a project copy takes a copy of this one."""
    import tempfile

    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="medseg-empty-store-"))
    previous = Path.cwd()
    os.chdir(folder)  # the Default experiment's artifact location is made from the working folder
    try:
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    finally:
        os.chdir(previous)
    return folder


def _repoint_store(db_path: Path, old: Path, new: Path) -> None:
    """Every path under `old` that the MLflow store `db_path` keeps (artifact locations of the
    experiments, runs, logged and registered models) now names `new` instead."""
    import sqlite3

    with sqlite3.connect(db_path) as db:
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
            for column in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if column[2].upper().startswith(("VARCHAR", "TEXT")):
                    name = column[1]
                    db.execute(f'UPDATE "{table}" SET "{name}" = replace("{name}", ?, ?) WHERE instr("{name}", ?) > 0',
                               (str(old), str(new), str(old)))


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a project copy that has run, with its own MLflow store: the paths of `source`
    that MLflow keeps in `mlflow.db` (artifact locations of the experiment, runs, logged and
    registered models) now name `target`, so runs made in the copy never write into `source`.
    Tables of the data layers (`case_fingerprints.csv`) still name `source`'s raw files, which
    hold the same bytes."""
    shutil.copytree(source, target, symlinks=True)
    _repoint_store(target / "mlflow.db", source, target)
    return target


def shared_project(tmp_path_factory, name: str, build) -> Path:
    """A project made once per test session, for every pytest-xdist worker, by `build(project)`
    on a fresh `make_project_copy`: the first worker to ask builds it under a file lock in the
    session's temporary folder, the others wait for it and reuse it. Tests read it and never
    write to it; a test that runs pipelines in it works on a `copy_project`."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # shared by the workers' own folders (gw0/, gw1/, ...)
    folder = base / f"shared-{name}"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(make_project_copy(folder))
            (folder / ".complete").write_text("")
    return folder


# The trained tiny U-Net that most tests read, registered in the model registry (so that
# `models:/` URIs can be tested). Without postprocessing: after three steps the network's
# probabilities are close to 0.5, and keeping the largest component of its masks leaves some
# scans all foreground, which would make the mask comparisons of the serving tests prove little.
REGISTERED_UNET = "medseg-unet-test"
# It and `trained_conv3d` also export their networks to ONNX, with the parity check on, and choose
# their inference profiles.
SHARED_UNET = {**TINY_UNET, "unet.export.registered_model_name": REGISTERED_UNET, "unet.export.onnx": True,
               "unet.inference.profiles": True}


@pytest.fixture(scope="session")
def trained_unet(tmp_path_factory) -> Path:
    """`kedro run --pipeline unet` with SHARED_UNET, once for the session (read only)."""
    return shared_project(tmp_path_factory, "unet", lambda project: run_pipeline(project, "unet", SHARED_UNET))


@pytest.fixture(scope="session")
def trained_unet_postprocessed(tmp_path_factory, prepared_data) -> Path:
    """The tiny U-Net with both postprocessing options on (so that predict must apply the
    model's own), trained with `training.precision: auto` where the probe finds no bfloat16
    units (float32), once for the session (read only)."""

    def build(project: Path) -> None:
        shutil.rmtree(project)
        copy_project(prepared_data, project)
        with bfloat16_hardware(cpu=False):
            run_pipeline(project, "unet", {**TINY_UNET_POSTPROCESSED, "unet.training.precision": "auto"})

    return shared_project(tmp_path_factory, "unet-postprocessed", build)


TINY_UNET_POSTPROCESSED = {
    **TINY_UNET,
    "unet.inference.mirror_axes": [0, 1],
    "unet.inference.keep_largest_component": True,
}


# With each fold's ONNX export on, so that the champion ensemble has its onnxruntime variant.
CV_UNET = {**TINY_UNET, "data.synthetic.n_cases": 8, "cv.folds": 2, "unet.export.onnx": True}


@pytest.fixture(scope="session")
def cross_validated_unet(tmp_path_factory) -> Path:
    """`kedro run --pipeline unet` with two folds (CV_UNET), once for the session (read only)."""
    return shared_project(tmp_path_factory, "cv-unet", lambda project: run_pipeline(project, "unet", CV_UNET))


@pytest.fixture(scope="session")
def trained_conv3d(tmp_path_factory, trained_unet) -> Path:
    """`kedro run --pipeline conv3d` with TINY_CONV3D (a 3D U-Net) in a copy of `trained_unet`,
    once for the session (read only): one project with both models, as the notebook wants."""

    def build(project: Path) -> None:
        shutil.rmtree(project)
        copy_project(trained_unet, project)
        run_pipeline(project, "conv3d", {**TINY_CONV3D, "conv3d.export.onnx": True, "conv3d.inference.profiles": True})

    return shared_project(tmp_path_factory, "conv3d", build)


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory) -> Path:
    """`kedro run --pipeline data` with TINY_DATA_PARAMS, once for the session (read only)."""
    return shared_project(tmp_path_factory, "data", lambda project: run_pipeline(project, "data", TINY_DATA_PARAMS))


@pytest.fixture
def prepared_project(prepared_data: Path, tmp_path: Path) -> Path:
    """A project copy whose data layers hold the tiny phantoms, preprocessed and split (and
    its MLflow store the `Data-Synthetic-...-run1` run that made them): a model run on
    TINY_DATA_PARAMS finds every case unchanged and goes straight to planning."""
    return copy_project(prepared_data, tmp_path / "project")


def nested(params: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}, as `kedro run --params a.b=1` does."""
    tree: dict = {}
    for dotted, value in params.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def run_pipeline(project: Path, pipeline: str | None, params: dict | None = None, cwd: Path | None = None,
                 node_names: list[str] | None = None) -> None:
    """Run a pipeline of the project copy through KedroSession, from `cwd` (default: the copy's
    root), as `kedro run` from that folder would; only its `node_names` when given, as
    `kedro run --nodes` does.

    `params` use dotted keys, like `kedro run --params`."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    previous = Path.cwd()
    os.chdir(cwd or project)
    try:
        bootstrap_project(project)
        with KedroSession.create(project_path=project, runtime_params=nested(params or {})) as session:
            session.run(pipeline_names=[pipeline] if pipeline else None, node_names=node_names)
    finally:
        os.chdir(previous)
        import mlflow

        # A run that a failed test left active would take the next test's parameters.
        while mlflow.active_run() is not None:
            mlflow.end_run("FAILED")


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    return make_project_copy(tmp_path / "project")


@pytest.fixture(scope="session")
def data_run(tmp_path_factory) -> Path:
    """The `data` pipeline, run once on a tiny synthetic set."""
    project = make_project_copy(tmp_path_factory.mktemp("data_run"))
    run_pipeline(project, "data", TINY_DATA_PARAMS)
    return project


@contextmanager
def tracking_store(project: Path):
    """MLflow's tracking URI is the project copy's store while the block runs (`runs:/` URIs
    then resolve there, not in whichever store the last session set), and the default after."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def mlflow_runs(project: Path):
    """All runs of the project copy's `medseg` experiment, newest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("medseg")
    if experiment is None:  # the run stopped before kedro-mlflow made the experiment
        return client, []
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def surface_hd95_brute_force(reference, prediction, spacing) -> float:
    """HD95 written independently of medseg.evaluation: all surface-to-surface distances."""
    import numpy as np
    from scipy.ndimage import binary_erosion
    from scipy.spatial.distance import cdist

    def surface(mask):
        mask = mask.astype(bool)
        return np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(spacing)

    a, b = surface(reference), surface(prediction)
    distances = cdist(a, b)
    return float(max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95)))


def hold_project_lock(project: Path, pipeline: str = "unet"):
    """A child process that holds the project's run lock (as a running `kedro run` does) until
    killed; returns once the lock is taken."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from medseg.runs.lock import ProjectLock;"
         "lock = ProjectLock(sys.argv[1]); lock.acquire(sys.argv[2]); print('locked', flush=True); time.sleep(120)",
         str(project), pipeline],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def data_files_written(project: Path) -> list[str]:
    """The files under the project's data/02_intermediate and data/03_primary, relative paths."""
    return sorted(
        str(path.relative_to(project))
        for layer in ("02_intermediate", "03_primary")
        for path in (project / "data" / layer).rglob("*")
        if path.is_file()
    )


# --- S3 on loopback: moto's server mode --------------------------------------------------------
# The endpoint reaches s3fs through AWS_ENDPOINT_URL, which botocore (>= 1.31) reads when any client
# is made, in this process and in a child `kedro run`. That is the route a pipeline test needs:
# `data.msd_dir=s3://...` and catalog entries on s3:// carry no credentials, only the environment
# does. (fsspec's FSSPEC_S3_ENDPOINT_URL works too, but is read once, when fsspec is imported.)
S3_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    """A loopback port free now, and outside the kernel's ephemeral range.

    A port the OS hands out (bind to 0) can be taken again by any outgoing connection or
    server of a parallel test between this probe and the server's own bind: CI once saw
    kedro viz fail with "address already in use" that way. Below the ephemeral range only an
    explicit bind takes a port, so two tests collide only if both draw the same one of
    thousands. kedro-viz also refuses ports of 49152 and above.
    """
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.Random().sample(range(20000, max(low, 20001)), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port found in 20000-{low}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP API (moto's `ThreadedMotoServer`) on 127.0.0.1 and a free port, for the
    whole session; yields its endpoint URL, e.g. "http://127.0.0.1:38211".

    While it runs, the environment sends every S3 client there: `AWS_ENDPOINT_URL=<endpoint>`,
    `AWS_ACCESS_KEY_ID=testing`, `AWS_SECRET_ACCESS_KEY=testing`, `AWS_DEFAULT_REGION=us-east-1`;
    `AWS_PROFILE` and `AWS_SESSION_TOKEN` are removed and `AWS_CONFIG_FILE` /
    `AWS_SHARED_CREDENTIALS_FILE` point at empty files, so a developer's real account is never
    used. So `s3fs`, `boto3`, `medseg.imaging.io` and a KedroSession run in this process (or a
    subprocess that inherits the environment) all reach the server with no storage options.
    Use `s3_bucket` for a fresh bucket, and `s3_storage_options(endpoint)` to pass the endpoint
    explicitly instead (catalog `credentials`, `storage_options=`).
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(name, value)
        env.setenv("AWS_CONFIG_FILE", str(empty))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        env.delenv("AWS_PROFILE", raising=False)
        env.delenv("AWS_SESSION_TOKEN", raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before has no endpoint
        try:
            yield endpoint
        finally:
            s3fs.S3FileSystem.clear_instance_cache()  # nor may one outlive the server
            server.stop()


def s3_storage_options(endpoint: str) -> dict:
    """fsspec/s3fs options that reach `endpoint` without the environment: the form of a Kedro
    catalog entry's `credentials` (or `storage_options=` of medseg.imaging.io)."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the `s3_server`, as a URL: "s3://medseg-<12 hex>"."""
    import uuid

    import fsspec

    name = f"medseg-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return f"s3://{name}"


class LogLines(list):
    """The messages logged while a `log_lines` block ran; `.text` joins them."""

    @property
    def text(self) -> str:
        return "\n".join(self)


@contextmanager
def log_lines(*names: str):
    """Collect the messages of the loggers `names` (e.g. "medseg.datasets.staged").

    pytest's caplog listens on the root logger, whose handlers Kedro replaces with its own each
    time a session configures logging (conf/logging.yml); a handler on a module's own logger,
    which that file does not name, stays in place across runs."""
    import logging

    lines = LogLines()
    handler = logging.Handler(level=logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield lines
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


# --- A user's own model kind, and in-memory catalogs ---------------------------------------------
# tests/pipelines/user_kind/ is laid out as a user adds a model: one module under the kinds'
# package and its parameters_<name>.yml.
USER_KIND = REPO_ROOT / "tests" / "pipelines" / "user_kind"


@pytest.fixture
def toy_kind(monkeypatch):
    """The user's folder on `medseg.kinds`' package path, as if `toy.py` were in `src/medseg/kinds/`;
    the registry is restored afterwards."""
    import sys

    import medseg.kinds as kinds

    kinds.model_kinds()  # the built-in kinds registered first, so that the registry restored after the test holds them
    monkeypatch.setattr(kinds, "__path__", [*kinds.__path__, str(USER_KIND / "src" / "medseg" / "kinds")])
    monkeypatch.setattr(kinds, "_REGISTRY", dict(kinds._REGISTRY))
    yield kinds.model_kinds()["toy"]
    sys.modules.pop("medseg.kinds.toy", None)


def kept_dataset():
    """A MemoryDataset that the runner does not empty once its last reader has run, for wiring
    tests that read a pipeline's intermediate results after the run."""
    from kedro.io import MemoryDataset

    class KeptDataset(MemoryDataset):
        def _release(self) -> None:
            pass

    return KeptDataset()


def slice_plan(**overrides):
    """A hand-made segmenter plan: a 2D model over whole slices at 1 x 1 x 2 mm, one class
    (`lesion`), no postprocessing; `overrides` replace any field."""
    from medseg.inference import SegmenterPlan

    fields = dict(
        model_key="unet", display_name="UNet", window="slice", target_spacing=(1.0, 1.0, 2.0), interpolation_order=1,
        clip_percentiles=None, crop_margin=None, channel=None, label_mode="binary", classes={"1": "lesion"}, lateralized=[],
        threshold=0.5, depth=2, patch_size=None, overlap=0.0, sigma_scale=0.125, features_per_voxel=10.0, memory_gb=0.01,
    )
    return SegmenterPlan(**{**fields, **overrides})


def above_mean_segmenter():
    """A segmenter made by hand, for wiring tests: a 1x1 network whose foreground is every voxel
    above the scan's mean (z-score >= 0), on 2D slices at 1 x 1 x 2 mm, so its masks are known
    exactly without training."""
    import keras
    import numpy as np

    from medseg.inference import Segmenter

    inputs = keras.Input((None, None, 1))
    layer = keras.layers.Conv2D(1, 1, activation="sigmoid")
    model = keras.Model(inputs, layer(inputs))
    layer.set_weights([np.full((1, 1, 1, 1), 10.0, np.float32), np.zeros(1, np.float32)])
    return Segmenter(model, slice_plan(memory_gb=0.5))
