"""`kedro viz` starts headless and serves the pipeline graph with one namespace per pipeline."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import free_port, make_project_copy


def _wait_for_group_to_end(group: int, timeout_s: float = 30) -> None:
    """SIGKILL what is left of the process group after `timeout_s` (the server's child)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    os.killpg(group, signal.SIGKILL)


def test_kedro_viz_serves_the_graph(tmp_path):
    project = make_project_copy(tmp_path / "project")
    port = free_port()
    kedro = str(Path(sys.executable).with_name("kedro"))
    # kedro-viz asks PyPI for a newer version at start-up: a proxy that refuses at once keeps the test
    # offline, and no slower than the network it would otherwise wait on.
    offline = {"HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": "127.0.0.1,localhost"}
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", **offline}
    log = tmp_path / "viz.log"
    with log.open("wb") as sink:  # a file, not a pipe: a pipe nobody reads blocks the server once it is full
        server = subprocess.Popen(
            [kedro, "viz", "run", "--no-browser", "--host", "127.0.0.1", "--port", str(port)],
            cwd=project, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,  # kedro viz serves from a child process: stop the whole group
        )
    try:
        deadline, graph = time.monotonic() + 240, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/main", timeout=5) as response:
                    graph = json.load(response)
                break
            except OSError:
                time.sleep(2)
        assert graph is not None, f"no graph in 240 s (server exit code {server.poll()}):\n{log.read_text()[-3000:]}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        _wait_for_group_to_end(server.pid)

    names = {node["name"] for node in graph["nodes"] if node["type"] == "task"}
    assert {
        "validate_cases", "preprocess_cases", "plan_unet", "plan_conv3d", "train_unet", "train_conv3d",
        "build_unet_segmenter", "predict_split", "evaluate_predictions",
    } <= {n.split(".")[-1] for n in names}  # the default pipeline; `predict` is a pipeline of its own
    assert {p["id"] for p in graph["pipelines"]} >= {"__default__", "data", "unet", "conv3d", "predict"}
    assert {"data", "unet", "conv3d"} <= set(graph["modular_pipelines"])
