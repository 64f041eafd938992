"""Hope's chunk step fused per (batch, head) in C++ (`kernels/dgd/cpu_step`, `hope_step.cpp`)
against its reference, `smt_step._FusedStep` (itself tested against autograd in
tests/test_smt_step.py): outputs and every input's gradient in float64 with the guard off,
inactive and capping, v normalized or not, both steps; at the sizes the kernel is specialised
for and at odd ones; float32 at Hope's `medium` head shapes; a whole Hope model; and the build:
the per-user cache, and the fallback when there is no compiler."""

import itertools
import os
import shutil
import stat

import pytest
import torch
import torch.nn.functional as F

from nlbench.kernels.dgd import cpu_step
from nlbench.models import build_model
from nlbench.models.self_modifying_titans import GUARD, top_direction
from nlbench.models.smt_step import _FusedStep, fused_chunk_step, power_step

pytestmark = pytest.mark.skipif(not cpu_step.available()[0] and shutil.which("g++") is None,
                                reason="no C++ compiler")


def _leaves(B, H, L, d, h, dtype=torch.float64, w1_scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    w2, w1 = rnd(5, B, H, h, d), w1_scale * rnd(5, B, H, d, h)
    zc, qc = F.normalize(rnd(4, B, H, L, d), dim=-1), F.normalize(rnd(B, H, L, d), dim=-1)
    return [zc, qc, 0.5 * rnd(H) - 1.0, 0.5 * rnd(H) + 3.0, w2, w1]


def _run(fn, leaves, guard_on, normalize_v, normalized):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    zc, qc, b_eta, b_alpha, w2, w1 = leaves
    u = power_step(w1.detach(), top_direction(w1.detach())) if guard_on else None
    outs = fn(GUARD, normalize_v, normalized, u, zc, qc, b_eta, b_alpha, w2, w1)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)


def _assert_matches(leaves, guard_on, normalize_v, normalized, rtol=1e-10, atol=1e-10):
    out_r, g_r = _run(_FusedStep.apply, leaves, guard_on, normalize_v, normalized)
    out_c, g_c = _run(cpu_step.hope_step_cpu, leaves, guard_on, normalize_v, normalized)
    for name, a, b in zip(["y", "w2", "w1"], out_r, out_c):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda s, n=name: f"{n}: {s}")
    for name, a, b in zip(["z", "q", "b_eta", "b_alpha", "w2", "w1"], g_r, g_c):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda s, n=name: f"grad {n}: {s}")


def test_the_kernel_builds_here():
    ok, why = cpu_step.available()
    assert ok, why


@pytest.mark.parametrize("guard_on,normalize_v,normalized", list(itertools.product([True, False], repeat=3)))
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (1, 2, 16, 32, 32)], ids=["odd", "specialised"])
def test_cpp_step_matches_the_pytorch_step(shape, guard_on, normalize_v, normalized):
    _assert_matches(_leaves(*shape), guard_on, normalize_v, normalized)


@pytest.mark.parametrize("shape", [(2, 3, 7, 8, 16), (1, 1, 16, 64, 64)], ids=["odd", "specialised-64"])
def test_cpp_step_matches_with_the_guard_capping_eta(shape):
    leaves = _leaves(*shape, w1_scale=3.0)
    w1 = leaves[-1]
    lam = (w1 * power_step(w1, top_direction(w1)).unsqueeze(-2)).sum(-1).square().sum(-1)
    assert (GUARD / lam < 0.2).all()  # η ≈ sigmoid(−1) ≈ 0.27: every memory capped
    _assert_matches(leaves, True, True, True)


@pytest.mark.parametrize("dh", [32, 64], ids=["medium", "large"])
def test_cpp_step_float32_at_hope_head_shapes(dh):
    """float32 takes the paths compiled for Hope's head sizes (chunks of 16, head dim 32 / 64)."""
    leaves = _leaves(2, 2, 16, dh, dh, dtype=torch.float32)
    _assert_matches(leaves, True, True, True, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cpu_kernel", [True, False])
@pytest.mark.parametrize("T", [40, 48])
def test_hope_matches_the_autograd_step_on_the_whole_model(cpu_kernel, T):
    """A Hope model's logits and every parameter's gradient with the fused step (in C++, or in
    PyTorch) against the autograd step: 40 tokens (chunks of 16, 16 and 8: C++ chunk steps) and
    48 (whole chunks: one C++ call per layer)."""
    torch.manual_seed(0)
    model = build_model("hope", size="tiny", vocab_size=32).double()
    x = torch.randint(0, 32, (3, T))

    def grads(fused):
        for b in model.blocks:
            b.mixer.fused_step, b.mixer.cpu_kernel = fused, cpu_kernel and fused
        model.zero_grad()
        logits = model(x).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (l_r, g_r), (l_f, g_f) = grads(False), grads(True)
    torch.testing.assert_close(l_f, l_r, rtol=1e-12, atol=1e-12)
    assert g_r.keys() == g_f.keys() and len(g_r) > 20
    for n in g_r:
        torch.testing.assert_close(g_f[n], g_r[n], rtol=1e-9, atol=1e-11, msg=lambda s, n=n: f"grad {n}: {s}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,T,D,H", [(2, 9, 12, 3), (4, 64, 256, 8)])
def test_cpp_inputs_match_the_pytorch_convs_and_norms(B, T, D, H, dtype):
    """`projection_inputs` (four depthwise causal convs from a carried tail, the stacked layout,
    L2 norms) with and without the C++ pass: z, the new tail, and the gradients of x, the tail
    and the conv weight."""
    from nlbench.models.self_modifying_titans import projection_inputs

    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(B, T, D, generator=g, dtype=dtype), torch.randn(B, 3, D, generator=g, dtype=dtype),
              0.5 * torch.randn(4 * D, 1, 4, generator=g, dtype=dtype)]

    def run(cpu_kernel):
        x, tail, w = (t.detach().clone().requires_grad_() for t in leaves)
        z, new_tail = projection_inputs(x, tail, w, H, True, cpu_kernel)
        gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        return [z.detach(), new_tail.detach(), *torch.autograd.grad((z * gz).sum(), (x, tail, w))]

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["z", "tail", "grad x", "grad tail", "grad w"], run(False), run(True)):
        torch.testing.assert_close(b, a, **tol, msg=lambda s, n=name: f"{n}: {s}")


def test_cpp_step_keeps_only_its_inputs_for_the_backward_pass():
    """The backward node holds the step's seven inputs and nothing else (the PyTorch step's
    holds its intermediates too): the C++ backward pass recomputes the forward."""
    zc, qc, b_eta, b_alpha, w2, w1 = (x.requires_grad_() for x in _leaves(2, 2, 16, 32, 32, dtype=torch.float32))
    u = power_step(w1.detach(), top_direction(w1.detach()))
    y, _, _ = cpu_step.hope_step_cpu(GUARD, True, True, u, zc, qc, b_eta, b_alpha, w2, w1)
    saved = y.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved] == [t.data_ptr() for t in (u, zc, qc, b_eta, b_alpha, w2, w1)]
    y_ref, _, _ = _FusedStep.apply(GUARD, True, True, u, zc, qc, b_eta, b_alpha, w2, w1)
    def numel(x):  # tensors in saved_tensors and in the DGD chunk's dict of intermediates
        if isinstance(x, torch.Tensor):
            return x.numel()
        if isinstance(x, dict):
            x = x.values()
        return sum(numel(v) for v in x) if isinstance(x, (list, tuple, type({}.values()))) else 0

    held = numel(y_ref.grad_fn.saved_tensors) + numel(y_ref.grad_fn.saved)
    assert sum(t.numel() for t in saved) < 0.5 * held


def test_recompute_chunks_runs_the_cpp_step_with_the_same_results(monkeypatch):
    """`recompute_chunks` checkpoints groups of C++ steps: same logits and gradients as without it
    (where each layer is one C++ call), and the C++ step is what runs (6 chunks of 8: two groups;
    forward, then the group replays)."""
    calls, layers = [], []
    real, real_layer = cpu_step.hope_step_cpu, cpu_step.hope_layer_cpu
    monkeypatch.setattr(cpu_step, "hope_step_cpu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_step, "hope_layer_cpu", lambda *a: layers.append(1) or real_layer(*a))

    def run(recompute):
        torch.manual_seed(0)
        model = build_model("hope", size="tiny", vocab_size=64, recompute_chunks=recompute, chunk_size=8,
                            mem_chunk_size=8).double()
        tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
        logits = model(tokens).logits
        F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    logits, grads = run(False)
    assert (len(calls), len(layers)) == (0, 2)
    layers.clear()
    logits_r, grads_r = run(True)
    assert (len(calls), len(layers)) == (2 * 6 * 2, 0)  # each group's forward runs again in the backward pass
    torch.testing.assert_close(logits_r, logits, rtol=1e-12, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(grads_r[name], g, rtol=1e-12, atol=1e-12, msg=lambda s, n=name: f"{n}: {s}")


def test_build_goes_to_a_private_cache_and_falls_back_without_a_compiler(tmp_path, monkeypatch):
    cache = tmp_path / "kernels"
    monkeypatch.setenv("NLBENCH_KERNEL_CACHE", str(cache))
    cpu_step._library.cache_clear()
    try:
        assert cpu_step.available() == (True, "")
        libs = list(cache.iterdir())
        assert len(libs) == 1 and libs[0].name.startswith("hope_step-") and libs[0].suffix == ".so"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o700
        # a cache others can write to is refused: its libraries would run as this process
        cache.chmod(0o777)
        cpu_step._library.cache_clear()
        with pytest.warns(RuntimeWarning, match="writable by group or others"):
            ok, why = cpu_step.available()
        assert not ok and "writable by group or others" in why
        cache.chmod(0o700)
        # no compiler and nothing cached: unavailable with the reason, and Hope runs the PyTorch step
        monkeypatch.setenv("NLBENCH_KERNEL_CACHE", str(tmp_path / "empty"))
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
        cpu_step._library.cache_clear()
        with pytest.warns(RuntimeWarning, match="no-such-compiler"):
            ok, why = cpu_step.available()
        assert not ok and "no-such-compiler" in why
        assert not [p for p in (tmp_path / "empty").iterdir()]  # no partial file left
        torch.manual_seed(0)
        model = build_model("hope", size="tiny", vocab_size=32)
        model(torch.randint(0, 32, (2, 20))).logits.sum().backward()
        monkeypatch.setenv("NLBENCH_CPU_KERNEL", "0")
        cpu_step._library.cache_clear()
        assert cpu_step.available() == (False, "NLBENCH_CPU_KERNEL=0")
    finally:
        monkeypatch.undo()
        cpu_step._library.cache_clear()


def _layer_reference(guard_on, normalize_v, normalized, chunk, u, z, q, b_eta, b_alpha, w2, w1):
    """The chunk loop of `SelfModifyingTitans._memories_stacked` on the PyTorch fused step."""
    weights, ys = [w2, w1], []
    for zc, qc in zip(z.split(chunk, dim=-2), q.split(chunk, dim=-2)):
        y, weights, u = fused_chunk_step(weights, u, zc, qc, b_eta, b_alpha, guard=GUARD, normalize_v=normalize_v,
                                         normalized_step=normalized, cpu_kernel=False)
        ys.append(y)
    return torch.cat(ys, dim=-2), *weights, u


def _run_layer(fn, leaves, guard_on, normalize_v, normalized, chunk):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    z, q, b_eta, b_alpha, w2, w1 = leaves
    u = top_direction(w1.detach()) if guard_on else None
    y, n2, n1, u_end = fn(GUARD, normalize_v, normalized, chunk, u, z, q, b_eta, b_alpha, w2, w1)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in (y, n2, n1))
    return [o.detach() for o in (y, n2, n1)], u_end, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("guard_on,normalize_v,normalized",
                         [(True, True, True), (False, True, True), (True, False, True), (True, True, False)])
@pytest.mark.parametrize("shape", [(2, 3, 40, 8, 12, 8), (2, 2, 64, 32, 32, 16)], ids=["odd", "hope"])
def test_layer_kernel_matches_the_chunk_loop(guard_on, normalize_v, normalized, shape):
    """One C++ call for every chunk of a layer (`hope_layer_cpu`: the chunk loop, the guard's
    power step and the carried weights in C++) against the chunk loop on `_FusedStep` (float64):
    y, the last weights and guard vectors, and every input's gradient."""
    B, H, T, d, h, chunk = shape
    leaves = _leaves(B, H, T, d, h)
    args = (guard_on, normalize_v, normalized, chunk)
    out_r, u_r, g_r = _run_layer(_layer_reference, leaves, *args)
    out_c, u_c, g_c = _run_layer(cpu_step.hope_layer_cpu, leaves, *args)
    for name, a, b in zip(["y", "w2", "w1"], out_r, out_c):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=lambda s, n=name: f"{n}: {s}")
    assert (u_c is None) == (not guard_on)
    if guard_on:
        torch.testing.assert_close(u_c, u_r, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(["z", "q", "b_eta", "b_alpha", "w2", "w1"], g_r, g_c):
        # unnormalized v lets gradients grow to ~1e5 over four chunks: tolerance relative to the largest
        atol = 1e-10 * max(1.0, a.abs().max().item())
        torch.testing.assert_close(b, a, rtol=1e-10, atol=atol, msg=lambda s, n=name: f"grad {n}: {s}")


@pytest.mark.parametrize("dh", [32, 64], ids=["medium", "large"])
def test_layer_kernel_float32_at_hope_head_shapes(dh):
    leaves = _leaves(2, 2, 48, dh, dh, dtype=torch.float32)
    out_r, u_r, g_r = _run_layer(_layer_reference, leaves, True, True, True, 16)
    out_c, u_c, g_c = _run_layer(cpu_step.hope_layer_cpu, leaves, True, True, True, 16)
    for a, b in zip([*out_r, u_r, *g_r], [*out_c, u_c, *g_c]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_layer_kernel_keeps_its_inputs_and_each_chunks_start_weights():
    """The backward node holds the inputs, the start weights of chunks 1 .. n − 1 and each
    chunk's guard vector: what the chunk loop's nodes hold, without their per-chunk copies."""
    B, H, T, d, h, chunk = 2, 2, 64, 8, 8, 16
    z, q, b_eta, b_alpha, w2, w1 = (x.requires_grad_() for x in _leaves(B, H, T, d, h))
    u = top_direction(w1.detach())
    y, *_ = cpu_step.hope_layer_cpu(GUARD, True, True, chunk, u, z, q, b_eta, b_alpha, w2, w1)
    saved = y.grad_fn.saved_tensors
    n = T // chunk
    expected = z.numel() + q.numel() + 2 * H + n * (w2.numel() + w1.numel()) + n * u.numel()
    assert sum(t.numel() for t in saved if t is not None) == expected


def test_hope_runs_one_layer_call_on_whole_chunks_and_chunk_steps_otherwise(monkeypatch):
    calls, layers = [], []
    real, real_layer = cpu_step.hope_step_cpu, cpu_step.hope_layer_cpu
    monkeypatch.setattr(cpu_step, "hope_step_cpu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(cpu_step, "hope_layer_cpu", lambda *a: layers.append(1) or real_layer(*a))
    model = build_model("hope", size="tiny", vocab_size=32)
    model(torch.randint(0, 32, (2, 48)))
    assert (len(calls), len(layers)) == (0, 2)
    model(torch.randint(0, 32, (2, 40)))
    assert (len(calls), len(layers)) == (2 * 3, 2)


def test_layer_kernel_without_gradients_keeps_two_slots_and_gives_the_same_outputs(monkeypatch):
    """Under no_grad (inference, streaming) the layer call carries the weights in two slots used in
    turn instead of keeping every chunk's: the same y, last weights and guard vectors as with
    gradients, bit for bit, and buffers that do not grow with the sequence."""
    z, q, b_eta, b_alpha, w2, w1 = (x.requires_grad_() for x in _leaves(2, 2, 80, 8, 8))
    u = top_direction(w1.detach())
    sizes = []
    real = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *s, **k: sizes.append(s[0]) or real(self, *s, **k))
    with_grad = cpu_step.hope_layer_cpu(GUARD, True, True, 16, u, z, q, b_eta, b_alpha, w2, w1)
    assert sizes[:3] == [4, 4, 5]  # every chunk's start weights (chunks 1-4) and guard vectors (0-4)
    sizes.clear()
    with torch.no_grad():
        without = cpu_step.hope_layer_cpu(GUARD, True, True, 16, u, z, q, b_eta, b_alpha, w2, w1)
    assert sizes[:3] == [2, 2, 2]
    for a, b in zip(with_grad, without):
        assert torch.equal(a.detach(), b)
