"""CMS controls of spec §4 on the real Hope model: the teach-signal objective of in-context CMS
(`cms_objective: teach`) and the nested variant (`cms_variant: nested`)."""

import pytest
import torch
import torch.nn.functional as F

from nlbench.models import ModelConfigError, build_model
from nlbench.models.cms import CMS, CMSLevel, cms_level_chunked, cms_level_reference, swiglu_grads
from nlbench.models.hope import build_hope

torch.set_num_threads(1)
V = 32
SMALL = dict(d_model=16, n_layers=2, n_heads=2)


def _hope(**kw):
    torch.manual_seed(0)
    return build_hope(vocab_size=V, **SMALL, chunk_size=4, mem_chunk_size=2, cms_mode="in_context", **kw)


# --- teach signal -------------------------------------------------------------------------------

def test_teach_update_is_the_gradient_of_the_segments_next_token_loss():
    """After one segment every level's fast weights moved by −η ∂L/∂θ, L the summed next-token
    cross-entropy of the segment's tokens (labels: the tokens after them, the last one the next
    segment's first token); a level whose block is not complete holds that gradient in `acc`."""
    teach = _hope(cms_objective="teach", cms_periods=[4, 4, 8])
    plain = _hope(cms_periods=[4, 4, 8])
    plain.load_state_dict(teach.state_dict())
    tok = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    out = teach(tok)  # segment = tokens 0..3 (labels 1..4), then token 4 alone (no label)

    state, leaves = plain.init_state(2), []
    for layer in state:
        for lvl in layer["cms"]:
            lvl["w"] = [w.detach().clone().requires_grad_(True) for w in lvl["w"]]
            leaves += lvl["w"]
    logits = plain(tok[:, :4], state=state).logits  # tokens 0..3 read θ_0 under either objective
    torch.testing.assert_close(out.logits[:, :4], logits, atol=1e-5, rtol=1e-5)
    loss = F.cross_entropy(logits.reshape(-1, V), tok[:, 1:5].reshape(-1), reduction="sum")
    grads = iter(torch.autograd.grad(loss, leaves))

    for block, layer in zip(teach.blocks, out.state):
        for lvl, s in zip(block.cms.levels, layer["cms"]):
            g = [next(grads) for _ in range(3)]
            w0 = [w.detach() for w in lvl.init_state(2)["w"]]
            lr = lvl.lr.detach()
            assert all(gg.abs().max() > 0 for gg in g)
            if lvl.period == 4:  # block complete after the segment: updated; token 4 adds δ = 0
                assert int(s["count"]) == 1
                for a, b, gg in zip(s["w"], w0, g):
                    torch.testing.assert_close(a.detach(), b - lr * gg, atol=1e-5, rtol=1e-4)
                assert all(a.abs().max() == 0 for a in s["acc"])
            else:  # period 8: still summing
                assert int(s["count"]) == 5
                for a, b in zip(s["w"], w0):
                    torch.testing.assert_close(a.detach(), b)
                for a, gg in zip(s["acc"], g):
                    torch.testing.assert_close(a.detach(), gg, atol=1e-5, rtol=1e-4)


def test_teach_is_causal_over_many_segments_and_same_with_or_without_grad():
    m = _hope(cms_objective="teach", cms_periods=[2, 4, 8]).eval()
    tok = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    t = 9
    tok2 = tok.clone()
    tok2[:, t] = (tok2[:, t] + 1) % V
    with torch.no_grad():
        a, b = m(tok), m(tok2)
    torch.testing.assert_close(a.logits[:, :t], b.logits[:, :t])
    assert (a.logits[:, t:] - b.logits[:, t:]).abs().max() > 1e-6
    trained = m(tok)  # autograd on: the same values, and the graph reaches the outer parameters
    torch.testing.assert_close(trained.logits.detach(), a.logits)
    for s1, s0 in zip(trained.state, a.state):
        for l1, l0 in zip(s1["cms"], s0["cms"]):
            for x1, x0 in zip(l1["w"], l0["w"]):
                torch.testing.assert_close(x1.detach(), x0)
    trained.logits.logsumexp(-1).mean().backward()
    for lvl in m.blocks[0].cms.levels:
        assert lvl.lr_param.grad is not None and lvl.lr_param.grad.abs() > 0
        assert lvl.mlp.w_down.weight.grad.abs().max() > 0


def test_teach_options_are_checked():
    with pytest.raises(ModelConfigError, match="cms_objective"):
        build_model("hope", size="tiny", vocab_size=V, cms_objective="teach")  # optimizer mode
    with pytest.raises(ModelConfigError, match="cms_objective"):
        build_model("hope", size="tiny", vocab_size=V, cms_mode="in_context", cms_objective="grad")
    with pytest.raises(ModelConfigError, match="cms_objective"):
        build_model("hope-attention", size="tiny", vocab_size=V, cms_mode="in_context", cms_objective="teach")
    m = build_model("hope", size="tiny", vocab_size=V, cms_mode="in_context", cms_objective="teach")
    assert m.options["cms_objective"] == "teach" and m.blocks[0].cms.teach_period == 4


# --- nested variant -----------------------------------------------------------------------------

def test_nested_level_reinitializes_from_phi_at_the_slower_block_end():
    """Level ℓ re-initializes from φ_ℓ every C^(ℓ+1) tokens; φ_ℓ first takes the summed local
    gradients of that block at level ℓ+1's step η^(ℓ+1) (its initial state learned at level
    ℓ+1's frequency); in between, level ℓ updates every C^(ℓ) tokens as usual (Eq. 71)."""
    m = _hope(cms_variant="nested", cms_periods=[2, 4])
    cms, T = m.blocks[0].cms, 6
    x = torch.randn(2, T, 16, generator=torch.Generator().manual_seed(4))
    out, new = cms(x, cms.init_state(2))
    fast, slow = cms.levels
    lr0, lr1 = fast.lr.detach(), slow.lr.detach()
    h = fast.norm(x).detach()
    w = [p.detach() for p in fast.init_state(2)["w"]]
    phi, acc, G, prev = list(w), [0, 0, 0], [0, 0, 0], torch.zeros(2, 16)
    for t in range(T):  # by hand, token by token
        g = swiglu_grads(w, prev[:, None], h[:, t:t + 1])
        prev = h[:, t]
        acc = [a + b for a, b in zip(acc, g)]
        G = [a + b for a, b in zip(G, g)]
        if (t + 1) % 2 == 0:
            w, acc = [p - lr0 * a for p, a in zip(w, acc)], [0, 0, 0]
        if (t + 1) % 4 == 0:
            phi = [p - lr1 * a for p, a in zip(phi, G)]
            w, G = list(phi), [0, 0, 0]
    for got, want in ((new[0]["w"], w), (new[0]["phi"], phi), (new[0]["phi_acc"], G)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=1e-4)
    assert int(new[0]["since"]) == 2 and "phi" not in new[1]  # the slowest level has no φ

    seq = CMS(16, fast.mlp.w_gate.out_features, [2, 4], mode="in_context", lr=[0.5, 0.5])
    seq.load_state_dict(cms.state_dict())
    out_seq, _ = seq(x, seq.init_state(2))
    torch.testing.assert_close(out[:, :4], out_seq[:, :4])  # the same chain until the first reset
    assert (out[:, 4:] - out_seq[:, 4:]).abs().max() > 1e-7


@pytest.mark.parametrize("count0", [0, 1, 3])
def test_nested_chunked_matches_reference_forward_and_grads(count0):
    results = []
    for fn in (cms_level_reference, cms_level_chunked):
        torch.manual_seed(0)
        lvl, nxt = CMSLevel(6, 8, 2, "in_context", lr=0.5), CMSLevel(6, 8, 4, "in_context", lr=0.5)
        lvl.nested = True
        for p in lvl.mlp.parameters():
            torch.nn.init.normal_(p, 0, 0.3)
        state = {**lvl.init_state(2), "count": torch.tensor(count0 % 2), "since": torch.tensor(count0)}
        x = torch.randn(2, 11, 6, requires_grad=True)
        out, new = fn(state, x, 2, lvl.lr, (4, nxt.lr))
        loss = (out ** 2).sum() + sum((w ** 2).sum() for w in new["w"] + new["phi"])
        leaves = [x, *lvl.mlp.parameters(), lvl.lr_param, nxt.lr_param]
        results.append((out.detach(), [w.detach() for w in new["w"] + new["phi"]], int(new["since"]),
                        torch.autograd.grad(loss, leaves)))
    (o0, w0, s0, g0), (o1, w1, s1, g1) = results
    assert s0 == s1 == (count0 + 11) % 4
    torch.testing.assert_close(o1, o0, atol=1e-4, rtol=1e-4)
    for a, b in zip(w1 + list(g1), w0 + list(g0)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_nested_with_teach_and_carried_stream():
    """Both controls together on Hope; a stream split at a segment boundary continues the
    nested clocks (since counts on across calls)."""
    m = _hope(cms_variant="nested", cms_objective="teach", cms_periods=[2, 4, 8]).eval()
    tok = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        s = m(tok[:, :6]).state
        s = m(tok[:, 6:], state=s).state
    assert [int(lvl["since"]) for lvl in s[0]["cms"][:2]] == [10 % 4, 10 % 8]


def test_nested_options_are_checked():
    with pytest.raises(ModelConfigError, match="cms_variant"):
        build_model("hope", size="tiny", vocab_size=V, cms_variant="nested")  # optimizer mode
    with pytest.raises(ModelConfigError, match="divide"):
        build_model("hope", size="tiny", vocab_size=V, cms_mode="in_context", cms_variant="nested",
                    cms_periods=[2, 3])
    m = build_model("hope-attention", size="tiny", vocab_size=V, cms_mode="in_context", cms_variant="nested")
    assert m.options["cms_variant"] == "nested"
    m(torch.randint(0, V, (1, 20)))
