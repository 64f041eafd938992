"""Scoring a model on a task's held-out set, the one loss every protocol trains with, and the
divergence check.

Loss: `F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)`. The task has
already shifted the targets once (targets[b, t] labels logits[b, t]); nothing here shifts again.
Accuracy: mean over scored positions of argmax(logits) == targets (docs/ARCHITECTURE.md, Tasks).
Task-incremental streams pass `output_groups`: loss and argmax are then taken over the target's own
task's labels only (nlbench.tasks.base.restrict_to_group), in training and scoring alike.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from nlbench.models.base import clone_state
from nlbench.tasks.base import restrict_to_group

IGNORE_INDEX = -100


class Diverged(RuntimeError):
    """Training produced a non-finite loss or gradient: the run ends as `diverged`."""

    def __init__(self, reason: str, step: int):
        super().__init__(reason)
        self.reason, self.step = reason, step


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, output_groups: torch.Tensor | None = None) -> torch.Tensor:
    logits = restrict_to_group(logits, targets, output_groups)
    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def autocast_for(device: torch.device, dtype: str):
    """bfloat16 runs the forward under autocast (parameters and optimizer state stay float32)."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def _head(batch, max_sequences: int | None):
    tokens, targets = batch
    if max_sequences is not None:
        tokens, targets = tokens[:max_sequences], targets[:max_sequences]
    return tokens, targets


def _score(logits, targets, sums, output_groups=None):
    logits = restrict_to_group(logits, targets, output_groups)
    scored = targets != IGNORE_INDEX
    V = logits.shape[-1]
    sums["loss"] += F.cross_entropy(
        logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    ).item()
    sums["correct"] += (logits.argmax(-1).eq(targets) & scored).sum().item()
    sums["n"] += scored.sum().item()


def _finish(sums) -> dict[str, float]:
    n = sums["n"]
    if n == 0:
        return {"accuracy": math.nan, "loss": math.nan}
    return {"accuracy": sums["correct"] / n, "loss": sums["loss"] / n}


@torch.no_grad()
def evaluate(model, batch, *, batch_size: int, max_sequences: int | None, device, dtype: str = "float32",
             output_groups: torch.Tensor | None = None) -> dict:
    """Finetune scoring: every sequence starts from the meta-learned initial state (state=None).

    Accuracy and loss are averaged over all scored positions of the (first `max_sequences`)
    held-out sequences, so the result does not depend on `batch_size`.
    """
    tokens, targets = _head(batch, max_sequences)
    sums = {"loss": 0.0, "correct": 0, "n": 0}
    for s in range(0, tokens.shape[0], batch_size):
        x, y = tokens[s:s + batch_size].to(device), targets[s:s + batch_size].to(device)
        with autocast_for(device, dtype):
            logits = model(x, state=None, update_state=True).logits
        _score(logits, y, sums, output_groups)
    return _finish(sums)


@torch.no_grad()
def evaluate_with_state(model, batch, state, *, streams: int, max_sequences: int | None, device,
                        dtype: str = "float32", output_groups: torch.Tensor | None = None) -> dict:
    """In-context scoring: probe each held-out chunk of `streams` sequences from a clone of the
    carried fast state with update_state=False: writes within a probe sequence happen (the
    memories are the token mixer), its final state is discarded, so scoring never teaches the
    carried memory.

    The state holds one memory per stream, so chunks are exactly `streams` sequences; the last
    chunk is padded with copies whose targets are all ignored.
    """
    tokens, targets = _head(batch, max_sequences)
    sums = {"loss": 0.0, "correct": 0, "n": 0}
    for s in range(0, tokens.shape[0], streams):
        x, y = tokens[s:s + streams], targets[s:s + streams]
        pad = streams - x.shape[0]
        if pad:
            x = torch.cat([x, x[:1].expand(pad, -1)])
            y = torch.cat([y, torch.full((pad, y.shape[1]), IGNORE_INDEX, dtype=y.dtype)])
        x, y = x.to(device), y.to(device)
        with autocast_for(device, dtype):
            logits = model(x, state=clone_state(state), update_state=False).logits
        _score(logits, y, sums, output_groups)
    return _finish(sums)


def check_finite(value: torch.Tensor | float, what: str, step: int, task: int) -> None:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise Diverged(f"non-finite {what} ({v}) at step {step} (task {task})", step)
