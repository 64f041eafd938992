"""Titans LMM update, chunked parallel form (spec §1, "Parallel training"); the per-token rule
is stated in `naive`.

Inside a chunk of C tokens every gradient is taken at the chunk-start state M_b. For one
matrix the gradient of token s is rank one, G_s = δ_s u_sᵀ (δ_s the output error of that layer, u_s its input, both computed
at M_b). Momentum and decay are then a linear recurrence, solved in closed form: with
P_t = Π_{j≤t} η_j and Q_t = Π_{j≤t} (1 − α_j) (chunk-local, t = 1..C),

    S_t = P_t S_b − Σ_{s≤t} (P_t / P_s) θ_s G_s
    M_t = Q_t M_b + (Σ_{r≤t} (Q_t/Q_r) P_r) S_b − Σ_{s≤t} D[t, s] θ_s G_s,
    D   = L_Q @ L_P,   L_Q[t, r] = Q_t/Q_r (r ≤ t),   L_P[r, s] = P_r/P_s (s ≤ r).

A read M_{t-1}(z) never materialises M_{t-1}: per layer, with a_t = Q_t and b_t the
coefficient of S_b above (a_0 = 1, b_0 = 0),
    W_{t-1} z = a_{t-1} W_b z + b_{t-1} S_b z − Σ_{s<t} D[t-1, s] θ_s δ_s (u_s · z),
attention-like matmuls over the chunk (z · u_s is a C × C score matrix). Ratios of
cumulative products are exp of differences of cumulative log-gates, masked before exp, so
long chunks with small gates cannot underflow or overflow. No per-token loop runs inside a
chunk; with C = 1 this is exact per-token Titans.

Shapes: q, k [B, H, T, d_in]; v [B, H, T, d_out]; gates η, θ, α [B, H, T] in (0, 1);
weights / momentum: lists of [B, H, out, in] tensors (layer order, input side first).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from nlbench.kernels.activations import silu_grad
from nlbench.kernels.compiling import compile_kernel, compile_mode
from nlbench.kernels.titans.chunk_grad import titans_chunk_manual
from nlbench.kernels.titans.naive import check_inputs

__all__ = ["memory_flops_per_token", "titans_memory_chunked"]


def _grad_factors(weights, k, v):
    """Per-token gradient of ℓ = ‖M(k) − v‖² as rank-one factors: ∇_{W^l} ℓ_s = δ^l_s ⊗ u^l_s."""
    us, pres, z = [], [], k
    for i, w in enumerate(weights):
        us.append(z)
        pre = z @ w.transpose(-1, -2)
        pres.append(pre)
        z = F.silu(pre) if i < len(weights) - 1 else pre
    d = 2 * (z - v)
    deltas = [None] * len(weights)
    for i in reversed(range(len(weights))):
        deltas[i] = d
        if i > 0:
            d = (d @ weights[i]) * silu_grad(pres[i - 1])
    return us, deltas


def _decay_matrix(logcum):
    """[.., C] cumulative log-gates -> [.., C, C] with [t, s] = exp(logcum_t − logcum_s) for s ≤ t, else 0."""
    C = logcum.shape[-1]
    diff = logcum[..., :, None] - logcum[..., None, :]
    mask = torch.ones(C, C, dtype=torch.bool, device=logcum.device).tril()
    return diff.masked_fill(~mask, float("-inf")).exp()


def _chunk(weights, momentum, q, k, v, eta, theta, alpha):
    """One chunk of the parallel form. Returns reads [B, H, C, out] and the chunk-end state."""
    us, deltas = _grad_factors(weights, k, v)
    # clamps: a saturated sigmoid gives exactly 0 or 1 in fp32, and log 0 would turn the
    # masked differences below into −inf − (−inf) = NaN.
    # Cumulative log-gates are long sums: half-precision gates are summed in fp32, fp32 / fp64
    # in their own dtype (an fp32 sum would cost fp64 inputs ~1e-7 relative).
    acc = torch.promote_types(eta.dtype, torch.float32)
    LP = torch.log(eta.to(acc).clamp_min(1e-30)).cumsum(-1)                 # log P_t
    LQ = torch.log1p(-alpha.to(acc).clamp_max(1 - 1e-6)).cumsum(-1)         # log Q_t
    Lq, Lp = _decay_matrix(LQ), _decay_matrix(LP)
    dt = q.dtype
    D = (Lq @ Lp).to(dt)                          # D[t, s] = Σ_{s≤r≤t} Q_t/Q_r · P_r/P_s
    a = LQ.exp().to(dt)                           # coefficient of M_b in M_t
    b = (Lq @ LP.exp().unsqueeze(-1)).squeeze(-1).to(dt)  # coefficient of S_b in M_t
    # reads use M_{t-1}: shift every coefficient down one token (M_0 = M_b, no S_b term).
    one, zero = torch.ones_like(a[..., :1]), torch.zeros_like(b[..., :1])
    a_r = torch.cat([one, a[..., :-1]], -1).unsqueeze(-1)
    b_r = torch.cat([zero, b[..., :-1]], -1).unsqueeze(-1)
    D_r = F.pad(D[..., :-1, :], (0, 0, 1, 0))
    Dth_r = D_r * theta.unsqueeze(-2)             # [t, s] weight of G_s in M_{t-1}, θ_s folded in

    z = q
    for i, (w, s_mom) in enumerate(zip(weights, momentum)):
        pre = (a_r * (z @ w.transpose(-1, -2)) + b_r * (z @ s_mom.transpose(-1, -2))
               - (Dth_r * (z @ us[i].transpose(-1, -2))) @ deltas[i])
        z = F.silu(pre) if i < len(weights) - 1 else pre
    y = z

    # chunk-end state: last row of the (unshifted) coefficients.
    wD = (D[..., -1, :] * theta).unsqueeze(-1)                         # [B, H, C, 1]
    wP = ((LP[..., -1:] - LP).exp().to(dt) * theta).unsqueeze(-1)
    aC, bC, pC = a[..., -1, None, None], b[..., -1, None, None], LP[..., -1, None, None].exp().to(dt)
    new_w, new_s = [], []
    for w, s_mom, u, dl in zip(weights, momentum, us, deltas):
        new_w.append(aC * w + bC * s_mom - (dl * wD).transpose(-1, -2) @ u)
        new_s.append(pC * s_mom - (dl * wP).transpose(-1, -2) @ u)
    return y, new_w, new_s



@functools.cache
def _compiled_chunk(device_type: str, mode: str = "default"):
    """`_chunk` through `torch.compile` (forward and its autograd backward; `compiling.compile_kernel`),
    made once per process, device type and compile mode."""

    return compile_kernel(_chunk, device_type, mode)


def titans_memory_chunked(q, k, v, eta, theta, alpha, weights, momentum, chunk_size: int = 16,
                          compiled: bool | str = False):
    """Titans memory over a sequence, chunk by chunk (parallel inside a chunk).

    Returns (y [B, H, T, out], weights, momentum) -- the state after the last token. A trailing
    partial chunk is processed as a shorter chunk, so the next call starts a fresh chunk.
    `compiled=True` (or a mode of `compiling.COMPILE_MODES`) runs each chunk through
    `torch.compile` (`NLModel.compiled`); eager fp32 / fp64 take `chunk_grad.titans_chunk_manual`
    (the same chunk, hand-written backward), half precision and autocast the autograd form.
    """
    check_inputs(q, k, v, eta, theta, alpha, weights, momentum, chunk_size)
    weights, momentum, ys = list(weights), list(momentum), []
    if compiled:
        chunk = _compiled_chunk(k.device.type, compile_mode(compiled))
    elif k.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(k.device.type):
        chunk = titans_chunk_manual  # the same chunk with a hand-written backward (`chunk_grad`)
    else:
        chunk = _chunk
    # split once (not a slice per chunk, whose backward zero-fills a full-length tensor each time)
    for qc, kc, vc, ec, tc, ac in zip(*(t.split(chunk_size, dim=2) for t in (q, k, v, eta, theta, alpha))):
        y, weights, momentum = chunk(weights, momentum, qc, kc, vc, ec, tc, ac)
        ys.append(y)
    return torch.cat(ys, dim=2), weights, momentum



def memory_flops_per_token(dims: list[tuple[int, int]], chunk_size: int) -> float:
    """Matmul FLOPs per token per head of `titans_memory_chunked` (dims: (out, in) per layer).

    Counts the key forward + backprop at the chunk-start state, the four read products per
    layer (W_b, S_b, z·u, D·δ), the C×C decay products and the chunk-end state update.
    """
    C = chunk_size
    total = 0.0
    for i, (o, n) in enumerate(dims):
        total += 2 * o * n                    # key forward at M_b
        total += 2 * o * n if i > 0 else 0    # backprop of δ through W
        total += 4 * o * n                    # read: z W_bᵀ, z S_bᵀ
        total += 2 * C * n + 2 * C * o        # read: z uᵀ, (D ∘ ·) δ
        total += 4 * o * n                    # chunk-end W and S updates (C tokens per chunk)
    total += 2 * C * C + 2 * C                # D = L_Q L_P and b (per token share of C³, C²)
    return total
