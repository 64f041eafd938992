"""DGD, Delta Gradient Descent as an outer optimizer, one rule per Linear layer (spec §2).

For a Linear weight W (out × in) whose layer saw the input rows X = [x_1; …; x_n] since the
last step, and the loss gradient ∇W:

    W ← W (I − η′ XᵀX / n) − η′ ∇W,        η′ = η / (1 + η)

(and, when several forwards/calls fed one gradient — gradient accumulation, or a CMS level
stepped every C steps — the decay sums their terms Σ_k X_kᵀX_k / n_k, as the gradient sums theirs)

This is the Sherman–Morrison solution of min_W ½‖W x − u‖² + (1/2η)‖W − W_t‖² with ‖x‖ = 1,
averaged over the n tokens. Compared with SGD, DGD also shrinks W along the directions its
inputs occupied (a delta-rule "forget what this input used to map to"); directions orthogonal
to every input are left alone.

How the inputs reach the optimizer: every weight DGD owns that is applied to inputs adds
S += X̂ᵀX̂ / n over the n rows of each application, so memory is in × in per matrix, not per
token. An nn.Linear called as a module is seen by a forward hook; every other application (a
weight used through `F.linear`, functional fast weights, conv kernels, per-head memory initial
states) is reported by the model with `nlbench.models.inputs.report_input`. A weight
[*batch, out, in] is a batch of matrices: each slice (e.g. one head's memory state) has its own
S [*batch, in, in] from its own rows, and the decay is the batched W @ S. Rows are normalized,
x̂ = x / max(‖x‖, 1e-12), because the derivation assumes ‖x‖ = 1 (`normalize_inputs=False` uses
raw x). Only applications run with autograd enabled are captured (evaluation under
torch.no_grad does not leak into the next step). The statistics are cleared when the weight is
stepped or its gradient is zeroed via `zero_grad`, so gradient accumulation over several
forwards sees all of their inputs. A weight shared by several layers pools their inputs.

A matrix (ndim ≥ 2) that has a gradient but received no input since its last step is an error
naming the parameter: DGD never silently takes the plain SGD step. Vectors and scalars (biases,
gains; `build_optimizer` routes them to AdamW) have no layer input and take the SGD step with
the same η′ (the DGD rule with X = 0).

Call `close()` (or drop the optimizer) to remove the hooks and stop collecting reports.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from nlbench.models import inputs as layer_inputs
from nlbench.optim.muon import check_range


class DGD(torch.optim.Optimizer):
    def __init__(self, model_or_params, lr: float, *, model: nn.Module | None = None,
                 normalize_inputs: bool = True):
        check_range("DGD", "lr", lr, 0.0, math.inf, "a finite float >= 0", hi_open=True)
        if not isinstance(normalize_inputs, bool):
            raise ValueError(f"DGD: normalize_inputs must be True or False, got {normalize_inputs!r}.")
        if isinstance(model_or_params, nn.Module):
            if model is not None and model is not model_or_params:
                raise ValueError("DGD: pass the model either as the first argument or as model=, not two different ones.")
            model, params = model_or_params, list(model_or_params.parameters())
        else:
            params = list(model_or_params)
            if model is None:
                # Without the modules there are no layer inputs and DGD silently degrades to
                # SGD (spec §7); refuse instead.
                raise ValueError(
                    "DGD: needs the layer inputs, so pass the nn.Module (DGD(model, lr)) or the "
                    "parameters together with model=the module that owns them (DGD(params, lr, model=model))."
                )
        super().__init__(params, dict(lr=lr, normalize_inputs=normalize_inputs))
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        self._names = {id(p): n for n, p in model.named_parameters() if id(p) in owned}
        self._inputs: dict[int, list] = {}     # id(weight) -> [S = Σ XᵀX/n ([*batch,] in × in), calls]
        for g in self.param_groups:
            for p in g["params"]:
                if p.ndim >= 2:
                    self._inputs[id(p)] = [None, 0]
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in owned:
                self._handles.append(module.register_forward_hook(_make_hook(weakref.ref(self))))
        self.hooked_params = len(self._handles)
        self._collector = _make_collector(weakref.ref(self))
        layer_inputs.add_collector(self._collector)
        weakref.finalize(self, _remove_all, list(self._handles), self._collector)

    def _capture(self, weight: torch.Tensor, x: torch.Tensor) -> None:
        rec = self._inputs.get(id(weight))
        if rec is None or not torch.is_grad_enabled():
            return
        batch = weight.shape[:-2]
        if tuple(x.shape[:len(batch)]) != tuple(batch) or x.shape[-1] != weight.shape[-1]:
            raise ValueError(
                f"DGD: inputs reported for '{self._names.get(id(weight), '?')}' {tuple(weight.shape)} have shape "
                f"{tuple(x.shape)}; a weight [*batch, out, in] takes inputs [*batch, ..., in] "
                f"(nlbench/models/inputs.py)."
            )
        x = x.detach().reshape(*batch, -1, x.shape[-1]).to(weight.dtype)
        if self.defaults["normalize_inputs"]:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        S = x.mT @ x / x.shape[-2]
        rec[0] = S if rec[0] is None else rec[0] + S
        rec[1] += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            eta = group["lr"]
            eta_p = eta / (1.0 + eta)
            for p in group["params"]:
                if p.grad is None:
                    continue
                rec = self._inputs.get(id(p))
                if rec is not None:
                    if rec[1] == 0:
                        raise RuntimeError(
                            f"DGD: weight '{self._names.get(id(p), '?')}' {tuple(p.shape)} has a gradient but "
                            f"received no layer input since its last step, so its DGD step would be plain SGD. "
                            f"Apply it as an nn.Linear module call or report its inputs with "
                            f"nlbench.models.inputs.report_input where the model applies it."
                        )
                    decay = p @ rec[0]                   # W XᵀX / n (per slice), from the pre-step W
                    p.sub_(decay, alpha=eta_p)
                    rec[0], rec[1] = None, 0
                p.sub_(p.grad, alpha=eta_p)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        super().zero_grad(set_to_none=set_to_none)
        for rec in self._inputs.values():
            rec[0], rec[1] = None, 0

    def state_dict(self):
        sd = super().state_dict()
        # Pending inputs (mid gradient-accumulation) are part of the optimizer's state: a
        # resumed run must see the same XᵀX. Indexed like torch's own state: position in groups.
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        sd["dgd_inputs"] = {index[k]: (None if S is None else S.clone(), n)
                            for k, (S, n) in self._inputs.items() if n > 0}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        pending = state_dict.pop("dgd_inputs", {})
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for rec in self._inputs.values():
            rec[0], rec[1] = None, 0
        for i, (S, n) in pending.items():
            p = params[int(i)]
            if id(p) not in self._inputs:
                raise ValueError(f"DGD.load_state_dict: saved inputs for param {i}, which is not a matrix DGD owns here.")
            self._inputs[id(p)] = [S.to(device=p.device, dtype=p.dtype), int(n)]

    def close(self) -> None:
        """Remove the forward hooks and the report collector (no more inputs reach this optimizer)."""
        _remove_all(self._handles, self._collector)
        self._handles = []


def _make_hook(opt_ref):
    # A weak reference so that the hook does not keep a dropped optimizer alive; the finalizer
    # then removes the hooks.
    def hook(module, inputs, output):  # noqa: ARG001
        opt = opt_ref()
        if opt is not None:
            opt._capture(module.weight, inputs[0])
    return hook


def _make_collector(opt_ref):
    def collect(weight, x):
        opt = opt_ref()
        if opt is not None:
            opt._capture(weight, x)
    return collect


def _remove_all(handles, collector=None) -> None:
    for h in handles:
        h.remove()
    if collector is not None:
        layer_inputs.remove_collector(collector)
