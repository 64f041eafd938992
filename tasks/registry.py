"""`STREAMS` registry, `build_stream`, `describe_streams`."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

from .arithmetic import OPERATIONS, build_modular_arithmetic
from .base import Stream, Task, check_int
from .digits import build_permuted_digits, build_split_digits, build_split_digits_task
from .markov import build_markov_languages, build_permuted_tokens
from .mqar import build_mqar
from .passkey import build_passkey
from .recall import build_associative_recall
from .recurring import build_recurring, recurrences
from .text import build_text_domains

COMMON = ("num_tasks", "seq_len", "seed", "eval_size")


@dataclass(frozen=True)
class StreamSpec:
    name: str
    builder: Callable[..., Stream]
    description: str
    num_tasks: int | None      # default; None = every available task (text-domains)
    seq_len: int               # default
    max_tasks: int             # upper bound of num_tasks (text-domains checks its own)
    tasks_note: str = ""       # why that bound, for the error message
    # "forgetting": ranked in the report's verdict; "capability": a skill at growing lengths or
    # learnability at a budget, reported in its own section (docs/METRICS.md)
    measures: str = "forgetting"
    # num_tasks -> positions that train the same task (recurring streams; relearn_savings)
    recurrences: Callable[[int], list[list[int]]] | None = None

    @property
    def knobs(self) -> dict:
        """Size knobs and their defaults."""
        params = inspect.signature(self.builder).parameters
        return {k: p.default for k, p in params.items() if k not in COMMON}


STREAMS: dict[str, StreamSpec] = {s.name: s for s in [
    StreamSpec("markov-languages", build_markov_languages,
               "a different random sparse n-gram language per task; next-token accuracy with "
               "the exact Bayes ceiling", 5, 128, 1000),
    StreamSpec("associative-recall", build_associative_recall,
               "multi-query key->value recall, a fixed key->value map per task; scored at the "
               "answers", 5, 64, 1000),
    StreamSpec("modular-arithmetic", build_modular_arithmetic,
               "a o b mod p, a different operation per task, held-out (a, b) pairs", 5, 64, 8,
               "(one task per operation: " + ", ".join(OPERATIONS) + ")", measures="capability"),
    StreamSpec("permuted-tokens", build_permuted_tokens,
               "one n-gram language, a different vocabulary permutation per task (task 0 "
               "identity)", 5, 128, 1000),
    StreamSpec("split-digits", build_split_digits,
               "sklearn 8x8 digits as pixel tokens, class-incremental: 5 tasks x 2 classes",
               5, 65, 5, "(10 classes, 2 per task)"),
    StreamSpec("permuted-digits", build_permuted_digits,
               "sklearn 8x8 digits, domain-incremental: a fixed pixel permutation per task",
               5, 65, 1000),
    StreamSpec("text-domains", build_text_domains,
               "byte-level LM over text shipped with Python: prose, Python source, docs, C "
               "headers", None, 256, 1000, measures="capability"),
    StreamSpec("passkey", build_passkey,
               "retrieve digits hidden in filler, sequences growing longer across tasks",
               5, 256, 1000, measures="capability"),
    StreamSpec("mqar", build_mqar,
               "multi-query associative recall (Zoology MQAR): a new key->value map in every "
               "sequence, several queries; each task its own key and value tokens", 4, 64, 64),
    StreamSpec("split-digits-task", build_split_digits_task,
               "split-digits in task-incremental form: the same 5 tasks x 2 classes, a per-task "
               "output mask lets only the task's own labels compete", 5, 65, 5,
               "(10 classes, 2 per task)"),
    StreamSpec("recurring", build_recurring,
               "A B A C A ...: task A of a base stream recurs between new tasks; "
               "relearn_savings measures how fast A is relearned", 5, 65, 1000,
               recurrences=recurrences),
]}


def capability_streams() -> tuple[str, ...]:
    """Streams reported in the capability section, outside the forgetting verdict."""
    return tuple(n for n, s in STREAMS.items() if s.measures == "capability")


def recurrence_positions(name: str, num_tasks: int) -> list[list[int]]:
    """Positions of stream `name` that train the same task ([] for streams without recurrences)."""
    spec = STREAMS.get(name)
    return [] if spec is None or spec.recurrences is None else spec.recurrences(int(num_tasks))


def describe_streams() -> dict[str, str]:
    """Stream name -> one-line description (with its defaults)."""
    out = {}
    for s in STREAMS.values():
        knobs = ", ".join(f"{k}={v}" for k, v in s.knobs.items())
        tasks = "all available" if s.num_tasks is None else s.num_tasks
        out[s.name] = (f"{s.description}. Defaults: num_tasks={tasks}, seq_len={s.seq_len}"
                       f"{', ' + knobs if knobs else ''}.")
    return out


def build_stream(name: str, num_tasks: int | None = None, seq_len: int | None = None,
                 seed: int = 0, eval_size: int = 256, **knobs) -> Stream:
    """Build the named stream; unset num_tasks / seq_len take the stream's defaults."""
    if name not in STREAMS:
        raise ValueError(f"build_stream: unknown stream `name` {name!r}; allowed values: "
                         f"{', '.join(STREAMS)}.")
    spec = STREAMS[name]
    where = f"stream {name!r}"
    unknown = sorted(set(knobs) - set(spec.knobs))
    if unknown:
        allowed = ", ".join(spec.knobs) or "none"
        raise ValueError(f"{where}: unknown knob(s) {', '.join(unknown)}; allowed knobs: "
                         f"{allowed} (plus {', '.join(COMMON)}).")
    if num_tasks is None:
        num_tasks = spec.num_tasks
    if num_tasks is not None:
        check_int("num_tasks", num_tasks, 1, spec.max_tasks, where=where, why=spec.tasks_note)
    seq_len = check_int("seq_len", spec.seq_len if seq_len is None else seq_len, 1, 1 << 20,
                        where=where)
    seed = check_int("seed", seed, 0, (1 << 63) - 1, where=where)
    eval_size = check_int("eval_size", eval_size, 1, 1 << 20, where=where)
    stream = spec.builder(num_tasks=num_tasks, seq_len=seq_len, seed=seed, eval_size=eval_size,
                          **knobs)
    stream.recipe = dict(name=name, num_tasks=len(stream.tasks), seq_len=seq_len, seed=seed,
                         eval_size=eval_size, **knobs)
    stream.rebuild = rebuild_stream
    for task in stream.tasks:
        task.recipe, task.rebuild = stream.recipe, rebuild_task
    return stream


def rebuild_stream(recipe: dict) -> Stream:
    """The stream `recipe` (build_stream's arguments) describes: how a stream unpickles."""
    return build_stream(**recipe)


def rebuild_task(recipe: dict, index: int) -> Task:
    return rebuild_stream(recipe).tasks[index]
