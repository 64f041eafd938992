"""Continuum Memory System (CMS), docs/ALGORITHMS.md §4 (Eq. 70–74 and Eq. 96).

K MLP levels; level ℓ has update period C^(ℓ) (frequency 1/C^(ℓ)). Wiring, pre-norm residual:
    sequential (default, Eq. 96 chain):  x ← x + MLP^(ℓ)(norm_ℓ(x))  for ℓ = 1..K in turn
    independent (head-wise, Agg = sum):  x ← x + Σ_ℓ MLP^(ℓ)(norm_ℓ(x))
    nested (in-context only):            the sequential chain, and level ℓ < K re-initializes
        from its own initial state φ^(ℓ) every C^(ℓ+1) tokens, after φ^(ℓ) took one step of
        level ℓ+1: φ ← φ − η^(ℓ+1) Σ_{that block} ∇ℓ_t (first order; `nlbench.kernels.cms.state.fold`). Periods must
        divide one another.

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

  `objective="teach"` replaces next-input prediction by the teach signal of spec §4:
  ℓ_t(θ) = ½‖MLP_θ(x_t) − sg(out_t − δ_t)‖², δ_t = ∂L/∂out_t for L the model's next-token loss
  on the segment read so far; its gradient is J_tᵀ δ_t (`teach_grads`). The level cannot
  compute δ itself: `CMS.read` gives the outputs (with a zero probe whose gradient is δ) and
  `CMS.teach` folds Σ J_tᵀ δ_t in; `Hope._forward_teach` runs the segments.

  Level state: {"w": [W_gate, W_up, W_down] ([B, h, d], [B, h, d], [B, d, h]), "acc": the
  gradient sum of the block in progress, "count": tokens since the last update (0-dim long),
  "prev": last input [B, d]; nested levels also "phi", "phi_acc" (gradient sum since the last
  re-initialization) and "since" (tokens since then)}. Carrying it across calls continues the stream exactly, also when
  a call ends mid-block. The update itself lives in `nlbench.kernels.cms`: `cms_level_reference`
  (token loop with a counter) and `cms_level_chunked` (loop over blocks, matmuls inside) compute
  the same thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nlbench.kernels.cms import (cms_level_chunked, cms_level_reference, cms_level_teach, swiglu_apply, swiglu_grads,
                                 teach_grads)
from nlbench.kernels.cms.state import check_period
from nlbench.models.inputs import collecting, report_input
from nlbench.models.layers import RMSNorm, SwiGLU

__all__ = [
    "CMS", "CMSLevel", "swiglu_apply", "swiglu_grads", "teach_grads", "cms_level_reference", "cms_level_chunked",
    "cms_level_teach", "check_nested", "CMS_LR_MODES", "CMS_MODES", "CMS_OBJECTIVES", "CMS_VARIANTS",
]

CMS_MODES = ("optimizer", "in_context")
CMS_VARIANTS = ("sequential", "independent", "nested")
CMS_OBJECTIVES = ("next_input", "teach")
CMS_LR_MODES = ("period", "scaled")


class CMSLevel(nn.Module):
    """One CMS level: pre-norm + SwiGLU with update period C^(ℓ).

    `lr_mode="scaled"` is the frequency control: the level steps every step (every optimizer
    step, or every token in context) with its learning rate divided by C^(ℓ), so the same
    learning rate per token or step reaches it without the rare updates."""

    def __init__(self, dim: int, hidden: int, period: int, mode: str, lr: float, lr_mode: str = "period",
                 objective: str = "next_input"):
        super().__init__()
        check_period(period)
        if lr_mode not in CMS_LR_MODES:
            raise ValueError(f"cms_lr_mode must be one of {', '.join(CMS_LR_MODES)}; got {lr_mode!r}.")
        if objective not in CMS_OBJECTIVES:
            raise ValueError(f"cms_objective must be one of {', '.join(CMS_OBJECTIVES)}; got {objective!r}.")
        self.period, self.mode, self.lr_mode, self.objective = period, mode, lr_mode, objective
        self.step_period = 1 if lr_mode == "scaled" else period  # how often the level moves
        self.nested = False  # set by CMS: re-initialized from φ at the end of the next level's block
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
        state = {
            "w": w, "acc": [torch.zeros_like(p) for p in w],
            "count": torch.tensor(0, dtype=torch.long),
            "prev": w[0].new_zeros(batch_size, w[0].shape[-1]),
        }
        if self.nested:  # φ: the meta-learned initial state the level re-initializes from
            state.update(phi=list(w), phi_acc=[torch.zeros_like(p) for p in w],
                         since=torch.tensor(0, dtype=torch.long))
        return state

    @property
    def lr(self):
        return F.softplus(self.lr_param)

    def _report(self, h):
        if collecting():  # fast weights start from the parameters: their inputs for DGD (models/inputs.py)
            wg, wu = self.mlp.w_gate.weight, self.mlp.w_up.weight
            report_input(wg, h)
            report_input(wu, h)
            report_input(self.mlp.w_down.weight, lambda: F.silu(F.linear(h, wg)) * F.linear(h, wu))

    def forward(self, x, state, reference: bool = False, nest=None):
        h = self.norm(x)
        if self.mode == "optimizer":
            return self.mlp(h), None
        self._report(h)
        fn = cms_level_reference if reference else cms_level_chunked
        return fn(state, h, self.step_period, self.lr, nest)

    def read(self, x, state):
        """Teach objective, first half: the level's output with its current fast weights (no
        update) and its normalized input h, kept for `teach`."""
        h = self.norm(x)
        self._report(h)
        return swiglu_apply(state["w"], h), h

    def teach(self, state, h, delta, nest=None):
        """Teach objective, second half: fold the segment's Σ J_tᵀ δ_t into the state."""
        return cms_level_teach(state, h, delta, self.step_period, self.lr, nest)


class CMS(nn.Module):
    """K levels, periods non-decreasing (fastest first); `forward(x, state) -> (x_out, state)`
    adds the residuals itself (see module docstring for the wiring of each variant)."""

    def __init__(self, dim: int, hidden: int | list[int], periods, mode: str = "optimizer",
                 variant: str = "sequential", lr: float | list[float] = 0.5, lr_mode: str = "period",
                 objective: str = "next_input"):
        super().__init__()
        if mode not in CMS_MODES:
            raise ValueError(f"cms_mode must be one of {', '.join(CMS_MODES)}; got {mode!r}.")
        if variant not in CMS_VARIANTS:
            raise ValueError(f"cms_variant must be one of {', '.join(CMS_VARIANTS)}; got {variant!r}.")
        periods = list(periods)
        if variant == "nested":
            check_nested(mode, periods)
        if objective == "teach" and mode != "in_context":
            raise ValueError("cms_objective 'teach' is the local objective of in-context CMS; it needs "
                             "cms_mode 'in_context'.")
        hidden = [hidden] * len(periods) if isinstance(hidden, int) else list(hidden)
        self.mode, self.variant, self.objective = mode, variant, objective
        self.reference = False  # True: per-token reference loops (tests)
        lrs = [lr] * len(periods) if isinstance(lr, (int, float)) else list(lr)
        if len(lrs) != len(periods) or len(hidden) != len(periods):
            raise ValueError(f"CMS: {len(periods)} periods need as many hidden widths and lrs; got {hidden!r}, {lr!r}.")
        self.levels = nn.ModuleList(CMSLevel(dim, h, p, mode, r, lr_mode, objective)
                                    for h, p, r in zip(hidden, periods, lrs))
        for lvl in list(self.levels)[:-1]:
            lvl.nested = variant == "nested"

    def init_state(self, batch_size: int):
        if self.mode == "optimizer":
            return None
        return [lvl.init_state(batch_size) for lvl in self.levels]

    def _nest(self, i):
        """Level i's re-initialization clock in the nested variant: (C^(i+1), η^(i+1)) or None."""
        if self.variant != "nested" or i + 1 == len(self.levels):
            return None
        nxt = self.levels[i + 1]
        return nxt.period, nxt.lr

    @property
    def teach_period(self) -> int:
        """Teach objective: the model runs segment by segment, this many tokens each (the gcd of
        the levels' step periods, so no segment crosses a level's block boundary)."""
        return math.gcd(*(lvl.step_period for lvl in self.levels))

    def forward(self, x, state=None, reference: bool | None = None):
        if self.objective == "teach":
            raise RuntimeError("CMS with cms_objective 'teach' needs the model's loss: use read() and "
                               "teach() (Hope.forward runs the segments).")
        reference = self.reference if reference is None else reference
        if state is None:
            state = self.init_state(x.shape[0])
        states = [None] * len(self.levels) if state is None else state
        new, total = [], 0
        for i, (lvl, s) in enumerate(zip(self.levels, states)):
            out, s = lvl(x, s, reference, self._nest(i))
            new.append(s)
            if self.variant == "independent":
                total = total + out
            else:
                x = x + out
        if self.variant == "independent":
            x = x + total
        return x, (None if self.mode == "optimizer" else new)

    def read(self, x, state):
        """Teach objective: the wiring of `forward` with every level's output read at its current
        fast weights, plus a zero probe per level (its gradient is δ = ∂L/∂(level output)).
        Returns (x_out, pending) with pending = [(h, probe)] per level, for `teach`."""
        pending, total = [], 0
        for lvl, s in zip(self.levels, state):
            out, h = lvl.read(x, s)
            probe = torch.zeros_like(out, requires_grad=True)
            out = out + probe
            pending.append((h, probe))
            if self.variant == "independent":
                total = total + out
            else:
                x = x + out
        if self.variant == "independent":
            x = x + total
        return x, pending

    def teach(self, state, pending, deltas):
        """Teach objective: each level folds its segment's Σ J_tᵀ δ_t into its state."""
        return [lvl.teach(s, h, d, self._nest(i))
                for i, (lvl, s, (h, _), d) in enumerate(zip(self.levels, state, pending, deltas))]

    def flops_per_token(self) -> float:
        f = 0.0
        for lvl in self.levels:
            d, h = lvl.mlp.w_gate.in_features, lvl.mlp.w_gate.out_features
            f += 2 * 3 * d * h
            if self.mode == "in_context":
                f += 2 * 3 * d * h * 2 + 2 * d * h  # closed-form backprop + the one extra row
        return f


def check_nested(mode: str, periods) -> None:
    """The nested variant re-initializes level ℓ every C^(ℓ+1) tokens: in-context levels only,
    and each period must divide the next (a re-initialization lands on a block boundary)."""
    if mode != "in_context":
        raise ValueError("cms_variant 'nested' re-initializes in-context fast weights; it needs cms_mode "
                         "'in_context'.")
    if any(b % a for a, b in zip(periods, periods[1:])):
        raise ValueError(f"cms_variant 'nested' needs each CMS period to divide the next (level ℓ "
                         f"re-initializes at the end of level ℓ+1's block); got {list(periods)!r}.")
