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

How the inputs reach the optimizer: a forward hook on every nn.Linear whose weight DGD owns
adds S += X̂ᵀX̂ / n over the n rows of that call's input (all leading dims flattened), so memory
is in × in per layer, not per token. Rows are normalized, x̂ = x / max(‖x‖, 1e-12),
because the derivation assumes ‖x‖ = 1 (`normalize_inputs=False` uses raw x). Only forwards run
with autograd enabled are captured (evaluation under torch.no_grad does not leak into the next
step). The statistics are cleared when the weight is stepped or its gradient is zeroed via
`zero_grad`, so gradient accumulation over several forwards sees all of their inputs.

Parameters that are not the weight of a hooked nn.Linear (biases, norm gains, embeddings,
free-standing nn.Parameters) have no layer input; they fall back to plain SGD with the same
step η′ (the DGD rule with X = 0). A Linear weight whose layer ran no gradient-enabled forward
since its last step gets the SGD step too. A weight shared by several Linears pools their inputs.

Call `close()` (or drop the optimizer) to remove the hooks.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

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
        self._inputs: dict[int, list] = {}     # id(weight) -> [S = Σ XᵀX/n (in × in), calls]
        self._handles = []
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) in owned:
                self._inputs.setdefault(id(module.weight), [None, 0])
                self._handles.append(module.register_forward_hook(_make_hook(weakref.ref(self))))
        self.hooked_params = len(self._inputs)
        weakref.finalize(self, _remove_all, list(self._handles))

    def _capture(self, module: nn.Linear, x: torch.Tensor) -> None:
        if not torch.is_grad_enabled():
            return
        x = x.detach().reshape(-1, x.shape[-1]).to(module.weight.dtype)
        if self.defaults["normalize_inputs"]:
            x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        rec = self._inputs[id(module.weight)]
        S = x.T @ x / x.shape[0]
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
                if rec is not None and rec[1] > 0:
                    decay = p @ rec[0]                   # W XᵀX / n, from the pre-step W
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
                raise ValueError(f"DGD.load_state_dict: saved inputs for param {i}, which is not a hooked Linear weight here.")
            self._inputs[id(p)] = [S.to(device=p.device, dtype=p.dtype), int(n)]

    def close(self) -> None:
        """Remove the forward hooks (the model no longer reports inputs to this optimizer)."""
        _remove_all(self._handles)
        self._handles = []


def _make_hook(opt_ref):
    # A weak reference so that the hook does not keep a dropped optimizer alive; the finalizer
    # then removes the hooks.
    def hook(module, inputs, output):  # noqa: ARG001
        opt = opt_ref()
        if opt is not None:
            opt._capture(module, inputs[0])
    return hook


def _remove_all(handles) -> None:
    for h in handles:
        h.remove()
