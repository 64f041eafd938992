"""The embedded runtime of `nlbench run` (no --address) is its own Ray, whatever is on the machine.

Real processes throughout: a `ray start --head` (token auth) whose address file sits in Ray's temp
dir, a stale address file naming a dead port, `RAY_ADDRESS` pointing at a dead port - in each case
`nlbench run` starts its own runtime and completes. A subprocess lists the TCP sockets the
embedded runtime's processes listen on: all on 127.0.0.1, and a client without the runtime's token
is refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import pytest
import yaml

from nlbench.results import ResultStore

from conftest import tiny_config
from ray_nodes import VENV_BIN, client_env, free_port, start_node

pytestmark = [pytest.mark.slow]


@pytest.fixture
def short_tmp():
    """A temp dir with a short path: Ray's Unix socket paths under it have a 107-byte limit."""
    path = Path(tempfile.mkdtemp(prefix="nli", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_tiny(tmp_path, env) -> subprocess.CompletedProcess:
    cfg = tiny_config(seeds=(0,))
    cfg["resources"] = {"cpus_per_run": 1, "gpus_per_run": 0, "max_failures": 0}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([str(VENV_BIN / "nlbench"), "run", str(path), "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)


def assert_completed(res, tmp_path):
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "When connecting to an existing cluster" not in res.stderr
    runs = ResultStore(tmp_path / "out").read("runs")
    assert list(runs.status) == ["completed"]


def test_run_with_a_ray_start_head_on_the_machine(tmp_path, short_tmp):
    token = uuid.uuid4().hex
    head = start_node(token, num_cpus=1, temp_root=str(short_tmp))
    try:
        # the head wrote its address where an address-less ray.init looks: RAY_TMPDIR/ray_current_cluster
        assert head.gcs.endswith(":" + str(head.extra["port"]))
        env = client_env(token, RAY_TMPDIR=head.temp)
        assert_completed(run_tiny(tmp_path, env), tmp_path)
        assert head.proc.poll() is None  # the head was left alone
    finally:
        head.stop()


def test_run_with_a_stale_cluster_address_file(tmp_path, short_tmp):
    temp = short_tmp
    (temp / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # no head there any more
    env = client_env("unused", RAY_TMPDIR=str(temp))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(k)
    assert_completed(run_tiny(tmp_path, env), tmp_path)
    assert [p.name for p in temp.iterdir()] == ["ray_current_cluster"]  # the runtime's temp dir is gone


def test_run_with_ray_address_set(tmp_path, short_tmp):
    env = client_env("unused", RAY_ADDRESS=f"127.0.0.1:{free_port()}", RAY_TMPDIR=str(short_tmp))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(k)
    assert_completed(run_tiny(tmp_path, env), tmp_path)


LISTENERS = textwrap.dedent("""
    import json, os, subprocess, sys
    import ray
    from nlbench.execution import connect

    connect(None, num_cpus=1, num_gpus=0)

    @ray.remote
    class Probe:
        def pid(self):
            return os.getpid()

    actor = Probe.remote()
    ray.get(actor.pid.remote())  # a worker process is up too

    def children():
        kids = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                try:
                    with open(f"/proc/{p}/stat") as f:
                        kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(p))
                except OSError:
                    pass
        out, todo = set(), [os.getpid()]
        while todo:
            x = todo.pop()
            out.add(x)
            todo += kids.get(x, [])
        return out

    def listening_inodes():
        found = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in f.readlines()[1:]:
                    cols = line.split()
                    if cols[3] == "0A":  # LISTEN
                        host, port = cols[1].split(":")
                        found[cols[9]] = (host, int(port, 16))
        return found

    inodes = listening_inodes()
    sockets = []
    for pid in children():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    name = f.read().split(b"\\0")[0].decode()
                sockets.append([pid, name, *inodes[target[8:-1]]])
    gcs = ray.get_runtime_context().gcs_address
    # other processes are refused by the GCS: one with a wrong token, one with the user's defaults
    # (no RAY_AUTH_* variables: whatever ~/.ray/auth_token holds)
    probe = f"from ray._raylet import GcsClient; GcsClient(address={gcs!r})"
    wrong = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    plain = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refusals = [subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                               timeout=120) for env in (wrong, plain)]
    print(json.dumps({"sockets": sockets, "gcs": gcs, "refused": [r.returncode != 0 for r in refusals],
                      "refusal": [r.stderr[-1500:] for r in refusals]}))
    ray.shutdown()
""")

LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1 in /proc/net/tcp{,6}


def test_embedded_runtime_listens_on_loopback_only_and_requires_its_token(short_tmp):
    env = client_env("unused", RAY_TMPDIR=str(short_tmp))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        env.pop(k)
    res = subprocess.run([sys.executable, "-c", LISTENERS], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["gcs"].startswith("127.0.0.1:")
    names = {s[1].rsplit("/", 1)[-1] for s in got["sockets"]}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), got["sockets"]
    outside = [s for s in got["sockets"] if s[2] not in LOOPBACK]
    assert not outside, f"listening beyond 127.0.0.1: {outside}"
    assert got["refused"] == [True, True], got["refusal"]
    assert all("Authentication token is missing or incorrect" in r for r in got["refusal"]), got["refusal"]
