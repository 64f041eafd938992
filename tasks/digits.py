"""`split-digits` and `permuted-digits`: scikit-learn's bundled 8x8 digits as token sequences.

Each image (1797 images, 10 classes, pixels 0..16, shipped inside scikit-learn -- nothing is
downloaded) becomes 64 pixel tokens in row-major order, quantised to `levels` values
(level = floor(pixel * levels / 17); 17 keeps the raw values), then SEP, then the label token,
which is the only scored target (at the SEP position); any rest of the window is PAD.
Tokens: pixel levels [0, levels), SEP = levels, labels [levels+1, levels+11), PAD = levels+11.

The held-out split is fixed by the stream seed: an `eval_fraction` of every class, never used
for training; the eval set is (up to `eval_size` of) those images. Train batches sample the
training images with replacement.

- split-digits: class-incremental, task t holds classes {2t, 2t+1} (at most 5 tasks); the label
  space is all 10 digits throughout.
- split-digits-task: the same tasks, task-incremental: a per-task output mask (the stream's
  `output_groups`, label token of class c in group c // 2) lets only the task's own two labels
  compete, in training and scoring, as with one output head per task. Forgetting then measures
  what is lost of the task's own two-way decision, not the output bias towards the newest classes.
- permuted-digits: domain-incremental, every task the whole 10-class problem with a fixed pixel
  permutation (task 0 the identity).

chance = accuracy of answering the majority class of the task's eval set (computed on it);
ceiling = None (the Bayes accuracy of real data is unknown).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .base import Stream, Task, check_float, check_int, majority_accuracy, rng_for, shift_targets

PIXELS = 64
MIN_SEQ_LEN = PIXELS + 1     # 64 pixels + SEP as input; the label is the SEP position's target


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.data.astype(np.int64), d.target.astype(np.int64)


def _split(seed: int, labels: np.ndarray, eval_fraction: float):
    """Per-class held-out split; returns (train indices, eval indices), both sorted."""
    rng = rng_for(seed, "digits", "split")
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = max(1, int(round(eval_fraction * len(idx))))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _digit_task(*, index, name, seed_key, pix, labels, train_idx, eval_idx, levels, seq_len,
                eval_size, permutation, info):
    SEP, LABEL0, PAD = levels, levels + 1, levels + 11
    length = seq_len + 1
    if len(eval_idx) > eval_size:
        # a fixed subset in index order, keyed by (seed, stream) only: permuted-digits tasks
        # then evaluate the very same images under their own permutations
        keep = np.sort(rng_for(*seed_key[:2], "eval-subset").permutation(len(eval_idx))[:eval_size])
        eval_idx = eval_idx[keep]

    def encode(idx):
        b = len(idx)
        seq = np.full((b, length), PAD, dtype=np.int64)
        seq[:, :PIXELS] = pix[idx][:, permutation]
        seq[:, PIXELS] = SEP
        seq[:, PIXELS + 1] = LABEL0 + labels[idx]
        scored = np.zeros_like(seq, dtype=bool)
        scored[:, PIXELS + 1] = True
        return shift_targets(seq, scored)

    def sample(rng, n):
        return encode(train_idx[rng.integers(0, len(train_idx), size=n)])

    eval_batch = encode(eval_idx)
    return Task(index=index, name=name, chance=majority_accuracy(eval_batch.targets),
                ceiling=None, seed_key=seed_key, train_sampler=sample,
                eval_builder=lambda: eval_batch,
                info=dict(info, permutation=permutation.copy(), train_idx=train_idx.copy(),
                          eval_idx=eval_idx.copy(), label_token_offset=LABEL0))


def _build(stream, *, num_tasks, seq_len, seed, eval_size, levels, eval_fraction):
    where = f"stream '{stream}'"
    split = stream.startswith("split-digits")
    if split and num_tasks > 5:
        raise ValueError(f"{where}: `num_tasks` must be in [1, 5] (10 classes, 2 per task); "
                         f"got {num_tasks}.")
    check_int("seq_len", seq_len, MIN_SEQ_LEN, None, where=where,
              why="(64 pixel tokens and SEP; the label is predicted at SEP)")
    levels = check_int("levels", levels, 2, 17, where=where, why="(pixel quantisation levels)")
    eval_fraction = check_float("eval_fraction", eval_fraction, 0.05, 0.5, where=where)
    images, labels = _load_digits()
    pix = images * levels // 17
    train_all, eval_all = _split(seed, labels, eval_fraction)
    identity = np.arange(PIXELS)
    tasks = []
    for t in range(num_tasks):
        if split:
            classes = (2 * t, 2 * t + 1)
            train_idx = train_all[np.isin(labels[train_all], classes)]
            eval_idx = eval_all[np.isin(labels[eval_all], classes)]
            perm, name, info = identity, f"digits-{classes[0]}{classes[1]}", dict(classes=classes)
        else:
            train_idx, eval_idx = train_all, eval_all
            perm = identity if t == 0 else rng_for(seed, "permuted-digits", "perm", t).permutation(PIXELS)
            name, info = f"digits-perm{t}", dict(classes=tuple(range(10)))
        # both split-digits forms draw the same images (the mask is the only difference)
        key_name = "split-digits" if split else stream
        tasks.append(_digit_task(index=t, name=name, seed_key=(seed, key_name, t), pix=pix,
                                 labels=labels, train_idx=train_idx, eval_idx=eval_idx,
                                 levels=levels, seq_len=seq_len, eval_size=eval_size,
                                 permutation=perm, info=info))
    out = Stream(stream, levels + 12, seq_len, "accuracy", tasks, seed,
                 dict(levels=levels, eval_fraction=eval_fraction))
    if stream == "split-digits-task":
        groups = torch.full((levels + 12,), -1, dtype=torch.long)
        groups[levels + 1:levels + 11] = torch.arange(10) // 2
        out.output_groups = groups
        for task in tasks:
            task.output_groups = groups
    return out


def build_split_digits(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                       levels: int = 17, eval_fraction: float = 0.2) -> Stream:
    return _build("split-digits", num_tasks=num_tasks, seq_len=seq_len, seed=seed,
                  eval_size=eval_size, levels=levels, eval_fraction=eval_fraction)


def build_split_digits_task(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                            levels: int = 17, eval_fraction: float = 0.2) -> Stream:
    return _build("split-digits-task", num_tasks=num_tasks, seq_len=seq_len, seed=seed,
                  eval_size=eval_size, levels=levels, eval_fraction=eval_fraction)


def build_permuted_digits(*, num_tasks: int, seq_len: int, seed: int, eval_size: int,
                          levels: int = 17, eval_fraction: float = 0.2) -> Stream:
    return _build("permuted-digits", num_tasks=num_tasks, seq_len=seq_len, seed=seed,
                  eval_size=eval_size, levels=levels, eval_fraction=eval_fraction)
