"""Outer optimizers: AdamW routing, Muon, M3 (multi-scale momentum Muon), DGD, CMS cadence.

    from nlbench.optim import build_optimizer, OPTIMIZERS
    opt = build_optimizer("m3", model, lr=1e-3, slow_every=8)   # one object: step/zero_grad/state_dict
"""

from nlbench.optim.build import (
    ADAMW_HP, MAIN_HP, OPTIMIZERS, NestedOptimizer, build_optimizer, route_params, routing, routing_counts,
    update_periods,
)
from nlbench.optim.dgd import DGD
from nlbench.optim.m3 import M3, M3_VARIANTS
from nlbench.optim.muon import Muon
from nlbench.optim.newton_schulz import NS_COEFFS, newton_schulz

__all__ = [
    "ADAMW_HP", "DGD", "M3", "M3_VARIANTS", "MAIN_HP", "NS_COEFFS", "Muon", "NestedOptimizer",
    "OPTIMIZERS", "build_optimizer", "newton_schulz", "route_params", "routing", "routing_counts",
    "update_periods",
]
