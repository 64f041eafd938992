"""Fault tolerance of Ray sweeps (real processes killed with SIGKILL; no mocks).

* an actor's process killed mid-run -> Ray restarts it, the run resumes from its per-task
  checkpoint and its matrix equals an undisturbed run;
* with max_failures=0 the same kill records the run `failed` ("actor died") and the sweep goes on;
* the driver killed mid-sweep -> the next invocation runs only what is missing, no row twice;
* a run whose execute_run raises is retried max_failures times, then recorded `failed` with the
  error while the other runs complete.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from nlbench.config import RunSpec
from nlbench.execution import run_sweep
from nlbench.results import ResultStore
from nlbench.runner import execute_run

KEY = ["run_id", "after_task", "eval_task", "metric"]


def actor_processes(raylet_pid: int | None) -> list[int]:
    """Pids of the session runtime's processes that Ray named after the actor they host
    (``ray::RunActor...``); other Ray runtimes on the machine have other raylets."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        # an actor inside a call is titled ray::RunActor.run (an idle or dying one is not)
        if cmd.startswith("ray::RunActor.run") and (raylet_pid is None or parent_pid(int(entry)) == raylet_pid):
            found.append(int(entry))
    return found


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_for(predicate, timeout: float, what: str, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sweep_in_thread(specs, out, **kwargs):
    """run_sweep in a thread of this process (the driver), so the test can kill its actor."""
    box = {}

    def target():
        try:
            box["summary"] = run_sweep(specs, out, progress=False, **kwargs)
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def kill_actor_after_first_checkpoint(spec, out: Path, raylet_pid: int | None):
    """SIGKILL the actor's process once the run has checkpointed its first task (mid-run)."""
    ckpt = out / "checkpoints" / spec.run_id
    wait_for(lambda: ckpt.is_dir() and any(not p.name.startswith(".") for p in ckpt.iterdir()),
             120, "the first per-task checkpoint")
    procs = wait_for(lambda: actor_processes(raylet_pid), 10, "the actor process")
    assert len(procs) == 1, procs
    os.kill(procs[0], signal.SIGKILL)
    return procs[0]


def matrix_of(records_or_out) -> pd.DataFrame:
    if isinstance(records_or_out, Path):
        df = ResultStore(records_or_out).read("matrix")
    else:
        df = pd.DataFrame([r for rec in records_or_out for r in rec.matrix])
    return df[KEY + ["value"]].sort_values(KEY).reset_index(drop=True)


@pytest.fixture
def long_spec(tiny_specs):
    # three tasks of ~0.5 s each on one CPU: the kill after task 0 lands well inside the run
    return tiny_specs(seeds=(7,), num_tasks=3, tokens_per_task=12288)[0]


def test_killed_actor_restarts_and_resumes_to_the_same_matrix(ray_session, long_spec, tmp_path):
    out = tmp_path / "out"
    thread, box = sweep_in_thread([long_spec], out, max_failures=2, max_concurrent=1)
    killed = kill_actor_after_first_checkpoint(long_spec, out, ray_session["raylet_pid"])
    thread.join(180)
    assert not thread.is_alive() and "error" not in box, box
    summary = box["summary"]
    assert summary["completed"] == 1 and summary["failed"] == 0
    assert summary["restarts"] == {long_spec.run_id: 1}  # the run came back on a restarted actor
    assert killed not in actor_processes(ray_session["raylet_pid"])

    threads = torch.get_num_threads()
    try:
        undisturbed = execute_run(long_spec, device="cpu", threads=1)
    finally:
        torch.set_num_threads(threads)
    pd.testing.assert_frame_equal(matrix_of(out), matrix_of([undisturbed]), check_exact=True)
    assert len(ResultStore(out).read("runs")) == 1


def test_actor_death_beyond_max_failures_is_recorded_failed(ray_session, long_spec, tiny_specs, tmp_path):
    out = tmp_path / "out"
    other = tiny_specs(seeds=(8,))[0]
    thread, box = sweep_in_thread([long_spec, other], out, max_failures=0, max_concurrent=1)
    kill_actor_after_first_checkpoint(long_spec, out, ray_session["raylet_pid"])
    thread.join(180)
    summary = box["summary"]
    assert summary["failed"] == 1 and summary["completed"] == 1
    runs = ResultStore(out).read("runs").set_index("run_id")
    assert runs.loc[long_spec.run_id, "status"] == "failed"
    assert "actor died" in runs.loc[long_spec.run_id, "error"]
    assert runs.loc[other.run_id, "status"] == "completed"
    # a failed run is not `completed`: the next invocation tries it again
    assert long_spec.run_id not in ResultStore(out).completed_run_ids()


DRIVER = textwrap.dedent("""
    import sys
    from nlbench.config import expand_runs, validate_config
    from nlbench.execution import run_sweep
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    specs = expand_runs(validate_config(tiny_config(seeds=range(4))))
    run_sweep(specs, {out!r}, address={address!r}, max_concurrent=1, progress=False)
""")


def test_killed_driver_then_rerun_finishes_the_rest_without_duplicates(ray_session, tiny_specs, tmp_path):
    out = tmp_path / "out"
    script = DRIVER.format(tests=str(Path(__file__).parent), out=str(out), address=ray_session["address"])
    # the driver joins the session runtime (no second Ray start) and is SIGKILLed once the first
    # run's results are in OUT, with the second run in flight
    driver = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ), stderr=subprocess.PIPE)
    try:
        wait_for(lambda: driver.poll() is not None or len(ResultStore(out).files("runs")) >= 1, 240,
                 "the first run to be written", poll=0.02)
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    written = ResultStore(out).completed_run_ids()
    assert 1 <= len(written) < 4

    specs = tiny_specs(seeds=range(4))
    summary = run_sweep(specs, out, progress=False)
    assert summary["skipped"] == len(written)
    assert summary["completed"] == 4 - len(written) and summary["failed"] == 0
    store = ResultStore(out)
    runs = store.read("runs")
    assert sorted(runs.run_id) == sorted(s.run_id for s in specs)
    matrix = store.read("matrix")
    assert not matrix.duplicated(KEY).any()
    assert matrix.groupby("run_id").size().nunique() == 1  # every run has its full matrix


def test_raising_run_is_retried_then_recorded_failed_and_others_complete(ray_session, tiny_specs, tmp_path):
    good, bad_model = tiny_specs(seeds=(11, 12))
    # execute_run itself raises for this one (its config lacks model.size), inside the actor
    broken_cfg = copy.deepcopy(bad_model.config)
    del broken_cfg["model"]["size"]
    broken = RunSpec(config=broken_cfg, run_id="broken0000000000", resources={})
    # ... and this one fails inside the run (unknown model): execute_run returns status failed
    unknown_cfg = copy.deepcopy(bad_model.config)
    unknown_cfg["model"]["name"] = "no-such-model"
    unknown = RunSpec(config=unknown_cfg, run_id="unknown000000000", resources={})
    summary = run_sweep([good, broken, unknown], tmp_path, max_failures=1, progress=False)
    assert summary["completed"] == 1 and summary["failed"] == 2
    runs = ResultStore(tmp_path).read("runs").set_index("run_id")
    assert runs.loc[good.run_id, "status"] == "completed"
    assert runs.loc["broken0000000000", "status"] == "failed"
    err = runs.loc["broken0000000000", "error"]
    assert "raised 2 time(s)" in err and "KeyError" in err and "size" in err
    assert runs.loc["unknown000000000", "status"] == "failed"
    assert "no-such-model" in runs.loc["unknown000000000", "error"]
    assert set(ResultStore(tmp_path).read("matrix").run_id) == {good.run_id}
