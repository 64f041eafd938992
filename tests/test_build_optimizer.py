"""build_optimizer: routing to AdamW, CMS optimizer-mode cadence (spec §4), checkpoint resume."""

import io

import pytest
import torch
from torch import nn

from nlbench.models.layers import RMSNorm
from nlbench.models.inputs import report_conv_input, report_input
from nlbench.optim import DGD, M3, OPTIMIZERS, Muon, NestedOptimizer, build_optimizer

torch.set_num_threads(1)


class TwoLevels(nn.Module):
    def __init__(self):
        super().__init__()
        self.fast = nn.Linear(3, 3, bias=False)
        self.slow = nn.Linear(3, 3, bias=False)
        self.fast.nlbench_update_period = 1
        self.slow.nlbench_update_period = 4


def test_slow_level_steps_every_4_with_the_sum_of_its_gradients():
    torch.manual_seed(0)
    model, lr = TwoLevels(), 0.1
    opt = NestedOptimizer(model, lambda n, p: "main", {"main": lambda ps: torch.optim.SGD(ps, lr=lr)})
    gen = torch.Generator().manual_seed(1)
    cs = [torch.randn(3, 3, generator=gen) for _ in range(12)]
    ds = [torch.randn(3, 3, generator=gen) for _ in range(12)]
    fast_prev, slow_prev = model.fast.weight.detach().clone(), model.slow.weight.detach().clone()
    slow_since = torch.zeros(3, 3)
    for i in range(1, 13):
        opt.zero_grad()
        # loss whose gradients are exactly c_i (fast) and d_i (slow)
        ((model.fast.weight * cs[i - 1]).sum() + (model.slow.weight * ds[i - 1]).sum()).backward()
        opt.step()
        slow_since += ds[i - 1]
        fast, slow = model.fast.weight.detach().clone(), model.slow.weight.detach().clone()
        torch.testing.assert_close(fast, fast_prev - lr * cs[i - 1])          # every step
        if i % 4 == 0:                                                           # steps 4, 8, 12
            torch.testing.assert_close(slow, slow_prev - lr * slow_since)       # Σ of the 4 grads
            slow_since = torch.zeros(3, 3)
        else:
            assert torch.equal(slow, slow_prev), f"slow level moved at step {i}"
        fast_prev, slow_prev = fast, slow


def test_build_optimizer_cadence_with_a_real_rule():
    model = TwoLevels()
    opt = build_optimizer("muon", model, lr=0.02)
    x = torch.randn(5, 3)
    changed = []
    for i in range(1, 9):
        before = model.slow.weight.detach().clone()
        opt.zero_grad()
        model.slow(model.fast(x)).pow(2).sum().backward()
        opt.step()
        changed.append(not torch.equal(before, model.slow.weight))
    assert changed == [i % 4 == 0 for i in range(1, 9)]


def test_periods_validation_and_innermost_mark_wins():
    model = TwoLevels()
    model.nlbench_update_period = 2            # outer mark; the children's own marks win
    opt = build_optimizer("adamw", model)
    assert opt.periods == [1, 4]
    model.slow.nlbench_update_period = 0
    with pytest.raises(ValueError, match=r"module 'slow': nlbench_update_period must be an integer >= 1"):
        build_optimizer("adamw", model)


class Tiny(nn.Module):
    """Embedding + tied head, a norm, a Linear with bias, a conv, a free 2-D parameter."""

    def __init__(self, V=11, d=8):
        super().__init__()
        self.tok_emb = nn.Embedding(V, d)
        self.conv = nn.Conv1d(d, d, 2, groups=d, bias=False)
        self.mem0 = nn.Parameter(0.1 * torch.randn(d, d))     # e.g. a meta-learned memory state
        self.block = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d, bias=False))
        self.block.nlbench_update_period = 3
        self.norm = RMSNorm(d)
        self.lm_head = nn.Linear(d, V, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, tokens):
        x = self.tok_emb(tokens)
        # the conv and the free matrix are applied functionally: they report their inputs (DGD)
        report_conv_input(self.conv.weight, x, x.new_zeros(x.shape[0], 1, x.shape[-1]))
        x = x + self.conv(nn.functional.pad(x.transpose(1, 2), (1, 0))).transpose(1, 2)
        report_input(self.mem0, x)
        x = x + self.block(nn.functional.linear(x, self.mem0))
        return self.lm_head(self.norm(x))


def _inner(opt, cls):
    return {id(p) for _, o in opt.optimizers.values() if isinstance(o, cls) for g in o.param_groups for p in g["params"]}


@pytest.mark.parametrize("name,cls", [("muon", Muon), ("m3", M3), ("dgd", DGD)])
def test_routing(name, cls):
    model = Tiny()
    opt = build_optimizer(name, model)
    main = _inner(opt, cls)
    adamw = _inner(opt, torch.optim.AdamW)
    hidden = {id(model.block[0].weight), id(model.block[2].weight), id(model.mem0)}
    # the depthwise conv kernel [C, 1, K] is a matrix of filters for Muon / M3, C 1 × K matrices for DGD
    conv_to = "main"
    assert main == hidden | ({id(model.conv.weight)} if conv_to == "main" else set())
    assert adamw == {id(model.tok_emb.weight), id(model.block[0].bias), id(model.norm.weight)} | (
        {id(model.conv.weight)} if conv_to == "adamw" else set())
    names = dict(opt.routing)
    assert names["tok_emb.weight"] == "adamw" and names["block.0.weight"] == name
    assert names["conv.weight"] == (name if conv_to == "main" else "adamw")
    assert {k for k in opt.optimizers} == {"period1/main", "period1/adamw", "period3/main", "period3/adamw"}
    opt.close()


def _batches(n, V=11):
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, V, (2, 6), generator=gen) for _ in range(n)]


def _train(model, opt, batches):
    for toks in batches:
        opt.zero_grad()
        logits = model(toks)
        nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), toks[:, 1:].flatten()).backward()
        opt.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_resumes_identically(name):
    hp = dict(slow_every=2) if name == "m3" else {}
    batches = _batches(9)
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer(name, model, **hp)
    _train(model, opt, batches[:4])     # the period-3 level is mid-period after step 4
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, batches[4:])
    opt.close()

    torch.manual_seed(123)
    resumed = Tiny()
    ropt = build_optimizer(name, resumed, **hp)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    resumed.load_state_dict(ckpt["model"])
    ropt.load_state_dict(ckpt["opt"])
    _train(resumed, ropt, batches[4:])
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), f"{name}: {n} differs after resume"
    ropt.close()


def test_hp_and_name_validation():
    model = TwoLevels()
    with pytest.raises(ValueError, match=r"optimizer name must be one of 'adamw', 'muon', 'm3', 'dgd', got 'sgd'"):
        build_optimizer("sgd", model)
    with pytest.raises(ValueError, match=r"optimizer 'muon': unknown hyper-parameter\(s\) 'slow_every'\. Allowed: .*momentum"):
        build_optimizer("muon", model, slow_every=4)
    with pytest.raises(ValueError, match=r"adamw_betas must be two floats"):
        build_optimizer("m3", model, adamw_betas=(0.9,))
    opt = build_optimizer("m3", model, betas=[0.9, 0.9, 0.9], slow_every=4, adamw_lr=3e-4)
    assert all(g["slow_every"] == 4 for g in opt.param_groups if g["nlbench_role"] == "main")
