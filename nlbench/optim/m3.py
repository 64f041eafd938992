"""M3, Multi-scale Momentum Muon (Algorithm 1 of Nested Learning; spec §6).

Per weight matrix θ (each matrix of a [..., out, in] batch on its own), with learning rate η, betas (β1, β2, β3), α, ε, T = ns_steps and slow
period f = slow_every. Each step t = 1, 2, … with gradient g (`variant="paper"`, literal):

    M1 ← M1 + β1 g          V ← V + β2 g²          G ← G + g          (fast momentum, 2nd moment,
                                                                        running gradient sum)
    O1 = NS_T(M1)
    θ ← θ − η (O1 + α O2) / (√V + ε)
    if t ≡ 0 (mod f):  M2 ← M2 + β3 G;  G ← 0;  O2 = NS_T(M2)          (slow momentum)

O2 starts at 0 and is recomputed once per slow period, after that step's update, so it acts
during the whole next period. `variant="ema"` replaces the unbounded sums (V grows like
AdaGrad's) with exponential averages, the slow one fed the period's mean gradient:

    M1 ← β1 M1 + (1 − β1) g    V ← β2 V + (1 − β2) g²    M2 ← β3 M2 + (1 − β3) G / f

State per parameter is M1, M2, V, G, O2 (5 × numel) plus a step count: the slow memory keeps
the running sum G, never a buffer of the period's gradients, so memory does not grow with f
(spec §7). Optional decoupled weight decay θ ← (1 − η λ) θ (λ = 0 by default, not in the paper).

`rms_normalize=True` (default False, the literal algorithm) is the spec's "RMS-normalized
update": u = (O1 + α O2)/(√V + ε) is rescaled to unit RMS, u ← u / RMS(u), before θ ← θ − η u.
Why: O1 spreads mass onto entries whose own gradients were ~0, where √V + ε ≈ ε, so the literal
update can be ~1/ε large there and diverge; normalizing makes η the per-entry step size.
"""

from __future__ import annotations

import math

import torch

from nlbench.optim.muon import check_int, check_range, matrix_view, require_matrices
from nlbench.optim.newton_schulz import newton_schulz, newton_schulz_many

M3_VARIANTS = ("paper", "ema")


class M3(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas=(0.9, 0.999, 0.9), alpha: float = 1.0,
                 slow_every: int = 8, ns_steps: int = 5, eps: float = 1e-8,
                 variant: str = "paper", weight_decay: float = 0.0, rms_normalize: bool = False):
        if variant not in M3_VARIANTS:
            raise ValueError(f"M3: variant must be one of {', '.join(map(repr, M3_VARIANTS))}, "
                             f"got {variant!r}.")
        check_range("M3", "lr", lr, 0.0, math.inf, "a finite float >= 0", hi_open=True)
        if not isinstance(betas, (tuple, list)) or len(betas) != 3:
            raise ValueError(f"M3: betas must be a tuple (beta1, beta2, beta3) of 3 floats, got {betas!r}.")
        for i, beta in enumerate(betas):
            # "paper": accumulation weights, a zero would make V = 0 or freeze a momentum;
            # "ema": averaging factors, 1 would freeze the average.
            if variant == "paper":
                check_range("M3", f"betas[{i}] (beta{i + 1})", beta, 0.0, 1.0,
                            "a float in (0, 1] for variant='paper'", lo_open=True)
            else:
                check_range("M3", f"betas[{i}] (beta{i + 1})", beta, 0.0, 1.0,
                            "a float in [0, 1) for variant='ema'", hi_open=True)
        check_range("M3", "alpha", alpha, 0.0, math.inf, "a finite float >= 0", hi_open=True)
        check_int("M3", "slow_every", slow_every, 1)
        check_int("M3", "ns_steps", ns_steps, 1)
        check_range("M3", "eps", eps, 0.0, math.inf, "a finite float > 0", lo_open=True, hi_open=True)
        if not isinstance(rms_normalize, bool):
            raise ValueError(f"M3: rms_normalize must be True or False, got {rms_normalize!r}.")
        check_range("M3", "weight_decay", weight_decay, 0.0, math.inf, "a finite float >= 0", hi_open=True)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), alpha=alpha, slow_every=slow_every,
                                      ns_steps=ns_steps, eps=eps, variant=variant,
                                      weight_decay=weight_decay, rms_normalize=rms_normalize))
        require_matrices("M3", self.param_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2, b3), alpha = group["lr"], group["betas"], group["alpha"]
            f, T, eps, ema = group["slow_every"], group["ns_steps"], group["eps"], group["variant"] == "ema"
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                g = p.grad
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    for k in ("M1", "M2", "V", "G", "O2"):
                        st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["step"] += 1
                M1, V = st["M1"], st["V"]
                if ema:
                    M1.mul_(b1).add_(g, alpha=1 - b1)
                    V.mul_(b2).addcmul_(g, g, value=1 - b2)
                else:
                    M1.add_(g, alpha=b1)
                    V.addcmul_(g, g, value=b2)
                st["G"].add_(g)
            # O1 = NS_T(M1): same-shape matrices in one batched call (per slice, as one by one)
            O1s = newton_schulz_many([matrix_view(self.state[p]["M1"]) for p in params], steps=T)
            for p, O1 in zip(params, O1s):
                st = self.state[p]
                M2, V, G, O2 = st["M2"], st["V"], st["G"], st["O2"]
                if group["weight_decay"]:
                    p.mul_(1.0 - lr * group["weight_decay"])
                u = O1.view_as(p).add(O2, alpha=alpha).div_(V.sqrt().add_(eps))
                if group["rms_normalize"]:
                    um = matrix_view(u)  # unit RMS per matrix (per head for batched states)
                    um.div_(um.square().mean(dim=(-2, -1), keepdim=True).sqrt().clamp_min(1e-12))
                p.add_(u, alpha=-lr)
                if st["step"] % f == 0:
                    if ema:
                        M2.mul_(b3).add_(G, alpha=(1 - b3) / f)
                    else:
                        M2.add_(G, alpha=b3)
                    G.zero_()
                    O2.copy_(newton_schulz(matrix_view(M2), steps=T).view_as(p))
        return loss
