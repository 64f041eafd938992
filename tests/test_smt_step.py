"""Hope's stacked chunk step with a hand-written backward pass (`models/smt_step.fused_chunk_step`)
against its reference, `stacked_chunk_step` with the DGD chunk in autograd's graph: outputs, the
guard's new vector, and the gradients of every input (both weight stacks, the memories' inputs z,
q, the gate biases), float64; with the guard off, inactive and active, v normalized or not,
the normalized or the literal step; and on a whole Hope model (every parameter's gradient)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from nlbench.models import build_model
from nlbench.models.self_modifying_titans import GUARD, stacked_chunk_step, top_direction
from nlbench.models.smt_step import fused_chunk_step

DT = torch.float64


def _inputs(B=2, H=3, L=5, d=4, h=6, w1_scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    w2, w1 = rnd(5, B, H, h, d), w1_scale * rnd(5, B, H, d, h)
    zc, qc = F.normalize(rnd(4, B, H, L, d), dim=-1), F.normalize(rnd(B, H, L, d), dim=-1)
    b_eta, b_alpha = 0.5 * rnd(H) - 1.0, 0.5 * rnd(H) + 3.0
    return [w2, w1, zc, qc, b_eta, b_alpha]


def _run(step, leaves, guard_on, **kw):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    w2, w1, zc, qc, b_eta, b_alpha = leaves
    u = top_direction(w1.detach()) if guard_on else None
    y, new, u_new = step([w2, w1], u, zc, qc, b_eta, b_alpha, **kw)
    outs = [y, *new]
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=DT)).sum() for o in outs)
    return outs, u_new, torch.autograd.grad(loss, leaves)


def _assert_matches(leaves, guard_on, normalize_v, normalized_step):
    kw = dict(normalize_v=normalize_v, normalized_step=normalized_step)
    out_r, u_r, g_r = _run(stacked_chunk_step, leaves, guard_on, **kw)
    out_f, u_f, g_f = _run(fused_chunk_step, leaves, guard_on, guard=GUARD, **kw)
    for a, b in zip(out_r, out_f):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    if guard_on:
        torch.testing.assert_close(u_f, u_r, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(["w2", "w1", "z", "q", "b_eta", "b_alpha"], g_r, g_f):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=lambda s, n=name: f"grad {n}: {s}")


@pytest.mark.parametrize("guard_on,normalize_v,normalized_step", list(itertools.product([True, False], repeat=3)))
def test_fused_step_matches_the_autograd_step(guard_on, normalize_v, normalized_step):
    _assert_matches(_inputs(), guard_on, normalize_v, normalized_step)


def test_fused_step_matches_with_the_guard_capping_eta():
    """A large W1 makes GUARD / λ smaller than η: the cap is what the chunk sees."""
    leaves = _inputs(w1_scale=3.0)
    w1 = leaves[1]
    lam = (w1 * top_direction(w1).unsqueeze(-2)).sum(-1).square().sum(-1)
    assert (GUARD / lam < 0.2).all()  # η ≈ sigmoid(−1) ≈ 0.27: every memory capped
    _assert_matches(leaves, True, True, True)


def test_hope_fused_step_matches_the_autograd_step_on_the_whole_model(monkeypatch):
    import nlbench.models.self_modifying_titans as smt

    calls = []
    monkeypatch.setattr(smt, "fused_chunk_step", lambda *a, **k: calls.append(1) or fused_chunk_step(*a, **k))
    torch.manual_seed(0)
    model = build_model("hope", size="tiny", vocab_size=32).double()
    x = torch.randint(0, 32, (3, 40))

    def grads(fused):
        for b in model.blocks:
            b.mixer.fused_step = fused
        model.zero_grad()
        logits = model(x).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l_r, g_r), (l_f, g_f) = grads(False), grads(True)
    assert len(calls) == 2 * 3  # 2 layers × 3 chunks of 16 (40 tokens), only with fused_step
    torch.testing.assert_close(l_f, l_r, rtol=1e-12, atol=1e-12)
    assert g_r.keys() == g_f.keys() and len(g_r) > 20
    for n in g_r:
        torch.testing.assert_close(g_f[n], g_r[n], rtol=1e-9, atol=1e-11, msg=lambda s, n=n: f"grad {n}: {s}")
