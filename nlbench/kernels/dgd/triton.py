"""Triton kernels for the chunked DGD memory update (spec §2–§3, Eq. 86–93).

Same computation as `chunk.dgd_chunk` / `dgd_memory_chunked` (read that
module's docstring for the derivation), fused into one kernel launch per sequence: one program
per (batch, head) keeps the memory state on chip (registers / shared memory) and loops over the
chunks of the sequence. Per chunk of L tokens, for each weight matrix W with input rows X:

    Γ[i, j] = γ_{i-1}/γ_j (j < i)          decay ratios, exp of differences of cumulative log α
    η̃_i = η_i / max(1, ‖x_i‖²)                the normalized step (spec §2)
    (I + diag(η̃)(Γ ⊙ X Xᵀ)) D = −diag(η̃)(G + diag(γ_prev) X W_bᵀ)       the WY system
    y_t = γ_{t-1} W_b r_t + Σ_{i<t} Γ[t, i] (r_t·x_i) d_i                  reads (Eq. 86)
    W_end = γ_L W_b + (diag(γ_L/γ) D)ᵀ X                                    next chunk-start state

where G holds the rank-one gradient factors of L = ½‖M_b(k) − v̂‖² at the chunk-start state M_b
(Eq. 87, 90–91; v̂ = M_b(v) with `self_target`, Eq. 88). The unit-lower-triangular system is
solved by forward substitution in registers (L row updates of the [L, d_out] block D), then every
read and the chunk-end state are `tl.dot`s. Two kernels:

    _dgd_linear_fwd_kernel   linear memory M(z) = W z (Eq. 93), X = k for W
    _dgd_mlp_fwd_kernel      residual MLP memory M(z) = z + W1 σ(W2 z) (Eq. 89): X = k for W2,
                             X = σ(W2_b k) for W1; reads go through σ of the W2 read

Accumulation is fp32 whatever the input dtype (bf16 inputs are upcast on load); fp32 inputs use
IEEE fp32 `tl.dot` (no TF32), so results match the PyTorch paths to ~1e-5.

Backward (fused, both memories): the forward saves the chunk-start state of every chunk (as
flash-linear-attention's chunk_fwd_h does, O(T/L · d²) memory instead of an autograd graph) and
`_dgd_linear_bwd_kernel` / `_dgd_mlp_bwd_kernel` walk the chunks in reverse, one program per
(batch, head): recompute the chunk from its saved state, pull (dy, dW_end) back through the reads,
the chunk-end state, the WY solve (back substitution with (I + A)ᵀ), the steps, the gradient
factors and the decays (reverse cumulative sum for d log α), and carry dW_b on chip as the next
(earlier) chunk's dW_end. Every input gets its gradient: q, k, v, η, α and the initial weights.
The step's max(1, ‖x‖²) passes its gradient at ‖x‖² = 1 like torch.clamp_min; for L2-normalized
k this radial term is annihilated by the normalization's Jacobian upstream.

Shapes as in `chunk`: q, k, v [B, H, T, d]; η, α [B, H, T]; weights list of [B, H, out, in].
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1 set before triton
is imported); `nlbench.kernels.dgd` (the backend choice) checks that and explains.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["DGDMemoryTriton", "dgd_memory_triton", "dgd_forward_triton", "MAX_DIM"]

MAX_DIM = 128  # state d_out × d_in kept on chip: beyond this the register tile spills


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _dsilu(x):
    s = tl.sigmoid(x)
    return s * (1 + x * (1 - s))


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _forward_substitution(A, R, rows, C: tl.constexpr):
    """D with (I + A) D = R for strictly-lower-triangular A [BC, BC]: row i of D is
    R_i − Σ_{j<i} A[i, j] D_j, and rows j < i are final when row i is formed."""
    D = R
    for i in range(1, C):
        a_i = tl.sum(tl.where(rows[:, None] == i, A, 0.0), axis=0)  # row i of A, over j
        upd = tl.sum(a_i[:, None] * D, axis=0)
        D = tl.where(rows[:, None] == i, D - upd[None, :], D)
    return D


@triton.jit
def _chunk_decays(alpha, rows):
    """lg = log γ_t, lgp = log γ_{t-1}, lgL = log γ_L; Γ (strictly lower) and γ_L/γ_i."""
    la = tl.log(alpha)
    lg = tl.cumsum(la, axis=0)
    lgp = lg - la
    lgL = tl.sum(la, axis=0)
    strict = rows[:, None] > rows[None, :]
    # masked before exp: every ratio is ≤ 1 and nothing divides by a small α
    gam = tl.exp(tl.where(strict, lgp[:, None] - lg[None, :], float("-inf")))
    return lgp, gam, tl.exp(lgL - lg), tl.exp(lgL)


@triton.jit
def _load_tile(ptr, n_rows, n_cols, stride_r, r_idx, c_idx):
    mask = (r_idx[:, None] < n_rows) & (c_idx[None, :] < n_cols)
    return tl.load(ptr + r_idx[:, None] * stride_r + c_idx[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_tile(ptr, val, n_rows, n_cols, stride_r, r_idx, c_idx):
    mask = (r_idx[:, None] < n_rows) & (c_idx[None, :] < n_cols)
    tl.store(ptr + r_idx[:, None] * stride_r + c_idx[None, :], val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dgd_linear_fwd_kernel(
    w_ptr, q_ptr, k_ptr, v_ptr, eta_ptr, alpha_ptr, y_ptr, w_out_ptr, states_ptr,
    T, D, NT,
    C: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
    HAS_Q: tl.constexpr, SELF_TARGET: tl.constexpr, SAVE_STATES: tl.constexpr, PREC: tl.constexpr,
):
    """Linear memory (Eq. 93): one program per (batch, head), W [D, D] on chip over all chunks."""
    bh = tl.program_id(0)
    r = tl.arange(0, BC)
    c = tl.arange(0, BD)
    W = _load_tile(w_ptr + bh * D * D, D, D, D, c, c)  # W[out, in]
    for n in range(NT):
        t0 = n * C
        n_valid = tl.minimum(T - t0, C)
        seq_off = bh * T * D + t0 * D
        K = _load_tile(k_ptr + seq_off, n_valid, D, D, r, c)
        V = _load_tile(v_ptr + seq_off, n_valid, D, D, r, c)
        # padded tokens: η = 0 (no write), α = 1 (no decay), so they change nothing
        eta = tl.load(eta_ptr + bh * T + t0 + r, mask=r < n_valid, other=0.0).to(tl.float32)
        alpha = tl.load(alpha_ptr + bh * T + t0 + r, mask=r < n_valid, other=1.0).to(tl.float32)
        lgp, gam, tail, gL = _chunk_decays(alpha, r)
        step = eta / tl.maximum(tl.sum(K * K, axis=1), 1.0)  # η / max(1, ‖k‖²)

        KW = _dot(K, tl.trans(W), PREC)  # M_b(k) = W_b k per token
        if SELF_TARGET:
            G = KW - _dot(V, tl.trans(W), PREC)  # v̂ = M_b(v), Eq. 88
        else:
            G = KW - V
        Rhs = -step[:, None] * (G + tl.exp(lgp)[:, None] * KW)
        A = step[:, None] * gam * _dot(K, tl.trans(K), PREC)
        Dm = _forward_substitution(A, Rhs, r, C)

        if HAS_Q:
            Q = _load_tile(q_ptr + seq_off, n_valid, D, D, r, c)
            Y = tl.exp(lgp)[:, None] * _dot(Q, tl.trans(W), PREC) + _dot(gam * _dot(Q, tl.trans(K), PREC), Dm, PREC)
            _store_tile(y_ptr + seq_off, Y, n_valid, D, D, r, c)
        if SAVE_STATES:
            _store_tile(states_ptr + (bh * NT + n) * D * D, W, D, D, D, c, c)
        W = gL * W + _dot(tl.trans(Dm * tail[:, None]), K, PREC)
    _store_tile(w_out_ptr + bh * D * D, W, D, D, D, c, c)


@triton.jit
def _dgd_mlp_fwd_kernel(
    w2_ptr, w1_ptr, q_ptr, k_ptr, v_ptr, eta_ptr, alpha_ptr, y_ptr, w2_out_ptr, w1_out_ptr,
    s2_ptr, s1_ptr,
    T, D, HID, NT,
    C: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    HAS_Q: tl.constexpr, SELF_TARGET: tl.constexpr, SAVE_STATES: tl.constexpr, PREC: tl.constexpr,
):
    """Residual MLP memory M(z) = z + W1 σ(W2 z) (Eq. 89), W2 [HID, D] and W1 [D, HID] on chip.
    Each matrix takes the DGD step with its own input: k for W2, σ(W2_b k) for W1."""
    bh = tl.program_id(0)
    r = tl.arange(0, BC)
    c = tl.arange(0, BD)
    h = tl.arange(0, BH)
    W2 = _load_tile(w2_ptr + bh * HID * D, HID, D, D, h, c)
    W1 = _load_tile(w1_ptr + bh * D * HID, D, HID, HID, c, h)
    for n in range(NT):
        t0 = n * C
        n_valid = tl.minimum(T - t0, C)
        seq_off = bh * T * D + t0 * D
        K = _load_tile(k_ptr + seq_off, n_valid, D, D, r, c)
        V = _load_tile(v_ptr + seq_off, n_valid, D, D, r, c)
        eta = tl.load(eta_ptr + bh * T + t0 + r, mask=r < n_valid, other=0.0).to(tl.float32)
        alpha = tl.load(alpha_ptr + bh * T + t0 + r, mask=r < n_valid, other=1.0).to(tl.float32)
        lgp, gam, tail, gL = _chunk_decays(alpha, r)

        # gradient factors at M_b: e = M_b(k) − v̂, g2 = (e W1) ⊙ σ'(W2 k)
        A2 = _dot(K, tl.trans(W2), PREC)  # [BC, BH] pre-activation W2 k
        S = _silu(A2)  # W1's input
        if SELF_TARGET:
            Vh = V + _dot(_silu(_dot(V, tl.trans(W2), PREC)), tl.trans(W1), PREC)
        else:
            Vh = V
        SW1 = _dot(S, tl.trans(W1), PREC)
        E = K + SW1 - Vh
        G2 = _dot(E, W1, PREC) * _dsilu(A2)

        step2 = eta / tl.maximum(tl.sum(K * K, axis=1), 1.0)
        step1 = eta / tl.maximum(tl.sum(S * S, axis=1), 1.0)
        # X W_bᵀ is A2 for W2 (X = k) and SW1 for W1 (X = σ(W2 k))
        D2 = _forward_substitution(
            step2[:, None] * gam * _dot(K, tl.trans(K), PREC),
            -step2[:, None] * (G2 + tl.exp(lgp)[:, None] * A2), r, C)
        D1 = _forward_substitution(
            step1[:, None] * gam * _dot(S, tl.trans(S), PREC),
            -step1[:, None] * (E + tl.exp(lgp)[:, None] * SW1), r, C)

        if HAS_Q:
            Q = _load_tile(q_ptr + seq_off, n_valid, D, D, r, c)
            hid = _silu(tl.exp(lgp)[:, None] * _dot(Q, tl.trans(W2), PREC)
                        + _dot(gam * _dot(Q, tl.trans(K), PREC), D2, PREC))
            Y = Q + tl.exp(lgp)[:, None] * _dot(hid, tl.trans(W1), PREC) \
                + _dot(gam * _dot(hid, tl.trans(S), PREC), D1, PREC)
            _store_tile(y_ptr + seq_off, Y, n_valid, D, D, r, c)
        if SAVE_STATES:
            _store_tile(s2_ptr + (bh * NT + n) * HID * D, W2, HID, D, D, h, c)
            _store_tile(s1_ptr + (bh * NT + n) * D * HID, W1, D, HID, HID, c, h)
        W2 = gL * W2 + _dot(tl.trans(D2 * tail[:, None]), K, PREC)
        W1 = gL * W1 + _dot(tl.trans(D1 * tail[:, None]), S, PREC)
    _store_tile(w2_out_ptr + bh * HID * D, W2, HID, D, D, h, c)
    _store_tile(w1_out_ptr + bh * D * HID, W1, D, HID, HID, c, h)


@triton.jit
def _back_substitution(A, G, rows, C: tl.constexpr):
    """X with (I + A)ᵀ X = G for strictly-lower-triangular A: row i of X is
    G_i − Σ_{j>i} A[j, i] X_j, formed from the last row up."""
    X = G
    for ii in range(1, C):
        i = C - 1 - ii
        a_i = tl.sum(tl.where(rows[None, :] == i, A, 0.0), axis=1)  # column i of A, over j
        upd = tl.sum(a_i[:, None] * X, axis=0)
        X = tl.where(rows[:, None] == i, X - upd[None, :], X)
    return X


@triton.jit
def _solve_bwd(dD, Dm, A, step, gam, XX, Z, rows, C: tl.constexpr, PREC: tl.constexpr):
    """Backward of D = (I + A)⁻¹ R with A = diag(step)(Γ ∘ X Xᵀ), R = −diag(step) Z.
    Returns dZ, dstep, dΓ and d(X Xᵀ) symmetrized (so dX += it @ X)."""
    dR = _back_substitution(A, dD, rows, C)
    dA = tl.where(rows[:, None] > rows[None, :], -_dot(dR, tl.trans(Dm), PREC), 0.0)
    dstep = tl.sum(dA * gam * XX, axis=1) - tl.sum(dR * Z, axis=1)
    dXX = dA * step[:, None] * gam
    return -step[:, None] * dR, dstep, dA * step[:, None] * XX, dXX + tl.trans(dXX)


@triton.jit
def _decay_bwd(dP, dgam, dtail, dgL, P, gam, tail, gL, alpha):
    """dα from the cotangents of P = γ_{t-1}, Γ[i, j] = γ_{i-1}/γ_j, tail = γ_L/γ_t, gL = γ_L,
    through lgp = lg − log α, lg = cumsum(log α), lgL = Σ log α."""
    gg = dgam * gam
    dlgp = dP * P + tl.sum(gg, axis=1)
    dlg = -tl.sum(gg, axis=0) - dtail * tail + dlgp
    dlgL = tl.sum(dtail * tail, axis=0) + dgL * gL
    dla = -dlgp + (tl.sum(dlg, axis=0) - tl.cumsum(dlg, axis=0) + dlg) + dlgL
    return dla / alpha


@triton.jit
def _d2silu(x):
    s = tl.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


@triton.jit
def _dgd_linear_bwd_kernel(
    states_ptr, q_ptr, k_ptr, v_ptr, eta_ptr, alpha_ptr, dy_ptr, dw_end_ptr,
    dq_ptr, dk_ptr, dv_ptr, deta_ptr, dalpha_ptr, dw0_ptr,
    T, D, NT,
    C: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr,
    HAS_Q: tl.constexpr, SELF_TARGET: tl.constexpr, PREC: tl.constexpr,
):
    """Backward of `_dgd_linear_fwd_kernel`: chunks in reverse, each recomputed from its saved
    chunk-start state; dW (the cotangent of the chunk-end state) carried on chip."""
    bh = tl.program_id(0)
    r = tl.arange(0, BC)
    c = tl.arange(0, BD)
    dWn = _load_tile(dw_end_ptr + bh * D * D, D, D, D, c, c)  # cotangent of the chunk-end state
    for nn in range(NT):
        n = NT - 1 - nn
        t0 = n * C
        n_valid = tl.minimum(T - t0, C)
        seq_off = bh * T * D + t0 * D
        W = _load_tile(states_ptr + (bh * NT + n) * D * D, D, D, D, c, c)
        K = _load_tile(k_ptr + seq_off, n_valid, D, D, r, c)
        V = _load_tile(v_ptr + seq_off, n_valid, D, D, r, c)
        eta = tl.load(eta_ptr + bh * T + t0 + r, mask=r < n_valid, other=0.0).to(tl.float32)
        alpha = tl.load(alpha_ptr + bh * T + t0 + r, mask=r < n_valid, other=1.0).to(tl.float32)
        # --- recompute the chunk (as in the forward) ---
        lgp, gam, tail, gL = _chunk_decays(alpha, r)
        P = tl.exp(lgp)
        nk = tl.sum(K * K, axis=1)
        den = tl.maximum(nk, 1.0)
        step = eta / den
        KW = _dot(K, tl.trans(W), PREC)
        if SELF_TARGET:
            G = KW - _dot(V, tl.trans(W), PREC)
        else:
            G = KW - V
        Z = G + P[:, None] * KW
        Rhs = -step[:, None] * Z
        KK = _dot(K, tl.trans(K), PREC)
        A = step[:, None] * gam * KK
        Dm = _forward_substitution(A, Rhs, r, C)

        # --- chunk-end state W' = γ_L W + (tail ⊙ D)ᵀ K ---
        dW = gL * dWn
        dgL = tl.sum(tl.sum(dWn * W, axis=1), axis=0)
        dDt = _dot(K, tl.trans(dWn), PREC)  # d(tail ⊙ D)
        dK = _dot(Dm * tail[:, None], dWn, PREC)
        dD = tail[:, None] * dDt
        dtail = tl.sum(dDt * Dm, axis=1)
        dP = tl.zeros([BC], dtype=tl.float32)
        dgam = tl.zeros([BC, BC], dtype=tl.float32)
        # --- reads Y = P ⊙ (Q Wᵀ) + (Γ ∘ Q Kᵀ) D ---
        if HAS_Q:
            Q = _load_tile(q_ptr + seq_off, n_valid, D, D, r, c)
            dY = _load_tile(dy_ptr + seq_off, n_valid, D, D, r, c)
            QK = _dot(Q, tl.trans(K), PREC)
            dP += tl.sum(dY * _dot(Q, tl.trans(W), PREC), axis=1)
            dQW = P[:, None] * dY
            dQ = _dot(dQW, W, PREC)
            dW += _dot(tl.trans(dQW), Q, PREC)
            dM = _dot(dY, tl.trans(Dm), PREC)
            dD += _dot(tl.trans(gam * QK), dY, PREC)
            dgam += dM * QK
            dQK = dM * gam
            dQ += _dot(dQK, K, PREC)
            dK += _dot(tl.trans(dQK), Q, PREC)
            _store_tile(dq_ptr + seq_off, dQ, n_valid, D, D, r, c)
        # --- solve D = (I + A)⁻¹ Rhs, Rhs = −step ⊙ Z, Z = G + P ⊙ K Wᵀ ---
        dZ, dstep, dgam_s, dKK = _solve_bwd(dD, Dm, A, step, gam, KK, Z, r, C, PREC)
        dgam += dgam_s
        dK += _dot(dKK, K, PREC)
        dP += tl.sum(dZ * KW, axis=1)
        dKW = dZ + P[:, None] * dZ  # G = K Wᵀ − v̂ and the P ⊙ K Wᵀ term
        if SELF_TARGET:  # v̂ = V Wᵀ
            dV = -_dot(dZ, W, PREC)
            dW -= _dot(tl.trans(dZ), V, PREC)
        else:
            dV = -dZ
        dK += _dot(dKW, W, PREC)
        dW += _dot(tl.trans(dKW), K, PREC)
        # --- step = η / max(1, ‖k‖²); like torch.clamp_min, the gradient passes at ‖k‖² = 1 ---
        deta = dstep / den
        dK += 2.0 * tl.where(nk >= 1.0, -dstep * eta / (den * den), 0.0)[:, None] * K
        dalpha = _decay_bwd(dP, dgam, dtail, dgL, P, gam, tail, gL, alpha)
        _store_tile(dk_ptr + seq_off, dK, n_valid, D, D, r, c)
        _store_tile(dv_ptr + seq_off, dV, n_valid, D, D, r, c)
        tl.store(deta_ptr + bh * T + t0 + r, deta.to(deta_ptr.dtype.element_ty), mask=r < n_valid)
        tl.store(dalpha_ptr + bh * T + t0 + r, dalpha.to(dalpha_ptr.dtype.element_ty), mask=r < n_valid)
        dWn = dW
    _store_tile(dw0_ptr + bh * D * D, dWn, D, D, D, c, c)


@triton.jit
def _dgd_mlp_bwd_kernel(
    s2_ptr, s1_ptr, q_ptr, k_ptr, v_ptr, eta_ptr, alpha_ptr, dy_ptr, dw2_end_ptr, dw1_end_ptr,
    dq_ptr, dk_ptr, dv_ptr, deta_ptr, dalpha_ptr, dw2_ptr, dw1_ptr,
    T, D, HID, NT,
    C: tl.constexpr, BC: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
    HAS_Q: tl.constexpr, SELF_TARGET: tl.constexpr, PREC: tl.constexpr,
):
    """Backward of `_dgd_mlp_fwd_kernel`: chunks in reverse, each recomputed from its saved
    chunk-start [W2, W1]; their cotangents carried on chip."""
    bh = tl.program_id(0)
    r = tl.arange(0, BC)
    c = tl.arange(0, BD)
    h = tl.arange(0, BH)
    dW2n = _load_tile(dw2_end_ptr + bh * HID * D, HID, D, D, h, c)
    dW1n = _load_tile(dw1_end_ptr + bh * D * HID, D, HID, HID, c, h)
    for nn in range(NT):
        n = NT - 1 - nn
        t0 = n * C
        n_valid = tl.minimum(T - t0, C)
        seq_off = bh * T * D + t0 * D
        W2 = _load_tile(s2_ptr + (bh * NT + n) * HID * D, HID, D, D, h, c)
        W1 = _load_tile(s1_ptr + (bh * NT + n) * D * HID, D, HID, HID, c, h)
        K = _load_tile(k_ptr + seq_off, n_valid, D, D, r, c)
        V = _load_tile(v_ptr + seq_off, n_valid, D, D, r, c)
        eta = tl.load(eta_ptr + bh * T + t0 + r, mask=r < n_valid, other=0.0).to(tl.float32)
        alpha = tl.load(alpha_ptr + bh * T + t0 + r, mask=r < n_valid, other=1.0).to(tl.float32)
        # --- recompute the chunk (as in the forward) ---
        lgp, gam, tail, gL = _chunk_decays(alpha, r)
        P = tl.exp(lgp)
        A2 = _dot(K, tl.trans(W2), PREC)
        S = _silu(A2)
        if SELF_TARGET:
            VA = _dot(V, tl.trans(W2), PREC)
            VS = _silu(VA)
            Vh = V + _dot(VS, tl.trans(W1), PREC)
        else:
            Vh = V
        SW1 = _dot(S, tl.trans(W1), PREC)
        E = K + SW1 - Vh
        EW = _dot(E, W1, PREC)
        ds_a2 = _dsilu(A2)
        G2 = EW * ds_a2
        nk = tl.sum(K * K, axis=1)
        ns = tl.sum(S * S, axis=1)
        den2 = tl.maximum(nk, 1.0)
        den1 = tl.maximum(ns, 1.0)
        step2 = eta / den2
        step1 = eta / den1
        KK = _dot(K, tl.trans(K), PREC)
        SS = _dot(S, tl.trans(S), PREC)
        Z2 = G2 + P[:, None] * A2
        Z1 = E + P[:, None] * SW1
        AA2 = step2[:, None] * gam * KK
        AA1 = step1[:, None] * gam * SS
        D2 = _forward_substitution(AA2, -step2[:, None] * Z2, r, C)
        D1 = _forward_substitution(AA1, -step1[:, None] * Z1, r, C)

        # --- chunk-end states W' = γ_L W + (tail ⊙ D)ᵀ X ---
        dW2 = gL * dW2n
        dW1 = gL * dW1n
        dgL = tl.sum(tl.sum(dW2n * W2, axis=1), axis=0) + tl.sum(tl.sum(dW1n * W1, axis=1), axis=0)
        dDt2 = _dot(K, tl.trans(dW2n), PREC)
        dDt1 = _dot(S, tl.trans(dW1n), PREC)
        dD2 = tail[:, None] * dDt2
        dD1 = tail[:, None] * dDt1
        dtail = tl.sum(dDt2 * D2, axis=1) + tl.sum(dDt1 * D1, axis=1)
        dK = _dot(D2 * tail[:, None], dW2n, PREC)
        dS = _dot(D1 * tail[:, None], dW1n, PREC)
        dP = tl.zeros([BC], dtype=tl.float32)
        dgam = tl.zeros([BC, BC], dtype=tl.float32)
        # --- reads y = q + P ⊙ σ(Hpre) W1ᵀ + (Γ ∘ σ(Hpre) Sᵀ) D1, Hpre = P ⊙ Q W2ᵀ + (Γ ∘ Q Kᵀ) D2 ---
        if HAS_Q:
            Q = _load_tile(q_ptr + seq_off, n_valid, D, D, r, c)
            dY = _load_tile(dy_ptr + seq_off, n_valid, D, D, r, c)
            QW2 = _dot(Q, tl.trans(W2), PREC)
            QK = _dot(Q, tl.trans(K), PREC)
            Hpre = P[:, None] * QW2 + _dot(gam * QK, D2, PREC)
            Hh = _silu(Hpre)
            HS = _dot(Hh, tl.trans(S), PREC)
            dP += tl.sum(dY * _dot(Hh, tl.trans(W1), PREC), axis=1)
            dHW1 = P[:, None] * dY
            dHh = _dot(dHW1, W1, PREC)
            dW1 += _dot(tl.trans(dHW1), Hh, PREC)
            dM1 = _dot(dY, tl.trans(D1), PREC)
            dD1 += _dot(tl.trans(gam * HS), dY, PREC)
            dgam += dM1 * HS
            dHS = dM1 * gam
            dHh += _dot(dHS, S, PREC)
            dS += _dot(tl.trans(dHS), Hh, PREC)
            dHpre = dHh * _dsilu(Hpre)
            dP += tl.sum(dHpre * QW2, axis=1)
            dQW2 = P[:, None] * dHpre
            dQ = dY + _dot(dQW2, W2, PREC)
            dW2 += _dot(tl.trans(dQW2), Q, PREC)
            dM2 = _dot(dHpre, tl.trans(D2), PREC)
            dD2 += _dot(tl.trans(gam * QK), dHpre, PREC)
            dgam += dM2 * QK
            dQK = dM2 * gam
            dQ += _dot(dQK, K, PREC)
            dK += _dot(tl.trans(dQK), Q, PREC)
            _store_tile(dq_ptr + seq_off, dQ, n_valid, D, D, r, c)
        # --- the two WY solves ---
        dZ1, dstep1, dgam1, dSS = _solve_bwd(dD1, D1, AA1, step1, gam, SS, Z1, r, C, PREC)
        dZ2, dstep2, dgam2, dKK = _solve_bwd(dD2, D2, AA2, step2, gam, KK, Z2, r, C, PREC)
        dgam += dgam1 + dgam2
        dS += _dot(dSS, S, PREC)
        dK += _dot(dKK, K, PREC)
        # Z1 = E + P ⊙ S W1ᵀ, Z2 = G2 + P ⊙ K W2ᵀ
        dE = dZ1
        dP += tl.sum(dZ1 * SW1, axis=1) + tl.sum(dZ2 * A2, axis=1)
        dSW1 = P[:, None] * dZ1
        dA2 = P[:, None] * dZ2
        # steps η / max(1, ‖x‖²); like torch.clamp_min, the gradient passes at ‖x‖² = 1
        deta = dstep1 / den1 + dstep2 / den2
        dS += 2.0 * tl.where(ns >= 1.0, -dstep1 * eta / (den1 * den1), 0.0)[:, None] * S
        dK += 2.0 * tl.where(nk >= 1.0, -dstep2 * eta / (den2 * den2), 0.0)[:, None] * K
        # G2 = (E W1) ⊙ σ'(A2)
        dEW = dZ2 * ds_a2
        dA2 += dZ2 * EW * _d2silu(A2)
        dE += _dot(dEW, tl.trans(W1), PREC)
        dW1 += _dot(tl.trans(E), dEW, PREC)
        # E = K + S W1ᵀ − v̂
        dK += dE
        dSW1 += dE
        dS += _dot(dSW1, W1, PREC)
        dW1 += _dot(tl.trans(dSW1), S, PREC)
        if SELF_TARGET:  # v̂ = V + σ(V W2ᵀ) W1ᵀ
            dVS = -_dot(dE, W1, PREC)
            dW1 -= _dot(tl.trans(dE), VS, PREC)
            dVA = dVS * _dsilu(VA)
            dV = -dE + _dot(dVA, W2, PREC)
            dW2 += _dot(tl.trans(dVA), V, PREC)
        else:
            dV = -dE
        # S = σ(A2), A2 = K W2ᵀ
        dA2 += dS * ds_a2
        dK += _dot(dA2, W2, PREC)
        dW2 += _dot(tl.trans(dA2), K, PREC)
        dalpha = _decay_bwd(dP, dgam, dtail, dgL, P, gam, tail, gL, alpha)
        _store_tile(dk_ptr + seq_off, dK, n_valid, D, D, r, c)
        _store_tile(dv_ptr + seq_off, dV, n_valid, D, D, r, c)
        tl.store(deta_ptr + bh * T + t0 + r, deta.to(deta_ptr.dtype.element_ty), mask=r < n_valid)
        tl.store(dalpha_ptr + bh * T + t0 + r, dalpha.to(dalpha_ptr.dtype.element_ty), mask=r < n_valid)
        dW2n = dW2
        dW1n = dW1
    _store_tile(dw2_ptr + bh * HID * D, dW2n, HID, D, D, h, c)
    _store_tile(dw1_ptr + bh * D * HID, dW1n, D, HID, HID, c, h)


def _block(n: int) -> int:
    # tl.dot needs every tile side ≥ 16; padding is masked to zeros and changes nothing
    return max(16, triton.next_power_of_2(n))


def _check_inputs(weights, q, k, v, eta, alpha, chunk_size):
    if len(weights) not in (1, 2):
        raise ValueError(
            f"weights: expected a list of 1 matrix (linear memory, Eq. 93) or 2 matrices [W2, W1] "
            f"(residual MLP memory, Eq. 89), got {len(weights)}.")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    B, H, T, d = k.shape
    for name, x in (("q", q), ("v", v)):
        if x is not None and x.shape != k.shape:
            raise ValueError(f"{name}: expected shape {tuple(k.shape)} (same as k), got {tuple(x.shape)}.")
    for name, x in (("eta", eta), ("alpha", alpha)):
        if x.shape != (B, H, T):
            raise ValueError(f"{name}: expected shape {(B, H, T)}, got {tuple(x.shape)}.")
    dims = [d] + [s for w in weights for s in w.shape[-2:]]
    if max(dims) > MAX_DIM:
        raise ValueError(f"triton backend: memory dimensions must be ≤ {MAX_DIM} (kept on chip), got {dims}.")
    if len(weights) == 1 and tuple(weights[0].shape) != (B, H, d, d):
        raise ValueError(f"weights[0]: expected shape {(B, H, d, d)}, got {tuple(weights[0].shape)}.")
    if len(weights) == 2:
        hid = weights[0].shape[-2]
        if tuple(weights[0].shape) != (B, H, hid, d) or tuple(weights[1].shape) != (B, H, d, hid):
            raise ValueError(
                f"weights: expected [W2 {(B, H, 'hid', d)}, W1 {(B, H, d, 'hid')}], got "
                f"{[tuple(w.shape) for w in weights]}.")


def dgd_forward_triton(weights, q, k, v, eta, alpha, chunk_size: int, self_target: bool = True,
                       save_states: bool = False):
    """Run the fused forward kernel. Returns (y or None, final weights, chunk-start states or None).

    states[i] has shape [B, H, NT, out, in] (fp32): the state at the start of every chunk, which
    the backward recomputes from.
    """
    _check_inputs(weights, q, k, v, eta, alpha, chunk_size)
    B, H, T, d = k.shape
    NT = triton.cdiv(T, chunk_size)
    dev = k.device
    prec = "ieee" if k.dtype == torch.float32 else "tf32"
    k_, v_ = k.contiguous(), v.contiguous()
    q_ = q.contiguous() if q is not None else k_
    eta_, alpha_ = eta.contiguous(), alpha.contiguous()
    ws = [w.contiguous() for w in weights]
    y = torch.empty_like(k_) if q is not None else k_.new_empty(1)
    outs = [torch.empty(w.shape, dtype=w.dtype, device=dev) for w in ws]
    states = [torch.empty(B, H, NT, *w.shape[-2:], dtype=torch.float32, device=dev) if save_states
              else torch.empty(1, dtype=torch.float32, device=dev) for w in ws]
    meta = dict(C=chunk_size, BC=_block(chunk_size), BD=_block(d), HAS_Q=q is not None,
                SELF_TARGET=bool(self_target), SAVE_STATES=save_states, PREC=prec)
    grid = (B * H,)
    if len(ws) == 1:
        _dgd_linear_fwd_kernel[grid](ws[0], q_, k_, v_, eta_, alpha_, y, outs[0], states[0], T, d, NT, **meta)
    else:
        hid = ws[0].shape[-2]
        _dgd_mlp_fwd_kernel[grid](ws[0], ws[1], q_, k_, v_, eta_, alpha_, y, outs[0], outs[1],
                                  states[0], states[1], T, d, hid, NT, BH=_block(hid), **meta)
    return (y if q is not None else None), outs, (states if save_states else None)


class DGDMemoryTriton(torch.autograd.Function):
    """Fused Triton forward and backward (the backward recomputes each chunk from the chunk-start
    states the forward saved)."""

    @staticmethod
    def forward(ctx, chunk_size, self_target, n_weights, q, k, v, eta, alpha, *weights):
        need_grad = any(ctx.needs_input_grad[3:])
        y, outs, states = dgd_forward_triton(list(weights), q, k, v, eta, alpha, chunk_size, self_target,
                                             save_states=need_grad)
        ctx.chunk_size, ctx.self_target, ctx.has_q = chunk_size, self_target, q is not None
        ctx.w_dtypes = [w.dtype for w in weights]
        if need_grad:
            ctx.save_for_backward(q if q is not None else k.new_empty(0), k, v, eta, alpha, *states)
        return (y, *outs) if q is not None else tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        q, k, v, eta, alpha, *states = ctx.saved_tensors
        dy = grads[0] if ctx.has_q else None
        dws = list(grads[1:] if ctx.has_q else grads)
        dq, dk, dv, deta, dalpha, *dw = _backward_triton(
            states, q if ctx.has_q else None, k, v, eta, alpha, dy, dws, ctx.chunk_size, ctx.self_target)
        return (None, None, None, dq, dk, dv, deta, dalpha, *(g.to(dt) for g, dt in zip(dw, ctx.w_dtypes)))


def _backward_triton(states, q, k, v, eta, alpha, dy, dw_end, chunk_size, self_target):
    """Fused backward: one program per (batch, head), chunks in reverse from the saved states."""
    B, H, T, d = k.shape
    NT = states[0].shape[2]
    f32, dev = torch.float32, k.device
    dw_end = [torch.zeros(s.shape[:2] + s.shape[3:], dtype=f32, device=dev) if g is None
              else g.to(f32).contiguous() for g, s in zip(dw_end, states)]
    has_q = q is not None
    k_ = k.contiguous()
    q_ = q.contiguous() if has_q else k_
    dy_ = (dy.contiguous() if dy is not None else torch.zeros_like(k_)) if has_q else k_
    dq = torch.empty(k.shape, dtype=f32, device=dev) if has_q else k_.new_empty(1, dtype=f32)
    dk, dv = (torch.empty(k.shape, dtype=f32, device=dev) for _ in range(2))
    deta, dalpha = (torch.empty(eta.shape, dtype=f32, device=dev) for _ in range(2))
    dw0 = [torch.empty(g.shape, dtype=f32, device=dev) for g in dw_end]
    meta = dict(C=chunk_size, BC=_block(chunk_size), BD=_block(d), HAS_Q=has_q, SELF_TARGET=bool(self_target),
                PREC="ieee" if k.dtype == torch.float32 else "tf32")
    common = (q_, k_, v.contiguous(), eta.contiguous(), alpha.contiguous(), dy_)
    if len(states) == 1:
        _dgd_linear_bwd_kernel[(B * H,)](states[0], *common, dw_end[0], dq, dk, dv, deta, dalpha, dw0[0],
                                         T, d, NT, **meta)
    else:
        hid = states[0].shape[-2]
        _dgd_mlp_bwd_kernel[(B * H,)](states[0], states[1], *common, dw_end[0], dw_end[1],
                                      dq, dk, dv, deta, dalpha, dw0[0], dw0[1], T, d, hid, NT,
                                      BH=_block(hid), **meta)
    return (dq.to(q.dtype) if has_q else None, dk.to(k.dtype), dv.to(v.dtype), deta.to(eta.dtype),
            dalpha.to(alpha.dtype), *dw0)


def dgd_memory_triton(weights, q, k, v, eta, alpha, chunk_size: int, self_target: bool = True):
    """DGD memory over a sequence with the fused Triton forward. Returns (y or None, weights),
    the same contract as `dgd_memory_chunked`; differentiable (see `DGDMemoryTriton`)."""
    _check_inputs(weights, q, k, v, eta, alpha, chunk_size)
    out = DGDMemoryTriton.apply(chunk_size, bool(self_target), len(weights), q, k, v, eta, alpha, *weights)
    if q is None:
        return None, list(out)
    return out[0], list(out[1:])
