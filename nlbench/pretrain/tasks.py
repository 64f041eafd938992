"""Pretraining tasks: a pool drawn from a separate seed space, and meta-sequences over it.

Seed spaces. Every evaluated stream is built with its run's seed, which configs keep below
`PRETRAIN_SEED_BASE` = 2^62 (nlbench.config checks it). Pretraining pools are built with
`pretrain_stream_seed(seed)` in [2^62, 2^63). Each family keys its generators by (stream seed,
family, task index), so no pretraining generator key can equal an evaluated one: disjointness
holds by construction, not by chance.

Pools. `tasks: N` builds one stream of N tasks and draws from it (a model can memorize a small
pool in its weights instead of learning in context). `tasks: fresh` gives every segment of
every row its own task: task 0 of a one-task stream seeded by (pretrain seed, step, row,
segment), an unbounded pool. For families whose task 0 is special (modular-arithmetic's first
operation, permuted-tokens' identity permutation, split-digits' first classes) fresh tasks all
share that kind; use a numbered pool there.

A meta-sequence (one batch row) is `segments` task segments, each `segment_sequences`
sequences of one task; each row draws its own distinct tasks from the pool. Every draw is a
pure function of (pretrain seed, step, place in the meta-sequence, row), so a resumed
pretraining sees exactly the batches an undisturbed one would.
"""

from __future__ import annotations

import numpy as np
import torch

from nlbench.tasks.base import derive_seed, rng_for

PRETRAIN_SEED_BASE = 1 << 62


def pretrain_stream_seed(seed: int, *part) -> int:
    """The stream seed of pretraining pool `seed` (and `part` of it): always in [2^62, 2^63)."""
    return PRETRAIN_SEED_BASE | (derive_seed("nlbench-pretrain", int(seed), *part) >> 1)


def build_pretrain_stream(block: dict, *part, num_tasks: int | None = None):
    """The numbered pool of `block['tasks']` tasks, or (fresh pools) the one-task stream `part`."""
    from nlbench.tasks import build_stream

    s = block["stream"]
    kw = {"seq_len": s["seq_len"]} if s.get("seq_len") is not None else {}
    n = num_tasks if num_tasks is not None else (1 if block["tasks"] == "fresh" else int(block["tasks"]))
    return build_stream(s["name"], num_tasks=n, seed=pretrain_stream_seed(block["seed"], *part),
                        eval_size=1, **kw, **(s.get("options") or {}))


class MetaSequences:
    """Which task each row reads in each segment of step `step`, and the sequences themselves."""

    def __init__(self, stream, block: dict):
        self.stream, self.block, self.seed = stream, block, int(block["seed"])
        self.batch_size, self.segments = int(block["batch_size"]), int(block["segments"])
        self.fresh = block["tasks"] == "fresh"
        self._fresh: dict[int, object] = {}

    def plan(self, step: int) -> np.ndarray:
        """int[batch, segments]: distinct tasks per row (with repeats only if the pool is smaller);
        fresh pools: a new task id per (step, row, segment)."""
        if self.fresh:
            self._fresh.clear()  # a step's tasks are never read again
            B, S = self.batch_size, self.segments
            return (int(step) * B * S + np.arange(B * S)).reshape(B, S)
        rng = rng_for("nlbench-pretrain-plan", self.seed, int(step))
        n = len(self.stream.tasks)
        return np.stack([rng.choice(n, self.segments, replace=n < self.segments) for _ in range(self.batch_size)])

    def task(self, t: int):
        if not self.fresh:
            return self.stream.tasks[int(t)]
        if int(t) not in self._fresh:
            self._fresh[int(t)] = build_pretrain_stream(self.block, "fresh", int(t)).tasks[0]
        return self._fresh[int(t)]

    def probe_segments(self, step: int, k: int) -> np.ndarray:
        """For each row, the earlier segment (< k) its probe after segment k reads."""
        return rng_for("nlbench-pretrain-probe", self.seed, int(step), int(k)).integers(0, k, size=self.batch_size)

    def draw(self, step: int, tasks, tag: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """One fresh sequence per row b of task tasks[b]: tokens, targets [batch, seq_len]."""
        rows = [next(self.task(t).train_batches(1, seed=derive_seed(self.seed, int(step), *tag, b)))
                for b, t in enumerate(tasks)]
        return torch.cat([r.tokens for r in rows]), torch.cat([r.targets for r in rows])


__all__ = ["PRETRAIN_SEED_BASE", "MetaSequences", "build_pretrain_stream", "pretrain_stream_seed"]
