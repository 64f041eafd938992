"""`mqar`: multi-query associative recall with a new key -> value map in every sequence.

As in Zoology's MQAR (Arora et al. 2023), every sequence draws its own map: n_pairs distinct keys
with distinct values, then several queries of shown keys, each followed by its value:
    k1 v1 k2 v2 ... kn vn SEP q1 a1 q2 a2 ... [PAD ...]
Only the answers a_i are scored (target at the position of q_i). Because the map changes with
every sequence, nothing about it can be memorised into the weights (unlike associative-recall's
fixed per-task map): the task is in-context lookup, and what a later task can overwrite is the
lookup machinery for the earlier task's tokens. Task t has its own key and value vocabulary, so
a new task is the same skill on tokens never seen before. Tokens: task t's keys
[t·(K+V), t·(K+V)+K), its values [t·(K+V)+K, (t+1)·(K+V)), SEP = T·(K+V), PAD = SEP + 1.

Exact figures: ceiling = 1 (the answer is shown earlier in the sequence). Values are a uniform
draw without replacement, so each scored answer is uniform over the task's V values:
chance = 1/V.
"""
from __future__ import annotations

import numpy as np

from .base import Stream, Task, check_int, rng_for, shift_targets
from .recall import query_count


def build_mqar(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
               n_keys: int = 16, n_values: int = 16, n_pairs: int = 8,
               n_queries: int | None = None) -> Stream:
    where = "stream 'mqar'"
    K = check_int("n_keys", n_keys, 2, 4096, where=where)
    V = check_int("n_values", n_values, 2, 4096, where=where)
    n_pairs = check_int("n_pairs", n_pairs, 1, min(K, V), where=where,
                        why=f"(distinct keys with distinct values: at most min(n_keys, n_values)="
                            f"{min(K, V)})")
    length = seq_len + 1
    n_q = query_count(seq_len, n_pairs, n_queries, where)
    block = K + V
    SEP, PAD = num_tasks * block, num_tasks * block + 1
    q0 = 2 * n_pairs + 1            # index of the first query key in the sequence

    def make_task(t):
        key0, value0 = t * block, t * block + K

        def sample(rng, n):
            keys = key0 + np.argsort(rng.random((n, K)), axis=1)[:, :n_pairs]
            values = value0 + np.argsort(rng.random((n, V)), axis=1)[:, :n_pairs]
            pick = rng.integers(0, n_pairs, size=(n, n_q))          # which shown pair is asked
            seq = np.full((n, length), PAD, dtype=np.int64)
            seq[:, 0:2 * n_pairs:2] = keys
            seq[:, 1:2 * n_pairs:2] = values
            seq[:, 2 * n_pairs] = SEP
            seq[:, q0:q0 + 2 * n_q:2] = np.take_along_axis(keys, pick, axis=1)
            seq[:, q0 + 1:q0 + 2 * n_q:2] = np.take_along_axis(values, pick, axis=1)
            scored = np.zeros_like(seq, dtype=bool)
            scored[:, q0 + 1:q0 + 2 * n_q:2] = True
            return shift_targets(seq, scored)

        return Task(index=t, name=f"mqar-{t}", chance=1.0 / V, ceiling=1.0,
                    seed_key=(seed, "mqar", t), train_sampler=sample,
                    eval_builder=lambda: sample(rng_for(seed, "mqar", t, "eval"), eval_size),
                    info=dict(keys=(key0, key0 + K), values=(value0, value0 + V), n_queries=n_q))

    return Stream("mqar", num_tasks * block + 2, seq_len, "accuracy",
                  [make_task(t) for t in range(num_tasks)], seed,
                  dict(n_keys=K, n_values=V, n_pairs=n_pairs, n_queries=n_q))
