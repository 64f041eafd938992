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


def test_equal_periods_are_the_all_fast_control():
    from nlbench.models import build_model

    for mode in ("optimizer", "in_context"):
        m = build_model("hope", size="tiny", vocab_size=16, cms_mode=mode, cms_periods=[1, 1, 1])
        assert [lvl.step_period for lvl in m.blocks[0].cms.levels] == [1, 1, 1]
        m(torch.randint(0, 16, (2, 8)))


def test_scaled_lr_mode_in_context_is_period_one_at_lr_over_c():
    """`lr_mode="scaled"`: a period-4 level moves every token with the step a period-1 level
    would take at lr/4 (η = lr/(C·d) as for period 4), so it equals that level exactly."""
    torch.manual_seed(0)
    scaled = CMSLevel(6, 8, 4, "in_context", lr=0.5, lr_mode="scaled")
    plain = CMSLevel(6, 8, 1, "in_context", lr=0.5 / 4)
    plain.load_state_dict(scaled.state_dict())
    torch.testing.assert_close(scaled.lr, torch.tensor(0.5 / (4 * 6)))
    x = torch.randn(2, 7, 6)
    (o1, s1), (o2, s2) = scaled(x, scaled.init_state(2)), plain(x, plain.init_state(2))
    torch.testing.assert_close(o1, o2)
    for a, b in zip(s1["w"], s2["w"]):
        torch.testing.assert_close(a, b)
    assert int(s1["count"]) == 0 and any((a - w).abs().max() > 0 for a, w in zip(s1["w"], scaled.init_state(2)["w"]))


def test_scaled_lr_mode_optimizer_steps_every_level_every_step_at_lr_over_c():
    from nlbench.models import build_model
    from nlbench.optim import build_optimizer

    lr = 1e-2
    for lr_mode in ("period", "scaled"):
        torch.manual_seed(0)
        m = build_model("hope-attention", size="tiny", vocab_size=16, cms_periods=[1, 4, 16], cms_lr_mode=lr_mode)
        opt = build_optimizer("adamw", m, lr=lr)
        levels = m.blocks[0].cms.levels
        slow = levels[2].mlp.w_up.weight
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        before = slow.detach().clone()
        m(torch.randint(0, 16, (2, 8))).logits.square().mean().backward()
        opt.step()
        moved = (slow - before).abs().max().item()
        if lr_mode == "period":
            assert [lvl.nlbench_update_period for lvl in levels] == [1, 4, 16] and moved == 0
            assert lrs[id(slow)] == lr
        else:
            assert [lvl.nlbench_update_period for lvl in levels] == [1, 1, 1] and moved > 0
            assert [lrs[id(lvl.mlp.w_up.weight)] for lvl in levels] == [lr, lr / 4, lr / 16]
            # AdamW's first step moves each entry by ≈ lr: the slow level by ≈ lr/16
            assert moved == pytest.approx(lr / 16, rel=0.01)
