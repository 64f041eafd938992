"""`associative-recall`: multi-query key -> value recall.

A sequence shows n_pairs distinct keys with their values, a SEP, then queries, each a shown key
followed by its value:   k1 v1 k2 v2 ... kn vn SEP q1 a1 q2 a2 ... [PAD ...]
Only the answers a_i are scored (target at the position of q_i). Each task has its own fixed
injective map key -> value, so the answer can be found in context (copy the value shown after the
same key) and can also be learned in the weights; a new task remaps every key, which is what
makes the stream continual. Tokens: keys [0, K), values [K, K+V), SEP = K+V, PAD = K+V+1.

Exact figures: ceiling = 1 (the answer is a function of the query). The queried key is uniform
over all K keys (uniform subset, uniform pick), and the map is injective, so every value is
answered with probability 1/K: chance = 1/K.
"""
from __future__ import annotations

import numpy as np

from .base import Stream, Task, check_int, rng_for, shift_targets


def query_count(seq_len: int, n_pairs: int, n_queries: int | None, where: str) -> int:
    """Queries per sequence after n_pairs key-value pairs and SEP: all that fit when None."""
    room = (seq_len + 1 - 2 * n_pairs - 1) // 2
    if n_queries is None:
        if room < 1:
            raise ValueError(f"{where}: `seq_len` must be at least {2 * n_pairs + 2} to hold "
                             f"{n_pairs} pairs, SEP and one query; got {seq_len}.")
        return room
    n_q = check_int("n_queries", n_queries, 1, None, where=where)
    if n_q > room:
        raise ValueError(f"{where}: `seq_len` must be at least {2 * n_pairs + 2 * n_q} to hold "
                         f"{n_pairs} pairs, SEP and {n_q} queries; got {seq_len}.")
    return n_q


def build_associative_recall(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                             n_keys: int = 32, n_values: int = 32, n_pairs: int = 16,
                             n_queries: int | None = None) -> Stream:
    where = "stream 'associative-recall'"
    K = check_int("n_keys", n_keys, 2, 4096, where=where)
    V = check_int("n_values", n_values, K, 4096, where=where,
                  why=f"(at least n_keys={K}, so each task's key -> value map is injective)")
    n_pairs = check_int("n_pairs", n_pairs, 1, K, where=where, why=f"(distinct keys shown, at "
                        f"most n_keys={K})")
    length = seq_len + 1
    n_q = query_count(seq_len, n_pairs, n_queries, where)
    SEP, PAD = K + V, K + V + 1
    q0 = 2 * n_pairs + 1            # index of the first query key in the sequence

    def make_task(t):
        value_of = K + rng_for(seed, "associative-recall", "map", t).permutation(V)[:K]

        def sample(rng, n):
            keys = np.argsort(rng.random((n, K)), axis=1)[:, :n_pairs]
            queries = np.take_along_axis(keys, rng.integers(0, n_pairs, size=(n, n_q)), axis=1)
            seq = np.full((n, length), PAD, dtype=np.int64)
            seq[:, 0:2 * n_pairs:2] = keys
            seq[:, 1:2 * n_pairs:2] = value_of[keys]
            seq[:, 2 * n_pairs] = SEP
            seq[:, q0:q0 + 2 * n_q:2] = queries
            seq[:, q0 + 1:q0 + 2 * n_q:2] = value_of[queries]
            scored = np.zeros_like(seq, dtype=bool)
            scored[:, q0 + 1:q0 + 2 * n_q:2] = True
            return shift_targets(seq, scored)

        return Task(index=t, name=f"recall-{t}", chance=1.0 / K, ceiling=1.0,
                    seed_key=(seed, "associative-recall", t), train_sampler=sample,
                    eval_builder=lambda: sample(rng_for(seed, "associative-recall", t, "eval"),
                                                eval_size),
                    info=dict(value_of=value_of.copy(), n_queries=n_q))

    return Stream("associative-recall", K + V + 2, seq_len, "accuracy",
                  [make_task(t) for t in range(num_tasks)], seed,
                  dict(n_keys=K, n_values=V, n_pairs=n_pairs, n_queries=n_q))
