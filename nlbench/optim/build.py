"""`build_optimizer`: route each parameter to the right rule, and step CMS levels at their period.

Routing (spec §6): every hidden weight matrix goes to the named optimizer (AdamW, Muon, M3 or
DGD) — 2-D weights, and for Muon / M3 also [..., out, in] tensors (per-head memory initial
states, each slice its own matrix) and depthwise conv kernels [C, 1, K] (the [C, K] matrix of
filters; `muon.matrix_view`). Embeddings (nn.Embedding weights, hence the LM head tied to them in
every nlbench model, and any `lm_head` module), biases, norm gains and scalars go to AdamW, as in
public Muon: orthogonalizing a vocabulary-sized embedding or a gain vector is meaningless. DGD
takes every matrix too (per slice, with each slice's own inputs: nlbench/optim/dgd.py) except
those a module lists in `nlbench_no_input` (never applied to a layer input, e.g. Titans'
persistent tokens), which go to AdamW under DGD. `routing(name, model)`
lists the choice per parameter; the run record stores the element count per optimizer.

Cadence (spec §4, CMS `optimizer` mode, Eq. 70–74): a submodule with an int attribute
`nlbench_update_period = C` has its parameters stepped only when the optimizer step count
i = 1, 2, … satisfies i ≡ 0 (mod C), with the SUM of the gradients of all steps since its
last step:

    θ^(ℓ) ← θ^(ℓ) − rule(Σ_{the last C steps} ∇θ^(ℓ))      when i ≡ 0 (mod C^(ℓ))

The sum is kept where autograd already accumulates it: `zero_grad()` only clears the levels
whose period divides the current count (all of them before the first step), so a slow level's
`.grad` keeps summing backward passes until its step. The innermost mark wins for nested
marked modules; unmarked parameters have period 1. Each (period, role) pair gets its own
inner optimizer, so e.g. M3's internal step count t counts that level's own steps.
A module marked `nlbench_lr_scale = s` (CMS `cms_lr_mode: scaled`, the frequency control) has
its parameters in a param group of their own whose lr is s times the configured lr.

Caveat for callers: because slow levels' `.grad` hold sums over several steps, a global
`clip_grad_norm_(model.parameters())` between backward and step would re-scale those sums
every step; clip with `NestedOptimizer.due_params()` (the parameters stepped by the next
`step()`) or not at all when levels have periods > 1.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from nlbench.optim.dgd import DGD
from nlbench.optim.m3 import M3
from nlbench.optim.muon import Muon, check_range

OPTIMIZERS: tuple[str, ...] = ("adamw", "muon", "m3", "dgd")

# Hyper-parameters of the AdamW side (embeddings, head, biases, norms), valid for every name.
ADAMW_HP: dict[str, Any] = dict(adamw_lr=None, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
                                adamw_weight_decay=0.0)
# Hyper-parameters of the rule for 2-D hidden weights, with defaults.
MAIN_HP: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=1e-3, weight_decay=0.0),
    "muon": dict(lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0),
    "m3": dict(lr=1e-3, betas=(0.9, 0.999, 0.9), alpha=1.0, slow_every=8, ns_steps=5, eps=1e-8,
               variant="paper", weight_decay=0.0, rms_normalize=False),
    "dgd": dict(lr=1e-2, normalize_inputs=True),
}
ROLES = ("main", "adamw")


class NestedOptimizer:
    """One optimizer object over several update-frequency levels and routing roles.

    `factories[role](params)` builds the inner optimizer of one (period, role) set of
    parameters; `route(name, param) -> role`. Exposes step / zero_grad / state_dict /
    load_state_dict / param_groups like a torch optimizer.
    """

    def __init__(self, model: nn.Module, route: Callable[[str, nn.Parameter], str],
                 factories: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]]):
        periods = update_periods(model)
        self.step_count = 0
        self.params: list[nn.Parameter] = []
        self.param_names: list[str] = []
        buckets: dict[tuple[int, str], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            role = route(name, p)
            if role not in factories:
                raise ValueError(f"route returned role {role!r} for {name}; allowed roles: {', '.join(factories)}.")
            self.params.append(p)
            self.param_names.append(name)
            buckets.setdefault((periods.get(id(p), 1), role), []).append(p)
        # key "period<C>/<role>" -> (C, inner optimizer); sorted so state_dict order is stable
        self.optimizers: dict[str, tuple[int, torch.optim.Optimizer]] = {}
        scales = lr_scales(model)
        for (period, role) in sorted(buckets, key=lambda k: (k[0], ROLES.index(k[1]) if k[1] in ROLES else 9, k[1])):
            ps = buckets[(period, role)]
            by_scale: dict[float, list[nn.Parameter]] = {}
            for p in ps:
                by_scale.setdefault(scales.get(id(p), 1.0), []).append(p)
            if len(by_scale) > 1 or 1.0 not in by_scale:  # one param group per lr scale
                ps = [{"params": v, "nlbench_lr_scale": s} for s, v in sorted(by_scale.items(), reverse=True)]
            opt = factories[role](ps)
            for g in opt.param_groups:
                g["nlbench_role"], g["nlbench_period"] = role, period
                g["lr"] = g["lr"] * g.get("nlbench_lr_scale", 1.0)
                g.setdefault("initial_lr", g["lr"])
            self.optimizers[f"period{period}/{role}"] = (period, opt)
        self._period = {id(p): c for c, opt in self.optimizers.values()
                        for g in opt.param_groups for p in g["params"]}

    # -- the torch.optim interface ----------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        """All inner groups (each tagged nlbench_role / nlbench_period); set g["lr"] to schedule."""
        return [g for _, opt in self.optimizers.values() for g in opt.param_groups]

    @property
    def periods(self) -> list[int]:
        return sorted({c for c, _ in self.optimizers.values()})

    def due_params(self) -> list[nn.Parameter]:
        """Parameters the next `step()` will update (their `.grad` is one step's gradient sum)."""
        nxt = self.step_count + 1
        return [p for c, opt in self.optimizers.values() if nxt % c == 0
                for g in opt.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        for period, opt in self.optimizers.values():
            if self.step_count % period == 0:
                opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the levels that just stepped (all levels before step 1)."""
        for period, opt in self.optimizers.values():
            if self.step_count % period == 0:
                opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        # The gradients a slow level accumulated mid-period are optimizer state: a resumed run
        # must add them to its next steps' gradients, or that period's update loses steps.
        pending = {}
        for i, p in enumerate(self.params):
            if p.grad is not None and self.step_count % self._period[id(p)] != 0:
                pending[i] = p.grad.detach().clone()
        return {
            "step_count": self.step_count,
            "optimizers": {k: opt.state_dict() for k, (_, opt) in self.optimizers.items()},
            "pending_grads": pending,
            "param_names": list(self.param_names),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = set(state_dict.get("optimizers", {}))
        if saved != set(self.optimizers) or state_dict.get("param_names") != self.param_names:
            raise ValueError(
                f"NestedOptimizer.load_state_dict: the checkpoint was made for levels {sorted(saved)} "
                f"and {len(state_dict.get('param_names') or [])} parameters; this optimizer has levels "
                f"{sorted(self.optimizers)} and {len(self.param_names)} parameters (same model, same "
                f"optimizer name and same nlbench_update_period marks are required)."
            )
        self.step_count = int(state_dict["step_count"])
        for k, (_, opt) in self.optimizers.items():
            opt.load_state_dict(state_dict["optimizers"][k])
        for i, g in state_dict.get("pending_grads", {}).items():
            p = self.params[int(i)]
            p.grad = g.detach().clone().to(device=p.device, dtype=p.dtype)

    def close(self) -> None:
        """Release inner resources (DGD's forward hooks)."""
        for _, opt in self.optimizers.values():
            if hasattr(opt, "close"):
                opt.close()

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {type(o).__name__}({sum(len(g['params']) for g in o.param_groups)} params)"
                          for k, (_, o) in self.optimizers.items())
        return f"NestedOptimizer(step_count={self.step_count}, {inner})"


def update_periods(model: nn.Module) -> dict[int, int]:
    """id(param) -> C from the innermost module marked `nlbench_update_period = C`."""
    periods: dict[int, int] = {}
    for name, module in model.named_modules():  # pre-order: a child's mark overrides its parent's
        c = getattr(module, "nlbench_update_period", None)
        if c is None:
            continue
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise ValueError(
                f"module '{name or type(module).__name__}': nlbench_update_period must be an integer >= 1 "
                f"(the CMS level's update period in optimizer steps), got {c!r}."
            )
        for p in module.parameters():
            periods[id(p)] = c
    return periods


def lr_scales(model: nn.Module) -> dict[int, float]:
    """id(param) -> s from the innermost module marked `nlbench_lr_scale = s` (0 < s ≤ 1)."""
    scales: dict[int, float] = {}
    for name, module in model.named_modules():
        s = getattr(module, "nlbench_lr_scale", None)
        if s is None:
            continue
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0 < s <= 1:
            raise ValueError(f"module '{name or type(module).__name__}': nlbench_lr_scale must be a number in "
                             f"(0, 1] (CMS cms_lr_mode: scaled), got {s!r}.")
        for p in module.parameters():
            scales[id(p)] = float(s)
    return scales


def adamw_role_ids(model: nn.Module) -> set[int]:
    """Parameters that AdamW must own whatever their shape: embeddings and the LM head."""
    ids = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name.rsplit(".", 1)[-1] == "lm_head":
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def no_input_ids(model: nn.Module) -> set[int]:
    """Matrices that are never applied to a layer input (a module names them in its
    `nlbench_no_input` tuple, e.g. Titans' persistent tokens): DGD has no input term for them,
    so under "dgd" they go to AdamW."""
    ids = set()
    for name, module in model.named_modules():
        for attr in getattr(module, "nlbench_no_input", ()):
            p = getattr(module, attr, None)
            if not isinstance(p, nn.Parameter):
                raise ValueError(f"module '{name or type(module).__name__}': nlbench_no_input names {attr!r}, "
                                 f"which is not one of its own parameters.")
            ids.add(id(p))
    return ids


def route_params(model: nn.Module, name: str = "muon") -> Callable[[str, nn.Parameter], str]:
    """route(param name, param) -> "main" (the named optimizer) or "adamw"."""
    special = adamw_role_ids(model) | (no_input_ids(model) if name == "dgd" else set())

    def route(_: str, p: nn.Parameter) -> str:
        return "main" if p.ndim >= 2 and id(p) not in special else "adamw"
    return route


def routing(name: str, model: nn.Module) -> list[tuple[str, str]]:
    """(parameter name, optimizer name) for every trainable parameter under optimizer `name`:
    the optimizer name is `name` for routed matrices and "adamw" for the rest."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}.")
    route = route_params(model, name)
    return [(n, name if route(n, p) == "main" else "adamw")
            for n, p in model.named_parameters() if p.requires_grad]


def routing_counts(name: str, model: nn.Module) -> dict[str, int]:
    """Element count per optimizer name under optimizer `name` (what the run record stores)."""
    params = dict(model.named_parameters())
    counts: dict[str, int] = {}
    for n, opt in routing(name, model):
        counts[opt] = counts.get(opt, 0) + params[n].numel()
    return counts


def build_optimizer(name: str, model: nn.Module, **hp) -> NestedOptimizer:
    """The outer optimizer `name` for `model`, routed and CMS-cadenced (see module docstring).

    hp: the named rule's hyper-parameters (MAIN_HP[name]) plus adamw_lr (default: lr for
    "adamw", 1e-3 otherwise), adamw_betas, adamw_eps, adamw_weight_decay for the AdamW side.
    `.routing` on the result: (parameter name, optimizer name) pairs. For "dgd", every routed
    matrix must receive its layer inputs during the forward (an nn.Linear module call, or
    `nlbench.models.inputs.report_input`); one that got none is an error at `step()`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer name must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}.")
    allowed = {**MAIN_HP[name], **ADAMW_HP}
    unknown = sorted(set(hp) - set(allowed))
    if unknown:
        raise ValueError(
            f"optimizer '{name}': unknown hyper-parameter(s) {', '.join(map(repr, unknown))}. "
            f"Allowed: {', '.join(sorted(allowed))}."
        )
    cfg = {**allowed, **hp}
    if cfg["adamw_lr"] is None:
        cfg["adamw_lr"] = cfg["lr"] if name == "adamw" else 1e-3
    for key in ("betas", "adamw_betas"):
        if key in cfg and isinstance(cfg[key], list):
            cfg[key] = tuple(cfg[key])  # YAML gives lists
    check_range(f"optimizer '{name}'", "adamw_lr", cfg["adamw_lr"], 0.0, math.inf, "a finite float >= 0", hi_open=True)
    check_range(f"optimizer '{name}'", "adamw_weight_decay", cfg["adamw_weight_decay"], 0.0, math.inf,
                "a finite float >= 0", hi_open=True)
    b = cfg["adamw_betas"]
    if not (isinstance(b, tuple) and len(b) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b)):
        raise ValueError(f"optimizer '{name}': adamw_betas must be two floats in [0, 1), got {b!r}.")

    def adamw(params, lr, wd):
        return torch.optim.AdamW(params, lr=lr, betas=cfg["adamw_betas"], eps=cfg["adamw_eps"], weight_decay=wd)

    main = {k: cfg[k] for k in MAIN_HP[name]}
    factories: dict[str, Callable[[list], torch.optim.Optimizer]] = {
        "adamw": lambda ps: adamw(ps, cfg["adamw_lr"], cfg["adamw_weight_decay"]),
    }
    if name == "adamw":
        check_range("optimizer 'adamw'", "lr", main["lr"], 0.0, math.inf, "a finite float >= 0", hi_open=True)
        check_range("optimizer 'adamw'", "weight_decay", main["weight_decay"], 0.0, math.inf,
                    "a finite float >= 0", hi_open=True)
        factories["main"] = lambda ps: adamw(ps, main["lr"], main["weight_decay"])
    elif name == "muon":
        factories["main"] = lambda ps: Muon(ps, **main)
    elif name == "m3":
        factories["main"] = lambda ps: M3(ps, **main)
    else:
        factories["main"] = lambda ps: DGD(ps, model=model, **main)
    opt = NestedOptimizer(model, route_params(model, name), factories)
    opt.routing = routing(name, model)
    return opt
