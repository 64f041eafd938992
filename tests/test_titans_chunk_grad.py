"""The hand-written backward pass of one Titans memory chunk (`kernels/titans/chunk_grad.py`)
against autograd of the plain chunk (`kernels/titans/chunk._chunk`): outputs and every input's
gradient (q, k, v, the three gates, every weight and momentum matrix), float64, for linear,
2- and 3-layer memories, shared and per-sequence states, gates at and beyond their clamps; and
`gradcheck` on a small case; and that `titans_memory_chunked` takes it for fp32 / fp64."""

import pytest
import torch
import torch.nn.functional as F

from nlbench.kernels.titans import chunk as titans_chunk
from nlbench.kernels.titans.chunk_grad import titans_chunk_manual

DT = torch.float64


def _leaves(dims, B=2, H=3, C=6, shared=False, clamp=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    d_in, d_out = dims[0][1], dims[-1][0]
    q, k = F.normalize(rnd(B, H, C, d_in), dim=-1), F.normalize(rnd(B, H, C, d_in), dim=-1)
    v = rnd(B, H, C, d_out)
    eta = 0.2 + 0.7 * torch.rand(B, H, C, generator=g, dtype=DT)
    theta = 0.3 * torch.rand(B, H, C, generator=g, dtype=DT)
    alpha = 0.3 * torch.rand(B, H, C, generator=g, dtype=DT)
    if clamp:  # a saturated gate: η = 0 and α = 1 hit `_chunk`'s clamps
        eta[0, 0, 1], alpha[0, 1, 2] = 0.0, 1.0
    pre = (1,) if shared else (B,)
    ws = [0.6 * rnd(*pre, H, o, i) for o, i in dims]
    ss = [0.2 * rnd(*pre, H, o, i) for o, i in dims]
    if shared:  # initial states shared by the batch, as a model's init_state gives them
        ws, ss = [w.expand(B, *w.shape[1:]) for w in ws], [s.expand(B, *s.shape[1:]) for s in ss]
    return [q, k, v, eta, theta, alpha, *ws, *ss]


def _run(fn, leaves, n):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    q, k, v, eta, theta, alpha = leaves[:6]
    y, new_w, new_s = fn(leaves[6:6 + n], leaves[6 + n:], q, k, v, eta, theta, alpha)
    outs = [y, *new_w, *new_s]
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=DT)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs, [torch.zeros_like(x) if gx is None else gx for x, gx in zip(leaves, grads)]


DIMS = {"linear": [(4, 4)], "mlp2": [(6, 4), (5, 6)], "mlp3": [(6, 4), (7, 6), (4, 7)]}


@pytest.mark.parametrize("dims", list(DIMS), ids=list(DIMS))
@pytest.mark.parametrize("shared", [False, True], ids=["per-sequence", "shared"])
@pytest.mark.parametrize("clamp", [False, True], ids=["gates", "clamped"])
def test_manual_backward_matches_autograd(dims, shared, clamp):
    dims = DIMS[dims]
    leaves = _leaves(dims, shared=shared, clamp=clamp)
    out_a, grad_a = _run(titans_chunk._chunk, leaves, len(dims))
    out_m, grad_m = _run(titans_chunk_manual, leaves, len(dims))
    for a, m in zip(out_a, out_m):
        torch.testing.assert_close(m, a, rtol=1e-12, atol=1e-12)
    names = ["q", "k", "v", "eta", "theta", "alpha"] + [f"w{i}" for i in range(len(dims))] + \
        [f"s{i}" for i in range(len(dims))]
    for name, a, m in zip(names, grad_a, grad_m):
        torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-10, msg=lambda s, n=name: f"grad {n}: {s}")


def test_manual_backward_gradcheck():
    dims = DIMS["mlp2"]
    leaves = [x.requires_grad_() for x in _leaves(dims, B=1, H=1, C=4)]

    def f(*xs):
        y, w, s = titans_chunk_manual(list(xs[6:8]), list(xs[8:10]), *xs[:6])
        return (y, *w, *s)

    assert torch.autograd.gradcheck(f, leaves)


def test_chunked_memory_takes_the_manual_chunk_for_fp32_and_fp64(monkeypatch):
    calls = []
    real = titans_chunk.titans_chunk_manual
    monkeypatch.setattr(titans_chunk, "titans_chunk_manual", lambda *a: calls.append(1) or real(*a))
    for dt in (torch.float32, torch.float64, torch.bfloat16):
        q, k, v, eta, theta, alpha, *state = (x.to(dt) for x in _leaves(DIMS["mlp2"], C=8))
        titans_chunk.titans_memory_chunked(q, k, v, eta, theta, alpha, state[:2], state[2:], chunk_size=4)
    assert len(calls) == 4  # two chunks each in fp32 and fp64, none in bf16
