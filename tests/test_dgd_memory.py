"""DGD memory kernel (spec §2–§3): chunked = per-token reference, Eq. 93 by hand, gated delta rule."""

import pytest
import torch
import torch.nn.functional as F

from nlbench.kernels.dgd import dgd_memory_chunked, dgd_memory_reference, unit_lower_solve

torch.set_num_threads(1)


def _inputs(mlp: bool, B=2, H=2, T=11, d=5, h=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(B, H, h, d, generator=g) * 0.5, torch.randn(B, H, d, h, generator=g) * 0.5] if mlp \
        else [torch.randn(B, H, d, d, generator=g) * 0.5]
    q = torch.randn(B, H, T, d, generator=g)
    k = F.normalize(torch.randn(B, H, T, d, generator=g), dim=-1)
    v = torch.randn(B, H, T, d, generator=g)
    eta = torch.rand(B, H, T, generator=g) * 0.5
    alpha = 0.5 + 0.5 * torch.rand(B, H, T, generator=g)
    return ws, q, k, v, eta, alpha


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("self_target", [True, False])
def test_chunked_matches_reference_forward_and_grads(mlp, self_target):
    for C in (1, 3, 4, 16):  # T = 11: not divisible by 3 or 4; 16 > T
        results = []
        for fn in (dgd_memory_reference, dgd_memory_chunked):
            ws, q, k, v, eta, alpha = _inputs(mlp)
            leaves = [*ws, q, k, v, eta, alpha]
            for x in leaves:
                x.requires_grad_(True)
            y, w_end = fn(ws, q, k, v, eta, alpha, C, self_target=self_target)
            loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum() + sum((w ** 2).sum() for w in w_end)
            grads = torch.autograd.grad(loss, leaves)
            results.append((y.detach(), [w.detach() for w in w_end], grads))
        (y0, w0, g0), (y1, w1, g1) = results
        torch.testing.assert_close(y1, y0, atol=1e-4, rtol=1e-4)
        for a, b in zip(w1, w0):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_chunk_start_gradients_change_the_result():
    ws, q, k, v, eta, alpha = _inputs(mlp=True)
    y1, _ = dgd_memory_chunked(ws, q, k, v, eta, alpha, 1)
    y4, _ = dgd_memory_chunked(ws, q, k, v, eta, alpha, 4)
    assert (y1 - y4).abs().max() > 1e-3  # gradients at M_b, not M_{t-1}, inside a chunk


@pytest.mark.parametrize("fn", [dgd_memory_reference, dgd_memory_chunked])
def test_linear_single_token_by_hand(fn):
    # W = [[1,2],[3,4]], k = e1, v̂ = v = [1,1], α = 0.9, η = 0.5:
    # W (αI − η k kᵀ) = [[0.4, 1.8], [1.2, 3.6]];  η (W k − v̂) kᵀ = [[0, 0], [1, 0]]
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    k = torch.tensor([1.0, 0.0])[None, None, None]
    v = torch.tensor([1.0, 1.0])[None, None, None]
    q = torch.tensor([1.0, 1.0])[None, None, None]
    y, (W1,) = fn([W], q, k, v, torch.tensor([[[0.5]]]), torch.tensor([[[0.9]]]), 1, self_target=False)
    torch.testing.assert_close(W1[0, 0], torch.tensor([[0.4, 1.8], [0.2, 3.6]]))
    torch.testing.assert_close(y[0, 0, 0], torch.tensor([3.0, 7.0]))  # read with M_{t-1}


@pytest.mark.parametrize("self_target", [True, False])
def test_linear_chunk1_is_gated_delta_rule(self_target):
    ws, q, k, v, eta, alpha = _inputs(mlp=False, T=9)
    S, ys = ws[0], []
    for t in range(k.shape[-2]):
        kt, qt = k[..., t, :], q[..., t, :]
        vt = (S @ v[..., t, :, None])[..., 0] if self_target else v[..., t, :]
        g, beta = alpha[..., t, None, None], (2 * eta[..., t] / alpha[..., t])[..., None, None]
        vv = alpha[..., t, None] * vt / 2
        ys.append((S @ qt[..., None])[..., 0])
        eye = torch.eye(S.shape[-1])
        S = g * S @ (eye - beta * kt[..., :, None] * kt[..., None, :]) + beta * vv[..., :, None] * kt[..., None, :]
    y, (W,) = dgd_memory_chunked(ws, q, k, v, eta, alpha, 1, self_target=self_target)
    torch.testing.assert_close(y, torch.stack(ys, dim=-2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(W, S, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [dgd_memory_reference, dgd_memory_chunked])
def test_mlp_decay_uses_each_matrix_own_input(fn):
    d = h = 4  # h = d so that a wrong input (k for W1) would type-check
    ws, _, k, v, eta, alpha = _inputs(mlp=True, B=1, H=1, T=1, d=d, h=h, seed=3)
    W2, W1 = [w[0, 0].clone().requires_grad_(True) for w in ws]
    kt, vt, e_, a_ = k[0, 0, 0], v[0, 0, 0], eta[0, 0, 0], alpha[0, 0, 0]
    v_hat = (vt + W1 @ F.silu(W2 @ vt)).detach()
    loss = 0.5 * ((kt + W1 @ F.silu(W2 @ kt) - v_hat) ** 2).sum()
    g2, g1 = torch.autograd.grad(loss, (W2, W1))
    s = F.silu(W2 @ kt).detach()
    eye = torch.eye(d)
    want2 = W2.detach() @ (a_ * eye - e_ * torch.outer(kt, kt)) - e_ * g2
    e1 = e_ / max(1.0, float(s @ s))  # step bounded for non-unit inputs (module docstring)
    want1 = W1.detach() @ (a_ * eye - e1 * torch.outer(s, s)) - e1 * g1
    wrong1 = W1.detach() @ (a_ * eye - e1 * torch.outer(kt, kt)) - e1 * g1
    _, (n2, n1) = fn(ws, None, k, v, eta, alpha, 1)
    torch.testing.assert_close(n2[0, 0], want2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(n1[0, 0], want1, atol=1e-6, rtol=1e-5)
    assert (n1[0, 0] - wrong1).abs().max() > 1e-4


def test_bad_chunk_size_raises():
    ws, q, k, v, eta, alpha = _inputs(mlp=False)
    with pytest.raises(ValueError, match="chunk_size"):
        dgd_memory_chunked(ws, q, k, v, eta, alpha, 0)


@pytest.mark.parametrize("mlp", [False, True])
def test_memory_gradients_are_the_autograd_gradients(mlp):
    """∇_W L = Σ_t g_t x_tᵀ for L = ½ Σ_t ‖M(k_t) − v̂_t‖², checked against autograd (Eq. 87)."""
    from nlbench.kernels.dgd import memory_apply, memory_gradients

    ws, _, k, v, _, _ = _inputs(mlp=mlp)
    ws = [w.detach().clone().requires_grad_() for w in ws]
    loss = 0.5 * (memory_apply(ws, k) - v).pow(2).sum()
    auto = torch.autograd.grad(loss, ws)
    for (g, x), a in zip(memory_gradients([w.detach() for w in ws], k, v), auto):
        torch.testing.assert_close(g.transpose(-1, -2) @ x, a, atol=1e-5, rtol=1e-4)


def test_memory_gradients_are_differentiable():
    """The outer loop differentiates through the inner gradients (meta-gradients): gradcheck in
    float64 of the rank-one factors wrt the weights and keys (second derivatives of SiLU)."""
    from nlbench.kernels.dgd import memory_gradients

    ws, _, k, v, _, _ = _inputs(mlp=True, B=1, H=1, T=3, d=3, h=4)
    args = [w.double().requires_grad_() for w in ws] + [k.double().requires_grad_(), v.double()]

    def f(w2, w1, k, v):
        return tuple(t for pair in memory_gradients([w2, w1], k, v) for t in pair)

    assert torch.autograd.gradcheck(f, tuple(args))


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_stacked_memories_equal_separate_chunks(mlp):
    """Memories stacked on a leading axis (Hope's fused path) with their own η and a shared α,
    k, v: each memory's chunk-end state equals its own `dgd_chunk` call, and `read_index` reads
    exactly that memory."""
    from nlbench.kernels.dgd import dgd_chunk

    per = [_inputs(mlp=mlp, T=6, seed=s) for s in range(3)]
    _, q, k, v, _, alpha = per[0]
    weights = [torch.stack(ws) for ws in zip(*(p[0] for p in per))]
    eta = torch.stack([p[4] for p in per])
    y, new = dgd_chunk(weights, q, k, v, eta, alpha, read_index=2)
    for i, p in enumerate(per):
        y_i, new_i = dgd_chunk(p[0], q, k, v, p[4], alpha)
        for a, b in zip(new, new_i):
            torch.testing.assert_close(a[i], b, atol=1e-5, rtol=1e-4)
        if i == 2:
            torch.testing.assert_close(y, y_i, atol=1e-5, rtol=1e-4)


def test_bfloat16_inputs_run_and_stay_close_to_fp32():
    """A bf16 model (no autocast) reaches the triangular solve with bf16 tensors, which torch has
    no kernel for: the solve runs in fp32 inside and the result keeps the input dtype."""
    from nlbench.kernels.dgd import dgd_chunk

    ws, q, k, v, eta, alpha = _inputs(mlp=True, T=8)
    y32, new32 = dgd_chunk(ws, q, k, v, eta, alpha)
    y16, new16 = dgd_chunk([w.bfloat16() for w in ws], *(t.bfloat16() for t in (q, k, v, eta, alpha)))
    assert y16.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for w in new16)
    torch.testing.assert_close(y16.float(), y32, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("L", [1, 2, 5, 16, 17, 33, 64, 100])
def test_unit_lower_solve_matches_lapack_forward_and_grads(L):
    """The matmul inverse (log-depth Neumann product) against LAPACK's triangular solve, in
    float64, for chunk lengths that are and are not powers of two, at and beyond the 16 × 16
    Neumann blocks (then merged by recursive doubling, with zero padding for 33 and 100);
    gradients through both. Entries ~ 1/√L keep the inverse's growth moderate at every L."""
    g = torch.Generator().manual_seed(L)
    a0 = (2 / L ** 0.5 * torch.randn(3, 2, L, L, generator=g, dtype=torch.float64)).tril(-1)
    r0 = torch.randn(3, 2, L, 7, generator=g, dtype=torch.float64)
    gd = torch.randn(3, 2, L, 7, generator=g, dtype=torch.float64)
    outs = []
    for solve in (unit_lower_solve,
                  lambda a, r: torch.linalg.solve_triangular(a, r, upper=False, unitriangular=True)):
        a, r = a0.clone().requires_grad_(), r0.clone().requires_grad_()
        d = solve(a, r)
        d.backward(gd)
        outs.append((d, a.grad.tril(-1), r.grad))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    if L <= 17:  # finite differences over every entry: seconds at L = 100
        a, r = a0.clone().requires_grad_(), r0.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda a, r: unit_lower_solve(a.tril(-1), r), (a, r))


def test_unit_lower_solve_broadcasts_the_matrix():
    """One matrix shared by several right-hand sides (a broadcast batch dim) gets the summed
    gradient, as autograd of a broadcast op would give."""
    g = torch.Generator().manual_seed(0)
    a = (0.3 * torch.randn(1, 6, 6, generator=g, dtype=torch.float64)).tril(-1).requires_grad_()
    r = torch.randn(4, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, r: unit_lower_solve(a.tril(-1), r), (a, r))
