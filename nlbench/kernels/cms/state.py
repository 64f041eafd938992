"""The state of one in-context CMS level and how summed gradients fold into it (Eq. 71): the
block sum, the update when the block is complete, and the nested variant's re-initialization
from φ. Level state: {"w": [W_gate, W_up, W_down], "acc": the gradient sum of the block in
progress, "count": tokens since the last update (0-dim long), "prev": last input [B, d]; nested
levels also "phi", "phi_acc", "since"}.
"""

from __future__ import annotations

import torch

__all__ = ["check_period", "fold", "pack", "unpack"]


def check_period(period):
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"CMS period must be a positive integer, got {period!r}.")


def fold(st, grads, n, period, lr, nest=None):
    """Fold the summed gradients `grads` of n more tokens (all taken at st["w"]) into a level
    state with python-int counters: the block sum, the update when the block is complete
    (count hits the period), and for the nested variant the re-initialization from φ at the
    end of the slower level's block (`nest` = (its period, its η)), φ first taking that block's
    summed gradients at the slower level's step."""
    st = {**st, "acc": [a + g for a, g in zip(st["acc"], grads)], "count": st["count"] + n}
    if st["count"] == period:
        st["w"] = [p - lr * a for p, a in zip(st["w"], st["acc"])]
        st["acc"], st["count"] = [torch.zeros_like(a) for a in st["acc"]], 0
    if nest is not None:
        reset_period, reset_lr = nest
        st["phi_acc"] = [a + g for a, g in zip(st["phi_acc"], grads)]
        st["since"] += n
        if st["since"] == reset_period:
            st["phi"] = [p - reset_lr * a for p, a in zip(st["phi"], st["phi_acc"])]
            st["w"] = list(st["phi"])
            st["phi_acc"], st["since"] = [torch.zeros_like(a) for a in st["phi_acc"]], 0
    return st


def unpack(state):
    st = {**state, "w": list(state["w"]), "acc": list(state["acc"]), "count": int(state["count"])}
    if "phi" in state:
        st.update(phi=list(state["phi"]), phi_acc=list(state["phi_acc"]), since=int(state["since"]))
    return st


def pack(st):
    st = {**st, "count": torch.tensor(st["count"], dtype=torch.long)}
    if "since" in st:
        st["since"] = torch.tensor(st["since"], dtype=torch.long)
    return st
