"""One chunk of the DGD memory update (Eq. 86–93) with a hand-written backward pass.

`chunk.dgd_chunk_autograd` states the chunk in PyTorch ops and lets autograd derive the
backward pass; on CPU, at Hope's sizes (5 stacked memories × batch × heads of 32 × 32
matrices, chunks of 16 tokens), that backward pass was mostly per-op and graph overhead:
~200 autograd nodes per chunk, weight gradients accumulated a dozen times over, broadcast
inputs (k shared by the five memories) reduced once per use. Here the forward pass runs
without a graph, keeps the few intermediates the backward pass needs, and the backward pass
is the chain rule written out once, in the reverse order of the forward equations:

    forward (per memory; `chunk` module docstring for the derivation)
      decays   γ_prev, Γ, γ_L/γ_i, γ_L from cumulative log α
      target   v̂ = M_b(v)                                          (Eq. 88)
      grads    MLP: a = k W2ᵀ, s = σ(a), e = k + s W1ᵀ − v̂, g2 = (e W1) ⊙ σ′(a)
               linear: e = k Wᵀ − v̂                                  (Eq. 89 / 93)
      per matrix (W, x, g, xW = x Wᵀ):
               η̃ = η / max(1, ‖x‖²),  A = η̃ ⊙ Γ ⊙ x xᵀ,  R = −η̃ ⊙ (g + γ_prev ⊙ xW)
               D = (I + A)⁻¹ R,  W_end = γ_L W + (D ⊙ γ_L/γ_i)ᵀ x     (Eq. 90–91)
      reads    W_{t-1} r_t = γ_prev ⊙ r Wᵀ + (Γ ⊙ r xᵀ) D           (Eq. 86)

The second derivative of SiLU enters because the outer loss differentiates through the inner
gradient g2. x Wᵀ is computed once per matrix (it is both the gradient's forward pass and
the decay term of R; the autograd form computed it twice). Tests check this function
against `dgd_chunk_autograd` (values and every input's gradient, float64) and `gradcheck`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from nlbench.kernels.activations import silu_and_grad, silu_grad, silu_grad2
from nlbench.kernels.compiling import compile_kernel, compile_mode
from nlbench.kernels.dgd.solve import strictly_lower, unit_lower_inverse

__all__ = ["dgd_chunk_manual"]


def _t(x):
    return x.transpose(-1, -2)


def _add(acc, val):
    return val if acc is None else acc + val


def _add_at(acc, val, index):
    """acc + val, or acc[index] += val when val is the slice `index` of a stacked acc."""
    if index is None:
        return acc + val
    acc[index] += val  # accumulators are fresh tensors of the backward pass
    return acc


def _rev_cumsum(x):
    return x.flip(-1).cumsum(-1).flip(-1)


def _forward(self_target, read_index, normalized, q, k, v, eta, alpha, weights, strict):
    """The chunk's outputs (y and/or the chunk-end weights) and what the backward pass needs;
    `strict` is the [L, L] strictly-lower mask; `normalized`: the step η/max(1, ‖x‖²), else η."""
    mlp = len(weights) == 2
    log_a = alpha.log()
    lg = log_a.cumsum(-1)
    lgp = lg - log_a
    gam = (lgp.unsqueeze(-1) - lg.unsqueeze(-2)).masked_fill(~strict, float("-inf")).exp()
    gp = lgp.exp()
    last = lg[..., -1:]
    tail = (last - lg).exp()
    gl = last.exp()  # [.., 1]

    sv = av = None
    if mlp:
        w2, w1 = weights
        v_hat = v
        if self_target:
            av = v @ _t(w2)
            sv = F.silu(av)
            v_hat = v + sv @ _t(w1)
        a = k @ _t(w2)
        s, d1a = silu_and_grad(a)
        p1 = s @ _t(w1)
        e = k + p1 - v_hat
        h = e @ w1
        g2 = h * d1a
        mats = [(w2, k, g2, a), (w1, s, e, p1)]
    else:
        (w,) = weights
        v_hat = v @ _t(w) if self_target else v
        p = k @ _t(w)
        e = p - v_hat
        a = s = d1a = h = None
        mats = [(w, k, e, p)]

    gp_u = gp.unsqueeze(-1)
    per, new = [], []
    for wm, x, g, xw in mats:
        n = x.square().sum(-1)
        eta_s = eta / n.clamp_min(1.0) if normalized else eta
        kx = x @ _t(x)
        gk_ = gam * kx
        inner = torch.addcmul(g, gp_u, xw)
        inv = unit_lower_inverse(eta_s.unsqueeze(-1) * gk_)
        d = inv @ (-eta_s.unsqueeze(-1) * inner)
        dd = d * tail.unsqueeze(-1)
        new.append(gl.unsqueeze(-1) * wm + _t(dd) @ x)
        per.append(dict(xw=xw, n=n, eta_s=eta_s, kx=kx, gk=gk_, inner=inner, inv=inv, d=d, dd=dd))

    y, rd = None, None
    if q is not None:
        def pick(t, rank):  # the read memory's slice of a stacked tensor, and its index
            if read_index is not None and t.dim() > rank:
                return t[read_index], read_index
            return t, None

        r = q.dim()
        (gpr, i_gp), (gamr, i_gam) = pick(gp, r - 1), pick(gam, r)
        gpr_u = gpr.unsqueeze(-1)
        if mlp:
            (w2r, i_w2), (w1r, i_w1) = pick(w2, r), pick(w1, r)
            (xkr, i_xk), (xsr, i_xs) = pick(k, r), pick(s, r)
            (d2r, i_d2), (d1r, i_d1) = pick(per[0]["d"], r), pick(per[1]["d"], r)
            qw = q @ _t(w2r)
            qk_raw = q @ _t(xkr)
            qk = gamr * qk_raw
            hr = gpr_u * qw + qk @ d2r
            sr, d1hr = silu_and_grad(hr)
            sw = sr @ _t(w1r)
            ss_raw = sr @ _t(xsr)
            ss = gamr * ss_raw
            y = torch.addcmul(q, gpr_u, sw) + ss @ d1r
            rd = dict(gpr=gpr, gamr=gamr, w2r=w2r, w1r=w1r, xkr=xkr, xsr=xsr, d2r=d2r, d1r=d1r, qw=qw,
                      qk_raw=qk_raw, qk=qk, d1hr=d1hr, sr=sr, sw=sw, ss_raw=ss_raw, ss=ss,
                      idx=dict(gp=i_gp, gam=i_gam, w2=i_w2, w1=i_w1, xk=i_xk, xs=i_xs, d2=i_d2, d1=i_d1))
        else:
            (wr, i_w), (xkr, i_xk), (dr, i_d) = pick(w, r), pick(k, r), pick(per[0]["d"], r)
            qw = q @ _t(wr)
            qk_raw = q @ _t(xkr)
            qk = gamr * qk_raw
            y = gpr_u * qw + qk @ dr
            rd = dict(gpr=gpr, gamr=gamr, wr=wr, xkr=xkr, dr=dr, qw=qw, qk_raw=qk_raw, qk=qk,
                      idx=dict(gp=i_gp, gam=i_gam, w=i_w, xk=i_xk, d=i_d))

    saved = dict(gam=gam, gp=gp, tail=tail, gl=gl, a=a, s=s, d1a=d1a, h=h, e=e, sv=sv, av=av,
                 per=per, rd=rd)
    return ((y, *new) if q is not None else tuple(new)), saved


def _backward(self_target, normalized, S, q, k, v, eta, alpha, weights, grads):
    """Gradients of (q, k, v, η, α, *weights) from the outputs' gradients `grads`."""
    gam, gp, tail, gl, per = S["gam"], S["gp"], S["tail"], S["gl"], S["per"]
    mlp = len(weights) == 2
    gy, g_new = (grads[0], grads[1:]) if q is not None else (None, grads)
    xs = [k, S["s"]] if mlp else [k]

    # chunk-end state: W_end = γ_L W + Ddᵀ x, Dd = D ⊙ γ_L/γ_i
    g_w = [S["gl"].unsqueeze(-1) * gn for gn in g_new]
    g_gl = sum((gn * wm).sum((-2, -1)) for gn, wm in zip(g_new, weights)).unsqueeze(-1)
    g_x = [p["dd"] @ gn for p, gn in zip(per, g_new)]
    g_dd = [x @ _t(gn) for x, gn in zip(xs, g_new)]
    g_d = [gd * tail.unsqueeze(-1) for gd in g_dd]
    g_tail = sum((gd * p["d"]).sum(-1) for gd, p in zip(g_dd, per))
    # γ_prev, Γ and k may be shared by stacked memories: their gradients are reduced to their
    # own shape before being summed (adding an unstacked term to a stacked one would count it
    # once per memory)
    g_gp, g_gam, g_q, g_k_read = None, None, None, None

    # reads
    if gy is not None:
        rd = S["rd"]
        ix = rd["idx"]
        gpr_u = rd["gpr"].unsqueeze(-1)
        if mlp:
            g_q = gy
            g_gpr = (gy * rd["sw"]).sum(-1)
            gsw = gpr_u * gy
            g_w[1] = _add_at(g_w[1], _t(gsw) @ rd["sr"], ix["w1"])
            g_sr = gsw @ rd["w1r"]
            g_d[1] = _add_at(g_d[1], _t(rd["ss"]) @ gy, ix["d1"])
            g_ss = gy @ _t(rd["d1r"])
            g_gamr = g_ss * rd["ss_raw"]
            g_m = g_ss * rd["gamr"]
            g_sr = g_sr + g_m @ rd["xsr"]
            g_x[1] = _add_at(g_x[1], _t(g_m) @ rd["sr"], ix["xs"])
            g_hr = g_sr * rd["d1hr"]
            g_gpr = g_gpr + (g_hr * rd["qw"]).sum(-1)
            t = gpr_u * g_hr
            g_w[0] = _add_at(g_w[0], _t(t) @ q, ix["w2"])
            g_q = g_q + t @ rd["w2r"]
            g_d[0] = _add_at(g_d[0], _t(rd["qk"]) @ g_hr, ix["d2"])
            g_qk = g_hr @ _t(rd["d2r"])
        else:
            g_gpr = (gy * rd["qw"]).sum(-1)
            t = gpr_u * gy
            g_w[0] = _add_at(g_w[0], _t(t) @ q, ix["w"])
            g_q = t @ rd["wr"]
            g_d[0] = _add_at(g_d[0], _t(rd["qk"]) @ gy, ix["d"])
            g_qk = gy @ _t(rd["dr"])
            g_gamr = None
        g_gamr = _add(g_gamr, g_qk * rd["qk_raw"])
        g_m2 = g_qk * rd["gamr"]
        g_q = g_q + g_m2 @ rd["xkr"]
        if ix["xk"] is None:  # k itself (shared by stacked memories): kept apart, not broadcast
            g_k_read = _t(g_m2) @ q
        else:
            g_x[0] = _add_at(g_x[0], _t(g_m2) @ q, ix["xk"])
        g_gp = g_gpr if ix["gp"] is None else _add_at(torch.zeros_like(gp), g_gpr, ix["gp"])
        g_gam = g_gamr if ix["gam"] is None else _add_at(torch.zeros_like(gam), g_gamr, ix["gam"])

    # per matrix: D = (I + A)⁻¹ R, A = η̃ Γ ⊙ x xᵀ, R = −η̃ (g + γ_prev xW), η̃ = η / max(1, ‖x‖²)
    gp_u = gp.unsqueeze(-1)
    g_g, g_xw, g_eta = [], [], None
    for i, (p, x) in enumerate(zip(per, xs)):
        eta_s = p["eta_s"].unsqueeze(-1)
        g_r = _t(p["inv"]) @ g_d[i]
        g_a = -(g_r @ _t(p["d"])).tril(-1)
        g_eta_s = -(g_r * p["inner"]).sum(-1) + (g_a * p["gk"]).sum(-1)
        gg = -eta_s * g_r
        g_g.append(gg)
        g_xw.append(gg * gp_u)
        g_gp = _add(g_gp, (gg * p["xw"]).sum(-1).sum_to_size(gp.shape))
        g_a_eta = g_a * eta_s
        g_gam = _add(g_gam, (g_a_eta * p["kx"]).sum_to_size(gam.shape))
        g_kx = g_a_eta * gam
        g_x[i] = g_x[i] + (g_kx + _t(g_kx)) @ x
        if not normalized:
            g_eta = _add(g_eta, g_eta_s)
            continue
        clamp = p["n"].clamp_min(1.0)
        g_eta = _add(g_eta, g_eta_s / clamp)
        g_n = -(g_eta_s * eta / clamp.square()) * (p["n"] >= 1)
        g_x[i] = g_x[i] + 2 * g_n.unsqueeze(-1) * x

    # the gradients at M_b and the target v̂
    if mlp:
        w2, w1 = weights
        h, d1a, e, s = S["h"], S["d1a"], S["e"], S["s"]
        g_h = g_g[0] * d1a
        g_a = g_xw[0] + g_g[0] * h * silu_grad2(S["a"])
        g_e = g_g[1] + g_h @ _t(w1)
        g_w[1] = g_w[1] + _t(e) @ g_h
        g_p1 = g_xw[1] + g_e
        g_w[1] = g_w[1] + _t(g_p1) @ s
        g_s = g_x[1] + g_p1 @ w1
        g_a = g_a + g_s * d1a
        g_w[0] = g_w[0] + _t(g_a) @ k
        g_k = g_e + g_a @ w2 + g_x[0]
        g_vh = -g_e
        if self_target:
            g_v = g_vh
            g_w[1] = g_w[1] + _t(g_vh) @ S["sv"]
            g_av = (g_vh @ w1) * silu_grad(S["av"])
            g_w[0] = g_w[0] + _t(g_av) @ v
            g_v = g_v + g_av @ w2
        else:
            g_v = g_vh
    else:
        (w,) = weights
        g_p = g_xw[0] + g_g[0]
        g_w[0] = g_w[0] + _t(g_p) @ k
        g_k = g_p @ w + g_x[0]
        g_vh = -g_g[0]
        if self_target:
            g_v = g_vh @ w
            g_w[0] = g_w[0] + _t(g_vh) @ v
        else:
            g_v = g_vh

    # decays: γ_prev = exp(lgp), Γ = exp(lgp_i − lg_j), γ_L/γ_i = exp(lg_L − lg_i), γ_L = exp(lg_L)
    shape_a = alpha.shape
    gg_gam = g_gam * gam
    g_tail_t = (g_tail * tail).sum_to_size(shape_a)
    g_lgp = g_gp * gp + gg_gam.sum(-1)
    g_lg = g_lgp - gg_gam.sum(-2) - g_tail_t
    g_last = g_tail_t.sum(-1) + (g_gl * gl).sum_to_size(*shape_a[:-1], 1).squeeze(-1)
    g_lg[..., -1] += g_last  # a fresh tensor of this pass
    g_alpha = (_rev_cumsum(g_lg) - g_lgp) / alpha

    g_ws = [gw.sum_to_size(wm.shape) for gw, wm in zip(g_w, weights)]
    g_k = g_k.sum_to_size(k.shape)
    if g_k_read is not None:
        g_k = g_k + g_k_read
    return (None if g_q is None else g_q.sum_to_size(q.shape), g_k,
            g_v.sum_to_size(v.shape), g_eta.sum_to_size(eta.shape), g_alpha, *g_ws)


@functools.cache
def _compiled(device_type: str, mode: str = "default"):
    """(forward, backward) through `torch.compile` (`compiling.compile_kernel`), made once per
    process, device type and compile mode; each new shape compiles again."""
    return compile_kernel(_forward, device_type, mode), compile_kernel(_backward, device_type, mode)


class _DGDChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, self_target, read_index, compiled, normalized, recompute, q, k, v, eta, alpha, *weights):
        fwd = _compiled(k.device.type, compile_mode(compiled))[0] if compiled else _forward
        strict = strictly_lower(k.shape[-2], k.device)  # cached: outside the compiled function
        outs, saved = fwd(self_target, read_index, normalized, q, k, v, eta, alpha, list(weights), strict)
        ctx.save_for_backward(q, k, v, eta, alpha, *weights)
        # recompute: keep only the inputs; the backward pass runs the forward again (same ops, same values)
        ctx.saved = None if recompute else saved
        ctx.self_target, ctx.read_index, ctx.compiled, ctx.normalized = self_target, read_index, compiled, normalized
        return outs

    @staticmethod
    def backward(ctx, *grads):
        q, k, v, eta, alpha, *weights = ctx.saved_tensors
        fwd, bwd = _compiled(k.device.type, compile_mode(ctx.compiled)) if ctx.compiled else (_forward, _backward)
        saved = ctx.saved
        if saved is None:
            strict = strictly_lower(k.shape[-2], k.device)
            _, saved = fwd(ctx.self_target, ctx.read_index, ctx.normalized, q, k, v, eta, alpha, list(weights), strict)
        return (None, None, None, None, None,
                *bwd(ctx.self_target, ctx.normalized, saved, q, k, v, eta, alpha, weights, grads))


def dgd_chunk_manual(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None,
                     compiled: bool = False, normalized_step: bool = True, recompute: bool = False):
    """`chunk.dgd_chunk` with the hand-written backward pass; same arguments and returns
    (y or None, weights at chunk end). `compiled=True` (or a mode of `compiling.COMPILE_MODES`):
    both passes through `torch.compile`. `normalized_step=False`: the literal η (`naive.step_size`).
    `recompute=True`: keep only the chunk's inputs for the backward pass, which runs the forward
    pass again for its intermediates (the same function and gradients with a fraction of the
    memory: Hope's training peak, docs/decisions.md)."""
    if len(weights) not in (1, 2):
        raise ValueError(f"weights: expected 1 (linear) or 2 (MLP) matrices, got {len(weights)}.")
    device_type = k.device.type
    if torch.is_autocast_enabled(device_type):
        # Under autocast (bf16 training) the hand-written backward would see bf16 inputs next to
        # float32 states and gradients; the memory's recurrence runs in float32 instead, outside
        # autocast, and the casts carry the gradients back to the bf16 inputs.
        q, k, v, eta, alpha = (None if t is None else t.float() for t in (q, k, v, eta, alpha))
        weights = [w.float() for w in weights]
        with torch.autocast(device_type, enabled=False):
            out = _DGDChunk.apply(self_target, read_index, compiled, normalized_step, recompute, q, k, v, eta,
                                  alpha, *weights)
    else:
        out = _DGDChunk.apply(self_target, read_index, compiled, normalized_step, recompute, q, k, v, eta,
                              alpha, *weights)
    return (out[0], list(out[1:])) if q is not None else (None, list(out))
