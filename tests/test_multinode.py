"""A real two-node Ray cluster on this machine: a head and a worker started with `ray start`
(127.0.0.1, token auth, distinct custom resources), a sweep driven from a separate process.

* the sweep spreads over both nodes (the runs table's node_id names each run's node);
* the worker node SIGKILLed mid-sweep (raylet, workers and agents at once): every run still
  completes, the runs that were on it resume on the head from their last per-task checkpoint
  (stored by the driver, not on the lost node), the matrix equals undisturbed runs cell for cell,
  no row is lost or written twice;
* fractional gpus_per_run packs runs per GPU (logical GPUs on a CPU node, device CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch

from nlbench.results import ResultStore
from nlbench.runner import execute_run

from ray_nodes import client_env, start_node, wait_for_nodes

pytestmark = [pytest.mark.slow]

KEY = ["run_id", "after_task", "eval_task", "metric"]
# the GCS declares a silent node dead after ~2 s instead of ~30 s
FAST_HEALTH = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
               "RAY_health_check_failure_threshold": "4", "RAY_health_check_initial_delay_ms": "0"}


@pytest.fixture(scope="module")
def cluster():
    token = uuid.uuid4().hex
    head = start_node(token, num_cpus=1, resources={"head_node": 1}, env=FAST_HEALTH)
    worker = None
    try:
        worker = start_node(token, head_address=head.gcs, num_cpus=2, num_gpus=2, resources={"worker_node": 1})
        wait_for_nodes(head.gcs, token, 2)
        yield {"head": head, "worker": worker, "token": token}
    finally:
        if worker is not None:
            worker.stop()
        head.stop()


DRIVER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from nlbench.config import expand_runs, validate_config
    from nlbench.execution import run_sweep
    import ray
    specs = expand_runs(validate_config(tiny_config(**{knobs!r})))
    summary = run_sweep(specs, {out!r}, address={address!r}, progress=False, **{kwargs!r})
    print("SUMMARY " + json.dumps(summary, default=str))
""")


def start_driver(cluster, out, knobs: dict, **kwargs) -> subprocess.Popen:
    script = DRIVER.format(tests=str(Path(__file__).parent), knobs=knobs, out=str(out),
                           address=cluster["head"].gcs, kwargs=kwargs)
    return subprocess.Popen([sys.executable, "-c", script], env=client_env(cluster["token"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(driver: subprocess.Popen, timeout: float = 600) -> dict:
    """The driver's summary; generous timeout (a loaded 2-core CI box), its stderr on failure."""
    try:
        out, err = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        driver.kill()
        out, err = driver.communicate()
        raise AssertionError(f"the sweep did not finish in {timeout} s:\n{err[-4000:]}") from None
    assert driver.returncode == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def node_ids(cluster) -> dict:
    script = ("import ray, json\n"
              f"ray.init(address={cluster['head'].gcs!r}, logging_level='ERROR', log_to_driver=False)\n"
              "print(json.dumps({n['NodeID']: sorted(n['Resources']) for n in ray.nodes() if n['Alive']}))\n")
    res = subprocess.run([sys.executable, "-c", script], env=client_env(cluster["token"]), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    nodes = json.loads(res.stdout.strip().splitlines()[-1])
    return {("head" if "head_node" in r else "worker"): nid for nid, r in nodes.items()}


def undisturbed_matrix(specs) -> pd.DataFrame:
    threads = torch.get_num_threads()
    try:
        rows = [r for s in specs for r in execute_run(s, device="cpu", threads=1).matrix]
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows)[KEY + ["value"]].sort_values(KEY).reset_index(drop=True)


def stored(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    store = ResultStore(out)
    return store.read("runs"), store.read("matrix")[KEY + ["value"]].sort_values(KEY).reset_index(drop=True)


def test_sweep_spreads_over_both_nodes(cluster, tmp_path):
    ids = node_ids(cluster)
    summary = finish(start_driver(cluster, tmp_path, dict(seeds=list(range(6)))))
    assert summary["completed"] == 6 and summary["failed"] == 0 and summary["concurrency"] == 3
    runs, matrix = stored(tmp_path)
    assert len(runs) == 6 and set(runs.status) == {"completed"}
    assert set(runs.node_id) == {ids["head"], ids["worker"]}  # both nodes ran runs, each recorded
    assert not matrix.duplicated(KEY).any()


def test_gpu_fractions_pack_runs_per_gpu(cluster, tmp_path):
    # the worker's 2 logical GPUs at 0.5 per run: 4 runs at once, two per GPU; torch sees no CUDA,
    # so each actor computes on CPU (cpus_per_run 0.5 lets 4 fit on the worker's 2 CPUs)
    ids = node_ids(cluster)
    summary = finish(start_driver(cluster, tmp_path, dict(seeds=list(range(4))), cpus_per_run=0.5, gpus_per_run=0.5))
    assert summary["completed"] == 4 and summary["concurrency"] == 4
    placements = summary["placements"].values()
    assert {p["node_id"] for p in placements} == {ids["worker"]}  # only the worker has GPUs
    assert all(len(p["gpu_ids"]) == 1 for p in placements)
    gpus = pd.Series([p["gpu_ids"][0] for p in placements])
    assert sorted(gpus.value_counts().tolist()) == [2, 2]  # two runs on each GPU
    assert {p["device"] for p in placements} == {"cpu"}


def test_worker_killed_mid_sweep_loses_nothing(cluster, tmp_path):
    knobs = dict(seeds=list(range(6)), num_tasks=4, tokens_per_task=12288)
    driver = start_driver(cluster, tmp_path, knobs, cpus_per_run=1, max_failures=2)
    ckpts = tmp_path / "checkpoints"
    try:
        # two runs in flight have checkpointed mid-way: the head holds one run at a time, so at
        # least one of them is on the worker
        deadline = time.monotonic() + 600
        while not (ckpts.is_dir() and len([p for p in ckpts.iterdir() if (p / "last.pt").exists()]) >= 2):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "two runs never checkpointed at once"
            time.sleep(0.05)
        killed = cluster["worker"].kill()
        assert killed
        summary = finish(driver)
    finally:
        if driver.poll() is None:
            driver.kill()
    ids = node_ids(cluster)
    assert set(ids) == {"head"}  # the worker is gone for good
    assert summary["completed"] == 6 and summary["failed"] == 0, summary
    lost = set(summary["restarts"])
    assert 1 <= len(lost) <= 2  # the worker's runs in flight
    # the one that had checkpointed came back from its checkpoint (a run lost before its first
    # checkpoint starts over)
    assert lost & set(summary["resumed"])
    runs, matrix = stored(tmp_path)
    assert len(runs) == 6 and not runs.run_id.duplicated().any() and set(runs.status) == {"completed"}
    assert set(runs.set_index("run_id").loc[sorted(lost), "node_id"]) == {ids["head"]}
    assert not matrix.duplicated(KEY).any()
    from conftest import tiny_config
    from nlbench.config import expand_runs, validate_config

    specs = expand_runs(validate_config(tiny_config(**knobs)))
    pd.testing.assert_frame_equal(matrix, undisturbed_matrix(specs), check_exact=True)
    assert not ckpts.exists()  # every checkpoint cleared once its run finished
