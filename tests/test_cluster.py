"""A real Ray cluster: `ray start --head` in a subprocess, `nlbench submit` a tiny sweep through
the Job Submission API (token authentication on), wait for SUCCEEDED, check OUT.

The head gets its own temp dir, its own free ports and a unique auth token in its environment,
and is stopped by signalling only the processes that carry that token (never `ray stop`, which
would also kill the session runtime other tests share).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from nlbench.results import ResultStore

from conftest import tiny_config
from ray_nodes import free_port, processes_with_env

VENV_BIN = Path(sys.executable).parent


def cluster_env(token: str, address: str | None = None) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_API_SERVER_ADDRESS"] = address
    return env


@pytest.fixture(scope="module")
def head():
    """A one-node cluster (2 CPUs) with token auth; yields its dashboard URL and client env."""
    token = uuid.uuid4().hex
    temp = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(free_port()), "--num-cpus", "2",
        "--num-gpus", "0", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
        "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        "--temp-dir", temp, "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=cluster_env(token), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:

        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the head's dashboard did not come up in 120 s"
                time.sleep(0.5)
        yield {"url": url, "env": cluster_env(token, url), "token": token}
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: `ray start` stops the node's processes
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        # whatever is left of this cluster (job driver, workers) carries its unique token
        for pid in processes_with_env(f"RAY_AUTH_TOKEN={token}".encode()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def nlbench(*args, env, timeout=120):
    return subprocess.run([str(VENV_BIN / "nlbench"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_tiny_sweep_to_a_real_head(head, tmp_path):
    workdir = tmp_path / "job"
    workdir.mkdir()
    cfg = tiny_config(seeds=(0, 1))
    cfg["resources"] = {"cpus_per_run": 1, "gpus_per_run": 0, "max_failures": 1}
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"  # absolute: the head is this machine

    res = nlbench("submit", str(workdir / "sweep.yaml"), "--address", head["url"], "--out", str(out),
                  "--working-dir", str(workdir), env=head["env"])
    assert res.returncode == 0, res.stdout + res.stderr
    job = next(line.split()[-1] for line in res.stdout.splitlines() if line.startswith("submitted job"))
    assert f"nlbench jobs logs {job}" in res.stdout


    deadline = time.monotonic() + 240
    while True:
        st = nlbench("jobs", "status", job, env=head["env"])  # address from RAY_API_SERVER_ADDRESS
        assert st.returncode == 0, st.stderr
        if any(s in st.stdout for s in ("SUCCEEDED", "FAILED", "STOPPED")):
            break
        assert time.monotonic() < deadline, "job did not finish in 240 s"
        time.sleep(1)
    logs = nlbench("jobs", "logs", job, env=head["env"])
    assert "SUCCEEDED" in st.stdout, st.stdout + logs.stdout[-3000:]

    store = ResultStore(out)
    runs = store.read("runs")
    assert len(runs) == 2 and set(runs.status) == {"completed"}
    assert len(store.read("matrix")) > 0

    # a client without the cluster's token is refused, with a message that says what to set
    bad = dict(head["env"], RAY_AUTH_TOKEN=uuid.uuid4().hex)
    denied = nlbench("jobs", "status", job, env=bad)
    assert denied.returncode != 0
    assert "token" in (denied.stdout + denied.stderr).lower()
