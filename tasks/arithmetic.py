"""`modular-arithmetic`: a o b mod p, a different operation o per task.

A sequence packs equations of five tokens, `a OP b EQ c`, with c = (a o b) mod p; only c is
scored (target at the EQ position); a tail too short for an equation is PAD. Every task uses the
same OP token, so the task must be inferred from the data (and the old operation is overwritten
by the new one). Tokens: residues [0, p), OP = p, EQ = p+1, PAD = p+2.

The (a, b) pairs are split once per seed: a `holdout` fraction is reserved for evaluation and
never appears in training (the same pairs for every task). holdout = 0 evaluates on the training
pairs (memorisation). Exact figures: ceiling = 1 (c is a function of a, b); chance = frequency of
the most common answer over the held-out pairs (eval equations are uniform over them).
"""
from __future__ import annotations

import numpy as np

from .base import Stream, Task, check_float, check_int, rng_for, shift_targets

OPERATIONS = {
    "a+b": lambda a, b: a + b,
    "a-b": lambda a, b: a - b,
    "a*b": lambda a, b: a * b,
    "a^2+b": lambda a, b: a * a + b,
    "a^2+ab+b^2": lambda a, b: a * a + a * b + b * b,
    "ab+a+b": lambda a, b: a * b + a + b,
    "a^3+ab": lambda a, b: a * a * a + a * b,
    "(a-b)^2+a": lambda a, b: (a - b) ** 2 + a,
}
EQ_LEN = 5


def build_modular_arithmetic(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                             modulus: int = 31, holdout: float = 0.2) -> Stream:
    where = "stream 'modular-arithmetic'"
    if num_tasks > len(OPERATIONS):
        raise ValueError(f"{where}: `num_tasks` must be at most {len(OPERATIONS)} (one per "
                         f"operation: {', '.join(OPERATIONS)}); got {num_tasks}.")
    p = check_int("modulus", modulus, 2, 1024, where=where)
    holdout = check_float("holdout", holdout, 0.0, 0.9, where=where)
    check_int("seq_len", seq_len, EQ_LEN - 1, None, where=where,
              why=f"(one equation `a OP b EQ c` needs {EQ_LEN} tokens including the label)")
    OP, EQ, PAD = p, p + 1, p + 2
    length = seq_len + 1
    n_eq = length // EQ_LEN

    pairs = rng_for(seed, "modular-arithmetic", "split").permutation(p * p)
    n_eval = int(round(holdout * p * p))
    if holdout > 0 and not 1 <= n_eval < p * p:
        raise ValueError(f"{where}: `holdout`={holdout} leaves {n_eval} of {p * p} pairs for "
                         f"evaluation; choose holdout and modulus so both splits are non-empty.")
    eval_pairs = pairs[:n_eval] if n_eval else pairs
    train_pairs = pairs[n_eval:]

    def make_task(t, op_name):
        op = OPERATIONS[op_name]

        def sampler(pool):
            def sample(rng, n):
                pick = pool[rng.integers(0, len(pool), size=(n, n_eq))]
                a, b = pick // p, pick % p
                seq = np.full((n, length), PAD, dtype=np.int64)
                eqs = np.stack([a, np.full_like(a, OP), b, np.full_like(a, EQ), op(a, b) % p], -1)
                seq[:, :n_eq * EQ_LEN] = eqs.reshape(n, -1)
                scored = np.zeros_like(seq, dtype=bool)
                scored[:, EQ_LEN - 1:n_eq * EQ_LEN:EQ_LEN] = True
                return shift_targets(seq, scored)
            return sample

        answers = op(eval_pairs // p, eval_pairs % p) % p
        chance = np.bincount(answers, minlength=p).max() / len(answers)
        eval_sample = sampler(eval_pairs)
        return Task(index=t, name=f"mod{p}-{op_name}", chance=chance, ceiling=1.0,
                    seed_key=(seed, "modular-arithmetic", t), train_sampler=sampler(train_pairs),
                    eval_builder=lambda: eval_sample(rng_for(seed, "modular-arithmetic", t, "eval"),
                                                     eval_size),
                    info=dict(operation=op_name, modulus=p, eval_pairs=eval_pairs.copy(),
                              train_pairs=train_pairs.copy()))

    tasks = [make_task(t, name) for t, name in zip(range(num_tasks), OPERATIONS)]
    return Stream("modular-arithmetic", p + 3, seq_len, "accuracy", tasks, seed,
                  dict(modulus=p, holdout=holdout))
