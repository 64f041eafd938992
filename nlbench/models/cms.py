"""Continuum Memory System (CMS), docs/ALGORITHMS.md §4 (Eq. 70–74 and Eq. 96).

K MLP levels; level ℓ has update period C^(ℓ) (frequency 1/C^(ℓ)). Wiring, pre-norm residual:
    sequential (default, Eq. 96 chain):  x ← x + MLP^(ℓ)(norm_ℓ(x))  for ℓ = 1..K in turn
    independent (head-wise, Agg = sum):  x ← x + Σ_ℓ MLP^(ℓ)(norm_ℓ(x))

Periods are non-decreasing, fastest first; equal periods are allowed ([1, 1, 1] is the
all-fast control). `lr_mode="scaled"` (the frequency control) steps every level every step at
lr / C^(ℓ) instead of every C^(ℓ) steps at lr (`CMSLevel`).

Two meanings of "step" (spec §4), chosen with `mode`:

* `optimizer` — level ℓ is an ordinary SwiGLU whose module carries
  `nlbench_update_period = C^(ℓ)`; `nlbench.optim.build_optimizer` steps its parameters
  every C^(ℓ) optimizer steps with the gradients accumulated since its last step.

* `in_context` — level ℓ keeps fast weights θ^(ℓ) (initialized from its nn.Parameters, held in
  the state) that change every C^(ℓ) TOKENS (Eq. 71):
      θ ← θ − η^(ℓ) Σ_{t in the block} ∇_θ ℓ_t(θ_b),   when (tokens seen) ≡ 0 (mod C^(ℓ)),
  the SUM over every token since the last update (none dropped), all gradients at θ_b, the
  level's weights at the start of the block. Outputs of the block's tokens use θ_b (causal:
  the update only affects later tokens).

  Local error signal (our choice, no second pass): each level learns to predict its next
  input from its current one, ℓ_t(θ) = ½‖MLP_θ(x_{t-1}) − sg(x_t)‖², the teach signal
  δ_t = MLP_θ(x_{t-1}) − x_t of the output for position t−1 against the (detached) level input
  that actually came next. Token t's term only needs inputs up to t, so it joins the block of
  token t; x_{-1} is the previous call's last input (carried in the state) or 0 at the start of
  a sequence, which gives an exactly zero gradient (SwiGLU(0) = 0 and every weight gradient
  has the input as a factor). η^(ℓ) = softplus(ρ_ℓ) is learnable, initialized to
  `lr / (C^(ℓ) · d)`: the level input is RMS-normalized, so ‖x‖² ≈ d and this is the
  normalized-LMS step (stable for lr < 2 on a linear map) applied to the mean gradient of the
  block. Without the 1/d the d = 128 levels diverge within a few blocks.
  The update is differentiable: the outer loop meta-learns the initial weights and η.

  Level state: {"w": [W_gate, W_up, W_down] ([B, h, d], [B, h, d], [B, d, h]), "acc": the
  gradient sum of the block in progress, "count": tokens since the last update (0-dim long),
  "prev": last input [B, d]}. Carrying it across calls continues the stream exactly, also when
  a call ends mid-block. `cms_level_reference` (token loop with a counter) and
  `cms_level_chunked` (loop over blocks, matmuls inside) compute the same thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nlbench.models.inputs import collecting, report_input
from nlbench.models.layers import RMSNorm, SwiGLU

__all__ = [
    "CMS", "CMSLevel", "swiglu_apply", "swiglu_grads", "cms_level_reference", "cms_level_chunked",
    "CMS_LR_MODES", "CMS_MODES", "CMS_VARIANTS",
]

CMS_MODES = ("optimizer", "in_context")
CMS_VARIANTS = ("sequential", "independent")
CMS_LR_MODES = ("period", "scaled")


def _dsilu(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def swiglu_apply(w, x):
    """SwiGLU with per-batch weights w = [W_gate, W_up, W_down]: x [B, N, d] -> [B, N, d]."""
    wg, wu, wd = w
    return (F.silu(x @ wg.transpose(-1, -2)) * (x @ wu.transpose(-1, -2))) @ wd.transpose(-1, -2)


def _apply_and_grads(w, x_ext, target):
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
    xin, m_in, g_in, u_in, a_in = x_ext[:, :-1], m[:, :-1], g[:, :-1], u[:, :-1], a[:, :-1]
    dm = e @ wd                                    # [B, n, h]
    d_wd = e.transpose(-1, -2) @ m_in
    d_wu = (dm * a_in).transpose(-1, -2) @ xin
    d_wg = (dm * u_in * _dsilu(g_in)).transpose(-1, -2) @ xin
    return out[:, 1:], [d_wg, d_wu, d_wd]


def swiglu_grads(w, x_prev, x_next):
    """Σ_t ∇_w ½‖SwiGLU_w(x_prev_t) − x_next_t‖² (x_next is used as given; detach it yourself)."""
    ext = torch.cat([x_prev, x_prev[:, -1:]], dim=1)  # the extra row only feeds an unused output
    return _apply_and_grads(w, ext, x_next)[1]


def _check_period(period):
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"CMS period must be a positive integer, got {period!r}.")


def cms_level_reference(state, x, period: int, lr):
    """Token loop with a counter: out_t = MLP_θ(x_t); acc += ∇ℓ_t(θ); update when the count hits C."""
    _check_period(period)
    w, acc, prev = list(state["w"]), list(state["acc"]), state["prev"]
    count, outs = int(state["count"]), []
    for t in range(x.shape[1]):
        x_t = x[:, t : t + 1]
        outs.append(swiglu_apply(w, x_t))
        acc = [a + g for a, g in zip(acc, swiglu_grads(w, prev[:, None], x_t.detach()))]
        prev, count = x[:, t], count + 1
        if count == period:
            w = [p - lr * a for p, a in zip(w, acc)]
            acc, count = [torch.zeros_like(a) for a in acc], 0
    new = {"w": w, "acc": acc, "count": torch.tensor(count, dtype=torch.long), "prev": prev}
    return torch.cat(outs, dim=1), new


def cms_level_chunked(state, x, period: int, lr):
    """Same as `cms_level_reference`, one segment per block (matmuls inside, no token loop)."""
    _check_period(period)
    w, acc, prev = list(state["w"]), list(state["acc"]), state["prev"]
    count, T, outs = int(state["count"]), x.shape[1], []
    first = min(period - count, T)  # the rest of the block in progress, then whole blocks
    sizes = [first] + [period] * ((T - first) // period) + ([(T - first) % period] if (T - first) % period else [])
    # split once (a slice per block would zero-fill a full-length gradient per block)
    for xs in x.split([n for n in sizes if n], dim=1):
        out, grads = _apply_and_grads(w, torch.cat([prev[:, None], xs], dim=1), xs.detach())
        outs.append(out)
        acc = [a + g for a, g in zip(acc, grads)]
        prev, count = xs[:, -1], count + xs.shape[1]
        if count == period:
            w = [p - lr * a for p, a in zip(w, acc)]
            acc, count = [torch.zeros_like(a) for a in acc], 0
    new = {"w": w, "acc": acc, "count": torch.tensor(count, dtype=torch.long), "prev": prev}
    return torch.cat(outs, dim=1), new


class CMSLevel(nn.Module):
    """One CMS level: pre-norm + SwiGLU with update period C^(ℓ).

    `lr_mode="scaled"` is the frequency control: the level steps every step (every optimizer
    step, or every token in context) with its learning rate divided by C^(ℓ), so the same
    learning rate per token or step reaches it without the rare updates."""

    def __init__(self, dim: int, hidden: int, period: int, mode: str, lr: float, lr_mode: str = "period"):
        super().__init__()
        _check_period(period)
        if lr_mode not in CMS_LR_MODES:
            raise ValueError(f"cms_lr_mode must be one of {', '.join(CMS_LR_MODES)}; got {lr_mode!r}.")
        self.period, self.mode, self.lr_mode = period, mode, lr_mode
        self.step_period = 1 if lr_mode == "scaled" else period  # how often the level moves
        self.norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden)
        if mode == "optimizer":
            self.nlbench_update_period = self.step_period
            if lr_mode == "scaled":
                self.nlbench_lr_scale = 1.0 / period  # `nlbench.optim.build_optimizer` multiplies lr
        else:
            eta0 = lr / (period * dim)
            self.lr_param = nn.Parameter(torch.tensor(math.log(math.expm1(eta0))))

    def init_state(self, batch_size: int):
        if self.mode == "optimizer":
            return None
        w = [m.weight.unsqueeze(0).expand(batch_size, *m.weight.shape)
             for m in (self.mlp.w_gate, self.mlp.w_up, self.mlp.w_down)]
        return {
            "w": w, "acc": [torch.zeros_like(p) for p in w],
            "count": torch.tensor(0, dtype=torch.long),
            "prev": w[0].new_zeros(batch_size, w[0].shape[-1]),
        }

    @property
    def lr(self):
        return F.softplus(self.lr_param)

    def forward(self, x, state, reference: bool = False):
        h = self.norm(x)
        if self.mode == "optimizer":
            return self.mlp(h), None
        if collecting():  # fast weights start from the parameters: their inputs for DGD (models/inputs.py)
            wg, wu = self.mlp.w_gate.weight, self.mlp.w_up.weight
            report_input(wg, h)
            report_input(wu, h)
            report_input(self.mlp.w_down.weight, lambda: F.silu(F.linear(h, wg)) * F.linear(h, wu))
        fn = cms_level_reference if reference else cms_level_chunked
        return fn(state, h, self.step_period, self.lr)


class CMS(nn.Module):
    """K levels, periods non-decreasing (fastest first); `forward(x, state) -> (x_out, state)`
    adds the residuals itself (see module docstring for the wiring of each variant)."""

    def __init__(self, dim: int, hidden: int | list[int], periods, mode: str = "optimizer",
                 variant: str = "sequential", lr: float | list[float] = 0.5, lr_mode: str = "period"):
        super().__init__()
        if mode not in CMS_MODES:
            raise ValueError(f"cms_mode must be one of {', '.join(CMS_MODES)}; got {mode!r}.")
        if variant not in CMS_VARIANTS:
            raise ValueError(f"cms_variant must be one of {', '.join(CMS_VARIANTS)}; got {variant!r}.")
        periods = list(periods)
        hidden = [hidden] * len(periods) if isinstance(hidden, int) else list(hidden)
        self.mode, self.variant = mode, variant
        self.reference = False  # True: per-token reference loops (tests)
        lrs = [lr] * len(periods) if isinstance(lr, (int, float)) else list(lr)
        if len(lrs) != len(periods) or len(hidden) != len(periods):
            raise ValueError(f"CMS: {len(periods)} periods need as many hidden widths and lrs; got {hidden!r}, {lr!r}.")
        self.levels = nn.ModuleList(CMSLevel(dim, h, p, mode, r, lr_mode) for h, p, r in zip(hidden, periods, lrs))

    def init_state(self, batch_size: int):
        if self.mode == "optimizer":
            return None
        return [lvl.init_state(batch_size) for lvl in self.levels]

    def forward(self, x, state=None, reference: bool | None = None):
        reference = self.reference if reference is None else reference
        if state is None:
            state = self.init_state(x.shape[0])
        states = [None] * len(self.levels) if state is None else state
        new, total = [], 0
        for lvl, s in zip(self.levels, states):
            out, s = lvl(x, s, reference)
            new.append(s)
            if self.variant == "sequential":
                x = x + out
            else:
                total = total + out
        if self.variant == "independent":
            x = x + total
        return x, (None if self.mode == "optimizer" else new)

    def flops_per_token(self) -> float:
        f = 0.0
        for lvl in self.levels:
            d, h = lvl.mlp.w_gate.in_features, lvl.mlp.w_gate.out_features
            f += 2 * 3 * d * h
            if self.mode == "in_context":
                f += 2 * 3 * d * h * 2 + 2 * d * h  # closed-form backprop + the one extra row
        return f
