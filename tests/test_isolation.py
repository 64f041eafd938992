"""The embedded runtime is isolated: it starts its own Ray whatever else is on the machine, and
every process it starts listens on loopback only.

Before, `ray.init(num_cpus=…)` read RAY_ADDRESS and Ray's `ray_current_cluster` file, so with a
`ray start --head` on the machine (or a stale address file) every `nlbench run` died with
"When connecting to an existing cluster, num_cpus and num_gpus must not be provided".
"""

from __future__ import annotations

import ipaddress
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

import pandas as pd
import pytest
import yaml

from conftest import tiny_config
from test_cluster import VENV_BIN, cluster_env, free_port, processes_with_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def other_head():
    """Somebody else's `ray start --head` on this machine: yields its GCS address and temp dir
    (where it writes its `ray_current_cluster` address file)."""
    token = uuid.uuid4().hex
    temp = tempfile.mkdtemp(prefix="ri", dir="/tmp")  # short: Ray's socket paths have a length limit
    port = free_port()
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "1",
           "--num-gpus", "0", "--include-dashboard", "false", "--temp-dir", temp, "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=cluster_env(token), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the other head did not come up in 120 s"
                time.sleep(0.5)
        yield {"address": f"127.0.0.1:{port}", "temp": temp}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        for pid in processes_with_env(f"RAY_AUTH_TOKEN={token}".encode()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def run_embedded(tmp_path, env_changes: dict) -> subprocess.CompletedProcess:
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(seeds=(0,), num_tasks=2, tokens_per_task=1024)))
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    env.update(env_changes)
    return subprocess.run([str(VENV_BIN / "nlbench"), "run", str(cfg), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)


def assert_completed(res, tmp_path):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    runs = pd.read_parquet(tmp_path / "out" / "runs")
    assert list(runs["status"]) == ["completed"]


def test_run_ignores_a_head_named_by_ray_address(other_head, tmp_path):
    assert_completed(run_embedded(tmp_path, {"RAY_ADDRESS": other_head["address"]}), tmp_path)


def test_run_ignores_a_live_heads_address_file(other_head, tmp_path):
    # the head wrote its address into its temp dir; point Ray's default temp dir there
    assert (Path(other_head["temp"]) / "ray_current_cluster").is_file()
    assert_completed(run_embedded(tmp_path, {"RAY_TMPDIR": other_head["temp"]}), tmp_path)


def test_run_ignores_a_stale_address_file(tmp_path):
    stale = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    try:
        with socket.socket() as s:  # a port nobody listens on: the head that wrote the file is gone
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        (stale / "ray_current_cluster").write_text(f"127.0.0.1:{dead}")
        assert_completed(run_embedded(tmp_path, {"RAY_TMPDIR": str(stale)}), tmp_path)
    finally:
        shutil.rmtree(stale, ignore_errors=True)


PROBE = r"""
import ray
from nlbench.execution import connect
assert connect(None, num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())      # a worker process is up too
print("READY", flush=True)
input()                                      # the test reads /proc, then lets the probe shut down
ray.shutdown()
"""


def _tree(root: int) -> set[int]:
    """`root` and all its descendants, from /proc."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _listening(pids: set[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state owned by `pids` (/proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hexip, hexport = local.split(":")
                raw = bytes.fromhex(hexip)
                if v6:  # four little-endian 32-bit words
                    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    ip = str(ipaddress.IPv6Address(raw))
                    mapped = ipaddress.IPv6Address(raw).ipv4_mapped
                    ip = str(mapped) if mapped else ip
                else:
                    ip = str(ipaddress.IPv4Address(raw[::-1]))
                found.append((ip, int(hexport, 16)))
    return found


def test_every_embedded_process_listens_on_loopback_only():
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    probe = subprocess.Popen([sys.executable, "-c", PROBE], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in probe.stdout:
            if line.startswith("READY"):
                break
        assert probe.poll() is None, probe.stderr.read()[-3000:]
        listening = _listening(_tree(probe.pid))
    finally:
        out, err = probe.communicate("\n", timeout=120)
    assert len(listening) >= 3, f"too few listening sockets seen to judge: {listening}"
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if token.is_file():
        assert token.stat().st_mode & 0o077 == 0, "the auth token file is readable by others"
    exposed = [entry for entry in listening if entry[0] not in ("127.0.0.1", "::1")]
    assert not exposed, f"sockets on non-loopback addresses: {exposed}"
