"""Titans neural long-term memory (LMM) update, docs/ALGORITHMS.md §1: per-token reference.

Per head, the memory M is a stack of weight matrices W^1..W^L (L = 1: linear memory
M(z) = W z; L >= 2: MLP M(z) = W^L σ(... σ(W^1 z)), σ = SiLU). For every token t:

    read     y_t = M_{t-1}(q_t)                                  (state before token t)
    surprise S_t = η_t S_{t-1} − θ_t ∇ℓ(M_{t-1}; k_t, v_t),   ℓ = ‖M(k_t) − v_t‖²
    forget   M_t = (1 − α_t) M_{t-1} + S_t

applied to every weight matrix (S is one momentum tensor per matrix).

`titans_memory_reference` is that computation as a per-token loop that reads like the
equations (gradients by autograd); `chunk.titans_memory_chunked` is tested against it,
forward and backward.

Shapes: q, k [B, H, T, d_in]; v [B, H, T, d_out]; gates η, θ, α [B, H, T] in (0, 1);
weights / momentum: lists of [B, H, out, in] tensors (layer order, input side first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_inputs", "memory_forward", "memory_read", "titans_memory_reference"]


def memory_forward(weights, z):
    """M(z) for per-(batch, head) weights: z [B, H, N, in] -> [B, H, N, out]."""
    for i, w in enumerate(weights):
        z = z @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            z = F.silu(z)
    return z


def memory_read(weights, q):
    """y = M(q) at a fixed state (no update): MAC reads the segment-start memory this way."""
    return memory_forward(weights, q)



def check_inputs(q, k, v, eta, theta, alpha, weights, momentum, chunk_size):
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}.")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must be [B, H, T, d] and v [B, H, T, d_out]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}.")
    for name, g in (("eta", eta), ("theta", theta), ("alpha", alpha)):
        if g.shape != q.shape[:3]:
            raise ValueError(f"gate {name} must be [B, H, T] = {tuple(q.shape[:3])}, got {tuple(g.shape)}.")
    if len(weights) != len(momentum) or not weights:
        raise ValueError("weights and momentum must be non-empty lists of the same length (one per layer).")


def titans_memory_reference(q, k, v, eta, theta, alpha, weights, momentum, chunk_size: int = 1):
    """Per-token loop, literally the equations of spec §1 (gradient at the chunk-start state)."""
    check_inputs(q, k, v, eta, theta, alpha, weights, momentum, chunk_size)
    M, S, ys = list(weights), list(momentum), []
    with torch.enable_grad():
        for t in range(q.shape[2]):
            if t % chunk_size == 0:
                # gradients inside this chunk are taken at M_b (the chunk-start memory)
                M_b = [m if m.requires_grad else m.detach().requires_grad_() for m in M]
                M = M_b
            ys.append(memory_forward(M, q[:, :, t : t + 1]))                       # y_t = M_{t-1}(q_t)
            loss = (memory_forward(M_b, k[:, :, t : t + 1]) - v[:, :, t : t + 1]).pow(2).sum()
            grads = torch.autograd.grad(loss, M_b, create_graph=True)             # ∇ℓ(M_b; x_t)
            e, th, al = (g[:, :, t, None, None] for g in (eta, theta, alpha))
            S = [e * s - th * g for s, g in zip(S, grads)]                         # S_t
            M = [(1 - al) * m + s for m, s in zip(M, S)]                           # M_t
    return torch.cat(ys, dim=2), M, S
