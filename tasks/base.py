"""Shared pieces of every task stream: `Batch`, `Task`, `Stream`, seeding, the one target shift.

Contract (docs/ARCHITECTURE.md, "Tasks"): `targets[b, t]` is the label for `logits[b, t]`, i.e.
the token at position t+1 of the underlying sequence, and `IGNORE_INDEX` (-100) where a position
is not scored. Every family builds a sequence of `seq_len + 1` tokens plus a mask of which of
those tokens are to be predicted, and calls `shift_targets` -- the only place a shift happens,
so labels cannot be shifted twice (docs/ALGORITHMS.md, "Mistakes this code is tested against").

Chance (`Task.chance`) is the same quantity in every stream: the accuracy of the best
input-independent predictor (always answering the most frequent target), the "majority
baseline". It is computed exactly from the generator where the distribution is known
(Markov tables, maps, uniform digits) and from the fixed eval set where it is not (real digits,
text). `Task.ceiling` is the Bayes-optimal accuracy where it is known, else None.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100


class Batch(NamedTuple):
    """tokens LongTensor[B, T]; targets LongTensor[B, T] aligned with logits, -100 = not scored."""

    tokens: torch.Tensor
    targets: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(self.tokens.to(device), self.targets.to(device))

    @property
    def num_scored(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def shift_targets(seq: np.ndarray, scored: np.ndarray) -> Batch:
    """The single next-token shift: seq int[B, T+1], scored bool[B, T+1] (which tokens of `seq`
    are labels) -> Batch(tokens = seq[:, :T], targets[t] = seq[t+1] where scored[t+1] else -100).
    """
    seq = np.asarray(seq)
    scored = np.asarray(scored, dtype=bool)
    if seq.ndim != 2 or seq.shape != scored.shape or seq.shape[1] < 2:
        raise ValueError(f"shift_targets: seq and scored must both be [B, T+1] with T >= 1, "
                         f"got {seq.shape} and {scored.shape}.")
    tokens = torch.from_numpy(np.ascontiguousarray(seq[:, :-1], dtype=np.int64))
    targets = np.where(scored[:, 1:], seq[:, 1:], IGNORE_INDEX).astype(np.int64)
    return Batch(tokens, torch.from_numpy(np.ascontiguousarray(targets)))


def restrict_to_group(logits: torch.Tensor, targets: torch.Tensor,
                      output_groups: torch.Tensor | None) -> torch.Tensor:
    """Task-incremental output mask: at each scored position only the tokens of the target's own
    group (its task's labels) compete, the others get -inf; unscored positions are unchanged.

    `output_groups` LongTensor[V]: group id per vocabulary token (-1: not a label); None = no mask.
    The group is read off the target, so replayed or interleaved rows of other tasks keep their own
    task's mask.
    """
    if output_groups is None:
        return logits
    groups = output_groups.to(logits.device)
    scored = targets != IGNORE_INDEX
    own = groups[targets.clamp(min=0)]                                  # [B, T]
    keep = (groups.view(1, 1, -1) == own.unsqueeze(-1)) | ~scored.unsqueeze(-1)
    return logits.masked_fill(~keep, float("-inf"))


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of str/int parts, stable across processes and platforms
    (Python's hash() is salted per process, so it cannot be used)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def rng_for(*parts) -> np.random.Generator:
    return np.random.default_rng(derive_seed(*parts))


def majority_accuracy(targets) -> float:
    """Accuracy of always answering the most frequent scored target (the empirical chance)."""
    t = torch.as_tensor(targets).reshape(-1)
    t = t[t != IGNORE_INDEX]
    if t.numel() == 0:
        return float("nan")
    return float(torch.bincount(t).max()) / t.numel()


Sampler = Callable[[np.random.Generator, int], Batch]


class Task:
    """One task of a stream. `train_batches(batch_size, seed)` returns a fresh infinite iterator
    whose batches depend only on (stream seed, task, seed); `eval_set()` is built once and the
    same Batch is returned (as a copy) on every call."""

    def __init__(self, *, index: int, name: str, chance: float, ceiling: float | None,
                 seed_key: tuple, train_sampler: Sampler, eval_builder: Callable[[], Batch],
                 info: dict | None = None):
        self.index = index
        self.name = name
        self.chance = float(chance)
        self.ceiling = None if ceiling is None else float(ceiling)
        self.info = dict(info or {})
        self._seed_key = seed_key
        self._train_sampler = train_sampler
        self._eval_builder = eval_builder
        self._eval: Batch | None = None
        self.recipe: dict | None = None      # set by build_stream: how to rebuild this task
        self.rebuild: Callable | None = None  # set with it: (recipe, index) -> Task (registry.rebuild_task)
        self.output_groups: torch.Tensor | None = None  # task-incremental mask (restrict_to_group)

    def __reduce__(self):
        # samplers are closures; a task pickles as its recipe and is rebuilt (deterministically)
        if self.recipe is None:
            raise TypeError(f"task {self.name!r} was not made by build_stream and cannot be pickled")
        return self.rebuild, (self.recipe, self.index)

    def train_batches(self, batch_size: int, seed: int = 0) -> Iterator[Batch]:
        check_int("batch_size", batch_size, 1, None, where=f"task {self.name!r}")
        check_int("seed", seed, None, None, where=f"task {self.name!r}")
        rng = rng_for(*self._seed_key, "train", int(seed))
        sampler, n = self._train_sampler, int(batch_size)

        def batches():
            while True:
                yield sampler(rng, n)

        return batches()

    def eval_set(self) -> Batch:
        if self._eval is None:
            self._eval = self._eval_builder()
        return Batch(self._eval.tokens.clone(), self._eval.targets.clone())

    def __repr__(self) -> str:
        ceil = "None" if self.ceiling is None else f"{self.ceiling:.4f}"
        return f"Task({self.index}, {self.name!r}, chance={self.chance:.4f}, ceiling={ceil})"


@dataclass
class Stream:
    name: str
    vocab_size: int
    seq_len: int
    kind: str                      # "accuracy" | "lm"
    tasks: list[Task]
    seed: int = 0
    knobs: dict = field(default_factory=dict)
    # task-incremental streams: group id per vocabulary token, applied by restrict_to_group in
    # training and scoring; None = every token competes everywhere (class-incremental)
    output_groups: torch.Tensor | None = field(default=None, repr=False, compare=False)

    recipe: dict | None = None     # the build_stream arguments that rebuild this stream
    # set with it: recipe -> Stream (registry.rebuild_stream; base does not import the registry)
    rebuild: Callable | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.tasks)

    def __reduce__(self):
        if self.recipe is None:
            raise TypeError(f"stream {self.name!r} was not made by build_stream and cannot be "
                            f"pickled")
        return self.rebuild, (self.recipe,)

    def __iter__(self):
        return iter(self.tasks)


# ---- validation: one-paragraph errors naming the field and the allowed values ----------------

def _range_text(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    if lo is not None:
        return f">= {lo}"
    if hi is not None:
        return f"<= {hi}"
    return "any integer"


def check_int(field_name: str, value, lo=None, hi=None, *, where: str, why: str = "") -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and (lo is None or value >= lo) and (hi is None or value <= hi):
        return int(value)
    raise ValueError(f"{where}: `{field_name}` must be an integer {_range_text(lo, hi)}"
                     f"{' ' + why if why else ''}; got {value!r}.")


def check_float(field_name: str, value, lo: float, hi: float, *, where: str,
                lo_open=False, hi_open=False) -> float:
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if ok:
        v = float(value)
        if (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi):
            return v
    lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
    raise ValueError(f"{where}: `{field_name}` must be a number in {lb}{lo}, {hi}{rb}; "
                     f"got {value!r}.")
