"""The SwiGLU level of CMS with per-batch fast weights w = [W_gate, W_up, W_down] ([B, h, d],
[B, h, d], [B, d, h]): its forward pass and the closed-form weight gradients of the two local
objectives (docs/ALGORITHMS.md §4), so the in-context update needs no autograd pass of its own:

    next-input prediction  Σ_t ∇_w ½‖SwiGLU_w(x_{t-1}) − x_t‖²    (`swiglu_grads`)
    teach signal           Σ_t J_tᵀ δ_t, δ_t = ∂L/∂out_t          (`teach_grads`)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlbench.kernels.activations import silu_grad

__all__ = ["apply_and_grads", "swiglu_apply", "swiglu_backprop", "swiglu_grads", "teach_grads"]


def swiglu_apply(w, x):
    """SwiGLU with per-batch weights w = [W_gate, W_up, W_down]: x [B, N, d] -> [B, N, d]."""
    wg, wu, wd = w
    return (F.silu(x @ wg.transpose(-1, -2)) * (x @ wu.transpose(-1, -2))) @ wd.transpose(-1, -2)


def apply_and_grads(w, x_ext, target):
    """One pass over rows x_ext = [x_{s-1}, x_s, .., x_{s+n-1}] (n + 1 rows).

    Returns the outputs of rows 1..n (the block's outputs) and Σ_t ∇_w ½‖MLP_w(x_{t-1}) − x_t‖²
    over the n targets, using rows 0..n-1 as inputs (closed-form SwiGLU backprop).
    """
    wg, wu, wd = w
    g, u = x_ext @ wg.transpose(-1, -2), x_ext @ wu.transpose(-1, -2)
    a = F.silu(g)
    m = a * u
    out = m @ wd.transpose(-1, -2)
    e = out[:, :-1] - target                       # δ_t, [B, n, d]
    return out[:, 1:], swiglu_backprop(wd, x_ext[:, :-1], g[:, :-1], u[:, :-1], a[:, :-1], m[:, :-1], e)


def swiglu_backprop(wd, xin, g, u, a, m, e):
    """Σ_t ∇_w of e_t · SwiGLU_w(xin_t) (closed form): the weight gradients for output errors e."""
    dm = e @ wd                                    # [B, n, h]
    d_wd = e.transpose(-1, -2) @ m
    d_wu = (dm * a).transpose(-1, -2) @ xin
    d_wg = (dm * u * silu_grad(g)).transpose(-1, -2) @ xin
    return [d_wg, d_wu, d_wd]


def teach_grads(w, x, delta):
    """Σ_t ∇_w ½‖SwiGLU_w(x_t) − sg(SwiGLU_w(x_t) − δ_t)‖² = Σ_t J_tᵀ δ_t: the teach-signal
    objective of spec §4 (δ_t = ∂L/∂out_t, used as given; detach it yourself)."""
    wg, wu, wd = w
    g, u = x @ wg.transpose(-1, -2), x @ wu.transpose(-1, -2)
    a = F.silu(g)
    return swiglu_backprop(wd, x, g, u, a, a * u, delta)


def swiglu_grads(w, x_prev, x_next):
    """Σ_t ∇_w ½‖SwiGLU_w(x_prev_t) − x_next_t‖² (x_next is used as given; detach it yourself)."""
    ext = torch.cat([x_prev, x_prev[:, -1:]], dim=1)  # the extra row only feeds an unused output
    return apply_and_grads(w, ext, x_next)[1]
