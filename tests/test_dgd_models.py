"""DGD on the real models: every DGD-routed weight sees the inputs it was applied to, however it
is applied (module call, `F.linear`, functional fast weights, conv kernels, per-head memory
states), so its update has the input term W XᵀX/n (docs/ALGORITHMS.md §2); a routed weight that
got no input is an error, never a silent SGD step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nlbench.models import MODELS, build_model
from nlbench.models import self_modifying_titans as smt_mod
from nlbench.models.inputs import report_input
from nlbench.optim import build_optimizer

torch.set_num_threads(1)

VARIANTS = [(m, {}) for m in sorted(MODELS)] + [
    ("hope", {"cms_mode": "in_context"}),
    ("hope", {"cms_mode": "in_context", "cms_objective": "teach", "cms_variant": "nested"}),
]
IDS = [m + "".join({"cms_mode": "-ic", "cms_objective": "-teach", "cms_variant": "-nested"}[k] for k in o)
       for m, o in VARIANTS]
LR = 0.1
ETA_P = LR / (1 + LR)


def _setup(name, options, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, size="tiny", vocab_size=64, **options)
    opt = build_optimizer("dgd", model, lr=LR)
    params = dict(model.named_parameters())
    dgd = [n for n, o in opt.routing if o == "dgd"]
    with torch.no_grad():  # a zero matrix (Titans' gate weights at init) has a zero input term W XᵀX
        for n in dgd:
            if not params[n].any():
                params[n].normal_(0, 0.02)
    return model, opt, params, dgd


def _loss(model, tokens):
    logits = model(tokens).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


@pytest.mark.parametrize("name,options", VARIANTS, ids=IDS)
def test_every_dgd_weight_gets_its_input_term(name, options):
    model, opt, params, dgd = _setup(name, options)
    assert dgd, name
    gen, checked = torch.Generator().manual_seed(1), set()
    for _ in range(max(opt.periods)):  # slow CMS levels step every C steps, with C steps' inputs
        due = {id(p) for p in opt.due_params()}
        opt.zero_grad()
        _loss(model, torch.randint(0, 64, (2, 24), generator=gen)).backward()
        step = [n for n in dgd if id(params[n]) in due and params[n].grad is not None]
        before = {n: params[n].detach().clone() for n in step}
        grads = {n: params[n].grad.detach().clone() for n in step}
        opt.step()
        for n in step:
            delta = (params[n].detach() - before[n]).flatten().double()
            g = grads[n].flatten().double()
            residual = delta - (delta @ g) / (g @ g).clamp_min(1e-300) * g   # the part not along the gradient
            assert residual.norm() > 1e-3 * delta.norm() > 0, f"{name}: {n} took a step along its gradient only"
            checked.add(n)
    assert checked == set(dgd), sorted(set(dgd) - checked)
    opt.close()


def test_hope_layer_matches_the_dgd_formula_by_hand():
    """W_q (applied through F.linear) and a per-head memory state [H, out, in] (applied inside the
    memory kernel) against W ← W − η′ W X̂ᵀX̂/n − η′ ∇W, X̂ their own unit-normalized input rows."""
    model, opt, params, _ = _setup("hope", {})
    smt = model.blocks[0].mixer
    seen = {}
    hook = model.blocks[0].norm.register_forward_hook(lambda m, i, o: seen.setdefault("x", o.detach()))
    tokens = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(2))
    opt.zero_grad()
    _loss(model, tokens).backward()
    hook.remove()
    x = seen["x"]
    B, T, D = x.shape
    zeros = x.new_zeros(B, 3, D)
    z, q, _, _ = smt_mod.layer_inputs(x, zeros, zeros, smt.conv_x.weight, smt.w_q.weight, smt.conv_q.conv.weight,
                                      smt.n_heads, smt.normalize_inputs)

    def gram(rows):  # rows [..., n, in] -> X̂ᵀX̂ / n
        rows = F.normalize(rows.double(), dim=-1)
        return rows.mT @ rows / rows.shape[-2]

    cases = {
        "w_q.weight": (smt.w_q.weight, gram(x.reshape(-1, D))),
        "mem0.k_w2": (smt.mem0["k_w2"], gram(z[0].transpose(0, 1).reshape(smt.n_heads, -1, smt.head_dim))),
        "mem0.mem_w2": (smt.mem0["mem_w2"], gram(q.transpose(0, 1).reshape(smt.n_heads, -1, smt.head_dim))),
    }
    want = {k: w.detach().double() - ETA_P * (w.detach().double() @ S) - ETA_P * w.grad.double()
            for k, (w, S) in cases.items()}
    opt.step()
    for k, (w, _) in cases.items():
        torch.testing.assert_close(w.detach().double(), want[k], rtol=1e-5, atol=1e-7, msg=k)
    opt.close()


class Unreported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 4))
        self.b = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        report_input(self.a, x)
        return F.linear(F.linear(x, self.a), self.b)   # b is applied without a report


def test_a_dgd_weight_without_inputs_is_an_error_naming_it():
    model = Unreported()
    opt = build_optimizer("dgd", model, lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(RuntimeError, match=r"DGD: weight 'b' \(4, 4\) has a gradient but received no layer input"):
        opt.step()
    opt.close()


def test_persistent_tokens_go_to_adamw_under_dgd_only():
    model = build_model("titans-mac", "tiny", vocab_size=64)
    assert dict(build_optimizer("dgd", model).routing)["blocks.0.persistent"] == "adamw"
    assert dict(build_optimizer("muon", model).routing)["blocks.0.persistent"] == "muon"


def test_no_reports_are_collected_without_dgd_or_without_grad():
    from nlbench.models import inputs

    model = build_model("hope", "tiny", vocab_size=64)
    opt = build_optimizer("dgd", model, lr=0.1)
    assert inputs.collecting()
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 8)))
    dgd = opt.optimizers["period1/main"][1]
    assert all(n == 0 for _, n in dgd._inputs.values())
    opt.close()
    assert not inputs.collecting()
