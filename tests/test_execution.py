"""Ray sweep execution on the shared session runtime (tests/conftest.py::ray_session).

Real Ray actors, real runs (tiny Transformer, ~0.5 s each), real Parquet store."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from nlbench.execution import SweepError, run_sweep, sweep_capacity
from nlbench.results import ResultStore
from nlbench.runner import execute_run

KEY = ["run_id", "after_task", "eval_task", "metric"]


def sequential_matrix(specs) -> pd.DataFrame:
    """The reference: the same runs one after another in this process, one torch thread (as the
    actors have), no checkpoints."""
    threads = torch.get_num_threads()
    try:
        rows = [r for s in specs for r in execute_run(s, device="cpu", threads=1).matrix]
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows)[KEY + ["value"]].sort_values(KEY).reset_index(drop=True)


def stored_matrix(out) -> pd.DataFrame:
    return ResultStore(out).read("matrix")[KEY + ["value"]].sort_values(KEY).reset_index(drop=True)


def test_two_run_sweep_equals_sequential_and_rerun_is_idempotent(ray_session, tiny_specs, tmp_path):
    specs = tiny_specs(seeds=(0, 1))
    assert len(specs) == 2
    out = tmp_path / "out"
    seen = []
    summary = run_sweep(specs, out, cpus_per_run=1, progress=True, on_record=lambda r: seen.append(r.run["run_id"]))
    assert summary["completed"] == 2 and summary["failed"] == 0 and summary["skipped"] == 0
    assert summary["concurrency"] == 2  # two actors on the two CPUs of the session runtime
    assert sorted(seen) == sorted(s.run_id for s in specs)

    runs = ResultStore(out).read("runs")
    assert sorted(runs.run_id) == sorted(s.run_id for s in specs)
    assert set(runs.status) == {"completed"}
    # the matrix written by the driver equals a sequential run of the same config, cell for cell
    got, want = stored_matrix(out), sequential_matrix(specs)
    assert len(got) == len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=True)

    # re-running the same sweep finds everything completed: no Ray work, no file rewritten
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = run_sweep(specs, out, progress=False)
    assert again["skipped"] == 2 and again["completed"] == 0 and again["concurrency"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == files

    # a sweep that adds a seed runs only the new run
    more = tiny_specs(seeds=(0, 1, 2))
    third = run_sweep(more, out, progress=False)
    assert third["skipped"] == 2 and third["completed"] == 1
    runs = ResultStore(out).read("runs")
    assert sorted(runs.run_id) == sorted(s.run_id for s in more)  # one row per run, none twice
    assert not ResultStore(out).read("matrix").duplicated(KEY).any()


def test_resources_section_and_concurrency_cap(ray_session, tiny_specs, tmp_path):
    specs = tiny_specs(seeds=(3, 4))
    # the config's `resources` section (what `nlbench run` passes) sets the per-run share:
    # 2 CPUs per run on a 2-CPU runtime leaves room for one actor at a time
    summary = run_sweep(specs, tmp_path, resources={"cpus_per_run": 2, "gpus_per_run": 0, "max_failures": 1},
                        progress=False)
    assert summary["completed"] == 2 and summary["concurrency"] == 1
    # fractional shares pack several actors per CPU; GPUs count when asked for
    assert sweep_capacity(0.5, 0) == 2 * ray_session["num_cpus"]
    assert sweep_capacity(1, 0) == ray_session["num_cpus"]
    assert sweep_capacity(1, 0.5) == 0  # the session runtime has no GPU
    with pytest.raises(SweepError, match="gpus_per_run=0.5"):
        run_sweep(tiny_specs(seeds=(5,)), tmp_path / "gpu", gpus_per_run=0.5, progress=False)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(cpus_per_run=-1), "cpus_per_run"),
        (dict(gpus_per_run="one"), "gpus_per_run"),
        (dict(cpus_per_run=0, gpus_per_run=0), "cpus_per_run and gpus_per_run"),
        (dict(max_failures=1.5), "max_failures"),
        (dict(resources={"cpu": 1}), "cpus_per_run, gpus_per_run, max_failures"),
        (dict(address="http://head:8265"), "nlbench submit"),
    ],
)
def test_bad_arguments_name_the_field(tiny_specs, tmp_path, kwargs, named):
    specs = tiny_specs(seeds=(0,))
    with pytest.raises(SweepError, match=named):
        run_sweep(specs, tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "runs").exists()
