import datetime as dt
import time

import pytest

from medseg.errors import TrackingError
from medseg.runs.hooks import check_tracking_server, next_run_number, run_name_prefix

PARAMS = {
    "data": {"source": "synthetic"},
    "unet": {"training": {"optimizer": "adam", "loss": "bce+dice"}, "model": {}},
    "conv3d": {"training": {"optimizer": "adam", "loss": "bce+dice"}, "model": {"network": "unet3d"}},
}


def test_run_name_prefixes():
    day = dt.date(2026, 11, 25)
    assert run_name_prefix(["unet"], PARAMS, day) == "UNet-Adam-BCE+Dice-20261125"
    assert run_name_prefix(["conv3d"], PARAMS, day) == "UNet3D-Adam-BCE+Dice-20261125"
    assert run_name_prefix(["unet", "conv3d"], PARAMS, day) == "UNet+UNet3D-Adam-BCE+Dice-20261125"
    assert run_name_prefix([], PARAMS, day) == "Data-Synthetic-20261125"
    classifier = {**PARAMS, "conv3d": {"training": {"optimizer": "sgd", "loss": "dice"}, "model": {"network": "patch_classifier"}}}
    assert run_name_prefix(["conv3d"], classifier, day) == "Conv3DClassifier-SGD-BCE-20261125"


def test_next_run_number_counts_only_the_same_prefix():
    names = ["UNet-Adam-BCE+Dice-20261125-run1", "UNet-Adam-BCE+Dice-20261125-run7", "UNet-Adam-BCE-20261125-run9", "x"]
    assert next_run_number(names, "UNet-Adam-BCE+Dice-20261125") == 8
    assert next_run_number([], "UNet-Adam-BCE+Dice-20261125") == 1


def test_unreachable_tracking_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(TrackingError, match="127.0.0.1:9.*cannot be reached.*mlflow.yml"):
        check_tracking_server("http://127.0.0.1:9")
    assert time.monotonic() - start < 10
    check_tracking_server("sqlite:///mlflow.db")  # local stores need no server


def _store(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("medseg", artifact_location=str(tmp_path / "mlruns"))
    return client, client.get_experiment(experiment_id)


def test_a_deleted_runs_name_is_not_given_again(tmp_path):
    from medseg.runs.hooks import next_run_name

    client, experiment = _store(tmp_path)
    prefix = "UNet-Adam-BCE+Dice-20261125"
    assert next_run_name(client, experiment, prefix) == f"{prefix}-run1"
    runs = [client.create_run(experiment.experiment_id, run_name=f"{prefix}-run{n}") for n in (1, 2, 3)]
    client.delete_run(runs[2].info.run_id)
    assert next_run_name(client, experiment, prefix) == f"{prefix}-run4"
    assert next_run_name(client, None, prefix) == f"{prefix}-run1"


def test_running_runs_whose_process_is_gone_are_marked_killed(tmp_path):
    import subprocess
    import sys

    import psutil

    from medseg.runs import tracking

    client, experiment = _store(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    child_tags = {**tracking.process_tags(), tracking.TAG_PID: str(child.pid),
                  tracking.TAG_PID_STARTED: f"{psutil.Process(child.pid).create_time():.3f}"}
    dead = client.create_run(experiment.experiment_id, run_name="dead", tags=child_tags)
    alive = client.create_run(experiment.experiment_id, run_name="alive", tags=tracking.process_tags())
    untagged = client.create_run(experiment.experiment_id, run_name="no tags")  # cannot tell: left alone
    assert tracking.end_dead_runs(client, experiment.experiment_id) == []  # the child still runs
    child.kill()
    child.wait()
    assert tracking.end_dead_runs(client, experiment.experiment_id) == [dead.info.run_id]
    assert client.get_run(dead.info.run_id).info.status == "KILLED"
    assert "killed" in client.get_run(dead.info.run_id).data.tags[tracking.TAG_END_REASON]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(untagged.info.run_id).info.status == "RUNNING"


class _Health:
    """A loopback HTTP server answering every GET with `status`, recording the paths."""

    def __init__(self, status: int):
        import http.server
        import threading

        self.status, self.paths = status, []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.paths.append(self.path)
                self.send_response(outer.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"OK")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_an_unhealthy_server_is_refused_within_seconds_and_retries_stay_the_users(monkeypatch):
    """A server that accepts connections but answers its health check with 503 is refused at
    once, naming the URI; a healthy one passes; MLflow's retry settings are never touched."""
    import os
    import time

    from medseg.errors import TrackingError

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    server = _Health(503)
    try:
        started = time.monotonic()
        with pytest.raises(TrackingError, match=rf"{server.uri} answers its health check with HTTP 503"):
            check_tracking_server(server.uri)
        assert time.monotonic() - started < 5
        server.status = 200
        check_tracking_server(server.uri)
        assert server.paths == ["/health", "/health"]
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    finally:
        server.close()


def test_a_second_run_in_the_same_project_is_refused(tmp_path):
    from conftest import hold_project_lock
    from medseg.runs.lock import ProjectBusyError, ProjectLock

    holder = hold_project_lock(tmp_path, "unet")
    try:
        with pytest.raises(ProjectBusyError, match=rf"another kedro run.*pid\": {holder.pid}.*unet"):
            ProjectLock(tmp_path).acquire("data")
    finally:
        holder.kill()
        holder.wait()
    lock = ProjectLock(tmp_path)  # the OS released the killed holder's lock
    lock.acquire("data")
    lock.release()


def test_the_batched_hook_logs_what_kedro_mlflow_logs_with_one_call_per_node(tmp_path, monkeypatch):
    """The same nodes' inputs through kedro-mlflow's hook and through BatchedMlflowHook give the
    same run parameters (flattened, a long value truncated by the strategy of mlflow.yml); ours
    makes one MLflow call for a node's new parameters, none for parameters already logged, and
    still lets MLflow refuse a changed value."""
    import mlflow
    from kedro.pipeline import node
    from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from medseg.runs.hooks import BatchedMlflowHook

    import shutil

    from conftest import _empty_tracking_store

    shutil.copy(_empty_tracking_store() / "mlflow.db", tmp_path / "mlflow.db")  # without MLflow's migrations
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = {"seed": 3, "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "labels": {"values": list(range(2000))}}
    unet = {"training": {"epochs": 2, "optimizer": "adam"}}
    nodes = [
        (node(lambda *a: None, ["x", "params:data"], "y", name="first"), {"x": 1, "params:data": data}),
        (node(lambda *a: None, ["params:data", "params:unet"], "z", name="second"), {"params:data": data, "params:unet": unet}),
    ]
    logged = {}
    for hook in (MlflowHook(), BatchedMlflowHook()):
        hook.flatten, hook.long_params_strategy = True, "truncate"
        calls = []
        for name in ("log_param", "log_params"):
            original = getattr(mlflow, name)
            monkeypatch.setattr(mlflow, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
        with mlflow.start_run(experiment_id="0") as run:  # the store's Default experiment, whatever ran before
            if isinstance(hook, BatchedMlflowHook):
                hook._logged = {}
            for made, inputs in nodes:
                hook.before_node_run(node=made, catalog=None, inputs=inputs, is_async=False)
        logged[type(hook).__name__] = (mlflow.get_run(run.info.run_id).data.params, calls)
        monkeypatch.undo()
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")

    theirs, their_calls = logged["MlflowHook"]
    ours, our_calls = logged["BatchedMlflowHook"]
    assert ours == theirs
    assert ours["data.split.train"] == "0.6" and ours["unet.training.epochs"] == "2"
    assert len(ours["data.labels.values"]) == MAX_PARAM_VAL_LENGTH  # truncated, as kedro-mlflow does
    assert len(their_calls) == 12  # 5 parameters, then 5 again and 2 new, one call each
    assert our_calls == ["log_param", "log_params", "log_params"]  # the long one once, then a batch per node with news

    hook = BatchedMlflowHook()
    hook.flatten = True
    with mlflow.start_run(experiment_id="0"):
        hook.before_node_run(node=nodes[0][0], catalog=None, inputs={"params:data": {"seed": 3}}, is_async=False)
        with pytest.raises(mlflow.exceptions.MlflowException, match="[Cc]hang"):
            hook.before_node_run(node=nodes[0][0], catalog=None, inputs={"params:data": {"seed": 4}}, is_async=False)
