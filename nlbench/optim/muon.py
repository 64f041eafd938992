"""Muon: momentum, then orthogonalize the update with Newton–Schulz (spec §6).

Per weight matrix W (rows × cols; a [..., rows, cols] tensor is a batch of them, each updated on
its own; `matrix_view`) with gradient g, momentum μ, learning rate η, weight decay λ:

    m ← μ m + g
    u = g + μ m          (Nesterov; u = m without it)
    W ← (1 − η λ) W − η · √max(1, rows/cols) · NS_T(u)

NS_T(u) has singular values ≈ 1 whatever the gradient scale, so η is a step size in spectral
norm; the √max(1, rows/cols) factor keeps the per-entry RMS of tall matrices' updates
comparable to square ones. Muon is for hidden weight matrices: embeddings, the LM head,
biases and norm gains go to AdamW (`nlbench.optim.build_optimizer` routes them).
"""

from __future__ import annotations

import math
import numbers

import torch

from nlbench.optim.newton_schulz import newton_schulz_many


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        check_range("Muon", "lr", lr, 0.0, math.inf, "a finite float >= 0", hi_open=True)
        check_range("Muon", "momentum", momentum, 0.0, 1.0, "a float in [0, 1)", hi_open=True)
        check_int("Muon", "ns_steps", ns_steps, 1)
        check_range("Muon", "weight_decay", weight_decay, 0.0, math.inf, "a finite float >= 0", hi_open=True)
        if not isinstance(nesterov, bool):
            raise ValueError(f"Muon: nesterov must be True or False, got {nesterov!r}.")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps, weight_decay=weight_decay))
        require_matrices("Muon", self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            us = []
            for p in params:
                g = p.grad
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                m = state["momentum_buffer"]
                m.mul_(mu).add_(g)
                us.append(matrix_view(g.add(m, alpha=mu) if group["nesterov"] else m))
            # same-shape matrices orthogonalized in one batched call (per slice, as one by one)
            for p, um, update in zip(params, us, newton_schulz_many(us, steps=group["ns_steps"])):
                scale = math.sqrt(max(1.0, um.shape[-2] / um.shape[-1]))
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update.view_as(p), alpha=-lr * scale)
        return loss


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """The matrices an orthogonalizing rule sees in a weight: a 2-D weight is one matrix; a
    [..., out, in] tensor (per-head memory states) is a batch of matrices; a depthwise conv
    kernel [C, 1, K] is the [C, K] matrix of its filters (as public Muon flattens conv filters)."""
    if t.ndim >= 3 and t.shape[-2] == 1:
        return t.reshape(t.shape[0], -1)
    return t


def require_matrices(opt_name: str, param_groups) -> None:
    """Orthogonalizing optimizers need matrices (or batches of them); say where the rest belongs."""
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            if p.ndim < 2:
                raise ValueError(
                    f"{opt_name}: param_groups[{gi}].params[{pi}] has shape {tuple(p.shape)}; "
                    f"{opt_name} only updates weight matrices or batches of them (allowed: ndim >= 2). "
                    f"Route biases, norm gains and scalars to AdamW — nlbench.optim.build_optimizer does "
                    f"this routing."
                )


def check_range(owner: str, field: str, value, lo: float, hi: float, allowed: str,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise one clear sentence naming the field and its allowed range (shared with M3/DGD)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(f"{owner}: {field} must be {allowed}, got {value!r}.")


def check_int(owner: str, field: str, value, lo: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{owner}: {field} must be an integer >= {lo}, got {value!r}.")
