"""Hope's stabilisers as options, and `paper_exact: true`: the paper form is
checked against Eq. 83–91 computed token by token here, each stabiliser changes the result,
and the resolved options reach the run record."""

import json

import pytest
import torch
import torch.nn.functional as F

from nlbench.config import expand_runs, validate_config
from nlbench.kernels.dgd import dgd_chunk, dgd_chunk_autograd, dgd_chunk_stacked, dgd_memory_reference
from nlbench.models import ModelConfigError, build_model
from nlbench.models.self_modifying_titans import PAPER_FORM, STABILISERS, SelfModifyingTitans
from nlbench.optim import build_optimizer
from nlbench.runner import execute_run

torch.set_num_threads(1)
MEMS = ("k", "v", "eta", "alpha", "mem")


def _mlp(w2, w1, z):
    return z + F.silu(z @ w2.T) @ w1.T


def _paper_layer(smt, x):
    """Eq. 83–91 with chunks of one token, written out per token and head from the spec: shared
    conv (F.conv1d) and unit-norm memory inputs, no v normalization, no curvature guard, the
    literal step η_t on both matrices; inner gradients by autograd."""
    B, T, D = x.shape
    H, dh = smt.n_heads, smt.head_dim
    z = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), smt.conv_x.weight, groups=D).transpose(1, 2)
    q = F.conv1d(F.pad((x @ smt.w_q.weight.T).transpose(1, 2), (3, 0)), smt.conv_q.conv.weight, groups=D)
    q = q.transpose(1, 2)
    out = torch.zeros(B, T, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            W = {m: [smt.mem0[f"{m}_w2"][h].detach().clone(), smt.mem0[f"{m}_w1"][h].detach().clone()] for m in MEMS}
            for t in range(T):
                zt = F.normalize(z[b, t, h * dh:(h + 1) * dh], dim=-1)
                qt = F.normalize(q[b, t, h * dh:(h + 1) * dh], dim=-1)
                k = F.normalize(_mlp(*W["k"], zt), dim=-1)
                v = _mlp(*W["v"], zt)
                eta = torch.sigmoid(_mlp(*W["eta"], zt).mean() + smt.b_eta[h])
                alpha = torch.sigmoid(_mlp(*W["alpha"], zt).mean() + smt.b_alpha[h])
                out[b, t, h * dh:(h + 1) * dh] = _mlp(*W["mem"], qt)
                for m in MEMS:
                    w2, w1 = (w.clone().requires_grad_(True) for w in W[m])
                    v_hat = _mlp(*W[m], v).detach()
                    g2, g1 = torch.autograd.grad(0.5 * (_mlp(w2, w1, k) - v_hat).square().sum(), [w2, w1])
                    x1 = F.silu(W[m][0] @ k)
                    new = []
                    for w, g, xi in ((W[m][0], g2, k), (W[m][1], g1, x1)):
                        eye = torch.eye(w.shape[1], dtype=w.dtype)
                        new.append(w @ (alpha * eye - eta * torch.outer(xi, xi)) - eta * g)
                    W[m] = new
    return out @ smt.w_o.weight.T


def _smt(**kw):
    torch.manual_seed(0)
    opts = {**PAPER_FORM, "w2_init_std": 1.0, **kw}
    smt = SelfModifyingTitans(8, 2, mem_hidden=8, chunk_size=1, mem_chunk_size=1, eta_init=0.7, **opts).double()
    with torch.no_grad():  # a large W1: the guard would cap η, and ‖σ(W2 k)‖² > 1
        for m in MEMS:
            smt.mem0[f"{m}_w1"].normal_(0, 0.5)
    return smt


def test_paper_form_is_eq_83_to_91_token_by_token():
    smt = _smt()
    assert smt.conv_x.weight.shape[0] == 8 and not smt.curvature_guard  # one shared conv, no guard
    torch.manual_seed(1)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    want = _paper_layer(smt, x)
    for kernel in ("reference", "chunked"):
        smt.memory_kernel = kernel
        got, state = smt(x, smt.init_state(1))
        assert "guard" not in state
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("switch", ["curvature_guard", "normalize_v", "normalized_step", "normalize_inputs"])
def test_each_stabiliser_changes_the_paper_form(switch):
    paper = _smt()
    torch.manual_seed(1)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    want = _paper_layer(paper, x)
    stab = _smt(**{switch: not PAPER_FORM[switch]})
    stab.load_state_dict(paper.state_dict())
    got, _ = stab(x, stab.init_state(1))
    assert not torch.allclose(got, want, rtol=1e-6, atol=1e-6)


def test_separate_convs_give_each_projection_memory_its_own_input():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8)
    for separate in (True, False):
        smt = SelfModifyingTitans(8, 2, separate_convs=separate, normalize_inputs=False)
        z, _ = smt.memory_inputs(x, torch.zeros(2, 3, 8))
        assert z.shape == (4, 2, 2, 6, 4)
        same = all(torch.equal(z[0], z[i]) for i in range(1, 4))
        assert same != separate
        if not separate:
            ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), smt.conv_x.weight, groups=8).transpose(1, 2)
            torch.testing.assert_close(z[0], ref.view(2, 6, 2, 4).transpose(1, 2))


def test_w2_init_std_null_is_the_fan_in_init():
    torch.manual_seed(0)
    smt = SelfModifyingTitans(64, 1, w2_init_std=None)
    assert abs(smt.mem0["k_w2"].std().item() - 64 ** -0.5) < 0.01
    smt = SelfModifyingTitans(64, 1)
    assert abs(smt.mem0["k_w2"].std().item() - STABILISERS["w2_init_std"]) < 0.05


@pytest.mark.parametrize("kernel", [dgd_chunk, dgd_chunk_autograd, dgd_chunk_stacked])
def test_literal_step_chunk_kernels_equal_the_reference(kernel):
    """normalized_step=False in every chunked form equals the per-token reference, values and
    gradients (float64), on inputs where σ(W2 k) has ‖·‖² > 1 so the two steps differ."""
    torch.manual_seed(0)
    B, H, L, d = 2, 2, 6, 4
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64) for _ in range(3))
    k = F.normalize(k, dim=-1)
    eta, alpha = torch.rand(B, H, L, dtype=torch.float64) * 0.5, 0.9 + 0.1 * torch.rand(B, H, L, dtype=torch.float64)
    w = [torch.randn(B, H, d, d, dtype=torch.float64) * 2, torch.randn(B, H, d, d, dtype=torch.float64) * 0.5]
    leaves = [q, k, v, eta, alpha, *w]
    results = []
    for fn in (lambda *a: dgd_memory_reference(*a[:6], L, normalized_step=False),
               lambda *a: kernel(*a, normalized_step=False)):
        ins = [t.clone().requires_grad_(True) for t in leaves]
        y, new = fn(ins[5:], *ins[:5])
        loss = y.square().sum() + sum(n.square().sum() for n in new)
        results.append((y, new, torch.autograd.grad(loss, ins)))
    (y0, n0, g0), (y1, n1, g1) = results
    for a, b in zip([y1, *n1, *g1], [y0, *n0, *g0]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    assert (F.silu(k @ w[0].transpose(-1, -2))).square().sum(-1).max() > 1  # the normalized step differs here
    y_norm, _ = dgd_memory_reference(w, q, k, v, eta, alpha, L)
    assert (y_norm - y0).abs().max() > 1e-6


def test_paper_exact_sets_every_stabiliser_and_explicit_options_win():
    m = build_model("hope", size="tiny", vocab_size=16, paper_exact=True)
    assert {k: m.options[k] for k in STABILISERS} == PAPER_FORM and m.options["paper_exact"] is True
    smt = m.blocks[0].mixer
    assert not smt.curvature_guard and not smt.normalize_v and not smt.normalized_step
    assert smt.normalize_inputs and smt.conv_x.weight.shape[0] == 64
    m = build_model("hope", size="tiny", vocab_size=16, paper_exact=True, curvature_guard=True)
    assert m.options["curvature_guard"] is True and m.blocks[0].mixer.curvature_guard
    m = build_model("hope", size="tiny", vocab_size=16)
    assert {k: m.options[k] for k in STABILISERS} == STABILISERS and m.options["paper_exact"] is False
    a = build_model("hope-attention", size="tiny", vocab_size=16, paper_exact=True)
    assert a.options["paper_exact"] is True and "curvature_guard" not in a.options


@pytest.mark.parametrize("opts, field", [
    (dict(paper_exact="yes"), "paper_exact"),
    (dict(normalize_v=1), "normalize_v"),
    (dict(w2_init_std=0), "w2_init_std"),
    (dict(w2_init_std="big"), "w2_init_std"),
    (dict(cms_lr_mode="fast"), "cms_lr_mode"),
])
def test_bad_stabiliser_options_raise_clear_errors(opts, field):
    with pytest.raises(ModelConfigError, match=field):
        build_model("hope", size="tiny", vocab_size=16, **opts)
    with pytest.raises(ModelConfigError, match="curvature_guard"):
        build_model("hope-attention", size="tiny", vocab_size=16, curvature_guard=False)


@pytest.mark.parametrize("name", ["hope", "hope-attention"])
def test_paper_exact_trains(name):
    """The paper form at the shipped chunk sizes: finite over a 256-token sequence from init
    (the fully literal form with unnormalized memory inputs is not), and a copy task's loss
    falls in 10 Muon steps."""
    torch.manual_seed(0)
    m = build_model(name, size="tiny", vocab_size=16, paper_exact=True)
    with torch.no_grad():
        assert torch.isfinite(m(torch.randint(0, 16, (2, 256))).logits).all()
    opt = build_optimizer("muon", m, lr=0.02, adamw_lr=3e-3)
    seq = torch.randint(0, 16, (4, 32))
    tokens = torch.cat([seq, seq], dim=1)  # second half copies the first
    losses = []
    for _ in range(10):
        logits = m(tokens[:, :-1]).logits
        loss = F.cross_entropy(logits[:, 32:].reshape(-1, 16), tokens[:, 33:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1, losses


def test_run_record_stores_resolved_model_options():
    raw = dict(
        models=[dict(name="hope", size="tiny", options=dict(paper_exact=True, chunk_size=8, mem_chunk_size=8))],
        streams=[dict(name="markov-languages", num_tasks=2, seq_len=16,
                      options=dict(vocab_size=16, order=1, branching=2, eval_size=8))],
        seeds=[1], protocol="finetune", strategy="naive",
        train=dict(tokens_per_task=16 * 4, batch_size=4, device="cpu", optimizer=dict(name="muon", lr=0.02)),
        eval=dict(max_sequences=8, batch_size=8),
    )
    rec = execute_run(expand_runs(validate_config(raw))[0], device="cpu", threads=1)
    assert rec.run["status"] == "completed", rec.run["error"]
    opts = json.loads(rec.run["model_options"])
    assert opts["paper_exact"] is True and opts["chunk_size"] == 8
    assert {k: opts[k] for k in STABILISERS} == PAPER_FORM
