"""Every matrix on its optimizer: routing on the real models, and batched matrices updated slice
by slice exactly as separate 2-D weights would be.

Before, routing went by `ndim == 2`, so Hope's per-head memory initial states [H, out, in] went
to AdamW whatever optimizer was named: 44–46% of Hope's parameters at `tiny`.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from nlbench.models import MODELS, build_model
from nlbench.optim import M3, Muon, build_optimizer, routing, routing_counts
from nlbench.optim.build import adamw_role_ids

torch.set_num_threads(1)

VARIANTS = [(m, {}) for m in MODELS] + [("hope", {"cms_mode": "in_context"})]


def _model(name, options):
    torch.manual_seed(0)
    return build_model(name, size="tiny", vocab_size=64, **options)


@pytest.mark.parametrize("opt_name", ["muon", "m3"])
@pytest.mark.parametrize("model_name,options", VARIANTS, ids=[f"{m}{'-ic' if o else ''}" for m, o in VARIANTS])
def test_at_least_99_percent_of_matrix_elements_go_to_the_named_optimizer(model_name, options, opt_name):
    model = _model(model_name, options)
    special = adamw_role_ids(model)
    params = dict(model.named_parameters())
    routed = dict(routing(opt_name, model))
    matrix_names = [n for n, p in params.items() if p.ndim >= 2 and id(p) not in special]
    total = sum(params[n].numel() for n in matrix_names)
    on_it = sum(params[n].numel() for n in matrix_names if routed[n] == opt_name)
    assert total > 0 and on_it / total >= 0.99, (
        f"{model_name}: {on_it}/{total} matrix elements on {opt_name}; elsewhere: "
        f"{[n for n in matrix_names if routed[n] != opt_name]}")
    # the embedding / LM head and every vector stay on AdamW
    assert all(routed[n] == "adamw" for n, p in params.items() if p.ndim < 2 or id(p) in special)


@pytest.mark.parametrize("model_name", ["hope", "titans-lmm"])
def test_routing_attribute_and_counts_agree_with_the_inner_optimizers(model_name):
    model = _model(model_name, {})
    opt = build_optimizer("m3", model, lr=1e-3)
    params = dict(model.named_parameters())
    inner = {id(p): type(o).__name__ for _, o in opt.optimizers.values() for g in o.param_groups for p in g["params"]}
    for n, o in opt.routing:
        assert inner[id(params[n])] == {"m3": "M3", "adamw": "AdamW"}[o], n
    counts = routing_counts("m3", model)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["m3"] > 10 * counts["adamw"] or model_name == "titans-lmm"


def _pairs(shape, seed=0):
    """A batched parameter and the same slices as separate 2-D parameters, same gradients."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(5)]
    batched = nn.Parameter(w.clone())
    slices = [nn.Parameter(w[h].clone()) for h in range(shape[0])]
    return batched, slices, grads


@pytest.mark.parametrize("make", [
    lambda ps: Muon(ps, lr=0.05),
    lambda ps: M3(ps, lr=0.01, slow_every=2, rms_normalize=True),
    lambda ps: M3(ps, lr=0.01, slow_every=2, variant="ema"),
], ids=["muon", "m3-rms", "m3-ema"])
@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 6, 4)])
def test_a_batch_of_matrices_is_updated_like_separate_matrices(make, shape):
    batched, slices, grads = _pairs(shape)
    ob, os_ = make([batched]), make(slices)
    for g in grads:
        batched.grad = g.clone()
        for h, p in enumerate(slices):
            p.grad = g[h].clone()
        ob.step()
        os_.step()
    torch.testing.assert_close(batched.detach(), torch.stack([p.detach() for p in slices]), rtol=1e-10, atol=1e-12)


def test_a_depthwise_conv_kernel_is_the_matrix_of_its_filters():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 1, 3, generator=gen, dtype=torch.float64)
    g = torch.randn(6, 1, 3, generator=gen, dtype=torch.float64)
    conv, flat = nn.Parameter(w.clone()), nn.Parameter(w.view(6, 3).clone())
    conv.grad, flat.grad = g.clone(), g.view(6, 3).clone()
    Muon([conv], lr=0.05).step()
    Muon([flat], lr=0.05).step()
    torch.testing.assert_close(conv.detach().view(6, 3), flat.detach(), rtol=1e-12, atol=1e-12)


def test_hope_memory_states_take_an_orthogonalized_step():
    """On the real model: Muon (no momentum) moves each head's memory initial state by
    lr · NS(g) of that head's gradient — not by AdamW's elementwise step."""
    from nlbench.optim import newton_schulz

    model = _model("hope", {})
    opt = build_optimizer("muon", model, lr=0.02, momentum=0.0, nesterov=False)
    name = next(n for n, p in model.named_parameters() if p.ndim == 3 and "mem0" in n)
    p = dict(model.named_parameters())[name]
    before = p.detach().clone()
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    out = model(tokens)
    nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    g = p.grad.detach().clone()
    opt.step()
    want = torch.stack([newton_schulz(g[h]) for h in range(g.shape[0])])
    torch.testing.assert_close((before - p.detach()) / 0.02, want, rtol=1e-4, atol=1e-5)


def test_the_run_record_stores_elements_per_optimizer():
    from nlbench.config import expand_runs, validate_config
    from nlbench.runner import execute_run

    from conftest import tiny_config

    cfg = tiny_config(seeds=(0,), num_tasks=1, tokens_per_task=256, models=("hope",))
    cfg["train"]["optimizer"] = {"name": "m3", "lr": 1e-3}
    spec = expand_runs(validate_config(cfg))[0]
    rec = execute_run(spec, device="cpu")
    assert rec.run["status"] == "completed", rec.run["error"]
    counts = json.loads(rec.run["optimizer_params"])
    assert set(counts) == {"m3", "adamw"} and counts["m3"] > counts["adamw"] > 0
    assert sum(counts.values()) == rec.run["params"]


def test_routing_command_prints_the_table_and_refuses_unknown_names():
    from click.testing import CliRunner

    from nlbench.cli import main

    res = CliRunner().invoke(main, ["routing", "--model", "hope", "--optimizer", "m3"])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "hope" in line and "m3" in line)
    assert "100.0%" in row
    bad = CliRunner().invoke(main, ["routing", "--model", "nope"])
    assert bad.exit_code == 2 and "not a registered model" in bad.output
