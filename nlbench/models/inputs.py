"""Layer-input reports: where a model applies a weight, it says to which inputs.

DGD (nlbench/optim/dgd.py, docs/ALGORITHMS.md §2) decays each weight along the inputs it was
applied to, W ← W (I − η′ XᵀX / n) − η′ ∇W, so it must see those inputs however the weight is
applied. An `nn.Linear` called as a module is seen by DGD's forward hook; everywhere else (a
weight applied through `F.linear`, functional fast weights, a conv written as shifted adds, the
per-head memory initial states) the model calls `report_input(weight, x)` outside any compiled
region. With no collector active (every optimizer but DGD) a report costs one list check; `x`
may be a zero-argument callable so the inputs are only computed when someone collects them.

Shapes: a 2-D weight [out, in] takes x [..., in] (all leading dims are rows); a batch of
matrices [*batch, out, in] takes x [*batch, ..., in] (each slice's own rows, e.g. one head's
inputs). Only reports made with autograd enabled are delivered: evaluation under no_grad does
not leak into the next training step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["add_collector", "remove_collector", "collecting", "no_reports", "report_input", "report_conv_input",
           "report_chain_inputs"]

_collectors: list[Callable] = []
_quiet: list[bool] = []


def add_collector(fn: Callable) -> None:
    """fn(weight, x) receives every report made with autograd enabled."""
    _collectors.append(fn)


def remove_collector(fn: Callable) -> None:
    if fn in _collectors:
        _collectors.remove(fn)


def collecting() -> bool:
    """True when some optimizer collects inputs (and autograd is on): compute inputs only then."""
    return bool(_collectors) and torch.is_grad_enabled() and not _quiet


@contextmanager
def no_reports():
    """No reports inside (a model that turns autograd on under no_grad for an inner objective,
    e.g. Hope's teach-signal CMS, so evaluation still does not leak into training)."""
    _quiet.append(True)
    try:
        yield
    finally:
        _quiet.pop()


def report_input(weight: torch.Tensor, x) -> None:
    """The model applied `weight` to the rows of `x` (a tensor, or a callable returning it)."""
    if not collecting():
        return
    x = x() if callable(x) else x
    for fn in list(_collectors):
        fn(weight, x.detach())


def report_conv_input(weight: torch.Tensor, x: torch.Tensor, tail: torch.Tensor) -> None:
    """A depthwise causal conv (`layers.causal_conv`) weight [D·m, 1, K] applied to x [B, T, D]
    after `tail` [B, K−1, D] (x may be a callable): each output channel is a 1 × K matrix whose input rows are the
    K-windows of its input channel, reported as [D·m, B·T, K]."""
    if not collecting():
        return

    def windows():
        xs = x() if callable(x) else x
        xx = torch.cat([tail, xs], dim=1)                              # [B, T+K−1, D]
        K, T, D = weight.shape[-1], xs.shape[1], xs.shape[-1]
        w = xx.unfold(1, K, 1)[:, :T]                                  # [B, T, D, K]
        w = w.permute(2, 0, 1, 3).reshape(D, -1, K)                    # [D, B·T, K]
        return w.repeat_interleave(weight.shape[0] // D, dim=0)
    report_input(weight, windows)


def report_chain_inputs(weights, z: torch.Tensor) -> None:
    """Per-head memory initial states [H, out, in] applied as a chain z → W_1 → SiLU → W_2 …
    (Hope's residual MLP memory [W2, W1] and linear memory [W]; Titans' MLP memory), read at
    z [B, H, N, in]: each matrix's rows are its input in that chain, computed at the initial
    state (the parameter itself), reported per head [H, B·N, in]."""
    if not collecting():
        return
    h, rows = z.detach(), []
    for i, w in enumerate(weights):
        rows.append(_per_head(h))
        if i < len(weights) - 1:
            h = F.silu(h @ w.detach().transpose(-1, -2))
    for w, x in zip(weights, rows):
        report_input(w, x)


def _per_head(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, d] -> [H, B·N, d]."""
    return x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])
