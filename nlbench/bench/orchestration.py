"""Orchestration benchmark: what Ray costs a sweep, and what a second actor buys.

``python -m nlbench.bench.orchestration [--runs 8] [--tokens-per-task 49152] [--width 1 2]``

Runs the same sweep of ``--runs`` short runs (tiny Transformer, markov-languages, one seed per
run) through :func:`nlbench.execution.run_sweep` on one embedded Ray runtime, once per actor
count in ``--width`` (each into a fresh OUT, so nothing is skipped), and prints per width:

* ``wall_s``: the sweep's wall time (actor start-up, scheduling, result transfer and the
  driver's Parquet writes included; the Ray runtime's own start is printed apart),
* ``inside_s``: Σ over runs of ``train_s + eval_s`` from the ``runs`` table (time inside the
  training and evaluation loops),
* ``run_s``: Σ of the runs' own ``wall_s`` (adds model build and data generation in the run),
* ``overhead``: 1 − inside_s / (width · wall_s), the share of the actors' reserved time not
  spent training or evaluating (goal ≤ 2 %),
* ``ray_overhead``: 1 − run_s / (width · wall_s), the same with each run's own set-up (model
  build, data generation, checkpoints) counted as work: what Ray and the driver alone cost,
* ``speedup``: wall_s(1 actor) / wall_s(this width) (goal ≥ 1.7× for 2 actors on 2 cores);
  ``--ceiling`` also prints what plain processes without Ray get on the same machine.

Speed goals are measured here, never asserted in unit tests.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def sweep_specs(runs: int, tokens_per_task: int, num_tasks: int, seq_len: int):
    from nlbench.config import expand_runs, validate_config

    cfg = {
        "name": "orchestration-bench",
        "models": [{"name": "transformer", "size": "tiny"}],
        "streams": [{"name": "markov-languages", "num_tasks": num_tasks, "seq_len": seq_len}],
        "seeds": list(range(runs)),
        "train": {"tokens_per_task": tokens_per_task, "batch_size": 16, "device": "cpu"},
        "eval": {"max_sequences": 64, "batch_size": 64},
    }
    return expand_runs(validate_config(cfg))


def measure(specs, width: int, out_dir: str) -> dict:
    from nlbench.execution import run_sweep
    from nlbench.results import ResultStore

    t0 = time.perf_counter()
    summary = run_sweep(specs, out_dir, cpus_per_run=1, max_failures=0, max_concurrent=width, progress=False)
    wall = time.perf_counter() - t0
    runs = ResultStore(out_dir).read("runs")
    if summary["completed"] != len(specs):
        raise RuntimeError(f"sweep of width {width} did not complete: {summary}")
    inside = float((runs.train_s + runs.eval_s).sum())
    return {
        "width": summary["concurrency"],
        "wall_s": wall,
        "inside_s": inside,
        "run_s": float(runs.wall_s.sum()),
        "overhead": 1.0 - inside / (summary["concurrency"] * wall),
        "ray_overhead": 1.0 - float(runs.wall_s.sum()) / (summary["concurrency"] * wall),
    }


def _inside_one(spec) -> float:
    import torch

    from nlbench.runner import execute_run

    torch.set_num_threads(1)
    run = execute_run(spec, device="cpu", threads=1).run
    return run["train_s"] + run["eval_s"]


def hardware_ceiling(specs, width: int) -> float:
    """The speed-up ``width`` plain processes (no Ray) get on this machine: ``width`` runs at
    once versus one alone, from their own train+eval times (imports excluded). On CPUs shared
    with other work, or SMT siblings, it is below ``width`` whatever the orchestrator does."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=width, mp_context=mp.get_context("spawn")) as pool:
        solo = list(pool.map(_inside_one, specs[:1]))[0]
        together = list(pool.map(_inside_one, specs[:width]))
    return width * solo / (sum(together) / len(together))


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m nlbench.bench.orchestration", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=8, help="runs in the sweep (>= 8 for the report)")
    p.add_argument("--tokens-per-task", type=int, default=49152)
    p.add_argument("--num-tasks", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--width", type=int, nargs="+", default=[1, 2], help="actor counts to compare")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded runtime (default: all)")
    p.add_argument("--ceiling", action="store_true",
                   help="also measure the speed-up plain processes (no Ray) get on this machine")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    if any(w < 1 for w in args.width):
        p.error(f"--width values must be >= 1, got {args.width}")

    import ray

    from nlbench.execution import connect

    specs = sweep_specs(args.runs, args.tokens_per_task, args.num_tasks, args.seq_len)
    t0 = time.perf_counter()
    started = connect(None, num_cpus=args.num_cpus)
    ray_start = time.perf_counter() - t0
    cpus = int(ray.cluster_resources().get("CPU", 0))
    print(f"orchestration bench: {len(specs)} runs (transformer tiny, markov-languages, {args.num_tasks} tasks x "
          f"{args.tokens_per_task} tokens, seq {args.seq_len}); Ray runtime with {cpus} CPUs started in {ray_start:.1f} s; "
          f"machine load average {os.getloadavg()[0]:.1f}")
    rows = []
    try:
        for width in args.width:
            with tempfile.TemporaryDirectory(prefix="nlbench-orch-") as out:
                rows.append(measure(specs, width, out))
    finally:
        if started:
            ray.shutdown()
    base = next((r["wall_s"] for r in rows if r["width"] == 1), None)
    if args.ceiling:
        for w in sorted(set(args.width) - {1}):
            print(f"hardware ceiling without Ray, {w} processes: {hardware_ceiling(specs, w):.2f}x")
    print(f"{'actors':>6} {'wall_s':>8} {'inside_s':>9} {'run_s':>8} {'overhead':>9} {'ray_ovh':>8} {'speedup':>8}")
    for r in rows:
        r["speedup"] = base / r["wall_s"] if base else float("nan")
        print(f"{r['width']:>6} {r['wall_s']:>8.2f} {r['inside_s']:>9.2f} {r['run_s']:>8.2f} "
              f"{100 * r['overhead']:>8.2f}% {100 * r['ray_overhead']:>7.2f}% {r['speedup']:>7.2f}x")
    return rows


if __name__ == "__main__":
    main()
