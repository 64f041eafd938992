"""The in-context CMS level block by block: one segment per update block, matmuls inside, no token
loop (`cms_level_chunked`), and the teach-signal fold of a segment whose δ came from the outer
loss (`cms_level_teach`). Both compute what `naive.cms_level_reference` computes."""

from __future__ import annotations

import torch

from nlbench.kernels.cms.state import check_period, fold, pack, unpack
from nlbench.kernels.cms.swiglu import apply_and_grads, teach_grads

__all__ = ["cms_level_chunked", "cms_level_teach"]


def cms_level_chunked(state, x, period: int, lr, nest=None):
    """Same as `cms_level_reference`, one segment per block (matmuls inside, no token loop)."""
    check_period(period)
    st, T, outs = unpack(state), x.shape[1], []
    first = min(period - st["count"], T)  # the rest of the block in progress, then whole blocks
    sizes = [first] + [period] * ((T - first) // period) + ([(T - first) % period] if (T - first) % period else [])
    # split once (a slice per block would zero-fill a full-length gradient per block)
    for xs in x.split([n for n in sizes if n], dim=1):
        out, grads = apply_and_grads(st["w"], torch.cat([st["prev"][:, None], xs], dim=1), xs.detach())
        outs.append(out)
        st = fold({**st, "prev": xs[:, -1]}, grads, xs.shape[1], period, lr, nest)
    return torch.cat(outs, dim=1), pack(st)


def cms_level_teach(state, x, delta, period: int, lr, nest=None):
    """Teach-signal objective: fold Σ_t J_tᵀ δ_t of a segment x [B, n, d] whose outputs were
    read with state["w"] (`teach_grads`) into the level state. The segment must not cross the
    level's block boundary (its tokens all used the same θ_b)."""
    check_period(period)
    st, n = unpack(state), x.shape[1]
    if st["count"] + n > period:
        raise ValueError(f"teach segment of {n} tokens crosses the level's block boundary "
                         f"({st['count']} of {period} tokens already in the block).")
    st = fold({**st, "prev": x[:, -1]}, teach_grads(st["w"], x, delta), n, period, lr, nest)
    return pack(st)
