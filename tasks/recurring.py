"""`recurring`: one task comes back between new ones, A B A C A D …, to measure relearning.

Position p of the stream trains task A (the base stream's task 0) when p is even and the base
stream's task (p + 1) / 2 when p is odd; the base stream (`base`, built with `base_options`) has
1 + num_tasks // 2 distinct tasks. Every exposure of A is scored on the same held-out set, and
each exposure draws new training batches (its own seed key), so a re-exposure is the same task,
not a replay of the same batches. Chance, ceiling and vocabulary are the base stream's.

How fast A is relearned is `relearn_savings` (docs/METRICS.md): the area under A's learning
curve in each later exposure minus the area in its first exposure.
"""
from __future__ import annotations

import inspect

from .base import Stream, Task, check_int
from .digits import build_permuted_digits, build_split_digits_task
from .markov import build_markov_languages, build_permuted_tokens
from .mqar import build_mqar

BASES = {"permuted-digits": build_permuted_digits, "markov-languages": build_markov_languages,
         "permuted-tokens": build_permuted_tokens, "mqar": build_mqar,
         "split-digits-task": build_split_digits_task}
_SET_HERE = ("num_tasks", "seq_len", "seed", "eval_size")


def source_of(position: int) -> int:
    """Index of the base task trained at stream position `position` (A = 0 at even positions)."""
    return 0 if position % 2 == 0 else (position + 1) // 2


def recurrences(num_tasks: int) -> list[list[int]]:
    """Positions that train the same task, for every task that occurs more than once: [[0, 2, 4, …]]."""
    return [list(range(0, num_tasks, 2))] if num_tasks >= 3 else []


def build_recurring(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                    base: str = "permuted-digits", base_options: dict | None = None) -> Stream:
    where = "stream 'recurring'"
    check_int("num_tasks", num_tasks, 3, None, where=where,
              why="(A B A is the shortest stream in which a task recurs)")
    if base not in BASES:
        raise ValueError(f"{where}: unknown `base` {base!r}; allowed values: {', '.join(BASES)}.")
    if base_options is not None and not isinstance(base_options, dict):
        raise ValueError(f"{where}: `base_options` must be a mapping of the base stream's knobs; "
                         f"got {base_options!r}.")
    options = dict(base_options or {})
    clash = sorted(set(options) & set(_SET_HERE))
    if clash:
        raise ValueError(f"{where}: `base_options` may not set {', '.join(clash)} (the recurring "
                         f"stream sets them).")
    knobs = [k for k in inspect.signature(BASES[base]).parameters if k not in _SET_HERE]
    unknown = sorted(set(options) - set(knobs))
    if unknown:
        raise ValueError(f"{where}: unknown `base_options` {', '.join(unknown)} for base {base!r}; "
                         f"allowed: {', '.join(knobs) or 'none'}.")
    try:
        inner = BASES[base](num_tasks=1 + num_tasks // 2, seq_len=seq_len, seed=seed,
                            eval_size=eval_size, **options)
    except ValueError as e:
        raise ValueError(f"{where} (base {base!r}): {e}") from None
    tasks, exposures = [], {}
    for p in range(num_tasks):
        src = inner.tasks[source_of(p)]
        k = exposures[src.index] = exposures.get(src.index, 0) + 1
        letter = chr(ord("A") + src.index) if src.index < 26 else str(src.index)
        task = Task(index=p, name=f"{letter}:{src.name}", chance=src.chance, ceiling=src.ceiling,
                    seed_key=(*src._seed_key, "exposure", k), train_sampler=src._train_sampler,
                    eval_builder=src.eval_set, info=dict(src.info, source=src.index, exposure=k))
        task.output_groups = src.output_groups
        tasks.append(task)
    out = Stream("recurring", inner.vocab_size, seq_len, inner.kind, tasks, seed,
                 dict(base=base, base_options=options, **{f"base.{k}": v for k, v in inner.knobs.items()}))
    out.output_groups = inner.output_groups
    return out
