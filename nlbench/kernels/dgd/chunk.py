"""DGD memory, chunked form: matmuls per chunk in the WY representation (spec §2–§3).

The update rule is stated in `naive` (the per-token reference).

Chunked form. Inside a chunk every gradient is taken at M_b, so for one matrix the gradient
of token i is rank one, g_i x_iᵀ, and the recurrence is linear:
W_t = W_{t-1}(α_t I − η_t x_t x_tᵀ) + u_t x_tᵀ with u_t = −η_t g_t. With chunk-local
cumulative decays γ_t = Π_{j≤t} α_j, one shows by induction (a WY representation, as in the
chunked gated delta rule of Yang et al. 2024)

    W_t = γ_t W_b + Σ_{i≤t} (γ_t/γ_i) d_i x_iᵀ,
    d_i = u_i − η_i γ_{i-1} W_b x_i − η_i Σ_{j<i} (γ_{i-1}/γ_j)(x_i·x_j) d_j,

a unit-lower-triangular system (I + diag(η)(Γ ⊙ X Xᵀ)) D = U − diag(η γ_prev) X W_bᵀ with
Γ[i, j] = γ_{i-1}/γ_j (j < i), solved per chunk through the explicit inverse (I + A)⁻¹ of its nilpotent
strictly-lower part in log-depth matmuls (the UT transform of DeltaNet). A read then is
    W_{t-1} r_t = γ_{t-1} W_b r_t + Σ_{i<t} Γ[t, i] (r_t·x_i) d_i,
attention-like matmuls; no per-token loop inside a chunk. Decay ratios are formed as exp of
differences of cumulative log α, masked before exp, so every ratio is ≤ 1 and never divides
by a small α. With C = 1 and a linear memory this is the gated delta rule
S_t = g S_{t-1}(I − β k kᵀ) + β v kᵀ, g = α_t, β = 2η_t/α_t, v = α_t v̂_t / 2 (spec §3).

`dgd_chunk_autograd` states one chunk in PyTorch ops (autograd derives its backward pass);
`dgd_chunk` runs `chunk_grad.dgd_chunk_manual` (hand-written backward) for fp32 / fp64.

Shapes: q, k, v [B, H, T, d]; η, α [B, H, T] (α ∈ (0, 1]); weights: list of [B, H, out, in].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlbench.kernels.dgd.chunk_grad import dgd_chunk_manual
from nlbench.kernels.dgd.naive import check_chunk_size, memory_apply, memory_gradients, step_size
from nlbench.kernels.dgd.solve import inverse_flops, strictly_lower, unit_lower_solve

__all__ = ["dgd_chunk", "dgd_chunk_autograd", "dgd_flops_per_token", "dgd_memory_chunked", "decay_terms",
           "read_chunk"]


def decay_terms(alpha):
    """Chunk-local decays from cumulative log α: γ_{t-1} [.., L], Γ[i, j] = γ_{i-1}/γ_j (j < i,
    else 0) [.., L, L], γ_L/γ_i [.., L] and γ_L [..]. Ratios are exp of masked differences, so
    none exceeds 1 and none divides by a small α."""
    log_a = torch.log(alpha)
    lg = torch.cumsum(log_a, dim=-1)
    lgp = lg - log_a
    strict = strictly_lower(alpha.shape[-1], alpha.device)
    gamma = (lgp.unsqueeze(-1) - lg.unsqueeze(-2)).masked_fill(~strict, float("-inf")).exp()
    last = lg[..., -1:]
    return lgp.exp(), gamma, (last - lg).exp(), last.exp().squeeze(-1)



def _solve_matrix(w, x, g, eta, g_prev, gamma):
    """D of the WY representation for one matrix (see module docstring):
    (I + diag(η)(Γ ⊙ X Xᵀ)) D = −diag(η)(G + diag(γ_prev) X W_bᵀ), a batched unit-lower
    triangular system; Γ is zero on and above the diagonal."""
    eta = eta.unsqueeze(-1)
    strict = eta * (gamma * (x @ x.transpose(-1, -2)))
    rhs = -eta * (g + g_prev.unsqueeze(-1) * (x @ w.transpose(-1, -2)))
    return unit_lower_solve(strict, rhs)


def read_chunk(w, x, d, r, g_prev, gamma):
    """W_{t-1} r_t for every t of the chunk: [.., L, in] -> [.., L, out]."""
    return g_prev.unsqueeze(-1) * (r @ w.transpose(-1, -2)) + (gamma * (r @ x.transpose(-1, -2))) @ d


def dgd_chunk(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None,
              compiled: bool | str = False, normalized_step: bool = True, recompute: bool = False):
    """One chunk of the DGD update with matmuls only. Returns (y or None, weights at chunk end).

    fp32 / fp64 run `chunk_grad.dgd_chunk_manual`, the same equations with a hand-written
    backward pass (faster on CPU, docs/decisions.md); half precision runs `dgd_chunk_autograd`.
    `compiled=True` (or a mode of `compiling.COMPILE_MODES`) runs that chunk's forward and
    backward functions through `torch.compile`. `normalized_step`: `naive.step_size`.
    `recompute=True`: the manual kernel keeps only its inputs and recomputes its intermediates in
    the backward pass (`chunk_grad.dgd_chunk_manual`); autograd's form keeps what autograd keeps.
    """
    if k.dtype in (torch.float32, torch.float64):
        return dgd_chunk_manual(weights, q, k, v, eta, alpha, self_target, read_index, compiled, normalized_step,
                                recompute)
    return dgd_chunk_autograd(weights, q, k, v, eta, alpha, self_target, read_index, normalized_step)


def dgd_chunk_autograd(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None,
                       normalized_step: bool = True):
    """One chunk of the DGD update in plain PyTorch ops, differentiated by autograd: the
    reference `dgd_chunk_manual` is tested against.

    All gradients and the decay input of W1 come from the chunk-start `weights` (M_b).
    `q=None` skips the reads (memories whose outputs only come from the chunk-start state).
    Several memories can be stacked on a leading axis of the weights (and of η, α when they
    differ), broadcasting against q, k, v; `read_index` then reads only that memory.
    """
    v_hat = memory_apply(weights, v) if self_target else v
    g_prev, gamma, tail, g_last = decay_terms(alpha)
    grads = memory_gradients(weights, k, v_hat)
    ds = [_solve_matrix(w, x, g, step_size(eta, x, normalized_step), g_prev, gamma) for w, (g, x) in zip(weights, grads)]
    y = None
    if q is not None:
        def pick(t, rank):  # the read memory's slice of a stacked tensor
            return t[read_index] if read_index is not None and t.dim() > rank else t

        r, gp_r, gamma_r = q.dim(), pick(g_prev, q.dim() - 1), pick(gamma, q.dim())
        if len(weights) == 1:
            y = read_chunk(pick(weights[0], r), pick(grads[0][1], r), pick(ds[0], r), q, gp_r, gamma_r)
        else:
            (w2, w1), ((_, x2), (_, x1)) = weights, grads
            hid = F.silu(read_chunk(pick(w2, r), pick(x2, r), pick(ds[0], r), q, gp_r, gamma_r))
            y = q + read_chunk(pick(w1, r), pick(x1, r), pick(ds[1], r), hid, gp_r, gamma_r)
    tail, g_last = tail.unsqueeze(-1), g_last[..., None, None]  # γ_L / γ_i, γ_L
    new = [g_last * w + (d * tail).transpose(-1, -2) @ x for w, d, (_, x) in zip(weights, ds, grads)]
    return y, new




def dgd_memory_chunked(weights, q, k, v, eta, alpha, chunk_size: int, self_target: bool = True,
                       compiled: bool | str = False, normalized_step: bool = True):
    """DGD memory over a sequence, chunk by chunk (matmuls inside a chunk). Returns (y, weights).
    `compiled=True` (or a compile mode): each chunk through `torch.compile` (`dgd_chunk`)."""
    check_chunk_size(chunk_size)
    # split once: slicing per chunk would make autograd scatter each chunk's gradient into a
    # zero-filled full-length tensor, O(T²/C) work in the backward pass
    ks, vs = k.split(chunk_size, dim=-2), v.split(chunk_size, dim=-2)
    qs = [None] * len(ks) if q is None else q.split(chunk_size, dim=-2)
    ys = []
    for qc, kc, vc, ec, ac in zip(qs, ks, vs, eta.split(chunk_size, dim=-1), alpha.split(chunk_size, dim=-1)):
        y, weights = dgd_chunk(weights, qc, kc, vc, ec, ac, self_target, compiled=compiled,
                               normalized_step=normalized_step)
        ys.append(y)
    return (None if q is None else torch.cat(ys, dim=-2)), weights



def dgd_flops_per_token(d: int, hidden: int | None, chunk_size: int, reads: bool = True) -> float:
    """Matmul FLOPs per token and head of `dgd_chunk` (linear memory when hidden is None)."""
    mats = [(d, d)] if hidden is None else [(hidden, d), (d, hidden)]
    C = chunk_size
    f = 2 * d * d if hidden is None else 2 * 2 * d * hidden  # target v̂ = M_b(v)
    for m, n in mats:
        f += 2 * m * n          # gradient forward at M_b
        f += 2 * C * n          # X Xᵀ (per token: one row)
        # X W_bᵀ of the right-hand side is the gradient's forward pass above: not counted twice
        f += inverse_flops(C) / C  # (I + A)⁻¹ once per chunk
        f += 2 * C * m          # applying it to the right-hand side
        f += 2 * m * n          # chunk-end state Dᵀ X
        if reads:
            f += 2 * m * n + 2 * C * n + 2 * C * m  # R W_bᵀ, R Xᵀ, (Γ⊙RXᵀ) D
    if hidden is not None:
        f += 2 * d * hidden  # backprop of e through W1 for W2's gradient
    return float(f)
