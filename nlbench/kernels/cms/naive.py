"""The in-context CMS level as a token loop with a counter: literally Eq. 71, the reference the
chunked form is tested against (outputs, states and gradients)."""

from __future__ import annotations

import torch

from nlbench.kernels.cms.state import check_period, fold, pack, unpack
from nlbench.kernels.cms.swiglu import swiglu_apply, swiglu_grads

__all__ = ["cms_level_reference"]


def cms_level_reference(state, x, period: int, lr, nest=None):
    """Token loop with a counter: out_t = MLP_θ(x_t); acc += ∇ℓ_t(θ); update when the count hits C."""
    check_period(period)
    st, outs = unpack(state), []
    for t in range(x.shape[1]):
        x_t = x[:, t : t + 1]
        outs.append(swiglu_apply(st["w"], x_t))
        grads = swiglu_grads(st["w"], st["prev"][:, None], x_t.detach())
        st = fold({**st, "prev": x[:, t]}, grads, 1, period, lr, nest)
    return torch.cat(outs, dim=1), pack(st)
