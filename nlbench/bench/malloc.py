"""What ``nlbench.malloc`` buys a training step: page faults and step time, tuning off vs on.

``python -m nlbench.bench.malloc [--model hope] [--size small] [--seq-len 512] [--batch 4] [--steps 4]``

Each setting runs in a fresh process (glibc's malloc settings are per process): forward and
backward passes of the model, one torch thread; prints per setting the minor page faults over
the steps after the first (the first faults everything in once either way) and the median
step time, then the ratio. Page-fault counts depend on the machine's memory reclaim, which is
why this is a benchmark and not a unit test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

STEPS = """
import json, resource, statistics, sys, time, torch
from nlbench.malloc import keep_freed_memory
applied = keep_freed_memory()
from nlbench.models import build_model
model_name, size, seq_len, batch, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
torch.manual_seed(0)
torch.set_num_threads(1)
model = build_model(model_name, size=size, vocab_size=64)
tokens = torch.randint(0, 64, (batch, seq_len))
faults, times = [], []
for step in range(steps):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    model(tokens).logits.square().mean().backward()
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"applied": applied, "faults": sum(faults[1:]),
                  "step_ms": 1000 * statistics.median(times[1:])}))
"""


def measure(tuning: str, model: str, size: str, seq_len: int, batch: int, steps: int) -> dict:
    env = {**os.environ, "NLBENCH_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", STEPS, model, size, str(seq_len), str(batch), str(steps)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nlbench.bench.malloc", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="hope")
    p.add_argument("--size", default="small")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be at least 2 (the first step is not counted)")
    rows = {t: measure(t, a.model, a.size, a.seq_len, a.batch, a.steps) for t in ("0", "1")}
    for t, r in rows.items():
        label = "kept (NLBENCH_MALLOC_TUNING=1)" if t == "1" else "glibc defaults (=0)"
        print(f"{label:32s} page faults after step 1: {r['faults']:>8,d}   median step: {r['step_ms']:8.1f} ms")
    off, on = rows["0"], rows["1"]
    print(f"faults on/off: {on['faults'] / max(off['faults'], 1):.3f}   step time on/off: {on['step_ms'] / off['step_ms']:.3f}")


if __name__ == "__main__":
    main()
