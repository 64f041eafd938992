"""`passkey`: retrieve a key of digits hidden in filler, at growing lengths across tasks.

Task t uses sequences of L_t tokens, L_t growing linearly from `min_len` (task 0) to seq_len + 1
(last task); the rest of the seq_len + 1 window is PAD. Layout:
    filler ... KEY d1 .. dn filler ... QUERY d1 .. dn
The needle `KEY d1..dn` sits at a uniformly random depth of the filler, so the mean distance
between needle and query grows with t. Filler is a cyclic run of `n_filler` tokens with a
random phase (predictable text, not noise). Only the answer digits after QUERY are scored.
Tokens: filler [0, F), digits [F, F+10), KEY = F+10, QUERY = F+11, PAD = F+12.

Exact figures: ceiling = 1 (the key is in context); digits are uniform, chance = 1/10.
"""
from __future__ import annotations

import numpy as np

from .base import Stream, Task, check_int, rng_for, shift_targets


def build_passkey(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                  key_digits: int = 5, n_filler: int = 16, min_len: int = 32) -> Stream:
    where = "stream 'passkey'"
    n = check_int("key_digits", key_digits, 1, 64, where=where)
    F = check_int("n_filler", n_filler, 1, 4096, where=where)
    shortest = 2 * (n + 1) + 1
    check_int("seq_len", seq_len, shortest, None, where=where,
              why=f"(the needle and the query of a {n}-digit key with one filler token need "
                  f"{shortest} tokens)")
    length = seq_len + 1
    min_len = check_int("min_len", min_len, shortest, length, where=where,
                        why="(sequence length of the first task, at most seq_len + 1)")
    DIG, KEY, QUERY, PAD = F, F + 10, F + 11, F + 12

    def make_task(t):
        frac = t / (num_tasks - 1) if num_tasks > 1 else 1.0
        L = int(round(min_len + (length - min_len) * frac))
        n_fill = L - 2 * (n + 1)

        def sample(rng, b):
            phase = rng.integers(0, F, size=(b, 1))
            depth = rng.integers(0, n_fill + 1, size=b)     # filler tokens before the needle
            digits = rng.integers(0, 10, size=(b, n)) + DIG
            seq = np.full((b, length), PAD, dtype=np.int64)
            seq[:, :n_fill + n + 1] = (phase + np.arange(n_fill + n + 1)) % F
            cols = np.arange(n_fill + n + 1)[None, :]
            # shift the filler after the needle right by n+1 and write the needle at `depth`
            after = cols >= depth[:, None]
            filler = seq[:, :n_fill + n + 1].copy()
            src = np.where(after, cols - (n + 1), cols)
            seq[:, :n_fill + n + 1] = np.take_along_axis(filler, np.maximum(src, 0), axis=1)
            rows = np.arange(b)[:, None]
            needle = depth[:, None] + np.arange(n + 1)[None, :]
            seq[rows, needle] = np.concatenate([np.full((b, 1), KEY), digits], axis=1)
            q = n_fill + n + 1
            seq[:, q] = QUERY
            seq[:, q + 1:q + 1 + n] = digits
            scored = np.zeros_like(seq, dtype=bool)
            scored[:, q + 1:q + 1 + n] = True
            return shift_targets(seq, scored)

        return Task(index=t, name=f"passkey-len{L}", chance=0.1, ceiling=1.0,
                    seed_key=(seed, "passkey", t), train_sampler=sample,
                    eval_builder=lambda: sample(rng_for(seed, "passkey", t, "eval"), eval_size),
                    info=dict(length=L, mean_distance=n_fill / 2 + n + 1))

    return Stream("passkey", F + 13, seq_len, "accuracy",
                  [make_task(t) for t in range(num_tasks)], seed,
                  dict(key_digits=n, n_filler=F, min_len=min_len))
