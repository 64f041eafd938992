"""Continuum Memory System (spec §4): cadence, summed updates, chunked = reference, wiring."""

import pytest
import torch

from nlbench.models.cms import CMS, CMSLevel, cms_level_chunked, cms_level_reference, swiglu_apply

torch.set_num_threads(1)


def _level(period, d=6, h=8, B=2, seed=0):
    torch.manual_seed(seed)
    lvl = CMSLevel(d, h, period, "in_context", lr=0.5)
    for p in lvl.mlp.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    return lvl, lvl.init_state(B)


def _block_grad(w, x_prev, x_next):
    """Σ_t ∇_w ½‖SwiGLU_w(x_{t-1}) − sg(x_t)‖² by autograd (independent of the closed form)."""
    w = [p.detach().clone().requires_grad_(True) for p in w]
    loss = 0.5 * ((swiglu_apply(w, x_prev) - x_next) ** 2).sum()
    return torch.autograd.grad(loss, w)


@pytest.mark.parametrize("period", [1, 3, 4])
def test_chunked_matches_reference_forward_and_grads(period):
    T = 10
    for count0 in (0, period - 1):  # fresh, and a state in the middle of a block
        results = []
        for fn in (cms_level_reference, cms_level_chunked):
            lvl, state = _level(period)
            torch.manual_seed(1)
            x = torch.randn(2, T, 6, requires_grad=True)
            state = {**state, "count": torch.tensor(count0), "prev": torch.randn(2, 6)}
            out, new = fn(state, x, period, lvl.lr)
            loss = (out ** 2).sum() + sum((w ** 2).sum() for w in new["w"]) + sum(a.sum() for a in new["acc"])
            leaves = [x, *lvl.mlp.parameters(), lvl.lr_param]
            results.append((out.detach(), [w.detach() for w in new["w"]], int(new["count"]),
                            torch.autograd.grad(loss, leaves)))
        (o0, w0, c0, g0), (o1, w1, c1, g1) = results
        assert c0 == c1 == (count0 + T) % period
        torch.testing.assert_close(o1, o0, atol=1e-4, rtol=1e-4)
        for a, b in zip(w1 + list(g1), w0 + list(g0)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_level_changes_only_at_its_period_by_the_summed_update():
    period, T = 4, 11
    lvl, state = _level(period)
    x = torch.randn(2, T, 6)
    lr = lvl.lr.detach()
    w_block, xs = [w.detach() for w in state["w"]], [torch.zeros(2, 6)]
    for t in range(T):  # one token per call: the state carries the counter and the gradient sum
        w_before = [w.detach() for w in state["w"]]
        out, state = cms_level_chunked(state, x[:, t : t + 1], period, lr)
        torch.testing.assert_close(out, swiglu_apply(w_block, x[:, t : t + 1]))  # causal: θ_b
        xs.append(x[:, t])
        changed = any((a.detach() - b).abs().max() > 0 for a, b in zip(state["w"], w_before))
        assert changed == ((t + 1) % period == 0), t
        if changed:
            prev = torch.stack(xs[-period - 1 : -1], dim=1)
            nxt = torch.stack(xs[-period:], dim=1)
            g = _block_grad(w_block, prev, nxt)
            for a, b, gg in zip(state["w"], w_block, g):
                torch.testing.assert_close(a.detach(), b - lr * gg, atol=1e-5, rtol=1e-5)
            w_block = [w.detach() for w in state["w"]]


def test_state_carried_mid_block_equals_one_call():
    lvl, state = _level(4)
    x = torch.randn(2, 13, 6)
    out, full = cms_level_chunked(state, x, 4, lvl.lr)
    o1, s1 = cms_level_chunked(state, x[:, :6], 4, lvl.lr)
    o2, s2 = cms_level_chunked(s1, x[:, 6:], 4, lvl.lr)
    torch.testing.assert_close(torch.cat([o1, o2], 1), out)
    for a, b in zip(s2["w"], full["w"]):
        torch.testing.assert_close(a, b)


def test_optimizer_mode_marks_update_periods():
    cms = CMS(8, 16, [1, 4, 16], mode="optimizer")
    assert [lvl.nlbench_update_period for lvl in cms.levels] == [1, 4, 16]
    assert cms.init_state(2) is None
    ic = CMS(8, 16, [1, 4, 16], mode="in_context")
    assert not any(hasattr(m, "nlbench_update_period") for m in ic.modules())


@pytest.mark.parametrize("mode", ["optimizer", "in_context"])
def test_sequential_and_independent_wiring(mode):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for variant in ("sequential", "independent"):
        cms = CMS(8, 16, [8, 16], mode=mode, variant=variant)
        y, _ = cms(x)
        l1, l2 = cms.levels  # at T < period both levels read their initial weights
        if variant == "sequential":
            h = x + l1.mlp(l1.norm(x))
            want = h + l2.mlp(l2.norm(h))
        else:
            want = x + l1.mlp(l1.norm(x)) + l2.mlp(l2.norm(x))
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)


def test_bad_mode_and_period_raise():
    with pytest.raises(ValueError, match="cms_mode"):
        CMS(8, 16, [1, 2], mode="tokens")
    with pytest.raises(ValueError, match="cms_variant"):
        CMS(8, 16, [1, 2], variant="nested-ish")
    with pytest.raises(ValueError, match="period"):
        CMSLevel(8, 16, 0, "in_context", 0.1)
