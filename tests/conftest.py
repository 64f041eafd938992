"""Shared pytest fixtures.

``ray_session``: ONE Ray runtime for the whole test session (Ray starts take seconds on a small
machine), with an explicit ``num_cpus=2`` so the sweep tests see the same capacity everywhere,
the dashboard off, and shut down when the session ends. Tests that need Ray take this fixture
instead of calling ``ray.init`` themselves; they may join it from a subprocess with
``ray_session["address"]`` (the GCS address; the token-auth settings are in os.environ);
``ray_session["raylet_pid"]`` is the parent of its worker processes.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # workers inherit the driver's environment: one torch thread unless an actor asks for more
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING", _node_ip_address="127.0.0.1")
        started = True
    ctx = ray.get_runtime_context()
    # the raylet is the parent of this runtime's worker processes: tests that kill an actor's
    # process pick it among the raylet's children, never another Ray on the machine
    node = ray._private.worker._global_node
    raylet = node.all_processes.get("raylet") if node is not None else None
    yield {
        "address": ctx.gcs_address,
        "num_cpus": int(ray.cluster_resources().get("CPU", 0)),
        "raylet_pid": raylet[0].process.pid if raylet else None,
    }
    if started:
        ray.shutdown()


def tiny_config(seeds=(0, 1), num_tasks=2, tokens_per_task=4096, seq_len=32, models=("transformer",), **extra) -> dict:
    """A sweep config whose runs take about half a second each (tiny Transformer, short tasks)."""
    cfg = {
        "name": "tiny",
        "models": [{"name": m, "size": "tiny"} for m in models],
        "streams": [{"name": "markov-languages", "num_tasks": num_tasks, "seq_len": seq_len}],
        "seeds": list(seeds),
        "train": {"tokens_per_task": tokens_per_task, "batch_size": 8, "device": "cpu"},
        "eval": {"max_sequences": 32, "batch_size": 32},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def tiny_specs():
    """``tiny_specs(**knobs)`` -> the RunSpecs of :func:`tiny_config` (validated, expanded)."""
    from nlbench.config import expand_runs, validate_config

    def make(**knobs):
        return expand_runs(validate_config(tiny_config(**knobs)))

    return make


# Test tiers. `make test-fast` runs the unit tier: `-m "not slow and not ray and not browser and
# not compile and not gpu"`; `make test` runs everything. Tests that take the shared Ray runtime
# are in the `ray` tier by construction; whole modules that start their own services are tiered
# here, so a new test in them cannot slip into the unit tier unmarked.
MODULE_TIERS = {
    "test_cluster": "ray",
    "test_multinode": "ray",
    "test_isolation": "ray",
    "test_faults": "ray",
    "test_report_html": "browser",
    "test_compiled_kernels": "compile",
    # the Triton kernels under the CPU interpreter: one subprocess, ~20 s of CPU on 2 cores
    "test_triton_kernels": "slow",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
        tier = MODULE_TIERS.get(item.module.__name__.rsplit(".", 1)[-1]) if item.module else None
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
