"""Titans memory kernel (chunked == per-token reference) and the Titans LMM / MAC / MAG models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlbench.kernels.titans import titans_memory_chunked, titans_memory_reference
from nlbench.models import ModelConfigError, build_model

torch.set_num_threads(1)


def _inputs(layers, B=2, H=2, T=11, d=6, seed=0, theta_max=0.3):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q = F.normalize(rnd(B, H, T, d), dim=-1).requires_grad_()
    k = F.normalize(rnd(B, H, T, d), dim=-1).requires_grad_()
    v = rnd(B, H, T, d).requires_grad_()
    eta = (0.05 + 0.9 * torch.rand(B, H, T, generator=g)).requires_grad_()
    theta = (theta_max * torch.rand(B, H, T, generator=g)).requires_grad_()
    alpha = (0.3 * torch.rand(B, H, T, generator=g)).requires_grad_()
    W = [(rnd(B, H, o, i) / i**0.5).requires_grad_() for o, i in layers]
    S = [(0.1 * rnd(B, H, o, i)).requires_grad_() for o, i in layers]
    return [q, k, v, eta, theta, alpha], W, S


LINEAR, MLP2, MLP3 = [(6, 6)], [(8, 6), (6, 8)], [(8, 6), (5, 8), (6, 5)]


@pytest.mark.parametrize("layers", [LINEAR, MLP2, MLP3], ids=["linear", "mlp2", "mlp3"])
@pytest.mark.parametrize("C", [1, 3, 4, 16])
def test_chunked_matches_reference_forward_and_grad(layers, C):
    """T = 11 is divisible by none of C > 1; C = 16 > T is one partial chunk."""
    xs, W, S = _inputs(layers)
    leaves = xs + W + S
    results = []
    for fn in (titans_memory_chunked, titans_memory_reference):
        y, W2, S2 = fn(*xs, W, S, chunk_size=C)
        g = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=g)).sum()
        loss = loss + sum((t * torch.randn(t.shape, generator=g)).sum() for t in W2 + S2)
        results.append((y, W2 + S2, torch.autograd.grad(loss, leaves)))
    (y_c, st_c, g_c), (y_r, st_r, g_r) = results
    torch.testing.assert_close(y_c, y_r, atol=1e-4, rtol=1e-4)
    for a, b in zip(st_c, st_r):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layers", [LINEAR, MLP3], ids=["linear", "mlp3"])
def test_chunked_matches_reference_to_float64_precision(layers):
    """In float64 the chunked form is the reference to rounding (the cumulative log-gates are
    summed in the inputs' dtype; only half precision is summed in fp32): ≤ 1e-12 relative on
    reads, chunk-end state and every input's gradient."""
    xs, W, S = _inputs(layers, T=16)
    xs, W, S = ([t.detach().double().requires_grad_() for t in ts] for ts in (xs, W, S))
    leaves = xs + W + S
    results = []
    for fn in (titans_memory_chunked, titans_memory_reference):
        y, W2, S2 = fn(*xs, W, S, chunk_size=8)
        g = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
        loss = loss + sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in W2 + S2)
        results.append([y, *W2, *S2, *torch.autograd.grad(loss, leaves)])
    for a, b in zip(*results):
        assert a.dtype == torch.float64
        assert ((a - b).norm() / b.norm()).item() <= 1e-12


def test_chunk_size_changes_result():
    """C > 1 takes gradients at the chunk-start state: it must differ from per-token Titans."""
    xs, W, S = _inputs(MLP2)
    y1, _, _ = titans_memory_chunked(*xs, W, S, chunk_size=1)
    y4, _, _ = titans_memory_chunked(*xs, W, S, chunk_size=4)
    assert (y1 - y4).abs().max() > 1e-3


def test_hand_computed_linear_memory():
    """d = 2, M_0 = S_0 = 0. Token 1 (k = e1, v = (1, 2), θ = .5, η = .5, α = .1):
    ∇ℓ = 2(M k − v)kᵀ = −2 v e1ᵀ -> S_1 = v e1ᵀ, M_1 = .9·0 + S_1 = [[1, 0], [2, 0]].
    Token 2 (k = e2, v = (0, 0), q = e1): read y_2 = M_1 e1 = (1, 2) (state before token 2);
    ∇ℓ = 0 -> S_2 = .5 S_1, M_2 = .9 M_1 + S_2 = [[1.4, 0], [2.8, 0]]. y_1 = M_0 q_1 = 0."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    q = torch.stack([e1, e1]).view(1, 1, 2, 2)
    k = torch.stack([e1, e2]).view(1, 1, 2, 2)
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    gate = lambda a, b: torch.tensor([a, b]).view(1, 1, 2)  # noqa: E731
    zeros = [torch.zeros(1, 1, 2, 2)]
    for C in (1, 2):  # token 2's gradient is 0 at both M_1 and M_0 (k = e2 orthogonal), so C = 2 agrees
        y, (M,), (S,) = titans_memory_chunked(q, k, v, gate(.5, .5), gate(.5, .5), gate(.1, .1), zeros, zeros, C)
        torch.testing.assert_close(y[0, 0], torch.tensor([[0.0, 0.0], [1.0, 2.0]]))
        torch.testing.assert_close(M[0, 0], torch.tensor([[1.4, 0.0], [2.8, 0.0]]))
        torch.testing.assert_close(S[0, 0], torch.tensor([[0.5, 0.0], [1.0, 0.0]]))


def test_state_carries_across_calls():
    """12 tokens in one call == 8 + 4 tokens in two calls (chunk boundaries aligned, C = 4)."""
    xs, W, S = _inputs(MLP2, T=12)
    y, W_full, S_full = titans_memory_chunked(*xs, W, S, chunk_size=4)
    first = [x[:, :, :8] for x in xs]
    second = [x[:, :, 8:] for x in xs]
    y1, W1, S1 = titans_memory_chunked(*first, W, S, chunk_size=4)
    y2, W2, S2 = titans_memory_chunked(*second, W1, S1, chunk_size=4)
    torch.testing.assert_close(torch.cat([y1, y2], dim=2), y, atol=1e-5, rtol=1e-5)
    for a, b in zip(W2 + S2, W_full + S_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_long_chunk_small_gates_stay_finite():
    """Cumulative products of 64 gates ~1e-3 underflow fp32; the log-space form must not NaN."""
    xs, W, S = _inputs(LINEAR, T=64, theta_max=0.1)
    with torch.no_grad():
        xs[3].fill_(1e-3)          # η
        xs[5].fill_(1.0)           # α saturated (sigmoid overflow): memory fully forgotten
    y, W2, S2 = titans_memory_chunked(*xs, W, S, chunk_size=64)
    (y.sum() + W2[0].sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(W2[0]).all()
    assert all(torch.isfinite(t.grad).all() for t in xs)


def test_kernel_rejects_bad_chunk_size():
    xs, W, S = _inputs(LINEAR)
    with pytest.raises(ValueError, match="chunk_size"):
        titans_memory_chunked(*xs, W, S, chunk_size=0)


# ---------------------------------------------------------------- models

VARIANTS = ["titans-lmm", "titans-mac", "titans-mag", "titans-mal"]


def _tokens(B=2, T=24, V=32, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [
    dict(segment_len=8, n_persistent=2, chunk_size=4),
    dict(segment_len=8, n_persistent=0, chunk_size=8, memory="linear"),
])
def test_mac_is_causal_inside_and_across_segments(overrides):
    """Perturbing token t (first, middle, last of a segment) leaves logits < t unchanged, and
    does change logits at t: the interleaved [P ‖ r ‖ h] context must hide later reads."""
    torch.manual_seed(0)
    model = build_model("titans-mac", size="tiny", vocab_size=32, **overrides).eval()
    x = _tokens(T=24)
    base = model(x).logits
    for t in (3, 8, 12, 15, 23):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 32
        out = model(x2).logits
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-5, rtol=0)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


def test_mac_memory_read_is_used():
    """The segment-start memory read feeds the attention context: changing the carried
    memory weights changes the logits of the next segment."""
    torch.manual_seed(0)
    model = build_model("titans-mac", size="tiny", vocab_size=32, segment_len=8).eval()
    x = _tokens(T=8)
    state = model.init_state(2)
    base = model(x, state=state).logits
    state[0]["W"] = [w + 0.5 * torch.randn_like(w) for w in state[0]["W"]]
    assert (model(x, state=state).logits - base).abs().max() > 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_gates_initialised_for_slow_forgetting(name):
    model = build_model(name, size="tiny", vocab_size=32)
    h = torch.randn(2, 5, 64)
    for block in model.blocks:
        eta, theta, alpha = block.memory.gate_values(h)
        assert alpha.max() < 0.01          # memory decays slowly at init (spec §7)
        assert 0.3 < eta.mean() < 0.7
        assert 0 < theta.min() and theta.max() <= block.memory.max_lr


@pytest.mark.parametrize("name", VARIANTS)
def test_inner_step_bounded_by_momentum_and_chunk(name):
    """θ_t ≤ max_lr (1 − η_t) before the chunk-key factor, for any learned gate weights."""
    torch.manual_seed(0)
    model = build_model(name, size="tiny", vocab_size=32, chunk_size=8, max_lr=0.5)
    h = torch.randn(2, 9, 64)
    for block in model.blocks:
        mem = block.memory
        with torch.no_grad():
            mem.gates.weight.normal_(0, 0.5)   # gates spread over (0, 1), near-saturated ones included
        eta, theta, alpha = mem.gate_values(h)
        assert eta.min() < 0.1 and eta.max() > 0.9
        bound = 0.5 * (1 - eta)
        assert (theta <= bound).all() and (theta >= 0).all()
        # the sigmoid of the θ projection is what spans the range below the bound
        ratio = theta[bound > 0] / bound[bound > 0]
        assert ratio.min() < 0.2 and ratio.max() > 0.8


def test_chunk_key_scale_is_causal_prefix_gram_norm():
    """λ_t = ‖prefix Gram‖_F of the chunk: t for identical keys, √t for orthogonal ones, reset
    at each chunk, and independent of later keys (causality)."""
    from nlbench.baselines.titans import chunk_key_scale

    eye = torch.eye(8)[None, None]                                    # 8 orthogonal unit keys
    same = torch.nn.functional.normalize(torch.ones(1, 1, 8, 8), dim=-1)
    k = torch.cat([eye, same], dim=2)                                 # T = 16, chunk 8
    lam = chunk_key_scale(k, 8)[0, 0]
    t = torch.arange(1, 9, dtype=torch.float32)
    assert torch.allclose(lam[:8], t.sqrt().clamp_min(1), atol=1e-5)
    assert torch.allclose(lam[8:], t, atol=1e-4)
    k2 = k.clone()
    k2[..., 12:, :] = eye[..., :4, :]                                 # change later keys only
    assert torch.equal(chunk_key_scale(k2, 8)[..., :12], chunk_key_scale(k, 8)[..., :12])


@pytest.mark.parametrize("name", VARIANTS)
def test_saturated_gates_on_repetitive_input_stay_bounded(name):
    """Regression (split-digits NaN): with η and θ learned to saturation and strongly
    correlated keys (a repeated token pattern), chunked updates used to take ~C/(1 − η) times a
    token's step and the MLP memory ran away to inf within one sequence. The memory must now
    stay finite and of the order of its initial weights, and the loss gradient finite."""
    torch.manual_seed(0)
    model = build_model(name, size="tiny", vocab_size=32)           # chunk_size 16, max_lr 0.1
    for block in model.blocks:
        H = block.memory.n_heads
        with torch.no_grad():                                      # η ≈ 0.998, θ-sigmoid ≈ 0.998
            block.memory.gates.bias.copy_(torch.tensor([6.0, 6.0, -5.0]).repeat_interleave(H))
    tokens = torch.tensor([[3, 7] * 48, [5] * 96])
    out = model(tokens)
    for layer in out.state:
        w_max = max(w.abs().max().item() for w in layer["W"])
        assert w_max < 5.0, w_max
    out.logits.logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", VARIANTS)
def test_meta_learned_initial_memory_receives_gradient(name):
    """Gradients flow from the loss through the in-context updates into the initial memory."""
    model = build_model(name, size="tiny", vocab_size=32, chunk_size=4)
    model(_tokens(T=12)).logits.sum().backward()
    for block in model.blocks:
        for w0 in block.memory.w0:
            assert w0.grad is not None and w0.grad.abs().sum() > 0


def test_lmm_in_context_memory_changes_predictions():
    """The LMM's only long-range mixer is the memory: a carried state written by a previous
    sequence changes the next sequence's logits beyond the conv window."""
    torch.manual_seed(0)
    model = build_model("titans-lmm", size="tiny", vocab_size=32).eval()
    fresh = model(_tokens(T=16, seed=1)).logits
    state = model(_tokens(T=32, seed=2)).state
    carried = model(_tokens(T=16, seed=1), state=state).logits
    assert (fresh - carried)[:, 8:].abs().max() > 1e-4


@pytest.mark.parametrize("name", VARIANTS)
def test_chunk_size_one_is_per_token(name):
    """A model with chunk_size=1 runs (exact per-token Titans) and differs from chunk_size=8."""
    torch.manual_seed(0)
    m1 = build_model(name, size="tiny", vocab_size=32, chunk_size=1).eval()
    torch.manual_seed(0)
    m8 = build_model(name, size="tiny", vocab_size=32, chunk_size=8).eval()
    x = _tokens(T=16)
    assert (m1(x).logits - m8(x).logits).abs().max() > 1e-6


@pytest.mark.parametrize("name,opt,value,field", [
    ("titans-lmm", "memory", "rnn", "'memory'"),
    ("titans-mac", "segment_len", 0, "'segment_len'"),
    ("titans-mag", "window", -1, "'window'"),
    ("titans-lmm", "memory_layers", 1, "'memory_layers'"),
    ("titans-mag", "max_lr", 2.0, "'max_lr'"),
    ("titans-mac", "chunk_size", 1.5, "'chunk_size'"),
])
def test_bad_option_values(name, opt, value, field):
    with pytest.raises(ModelConfigError, match=field):
        build_model(name, size="tiny", vocab_size=32, **{opt: value})


def test_linear_memory_option_builds_single_matrix():
    model = build_model("titans-lmm", size="tiny", vocab_size=32, memory="linear")
    assert [tuple(w.shape) for w in model.blocks[0].memory.w0] == [(2, 32, 32)]
    deep = build_model("titans-lmm", size="tiny", vocab_size=32, memory_layers=3, memory_hidden=16)
    assert [tuple(w.shape) for w in deep.blocks[0].memory.w0] == [(2, 16, 32), (2, 16, 16), (2, 32, 16)]


def test_mag_one_layer_memory_state_carries_across_calls():
    """With one layer the MAG memory sees only the embeddings, so its carried state after
    32 + 32 tokens equals the state after 64 tokens (attention is not state, see common tests)."""
    torch.manual_seed(0)
    model = build_model("titans-mag", size="tiny", vocab_size=32, n_layers=1).eval()
    x = _tokens(T=64, seed=3)
    with torch.no_grad():
        full = model(x).state
        half = model(x[:, 32:], state=model(x[:, :32]).state).state
    for key in ("W", "S"):
        for a, b in zip(half[0][key], full[0][key]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(half[0]["conv"], full[0]["conv"])
