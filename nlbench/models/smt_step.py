"""Hope's stacked chunk step (`self_modifying_titans.stacked_chunk_step` with the DGD chunk of
`kernels/dgd/chunk_grad`) as one autograd Function with a hand-written backward pass: the eager
fp32 / fp64 path of `SelfModifyingTitans`.

Per chunk, for the five memories stacked [k, v, η, α, mem] (weights [5, B, H, out, in]):

    P_□ = z_□ + W1_□ σ(W2_□ z_□)            the chunk-start projection memories (Eq. 84–85)
    k = L2norm(P_k), v = L2norm(P_v) (or P_v), η = sigmoid(mean P_η + b_η), α = sigmoid(mean P_α + b_α)
    η_□ ← min(η, GUARD / λ_□), λ_□ = ‖W1_□ u_□‖²   the curvature guard (u: one power step, given)
    one DGD chunk for all five memories, reading M_mem at q (`chunk_grad._forward`)

Under autograd these ~20 small ops per chunk cost as much as the DGD chunk's own forward
(per-op overhead, broadcast reductions, and the gradient of the weights' [:4] slice written
into a zero-filled [5, ...] tensor before being added). Here the backward pass adds the
projections' weight gradients into the DGD chunk's in place. `stacked_chunk_step` with
`chunk_fn=dgd_chunk` is the reference; tests check outputs and every input's gradient (float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlbench.kernels.activations import silu_and_grad
from nlbench.kernels.dgd import chunk_grad, cpu_step
from nlbench.kernels.dgd.solve import strictly_lower

__all__ = ["fused_chunk_step", "power_step"]

NORM_EPS = 1e-12  # F.normalize's


def _normalize(x):
    """F.normalize(x, dim=-1) and what its backward needs."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    nc = n.clamp_min(NORM_EPS)
    return x / nc, (n, nc)


def _normalize_grad(g, x, saved):
    """Gradient of F.normalize(x, dim=-1) from g: g/‖x‖ − x (g·x)/‖x‖³ (norm clamped at eps)."""
    n, nc = saved
    return g / nc - x * ((g * x).sum(-1, keepdim=True) / nc.square() * (n >= NORM_EPS) / n.clamp_min(NORM_EPS))


def _t(x):
    return x.transpose(-1, -2)


class _FusedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, guard, normalize_v, normalized, u, zc, qc, b_eta, b_alpha, w2, w1):
        n_proj = zc.shape[0]
        w2p, w1p = w2[:n_proj], w1[:n_proj]
        a = zc @ _t(w2p)
        s, d1a = silu_and_grad(a)
        P = zc + s @ _t(w1p)
        k, nk = _normalize(P[0])
        v, nv = _normalize(P[1]) if normalize_v else (P[1], None)
        eta0 = torch.sigmoid(P[2].mean(-1) + b_eta[:, None])
        alpha = torch.sigmoid(P[3].mean(-1) + b_alpha[:, None])
        eta_e = eta0.expand(n_proj + 1, *eta0.shape)
        w1u = lam = cap = None
        if u is not None:
            w1u = (w1 * u.unsqueeze(-2)).sum(-1)
            lam = w1u.square().sum(-1)
            cap = (guard / lam).unsqueeze(-1)
            eta = torch.minimum(eta_e, cap)
        else:
            eta = eta_e.contiguous()
        strict = strictly_lower(k.shape[-2], k.device)
        outs, saved = chunk_grad._forward(True, n_proj, normalized, qc, k, v, eta, alpha, [w2, w1], strict)
        ctx.save_for_backward(zc, qc, w2, w1, u, a, s, d1a, P, k, v, eta0, alpha, eta, w1u, lam, cap)
        ctx.saved, ctx.nk, ctx.nv = saved, nk, nv
        ctx.guard, ctx.normalize_v, ctx.normalized, ctx.n_proj = guard, normalize_v, normalized, n_proj
        return outs

    @staticmethod
    def backward(ctx, gy, g_w2n, g_w1n):
        zc, qc, w2, w1, u, a, s, d1a, P, k, v, eta0, alpha, eta, w1u, lam, cap = ctx.saved_tensors
        n_proj = ctx.n_proj
        g_q, g_k, g_v, g_eta, g_alpha, g_w2, g_w1 = chunk_grad._backward(
            True, ctx.normalized, ctx.saved, qc, k, v, eta, alpha, [w2, w1], (gy, g_w2n, g_w1n))
        g_w2, g_w1 = g_w2.contiguous(), g_w1.contiguous()
        # guard: η = min(η_e, GUARD / λ), ties split as torch.minimum's gradient; λ = ‖W1 u‖²
        if u is not None:
            eta_e = eta0.expand(n_proj + 1, *eta0.shape)
            tie = eta_e == cap
            g_e = torch.where(tie, g_eta / 2, g_eta).masked_fill(eta_e > cap, 0)
            g_cap = torch.where(tie, g_eta / 2, g_eta).masked_fill(eta_e < cap, 0).sum(-1)
            g_lam = -g_cap * ctx.guard / lam.square()
            g_w1 += (2 * g_lam).unsqueeze(-1).unsqueeze(-1) * w1u.unsqueeze(-1) * u.unsqueeze(-2)
        else:
            g_e = g_eta
        g_eta0 = g_e.sum(0)
        # gates: η = sigmoid(mean P_η + b_η), α = sigmoid(mean P_α + b_α); k, v normalized
        d = P.shape[-1]
        g_pe, g_pa = g_eta0 * eta0 * (1 - eta0), g_alpha * alpha * (1 - alpha)
        g_P = torch.empty_like(P)
        g_P[0] = _normalize_grad(g_k, P[0], ctx.nk)
        g_P[1] = _normalize_grad(g_v, P[1], ctx.nv) if ctx.normalize_v else g_v
        g_P[2] = (g_pe / d).unsqueeze(-1).expand_as(P[2])
        g_P[3] = (g_pa / d).unsqueeze(-1).expand_as(P[3])
        g_b_eta, g_b_alpha = g_pe.sum((0, 2)), g_pa.sum((0, 2))
        # projections P = z + s W1ᵀ, s = σ(a), a = z W2ᵀ (memories 0..3 of the stack)
        g_w1[:n_proj] += _t(g_P) @ s
        g_a = (g_P @ w1[:n_proj]) * d1a
        g_w2[:n_proj] += _t(g_a) @ zc
        g_z = g_P + g_a @ w2[:n_proj]
        return None, None, None, None, g_z, g_q, g_b_eta, g_b_alpha, g_w2, g_w1


def power_step(w1, u):
    """The curvature guard's power step u ← G u / ‖G u‖ (G = W1ᵀW1, with a 1e-4 share of the
    all-ones vector so that an estimate that reached zero recovers), without autograd
    (`self_modifying_titans.tracked_curvature`). The matrix-vector products are a row vector
    times a matrix (u W1ᵀ, then (W1 u)ᵀ W1): ATen's batched GEMM with one output column was ~4.5×
    slower at Hope's 160 × 32 × 32 (docs/decisions.md, "Curvature guard's power step")."""
    with torch.no_grad():
        start = u + 1e-4 * F.normalize(torch.ones_like(u), dim=-1)
        w1u = start.unsqueeze(-2) @ w1.transpose(-1, -2)
        return F.normalize((w1u @ w1).squeeze(-2), dim=-1)


def fused_chunk_step(weights, u, zc, qc, b_eta, b_alpha, guard: float, normalize_v: bool = True,
                     normalized_step: bool = True, cpu_kernel: bool = False):
    """`stacked_chunk_step(weights, u, zc, qc, b_eta, b_alpha, dgd_chunk, normalize_v, normalized_step)`
    for MLP memories, in one Function with a hand-written backward pass; same returns
    (y [B, H, L, dh], chunk-end weights, the new u). `u` is the guard's carried vector (None:
    no guard); its power step runs here without autograd, as in `tracked_curvature`.
    `cpu_kernel=True`: CPU tensors run the step fused per (batch, head) in C++
    (`kernels/dgd/cpu_step`) when it is available and the sizes fit, else `_FusedStep`."""
    w2, w1 = weights
    if u is not None:
        u = power_step(w1, u)
    if cpu_kernel and zc.device.type == "cpu" and cpu_step.fits(zc, w2):
        y, n2, n1 = cpu_step.hope_step_cpu(guard, normalize_v, normalized_step, u, zc, qc, b_eta, b_alpha, w2, w1)
    else:
        y, n2, n1 = _FusedStep.apply(guard, normalize_v, normalized_step, u, zc, qc, b_eta, b_alpha, w2, w1)
    return y, [n2, n1], u
