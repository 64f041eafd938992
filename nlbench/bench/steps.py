"""Train-step time of several models in ONE process, their steps alternating, and each model's
median step time against the last model's: a ratio that a shared, noisy machine moves much less
than it moves separate runs (each step of every model sees the same load).

``python -m nlbench.bench.steps --models hope,transformer --size medium --seq-len 512 --batch 4``

One step is what a run's training step does: forward on random tokens, cross-entropy, backward,
gradient clipping at 1.0, the optimizer's step (`nlbench.optim.build_optimizer`). Glibc keeps
freed memory (`nlbench.malloc`) and torch uses `--threads` threads, as in a run with that CPU
share. Prints one line per model (median and fastest step in ms, tokens/s) and, per model, its
tokens/s over the last model's. docs/decisions.md quotes its output with the command.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def train_step(model_name: str, size: str, seq_len: int, batch: int, vocab: int, optimizer: str, lr: float,
               seed: int = 0):
    """A closure running one train step of a fresh `model_name` on fixed random tokens."""
    from nlbench.models import build_model
    from nlbench.optim import build_optimizer

    torch.manual_seed(seed)
    model = build_model(model_name, size=size, vocab_size=vocab)
    opt = build_optimizer(optimizer, model, lr=lr)
    x, y = torch.randint(0, vocab, (batch, seq_len)), torch.randint(0, vocab, (batch, seq_len))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x, state=None).logits.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()

    return step


def alternate(steps: dict, n: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each closure over n rounds; the order reverses every other round."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(n):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nlbench.bench.steps", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="hope,transformer", help="comma-separated; ratios are against the last")
    p.add_argument("--size", default="medium")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=8, help="timed rounds (each model once per round)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    from nlbench.malloc import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(a.threads)
    names = [m.strip() for m in a.models.split(",") if m.strip()]
    steps = {m: train_step(m, a.size, a.seq_len, a.batch, a.vocab, a.optimizer, a.lr) for m in names}
    times = alternate(steps, a.steps)
    tokens = a.batch * a.seq_len
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{a.size}, T={a.seq_len}, batch {a.batch}, {a.optimizer} lr {a.lr}, {a.threads} thread(s), "
          f"{a.steps} alternating rounds")
    for m in names:
        print(f"{m:16s} median {1000 * med[m]:9.1f} ms  fastest {1000 * min(times[m]):9.1f} ms  "
              f"{tokens / med[m]:10.0f} tokens/s  ×{med[names[-1]] / med[m]:.3f} of {names[-1]}'s tokens/s")


if __name__ == "__main__":
    main()
