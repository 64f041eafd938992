"""One chunk of the Titans memory update (`chunk._chunk`) with a hand-written backward pass.

`chunk._chunk` states the chunk in PyTorch ops and lets autograd derive its backward pass; on
CPU at Titans' sizes (batch × heads of 64 × 32 matrices, chunks of 16 tokens) that backward
was ~3× the forward, mostly per-op overhead and broadcast reductions. Here the forward pass runs
without a graph and keeps what the backward pass needs; the backward pass is the chain rule
written out once, in the reverse order of the forward equations (`chunk` module docstring):

    key path   x_0 = k, p_i = x_i W_iᵀ, x_{i+1} = σ(p_i), out = p_{n−1}; u_i = x_i
               δ_{n−1} = 2(out − v), δ_{i−1} = (δ_i W_i) ⊙ σ′(p_{i−1})
    decays     LP = cumsum log η, LQ = cumsum log(1 − α), L_q / L_p their decay matrices,
               D = L_q L_p, a = exp LQ, b = L_q exp LP, read coefficients shifted one token
    reads      pre_i = a_r ⊙ z W_iᵀ + b_r ⊙ z S_iᵀ − (D_r θ ⊙ z u_iᵀ) δ_i,  z ← σ(pre_i)
    end        W_i' = a_C W_i + b_C S_i − (δ_i ⊙ w_D)ᵀ u_i,  S_i' = p_C S_i − (δ_i ⊙ w_P)ᵀ u_i

σ″ enters because the outer loss differentiates through the inner gradient δ. fp32 / fp64
only (the gates' cumulative sums run in the inputs' dtype, as `_chunk` does for these dtypes).
Tests check this function against `chunk._chunk` (values and every input's gradient, float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlbench.kernels.activations import silu_and_grad, silu_grad2

__all__ = ["titans_chunk_manual"]

ETA_MIN, ALPHA_MAX = 1e-30, 1 - 1e-6  # the clamps of `chunk._chunk` (its comment says why)


def _t(x):
    return x.transpose(-1, -2)


def _decay(logcum, mask):
    """[.., C] -> [.., C, C] with [t, s] = exp(logcum_t − logcum_s) for s ≤ t, else 0."""
    return (logcum[..., :, None] - logcum[..., None, :]).masked_fill(~mask, float("-inf")).exp()


def _decay_grad(g, m):
    """Gradient of `_decay`'s logcum from the gradient g of its output m."""
    gm = g * m
    return gm.sum(-1) - gm.sum(-2)


def _shift(x, first):
    """[first, x_1 .. x_{C−1}] along the last dim: the coefficients of M_{t−1}."""
    return torch.cat([torch.full_like(x[..., :1], first), x[..., :-1]], -1)


def _forward(weights, momentum, q, k, v, eta, theta, alpha):
    n = len(weights)
    C = k.shape[-2]
    mask = torch.ones(C, C, dtype=torch.bool, device=k.device).tril()
    # key path at M_b
    us, ps, d1s = [], [], []
    x = k
    for i, w in enumerate(weights):
        us.append(x)
        p = x @ _t(w)
        ps.append(p)
        if i < n - 1:
            x, d1 = silu_and_grad(p)
            d1s.append(d1)
        else:
            x = p
    deltas, hs = [None] * n, [None] * n
    d = 2 * (x - v)
    for i in reversed(range(n)):
        deltas[i] = d
        if i > 0:
            hs[i - 1] = d @ weights[i]
            d = hs[i - 1] * d1s[i - 1]
    # decays
    ec, ac = eta.clamp_min(ETA_MIN), alpha.clamp_max(ALPHA_MAX)
    LP, LQ = ec.log().cumsum(-1), torch.log1p(-ac).cumsum(-1)
    Lq, Lp = _decay(LQ, mask), _decay(LP, mask)
    D = Lq @ Lp
    a, eP = LQ.exp(), LP.exp()
    b = (Lq @ eP.unsqueeze(-1)).squeeze(-1)
    a_r, b_r = _shift(a, 1.0).unsqueeze(-1), _shift(b, 0.0).unsqueeze(-1)
    D_r = F.pad(D[..., :-1, :], (0, 0, 1, 0))
    Dth_r = D_r * theta.unsqueeze(-2)
    # reads
    z, reads = q, []
    for i, (w, s_m) in enumerate(zip(weights, momentum)):
        A, Bs, G = z @ _t(w), z @ _t(s_m), z @ _t(us[i])
        M = Dth_r * G
        pre = a_r * A + b_r * Bs - M @ deltas[i]
        reads.append(dict(z=z, A=A, Bs=Bs, G=G, M=M))
        if i < n - 1:
            z, d1 = silu_and_grad(pre)
            reads[-1].update(pre=pre, d1=d1)
        else:
            z = pre
    y = z
    # chunk end
    E = (LP[..., -1:] - LP).exp()
    wD, wP = (D[..., -1, :] * theta).unsqueeze(-1), (E * theta).unsqueeze(-1)
    aC, bC, pC = a[..., -1, None, None], b[..., -1, None, None], eP[..., -1, None, None]
    new_w = [aC * w + bC * s_m - _t(dl * wD) @ u for w, s_m, u, dl in zip(weights, momentum, us, deltas)]
    new_s = [pC * s_m - _t(dl * wP) @ u for s_m, u, dl in zip(momentum, us, deltas)]
    saved = dict(us=us, ps=ps, d1s=d1s, hs=hs, deltas=deltas, ec=ec, ac=ac, LP=LP, Lq=Lq, Lp=Lp, D=D, a=a, eP=eP,
                 b=b, a_r=a_r, b_r=b_r, D_r=D_r, Dth_r=Dth_r, reads=reads, E=E, wD=wD, wP=wP, aC=aC, bC=bC, pC=pC)
    return y, new_w, new_s, saved


def _backward(S, weights, momentum, q, k, v, eta, theta, alpha, gy, g_nw, g_ns):
    n = len(weights)
    us, deltas = S["us"], S["deltas"]
    aC, bC, pC, wD, wP = S["aC"], S["bC"], S["pC"], S["wD"], S["wP"]
    # chunk end: W' = a_C W + b_C S − (δ ⊙ w_D)ᵀ u,  S' = p_C S − (δ ⊙ w_P)ᵀ u
    g_w = [aC * gw for gw in g_nw]
    g_s = [bC * gw + pC * gs for gw, gs in zip(g_nw, g_ns)]
    g_aC = sum((gw * w).sum((-2, -1)) for gw, w in zip(g_nw, weights))
    g_bC = sum((gw * s_m).sum((-2, -1)) for gw, s_m in zip(g_nw, momentum))
    g_pC = sum((gs * s_m).sum((-2, -1)) for gs, s_m in zip(g_ns, momentum))
    g_u, g_d = [], []
    g_wD = g_wP = 0
    for u, dl, gw, gs in zip(us, deltas, g_nw, g_ns):
        g_pw, g_pp = -(u @ _t(gw)), -(u @ _t(gs))  # [C, out]
        g_u.append(-((dl * wD) @ gw + (dl * wP) @ gs))
        g_d.append(g_pw * wD + g_pp * wP)
        g_wD = g_wD + (g_pw * dl).sum(-1)
        g_wP = g_wP + (g_pp * dl).sum(-1)
    # reads, last layer first
    Dth_r = S["Dth_r"]
    a_r, b_r = S["a_r"], S["b_r"]
    g_ar = g_br = g_Dth = 0
    g_pre = gy
    for i in reversed(range(n)):
        r = S["reads"][i]
        g_ar = g_ar + (g_pre * r["A"]).sum(-1)
        g_br = g_br + (g_pre * r["Bs"]).sum(-1)
        g_A, g_Bs = a_r * g_pre, b_r * g_pre
        g_M = -(g_pre @ _t(deltas[i]))
        g_d[i] = g_d[i] - _t(r["M"]) @ g_pre
        g_Dth = g_Dth + g_M * r["G"]
        g_G = g_M * Dth_r
        z = r["z"]
        g_z = g_G @ us[i] + g_A @ weights[i] + g_Bs @ momentum[i]
        g_u[i] = g_u[i] + _t(g_G) @ z
        g_w[i] = g_w[i] + _t(g_A) @ z
        g_s[i] = g_s[i] + _t(g_Bs) @ z
        if i > 0:
            prev = S["reads"][i - 1]
            g_pre = g_z * prev["d1"]
        else:
            g_q = g_z
    # δ chain: δ_i = (δ_{i+1} W_{i+1}) ⊙ σ′(p_i), first layer first
    g_p = [torch.zeros_like(p) for p in S["ps"]]
    for i in range(n - 1):
        t = g_d[i] * S["d1s"][i]
        g_d[i + 1] = g_d[i + 1] + t @ _t(weights[i + 1])
        g_w[i + 1] = g_w[i + 1] + _t(deltas[i + 1]) @ t
        g_p[i] = g_p[i] + g_d[i] * S["hs"][i] * silu_grad2(S["ps"][i])
    # δ_{n−1} = 2(out − v), out = p_{n−1}; key forward p_i = x_i W_iᵀ, x_{i+1} = σ(p_i), u_i = x_i
    g_v = -2 * g_d[n - 1]
    g_p[n - 1] = g_p[n - 1] + 2 * g_d[n - 1]
    for i in reversed(range(n)):
        g_x = g_p[i] @ weights[i] + g_u[i]
        g_w[i] = g_w[i] + _t(g_p[i]) @ us[i]
        if i > 0:
            g_p[i - 1] = g_p[i - 1] + g_x * S["d1s"][i - 1]
        else:
            g_k = g_x
    # gates: Dth_r = D_r ⊙ θ_s, w_D = D[C, :] θ, w_P = exp(LP_C − LP) θ, p_C = exp(LP_C)
    D, E, LP = S["D"], S["E"], S["LP"]
    g_theta = (g_Dth * S["D_r"]).sum(-2) + g_wD * D[..., -1, :] + g_wP * E
    g_D = F.pad((g_Dth * theta.unsqueeze(-2))[..., 1:, :], (0, 0, 0, 1))  # D_r = D shifted down one row
    g_D[..., -1, :] += g_wD * theta
    g_E = g_wP * theta * E
    g_LP = -g_E
    g_LPC = g_E.sum(-1) + g_pC * pC[..., 0, 0]
    # a_r, b_r: a, b shifted one token; a_C, b_C their last entries
    g_a, g_b = F.pad(g_ar[..., 1:], (0, 1)), F.pad(g_br[..., 1:], (0, 1))
    g_a[..., -1] += g_aC
    g_b[..., -1] += g_bC
    a, b, eP, Lq, Lp = S["a"], S["b"], S["eP"], S["Lq"], S["Lp"]
    # a = exp LQ, b = L_q exp LP, D = L_q L_p
    g_LQ = g_a * a
    g_Lq = g_b.unsqueeze(-1) * eP.unsqueeze(-2) + g_D @ _t(Lp)
    g_LP = g_LP + (_t(Lq) @ g_b.unsqueeze(-1)).squeeze(-1) * eP
    g_Lp = _t(Lq) @ g_D
    g_LQ = g_LQ + _decay_grad(g_Lq, Lq)
    g_LP = g_LP + _decay_grad(g_Lp, Lp)
    g_LP[..., -1] += g_LPC
    # LP = cumsum log max(η, ETA_MIN), LQ = cumsum log(1 − min(α, ALPHA_MAX))
    g_logec = g_LP.flip(-1).cumsum(-1).flip(-1)
    g_logac = g_LQ.flip(-1).cumsum(-1).flip(-1)
    g_eta = g_logec / S["ec"] * (eta >= ETA_MIN)
    g_alpha = -g_logac / (1 - S["ac"]) * (alpha <= ALPHA_MAX)
    return g_q, g_k, g_v, g_eta, g_theta, g_alpha, g_w, g_s


class _TitansChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n, q, k, v, eta, theta, alpha, *state):
        weights, momentum = list(state[:n]), list(state[n:])
        y, new_w, new_s, saved = _forward(weights, momentum, q, k, v, eta, theta, alpha)
        ctx.save_for_backward(q, k, v, eta, theta, alpha, *state)
        ctx.saved, ctx.n = saved, n
        return (y, *new_w, *new_s)

    @staticmethod
    def backward(ctx, gy, *g_state):
        q, k, v, eta, theta, alpha, *state = ctx.saved_tensors
        n = ctx.n
        weights, momentum = state[:n], state[n:]
        g_nw = [torch.zeros_like(w) if g is None else g for g, w in zip(g_state[:n], weights)]
        g_ns = [torch.zeros_like(s) if g is None else g for g, s in zip(g_state[n:], momentum)]
        if gy is None:
            gy = torch.zeros_like(ctx.saved["reads"][-1]["A"])
        g_q, g_k, g_v, g_eta, g_theta, g_alpha, g_w, g_s = _backward(
            ctx.saved, weights, momentum, q, k, v, eta, theta, alpha, gy, g_nw, g_ns)
        return (None, g_q, g_k, g_v, g_eta, g_theta, g_alpha,
                *(g.sum_to_size(w.shape) for g, w in zip(g_w, weights)),
                *(g.sum_to_size(s.shape) for g, s in zip(g_s, momentum)))


def titans_chunk_manual(weights, momentum, q, k, v, eta, theta, alpha):
    """`chunk._chunk` with the hand-written backward pass: same arguments and returns
    (reads [B, H, C, out], chunk-end weights, chunk-end momentum)."""
    n = len(weights)
    out = _TitansChunk.apply(n, q, k, v, eta, theta, alpha, *weights, *momentum)
    return out[0], list(out[1:1 + n]), list(out[1 + n:])
