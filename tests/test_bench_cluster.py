"""`nlbench bench CONFIG --address ADDR` on a real two-node cluster started with `ray start`
(127.0.0.1, token auth): a CPU-only head and a worker that Ray lists with one GPU of type FAKE
(a logical GPU: torch there sees no CUDA).

* `device: cpu`: the CPU kind is measured on the CPU-only node (not the GPU one), every row in
  one OUT/throughput with the versions and git sha of the code that measured it;
* `device: auto`: both kinds are found and each task is pinned to its node; the GPU kind fails on
  the worker (no CUDA there), so the command fails naming that kind and node, and writes nothing.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from nlbench.environment import git_sha, versions
from nlbench.results import ResultStore

from ray_nodes import client_env, start_node, wait_for_nodes

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = ("name: tc\nmodels: [transformer]\nsizes: [tiny]\nseq_lens: [16]\nbatch_size: 2\nwarmup_steps: 1\n"
          "steps: 2\nkernel_seq_len: null\nphases: [train]\n")


@pytest.fixture(scope="module")
def cluster():
    token = uuid.uuid4().hex
    head = start_node(token, num_cpus=1, resources={"head_node": 1})
    worker = None
    try:
        worker = start_node(token, head_address=head.gcs, num_cpus=1, num_gpus=1,
                            resources={"worker_node": 1, "accelerator_type:FAKE": 1})
        wait_for_nodes(head.gcs, token, 2)
        ids = subprocess.run(
            [sys.executable, "-c",
             f"import ray, json; ray.init(address={head.gcs!r}, logging_level='ERROR', log_to_driver=False); "
             "print(json.dumps({('head' if 'head_node' in n['Resources'] else 'worker'): n['NodeID'] "
             "for n in ray.nodes() if n['Alive']}))"],
            env=client_env(token), capture_output=True, text=True, timeout=180)
        assert ids.returncode == 0, ids.stderr[-2000:]
        import json

        yield {"gcs": head.gcs, "token": token, "ids": json.loads(ids.stdout.strip().splitlines()[-1])}
    finally:
        if worker is not None:
            worker.stop()
        head.stop()


def bench(cluster, tmp_path, device: str) -> tuple[subprocess.CompletedProcess, object]:
    cfg = tmp_path / "tc.yaml"
    cfg.write_text(CONFIG + f"device: {device}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "nlbench.cli", "bench", str(cfg), "--out", str(out),
                           "--address", cluster["gcs"]], env=client_env(cluster["token"]), capture_output=True,
                          text=True, timeout=900)
    return proc, out


def test_cpu_kind_measured_on_the_cpu_node_into_one_throughput(cluster, tmp_path):
    proc, out = bench(cluster, tmp_path, "cpu")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"CPU: measuring on node {cluster['ids']['head']}" in proc.stdout
    assert "GPU" not in proc.stdout.split("measuring on node")[0]
    df = ResultStore(out).read("throughput")
    assert len(df) == 1 and set(df.phase) == {"train"} and (df.tokens_per_s > 0).all()
    assert df.device.str.startswith("cpu:").all() and df.device.str.endswith(":1threads").all()  # the head's 1 CPU
    assert (df.ray_version == versions()["ray"]).all() and (df.git_sha == git_sha()).all()
    assert df.command.str.contains("--address").all()


def test_every_kind_found_and_a_failing_kind_writes_nothing(cluster, tmp_path):
    proc, out = bench(cluster, tmp_path, "auto")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"CPU: measuring on node {cluster['ids']['head']}" in proc.stdout
    assert f"GPU FAKE: measuring on node {cluster['ids']['worker']}" in proc.stdout
    err = " ".join(proc.stderr.split())
    assert f"GPU FAKE on node {cluster['ids']['worker']}" in err and "sees no CUDA device" in err, err
    assert "Traceback" not in proc.stderr and not out.exists()
