"""Quintic Newton–Schulz orthogonalization NS_T, as in the public Muon (spec §6).

    X = G / (‖G‖_F + 1e-7)            # every singular value now ≤ 1
    if rows > cols: X = Xᵀ            # iterate on the short side: X Xᵀ is the smaller Gram
    repeat T times:
        A = X Xᵀ
        B = b A + c A²
        X = a X + B X                 # odd quintic p(s) = a s + b s³ + c s⁵ on each singular value
    transpose back

(a, b, c) = (3.4445, −4.7750, 2.0315) make p'(0) = a large, so small singular values grow ~3.4×
per step, and p oscillates around 1 on [0.5, 1] instead of converging to exactly 1: after 5 steps
the singular values lie roughly in (0.5, 1.5), which is all Muon/M3 need (an approximate U Vᵀ).
A cubic X (3I − XᵀX)/2 only grows small singular values 1.5× per step and leaves them far below
0.5 after 5 steps (spec §7) — tests/test_muon.py checks that this function is not that one.
"""

from __future__ import annotations

import torch

NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = NS_EPS) -> torch.Tensor:
    """NS_steps(G) over the last two dims (leading dims are a batch); same shape and dtype as G."""
    if G.ndim < 2:
        raise ValueError(
            f"newton_schulz: G must have at least 2 dims (a matrix or a batch of matrices), "
            f"got shape {tuple(G.shape)}."
        )
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"newton_schulz: steps must be an integer >= 0, got {steps!r}.")
    a, b, c = NS_COEFFS
    X = G / (torch.linalg.matrix_norm(G, ord="fro", keepdim=True) + eps)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def newton_schulz_many(mats: list[torch.Tensor], steps: int = 5, eps: float = NS_EPS) -> list[torch.Tensor]:
    """`newton_schulz` of each tensor in `mats`, those of one shape stacked into one batched call:
    the same result per matrix (each slice is iterated on its own), in far fewer small kernels —
    Hope's twenty per-head memory states per layer cost one call instead of twenty."""
    out: list[torch.Tensor | None] = [None] * len(mats)
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for idx in groups.values():
        if len(idx) == 1:
            out[idx[0]] = newton_schulz(mats[idx[0]], steps=steps, eps=eps)
            continue
        for i, r in zip(idx, newton_schulz(torch.stack([mats[i] for i in idx]), steps=steps, eps=eps).unbind(0)):
            out[i] = r
    return out
