"""Real Ray nodes for tests: `ray start --block` in a subprocess, on 127.0.0.1, token auth.

Every node gets its own temp dir and free ports; all of a cluster's processes carry a unique
marker in their environment (``NLBENCH_TEST_NODE=<uuid>``, inherited by raylet and workers), so a
test stops or SIGKILLs exactly one node's processes - never `ray stop`, which would hit every Ray
on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
MARKER = "NLBENCH_TEST_NODE"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with_env(marker: bytes) -> list[int]:
    """Pids of this user's processes whose environment holds ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if marker in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def client_env(token: str, **extra) -> dict:
    """The environment of a process that talks to the test cluster (its token, no RAY_ADDRESS)."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = token
    env.pop("RAY_ADDRESS", None)
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


@dataclass
class Node:
    proc: subprocess.Popen
    marker: str
    temp: str
    gcs: str = ""
    extra: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        return processes_with_env(f"{MARKER}={self.marker}".encode())

    def kill(self) -> list[int]:
        """SIGKILL every process of this node at once (a machine lost, not a clean stop)."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # --block: `ray start` stops the node's processes
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()  # whatever is left (workers, agents) carries the marker
        shutil.rmtree(self.temp, ignore_errors=True)


def start_node(token: str, *, head_address: str | None = None, num_cpus: int = 1, num_gpus: int = 0,
               resources: dict | None = None, temp_root: str | None = None, env: dict | None = None,
               wait_s: float = 120) -> Node:
    """Start a head (``head_address=None``) or a worker joining ``head_address`` and wait for its
    raylet. ``resources``: custom resources of the node (``ray start --resources``)."""
    marker = uuid.uuid4().hex
    # short: Ray's Unix socket paths (temp/session_<date>/sockets/...) have a length limit
    temp = tempfile.mkdtemp(prefix="rn", dir=temp_root or "/tmp")
    cmd = [str(VENV_BIN / "ray"), "start", "--block", "--num-cpus", str(num_cpus), "--num-gpus", str(num_gpus),
           "--node-ip-address", "127.0.0.1", "--temp-dir", temp, "--disable-usage-stats",
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port())]
    if resources:
        cmd += ["--resources", json.dumps(resources)]
    if head_address is None:
        port = free_port()
        cmd += ["--head", "--port", str(port), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port())]
        gcs = f"127.0.0.1:{port}"
    else:
        cmd += ["--address", head_address]
        gcs = head_address
    node_env = client_env(token, **{MARKER: marker})
    node_env.update(env or {})
    proc = subprocess.Popen(cmd, env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    node = Node(proc, marker, temp, gcs, extra={"port": int(gcs.rsplit(":", 1)[1])})
    deadline = time.monotonic() + wait_s
    try:
        # up = its raylet runs; a head also wrote its address file (the last step of `ray start`)
        address_file = Path(temp, "ray_current_cluster")
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ray start exited: {proc.stderr.read().decode()[-3000:]}")
            names = []
            for pid in node.pids():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        names.append(f.read().split(b"\0")[0])
                except OSError:
                    pass
            if any(n.endswith(b"raylet") for n in names) and (head_address or address_file.exists()):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"node did not come up in {wait_s} s")
            time.sleep(0.3)
    except BaseException:
        node.stop()
        raise
    if head_address is None:  # Ray may have replaced 127.0.0.1 with the machine's address
        node.gcs = address_file.read_text().strip()
    return node


def wait_for_nodes(gcs: str, token: str, count: int, timeout: float = 120) -> None:
    """Block until the cluster at ``gcs`` has ``count`` alive nodes (asked from a subprocess)."""
    script = (
        "import ray, time, sys\n"
        f"ray.init(address={gcs!r}, logging_level='ERROR', log_to_driver=False)\n"
        f"deadline = time.monotonic() + {timeout}\n"
        f"while sum(n['Alive'] for n in ray.nodes()) < {count}:\n"
        "    assert time.monotonic() < deadline, ray.nodes()\n"
        "    time.sleep(0.5)\n"
    )
    res = subprocess.run([sys.executable, "-c", script], env=client_env(token), capture_output=True, text=True,
                         timeout=timeout + 60)
    assert res.returncode == 0, res.stderr[-3000:]
