"""Titans stabiliser switches and `paper_exact` (spec §1): each switch changes exactly its own
factor of the inner step θ_t, the paper form runs the spec's equations on the real models, and
Titans-MAL (memory layer, then sliding-window attention) is wired as documented."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlbench.baselines.titans import PAPER_FORM, chunk_key_scale
from nlbench.kernels.titans import titans_memory_reference
from nlbench.models import MODELS, ModelConfigError, build_model
from nlbench.optim import build_optimizer

torch.set_num_threads(1)

TITANS = sorted(n for n in MODELS if n.startswith("titans-"))


def _set_gates(mem, eta, theta, alpha, weight_std=0.0):
    """Gate biases to the logits of (η, θ-sigmoid, α); weights 0 (input-independent) or random."""
    H = mem.n_heads
    with torch.no_grad():
        mem.gates.weight.normal_(0, weight_std) if weight_std else mem.gates.weight.zero_()
        mem.gates.bias.copy_(torch.logit(torch.tensor([eta, theta, alpha])).repeat_interleave(H))


def test_registry_has_every_variant():
    assert TITANS == ["titans-lmm", "titans-mac", "titans-mag", "titans-mal"]


@pytest.mark.parametrize("name", TITANS)
def test_paper_exact_resolves_paper_values_and_explicit_options_win(name):
    default = build_model(name, size="tiny", vocab_size=32)
    paper = build_model(name, size="tiny", vocab_size=32, paper_exact=True)
    assert paper.options["paper_exact"] is True and default.options["paper_exact"] is False
    for key, value in PAPER_FORM.items():
        assert paper.options[key] == value
        assert default.options[key] != value
        assert getattr(paper.blocks[0].memory, key) == value
    one = build_model(name, size="tiny", vocab_size=32, paper_exact=True, key_gram_norm=True)
    assert one.options["key_gram_norm"] is True and one.options["momentum_coupling"] is False
    assert one.blocks[1].memory.key_gram_norm is True


def test_paper_form_step_is_the_theta_gate_at_every_position_in_a_chunk():
    """Identical tokens (identical keys) through one chunk of 16: the paper form's step is
    θ_t = sigmoid(b_θ) = 0.5 at every position; the stabilised default takes
    0.3 · (1 − η) · 0.5 / λ_t, λ_t = t for identical unit keys -- 0.075 at the first token,
    0.075 / 16 at the 16th: the step depends on where the token sits in its chunk."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64).expand(2, 16, 64)
    results = {}
    for paper in (False, True):
        mem = build_model("titans-lmm", size="tiny", vocab_size=32, paper_exact=paper).blocks[0].memory
        _set_gates(mem, 0.5, 0.5, 0.1)
        q, k, v, _ = mem.project(x, mem.init_state(2)["conv"])
        k = F.normalize(k[:, :, -1:].expand_as(k), dim=-1)   # conv warm-up aside: identical keys
        eta, theta, alpha = mem.inner_gates(x, k)
        torch.testing.assert_close(eta, torch.full_like(eta, 0.5))
        torch.testing.assert_close(alpha, torch.full_like(alpha, 0.1))
        results[paper] = theta[0, 0]
    torch.testing.assert_close(results[True], torch.full((16,), 0.5))
    expected = 0.3 * 0.5 * 0.5 / torch.arange(1, 17, dtype=torch.float32)
    torch.testing.assert_close(results[False], expected, rtol=1e-4, atol=1e-6)
    assert results[False][0].item() == pytest.approx(0.075, rel=1e-4)


def test_each_switch_changes_only_its_factor():
    """max_lr scales θ; momentum_coupling multiplies by (1 − η); key_gram_norm divides by λ_t.
    With random gate weights (η, θ spread over (0, 1)) each factor is checked exactly."""
    torch.manual_seed(0)
    x = torch.randn(2, 20, 64)
    thetas = {}
    for coupling in (False, True):
        for gram in (False, True):
            torch.manual_seed(1)
            mem = build_model("titans-lmm", size="tiny", vocab_size=32, max_lr=0.4, momentum_coupling=coupling,
                              key_gram_norm=gram, chunk_size=8).blocks[0].memory
            _set_gates(mem, 0.5, 0.5, 0.1, weight_std=0.5)
            with torch.no_grad():
                _, k, _, _ = mem.project(x, mem.init_state(2)["conv"])
                eta, theta, _ = mem.inner_gates(x, k)
                sig = torch.sigmoid(mem.gates(x)).permute(0, 2, 1).chunk(3, dim=1)[1]
            thetas[coupling, gram] = theta
    lam = chunk_key_scale(k, 8)
    assert lam.max() > 1.5                                    # the Gram norm is not trivially 1
    torch.testing.assert_close(thetas[False, False], 0.4 * sig)
    torch.testing.assert_close(thetas[True, False], 0.4 * sig * (1 - eta))
    torch.testing.assert_close(thetas[False, True], 0.4 * sig / lam)
    torch.testing.assert_close(thetas[True, True], 0.4 * sig * (1 - eta) / lam)


@pytest.mark.parametrize("name", TITANS)
def test_gate_init_options_set_the_gates_at_init(name):
    model = build_model(name, size="tiny", vocab_size=32, eta_init=0.9, theta_init=0.2, alpha_init=0.05,
                        paper_exact=True)
    x = torch.randn(2, 5, 64)
    for block in model.blocks:
        eta, theta, alpha = block.memory.gate_values(x)
        for got, want in ((eta, 0.9), (theta, 0.2), (alpha, 0.05)):
            torch.testing.assert_close(got, torch.full_like(got, want))


def test_paper_form_model_runs_the_spec_equations_by_hand():
    """titans-lmm, linear memory, paper_exact, C = 4: the layer's memory update equals the
    per-token reference (spec §1 as a loop) fed with θ = sigmoid(b_θ) = 0.5 unscaled, and a
    hand-computed first step: S_1 = −θ ∇ℓ(M_0; k_1, v_1) = −0.5 · 2 (M_0 k_1 − v_1) k_1ᵀ,
    M_1 = (1 − α) M_0 + S_1."""
    torch.manual_seed(0)
    model = build_model("titans-lmm", size="tiny", vocab_size=32, memory="linear", chunk_size=4, paper_exact=True)
    mem = model.blocks[0].memory
    _set_gates(mem, 0.3, 0.5, 0.1)
    x = torch.randn(2, 9, 64)
    state = mem.init_state(2)
    with torch.no_grad():
        _, new = mem.memorize(x, state)
        q, k, v, _ = mem.project(x, state["conv"])
        full = lambda c: torch.full(q.shape[:3], c)  # noqa: E731
        _, W_ref, S_ref = titans_memory_reference(q, k, v, full(0.3), full(0.5), full(0.1), state["W"], state["S"],
                                                  chunk_size=4)
        torch.testing.assert_close(new["W"][0], W_ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new["S"][0], S_ref[0], atol=1e-5, rtol=1e-5)
        _, one = mem.memorize(x[:, :1], state)
        M0, k1, v1 = state["W"][0], k[:, :, :1], v[:, :, :1]
        grad = 2 * (k1 @ M0.transpose(-1, -2) - v1).transpose(-1, -2) @ k1           # [B, H, out, in]
        torch.testing.assert_close(one["S"][0], -0.5 * grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(one["W"][0], 0.9 * M0 - 0.5 * grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", TITANS)
def test_paper_exact_builds_and_trains(name):
    """Muon 0.02 (the protocol's optimizer), grad clip 1, 6 steps on repeated copy batches: the
    loss stays finite and falls, and the memory's meta-learned initial weights move."""
    torch.manual_seed(0)
    model = build_model(name, size="tiny", vocab_size=16, paper_exact=True)
    opt = build_optimizer("muon", model, lr=0.02)
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(1, 16, (8, 12), generator=gen)
    x = torch.cat([body, torch.zeros(8, 1, dtype=torch.long), body], dim=1)
    w0 = model.blocks[0].memory.w0[0].detach().clone()
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert not torch.equal(model.blocks[0].memory.w0[0], w0)


@pytest.mark.parametrize("opt,value,field", [
    ("paper_exact", "yes", "'paper_exact'"),
    ("momentum_coupling", 1, "'momentum_coupling'"),
    ("key_gram_norm", None, "'key_gram_norm'"),
    ("eta_init", 1.0, "'eta_init'"),
    ("alpha_init", 0, "'alpha_init'"),
    ("theta_init", True, "'theta_init'"),
])
def test_bad_switch_values(opt, value, field):
    with pytest.raises(ModelConfigError, match=field):
        build_model("titans-mal", size="tiny", vocab_size=32, **{opt: value})


def test_mag_and_mal_window_slides_within_shipped_sequences():
    """The default window (32) is below the shipped 64-token sequences, so tokens beyond it
    reach a position only through the memory: with the memory output zeroed, perturbing
    token 0 leaves MAL/MAG position 40 unchanged in a one-layer model; with memory it does not."""
    for name in ("titans-mag", "titans-mal"):
        torch.manual_seed(0)
        model = build_model(name, size="tiny", vocab_size=32, n_layers=1).eval()
        assert model.blocks[0].attn.window == 32
        x = torch.randint(0, 32, (1, 64), generator=torch.Generator().manual_seed(0))
        x2 = x.clone()
        x2[0, 0] = (x2[0, 0] + 1) % 32
        with torch.no_grad():
            moved = (model(x2).logits[0, 40] - model(x).logits[0, 40]).abs().max()
            assert moved > 1e-6                                  # the memory carries token 0
            torch.nn.init.zeros_(model.blocks[0].memory.out_proj.weight)   # MAG gate σ(0): blind too
            still = (model(x2).logits[0, 40] - model(x).logits[0, 40]).abs().max()
        assert still < 1e-6, f"{name}: attention reached past its window ({still})"
