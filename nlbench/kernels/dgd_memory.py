"""Delta-gradient-descent (DGD) update of a self-modifying memory, spec §2–§3 (algorithms.md).

Per head, the memory is either
    linear  (Eq. 93):  M(z) = W z                       weights [W]
    MLP     (Eq. 89):  M(z) = z + W1 σ(W2 z), σ = SiLU  weights [W2, W1] (input side first)
and every token t of a chunk that starts at state M_b is written by (Eq. 86–88, 90–91)

    M_t = M_{t-1} (α_t I − η_t x_t x_tᵀ) − η_t ∇_W L(M_b; k_t, v̂_t),   L = ½‖M(k) − v̂‖²,

applied to each weight matrix W with that matrix's OWN input x_t: k_t for W (linear) and W2,
σ(W2_b k_t) for W1. DGD assumes ‖x_t‖ = 1 (spec §2); k is L2-normalized but σ(W2 k) is not,
and with ‖x‖² ≫ 1 the factor α − η‖x‖² leaves (−1, 1) and the memory explodes (seen in long
streams). So each matrix uses the step η_t / max(1, ‖x_t‖²): the literal η for unit inputs,
a normalized-LMS step otherwise. The inner loss is halved so that Eq. 93 reads literally
(∇_W L = (M_b k − v̂) kᵀ); the factor 2 of ‖·‖² is only a rescaling of η. Reads use the
per-token state inside the chunk: y_t = M_{t-1}(q_t). With `self_target=True` the memory
makes its own target v̂_t = M_b(v_t) (Eq. 88); otherwise v̂_t = v_t.

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

`dgd_memory_reference` is the same computation as a per-token loop that reads like the
equations; tests check both agree, forward and backward.

Shapes: q, k, v [B, H, T, d]; η, α [B, H, T] (α ∈ (0, 1]); weights: list of [B, H, out, in].
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "memory_apply", "memory_gradients", "dgd_chunk", "dgd_chunk_autograd", "dgd_chunk_stacked", "dgd_memory_chunked",
    "dgd_memory_reference", "dgd_flops_per_token", "unit_lower_solve",
]


def _dsilu(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _check_weights(weights):
    if len(weights) not in (1, 2):
        raise ValueError(
            f"weights: expected a list of 1 matrix (linear memory, Eq. 93) or 2 matrices [W2, W1] "
            f"(residual MLP memory, Eq. 89), got {len(weights)}."
        )


def memory_apply(weights, z):
    """M(z) for per-(batch, head) weights: z [B, H, N, d] -> [B, H, N, d] (Eq. 89 / Eq. 93)."""
    _check_weights(weights)
    if len(weights) == 1:
        return z @ weights[0].transpose(-1, -2)
    w2, w1 = weights
    return z + F.silu(z @ w2.transpose(-1, -2)) @ w1.transpose(-1, -2)


def memory_gradients(weights, k, v_hat):
    """Per-token rank-one gradients of L = ½‖M(k) − v̂‖² at `weights`.

    Returns one (g, x) pair per matrix (same order as `weights`) with ∇_W L_t = g_t x_tᵀ; x is
    the matrix's own input (k for W and W2, σ(W2 k) for W1).
    """
    _check_weights(weights)
    if len(weights) == 1:
        return [(k @ weights[0].transpose(-1, -2) - v_hat, k)]
    w2, w1 = weights
    a = k @ w2.transpose(-1, -2)
    s = F.silu(a)
    e = k + s @ w1.transpose(-1, -2) - v_hat
    g2 = (e @ w1) * _dsilu(a)  # not aten.silu_backward: the outer loop needs its derivative
    return [(g2, k), (e, s)]


def _strictly_lower(L: int, device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced into the graph: a cache would be bypassed anyway
        return torch.ones(L, L, dtype=torch.bool, device=device).tril(-1)
    return _strictly_lower_cached(L, device)


@functools.lru_cache(maxsize=None)
def _strictly_lower_cached(L: int, device) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).tril(-1)


def _decay_terms(alpha):
    """Chunk-local decays from cumulative log α: γ_{t-1} [.., L], Γ[i, j] = γ_{i-1}/γ_j (j < i,
    else 0) [.., L, L], γ_L/γ_i [.., L] and γ_L [..]. Ratios are exp of masked differences, so
    none exceeds 1 and none divides by a small α."""
    log_a = torch.log(alpha)
    lg = torch.cumsum(log_a, dim=-1)
    lgp = lg - log_a
    strict = _strictly_lower(alpha.shape[-1], alpha.device)
    gamma = (lgp.unsqueeze(-1) - lg.unsqueeze(-2)).masked_fill(~strict, float("-inf")).exp()
    last = lg[..., -1:]
    return lgp.exp(), gamma, (last - lg).exp(), last.exp().squeeze(-1)


NEUMANN_BLOCK = 16  # diagonal blocks up to this size are inverted by the Neumann product


def _neumann_inverse(a):
    """(I + A)⁻¹ for strictly lower-triangular A [.., L, L], in matmuls: A is nilpotent (Aᴸ = 0),
    so (I + A)⁻¹ = Σ_{j<L} (−A)ʲ = Π_i (I + (−A)^(2^i)) over 2^i < L — ⌈log₂ L⌉ squarings and
    as many products, O(L³ log L)."""
    n = -a
    p = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) + n
    span = 2
    while span < a.shape[-1]:
        n = n @ n
        p = p + p @ n
        span *= 2
    return p


def _diagonal_blocks(a, size):
    """The diagonal blocks of a [.., L, L] (L a multiple of `size`): [.., L/size, size, size]."""
    n = a.shape[-1] // size
    blocks = a.unflatten(-2, (n, size)).unflatten(-1, (n, size)).diagonal(dim1=-4, dim2=-2)
    return blocks.movedim(-1, -3)


def _unit_lower_inverse(a):
    """(I + A)⁻¹ for strictly lower-triangular A [.., L, L] in matmuls only.

    Up to L = 16 the Neumann product (`_neumann_inverse`): at L = 16, batch 160 on CPU it was
    4× faster than the batched LAPACK triangular solve it replaces (152 µs vs 600 µs, one 16 × 32
    right-hand side). Longer chunks would pay L³ log L for it, so there the diagonal 16 × 16
    blocks are inverted that way and merged pairwise by recursive doubling,
        (I + [[A₁, 0], [B, A₂]])⁻¹ = [[T₁, 0], [−T₂ B T₁, T₂]],
    every level in two batched matmuls (A is zero-padded to 16 · 2ᵏ; the padding's inverse is I).
    """
    L = a.shape[-1]
    if L <= NEUMANN_BLOCK:
        return _neumann_inverse(a)
    size = NEUMANN_BLOCK
    padded = size
    while padded < L:
        padded *= 2
    if padded != L:
        a = F.pad(a, (0, padded - L, 0, padded - L))
    t = _neumann_inverse(_diagonal_blocks(a, size))  # [.., n, s, s]
    while size < padded:
        lower = _diagonal_blocks(a, 2 * size)[..., size:, :size]  # B of each pair [.., n/2, s, s]
        t1, t2 = t[..., 0::2, :, :], t[..., 1::2, :, :]
        off = -(t2 @ lower @ t1)
        top = torch.cat([t1, torch.zeros_like(t1)], dim=-1)
        t = torch.cat([top, torch.cat([off, t2], dim=-1)], dim=-2)
        size *= 2
    t = t.squeeze(-3)
    return t[..., :L, :L] if padded != L else t


class _UnitLowerSolve(torch.autograd.Function):
    """D = (I + A)⁻¹ R for strictly lower-triangular A (entries on and above the diagonal are
    zero), by the explicit inverse T: then dD = −T dA D, so ∂R = Tᵀ ∂D and ∂A = −(Tᵀ ∂D) Dᵀ on
    the strictly lower part — two matmuls for the backward pass, no second solve."""

    @staticmethod
    def forward(ctx, a, rhs):
        inv = _unit_lower_inverse(a)
        d = inv @ rhs
        ctx.save_for_backward(inv, d)
        ctx.shapes = a.shape, rhs.shape
        return d

    @staticmethod
    def backward(ctx, grad_d):
        inv, d = ctx.saved_tensors
        a_shape, rhs_shape = ctx.shapes
        grad_rhs = inv.transpose(-1, -2) @ grad_d
        grad_a = -(grad_rhs @ d.transpose(-1, -2)).tril(-1)
        return grad_a.sum_to_size(a_shape), grad_rhs.sum_to_size(rhs_shape)


def unit_lower_solve(a, rhs):
    """(I + A)⁻¹ R for strictly lower A (`torch.linalg.solve_triangular(A, R, upper=False,
    unitriangular=True)` where A's diagonal is zero); half-precision inputs are solved in fp32."""
    if rhs.dtype in (torch.bfloat16, torch.float16):
        return _UnitLowerSolve.apply(a.float(), rhs.float()).to(rhs.dtype)
    return _UnitLowerSolve.apply(a, rhs)


def _solve_matrix(w, x, g, eta, g_prev, gamma):
    """D of the WY representation for one matrix (see module docstring):
    (I + diag(η)(Γ ⊙ X Xᵀ)) D = −diag(η)(G + diag(γ_prev) X W_bᵀ), a batched unit-lower
    triangular system; Γ is zero on and above the diagonal."""
    eta = eta.unsqueeze(-1)
    strict = eta * (gamma * (x @ x.transpose(-1, -2)))
    rhs = -eta * (g + g_prev.unsqueeze(-1) * (x @ w.transpose(-1, -2)))
    return unit_lower_solve(strict, rhs)


def _read(w, x, d, r, g_prev, gamma):
    """W_{t-1} r_t for every t of the chunk: [.., L, in] -> [.., L, out]."""
    return g_prev.unsqueeze(-1) * (r @ w.transpose(-1, -2)) + (gamma * (r @ x.transpose(-1, -2))) @ d


def dgd_chunk(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None,
              compiled: bool | str = False):
    """One chunk of the DGD update with matmuls only. Returns (y or None, weights at chunk end).

    fp32 / fp64 run `dgd_chunk_grad.dgd_chunk_manual`, the same equations with a hand-written
    backward pass (one Hope `medium` layer, T=512, batch 4, 2 CPU threads: backward 188 → 142 ms,
    forward 110 → 105 ms, one A/B run); half precision runs `dgd_chunk_autograd`.
    `compiled=True` (or a mode of `compiling.COMPILE_MODES`) runs that chunk's forward and
    backward functions through `torch.compile`.
    """
    if k.dtype in (torch.float32, torch.float64):
        from nlbench.kernels.dgd_chunk_grad import dgd_chunk_manual
        return dgd_chunk_manual(weights, q, k, v, eta, alpha, self_target, read_index, compiled)
    return dgd_chunk_autograd(weights, q, k, v, eta, alpha, self_target, read_index)


def dgd_chunk_autograd(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None):
    """One chunk of the DGD update in plain PyTorch ops, differentiated by autograd: the
    reference `dgd_chunk_manual` is tested against.

    All gradients and the decay input of W1 come from the chunk-start `weights` (M_b).
    `q=None` skips the reads (memories whose outputs only come from the chunk-start state).
    Several memories can be stacked on a leading axis of the weights (and of η, α when they
    differ), broadcasting against q, k, v; `read_index` then reads only that memory.
    """
    v_hat = memory_apply(weights, v) if self_target else v
    g_prev, gamma, tail, g_last = _decay_terms(alpha)
    grads = memory_gradients(weights, k, v_hat)
    ds = [_solve_matrix(w, x, g, _step(eta, x), g_prev, gamma) for w, (g, x) in zip(weights, grads)]
    y = None
    if q is not None:
        def pick(t, rank):  # the read memory's slice of a stacked tensor
            return t[read_index] if read_index is not None and t.dim() > rank else t

        r, gp_r, gamma_r = q.dim(), pick(g_prev, q.dim() - 1), pick(gamma, q.dim())
        if len(weights) == 1:
            y = _read(pick(weights[0], r), pick(grads[0][1], r), pick(ds[0], r), q, gp_r, gamma_r)
        else:
            (w2, w1), ((_, x2), (_, x1)) = weights, grads
            hid = F.silu(_read(pick(w2, r), pick(x2, r), pick(ds[0], r), q, gp_r, gamma_r))
            y = q + _read(pick(w1, r), pick(x1, r), pick(ds[1], r), hid, gp_r, gamma_r)
    tail, g_last = tail.unsqueeze(-1), g_last[..., None, None]  # γ_L / γ_i, γ_L
    new = [g_last * w + (d * tail).transpose(-1, -2) @ x for w, d, (_, x) in zip(weights, ds, grads)]
    return y, new



def dgd_chunk_stacked(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None):
    """`dgd_chunk_autograd` in fewer, larger batched matmuls: the form Hope's compiled chunk step
    takes (`self_modifying_titans._compiled_fused_chunk_step`). For a residual-MLP memory whose
    hidden width equals its input width (Hope's default), W2's and W1's triangular systems and
    chunk-end updates are solved as one batch stacked on a new leading axis, and k and v go
    through M_b as one block of rows [k; v]. At Hope's sizes on CPU the chunk's matmuls are
    small (16 × 32 × 32, batch 160) and cost per call as much as per FLOP: one compiled chunk
    step went from 73 to 51 batched matmuls (forward + backward), and a compiled Hope `medium`
    layer's memory loop (T=512, batch 4, 2 threads, alternating in one process) from 113.7 to
    106.5 ms. Same values and gradients as `dgd_chunk_autograd` (tests); any other memory takes
    `dgd_chunk_autograd` itself."""
    if len(weights) != 2 or weights[0].shape[-1] != weights[0].shape[-2]:
        return dgd_chunk_autograd(weights, q, k, v, eta, alpha, self_target, read_index)
    w2, w1 = weights
    L = k.shape[-2]
    g_prev, gamma, tail, g_last = _decay_terms(alpha)
    # gradients at M_b (memory_gradients) and the self-target v̂ = M_b(v), rows [k; v] at once
    a_kv = (torch.cat([k, v], dim=-2) if self_target else k) @ w2.transpose(-1, -2)
    s_kv = F.silu(a_kv)
    p_kv = s_kv @ w1.transpose(-1, -2)
    a, s, p = a_kv[..., :L, :], s_kv[..., :L, :], p_kv[..., :L, :]
    e = k + p - (v + p_kv[..., L:, :] if self_target else v)
    g2 = (e @ w1) * _dsilu(a)
    # `_solve_matrix` for (W2, x = k, g = g2, x W2ᵀ = a) and (W1, x = s, g = e, x W1ᵀ = p), stacked
    eta2, eta1 = _step(eta, k).unsqueeze(-1), _step(eta, s).unsqueeze(-1)
    strict = torch.stack(torch.broadcast_tensors(eta2 * (gamma * (k @ k.transpose(-1, -2))),
                                                 eta1 * (gamma * (s @ s.transpose(-1, -2)))))
    gp = g_prev.unsqueeze(-1)
    d = unit_lower_solve(strict, torch.stack([-eta2 * (g2 + gp * a), -eta1 * (e + gp * p)]))
    y = None
    if q is not None:
        def pick(t, rank):  # the read memory's slice of a stacked tensor
            return t[read_index] if read_index is not None and t.dim() > rank else t

        r, gp_r, gamma_r = q.dim(), pick(g_prev, q.dim() - 1), pick(gamma, q.dim())
        hid = F.silu(_read(pick(w2, r), pick(k, r), pick(d[0], r), q, gp_r, gamma_r))
        y = q + _read(pick(w1, r), pick(s, r), pick(d[1], r), hid, gp_r, gamma_r)
    x = torch.stack([k.expand_as(s), s])
    update = (d * tail.unsqueeze(-1)).transpose(-1, -2) @ x
    g_last = g_last[..., None, None]
    return y, [g_last * w2 + update[0], g_last * w1 + update[1]]

def _step(eta, x):
    """η_t / max(1, ‖x_t‖²): the literal η for unit inputs (k), a bounded step otherwise."""
    return eta / x.pow(2).sum(-1).clamp_min(1.0)


def _check_chunk(chunk_size):
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")


def dgd_memory_chunked(weights, q, k, v, eta, alpha, chunk_size: int, self_target: bool = True,
                       compiled: bool | str = False):
    """DGD memory over a sequence, chunk by chunk (matmuls inside a chunk). Returns (y, weights).
    `compiled=True` (or a compile mode): each chunk through `torch.compile` (`dgd_chunk`)."""
    _check_chunk(chunk_size)
    # split once: slicing per chunk would make autograd scatter each chunk's gradient into a
    # zero-filled full-length tensor, O(T²/C) work in the backward pass
    ks, vs = k.split(chunk_size, dim=-2), v.split(chunk_size, dim=-2)
    qs = [None] * len(ks) if q is None else q.split(chunk_size, dim=-2)
    ys = []
    for qc, kc, vc, ec, ac in zip(qs, ks, vs, eta.split(chunk_size, dim=-1), alpha.split(chunk_size, dim=-1)):
        y, weights = dgd_chunk(weights, qc, kc, vc, ec, ac, self_target, compiled=compiled)
        ys.append(y)
    return (None if q is None else torch.cat(ys, dim=-2)), weights


def dgd_memory_reference(weights, q, k, v, eta, alpha, chunk_size: int, self_target: bool = True):
    """Per-token loop, literally Eq. 86–91: read with M_{t-1}, then
    W ← W (α_t I − η_t x_t x_tᵀ) − η_t g_t x_tᵀ per matrix, gradients at the chunk-start M_b."""
    _check_chunk(chunk_size)
    _check_weights(weights)
    weights = list(weights)
    T, ys = k.shape[-2], []
    n_in = [w.shape[-1] for w in weights]
    # per-token views by one split each: a slice per token would make the backward pass zero-fill
    # a full-length gradient per token, O(T²), and overstate what the chunked form saves
    ks, vs = k.split(1, dim=-2), v.split(1, dim=-2)
    qs = None if q is None else q.split(1, dim=-2)
    etas, alphas = eta.split(1, dim=-1), alpha.split(1, dim=-1)
    for t in range(T):
        if t % chunk_size == 0:
            w_b = list(weights)
        k_t, v_t = ks[t], vs[t]
        v_hat = memory_apply(w_b, v_t) if self_target else v_t
        grads = memory_gradients(w_b, k_t, v_hat)
        if q is not None:
            ys.append(memory_apply(weights, qs[t]))
        a_t = alphas[t][..., None]
        new = []
        for w, (g, x), n in zip(weights, grads, n_in):
            e_t = _step(etas[t], x)[..., None]
            eye = torch.eye(n, dtype=w.dtype, device=w.device)
            decay = a_t * eye - e_t * (x.transpose(-1, -2) @ x)  # α I − η x xᵀ
            new.append(w @ decay - e_t * (g.transpose(-1, -2) @ x))
        weights = new
    return (None if q is None else torch.cat(ys, dim=-2)), weights


def _inverse_flops(L: int) -> float:
    """Matmul FLOPs of `_unit_lower_inverse` for one L × L matrix (as implemented)."""
    def neumann(n):  # one squaring and one product per doubling of the span
        return 2 * 2 * n ** 3 * max(0, math.ceil(math.log2(n)) - 1) if n > 1 else 0
    if L <= NEUMANN_BLOCK:
        return float(neumann(L))
    size, padded = NEUMANN_BLOCK, NEUMANN_BLOCK
    while padded < L:
        padded *= 2
    f = (padded // size) * neumann(size)
    while size < padded:  # per merged pair: −T₂ B T₁, two s × s products
        f += (padded // (2 * size)) * 2 * 2 * size ** 3
        size *= 2
    return float(f)


def dgd_flops_per_token(d: int, hidden: int | None, chunk_size: int, reads: bool = True) -> float:
    """Matmul FLOPs per token and head of `dgd_chunk` (linear memory when hidden is None)."""
    mats = [(d, d)] if hidden is None else [(hidden, d), (d, hidden)]
    C = chunk_size
    f = 2 * d * d if hidden is None else 2 * 2 * d * hidden  # target v̂ = M_b(v)
    for m, n in mats:
        f += 2 * m * n          # gradient forward at M_b
        f += 2 * C * n          # X Xᵀ (per token: one row)
        # X W_bᵀ of the right-hand side is the gradient's forward pass above: not counted twice
        f += _inverse_flops(C) / C  # (I + A)⁻¹ once per chunk
        f += 2 * C * m          # applying it to the right-hand side
        f += 2 * m * n          # chunk-end state Dᵀ X
        if reads:
            f += 2 * m * n + 2 * C * n + 2 * C * m  # R W_bᵀ, R Xᵀ, (Γ⊙RXᵀ) D
    if hidden is not None:
        f += 2 * d * hidden  # backprop of e through W1 for W2's gradient
    return float(f)
