"""The hand-written backward pass of one DGD chunk (`kernels/dgd/chunk_grad.py`) against autograd of the
plain chunk (`dgd_chunk_autograd`): outputs and every input's gradient, float64, for linear and
MLP memories, with and without reads / self-targets, single and stacked memories (k, v, q
shared by the stack, η and α stacked or shared), and `gradcheck` on a small case. The same
for `dgd_chunk_stacked`, the form of the chunk that Hope's compiled step takes."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from nlbench.kernels.dgd import dgd_chunk, dgd_chunk_autograd, dgd_chunk_manual, dgd_chunk_stacked

DT = torch.float64


def _leaves(mlp, stack, eta_stacked, alpha_stacked, L=7, B=2, H=3, d=5, hid=4, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    pre = (stack,) if stack else ()
    ws = [0.7 * rnd(*pre, B, H, hid, d), 0.5 * rnd(*pre, B, H, d, hid)] if mlp else [0.5 * rnd(*pre, B, H, d, d)]
    q, k = F.normalize(rnd(B, H, L, d), dim=-1), F.normalize(rnd(B, H, L, d), dim=-1)
    k = k * (0.8 + 0.5 * torch.rand(B, H, L, 1, generator=g, dtype=DT))  # ‖k‖ on both sides of 1
    v = rnd(B, H, L, d)
    eta = 0.8 * torch.rand(*(pre if eta_stacked else ()), B, H, L, generator=g, dtype=DT)
    alpha = 0.6 + 0.4 * torch.rand(*(pre if alpha_stacked else ()), B, H, L, generator=g, dtype=DT)
    return [*ws, q, k, v, eta, alpha]


def _run(fn, leaves, read, self_target, read_index):
    leaves = [x.clone().requires_grad_() for x in leaves]
    n_w = len(leaves) - 5
    ws, (q, k, v, eta, alpha) = leaves[:n_w], leaves[n_w:]
    y, new = fn(ws, q if read else None, k, v, eta, alpha, self_target, read_index)
    outs = ([y] if read else []) + new
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=DT)).sum() for o in outs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return outs, [torch.zeros_like(x) if gx is None else gx for x, gx in zip(leaves, grads)]


CASES = [c for c in itertools.product([False, True], [0, 3], [False, True], [False, True], [True, False], [True, False])
         if c[1] or not (c[2] or c[3])]  # stacked η / α only with a stack


def _assert_matches_autograd(fn, leaves, read, self_target, read_index):
    """`fn` gives `dgd_chunk_autograd`'s outputs and every input's gradient (float64)."""
    out_a, grad_a = _run(dgd_chunk_autograd, leaves, read, self_target, read_index)
    out_f, grad_f = _run(fn, leaves, read, self_target, read_index)
    for a, m in zip(out_a, out_f):
        torch.testing.assert_close(m, a, rtol=1e-12, atol=1e-12)
    names = [f"w{i}" for i in range(len(leaves) - 5)] + ["q", "k", "v", "eta", "alpha"]
    for name, a, m in zip(names, grad_a, grad_f):
        torch.testing.assert_close(m, a, rtol=1e-10, atol=1e-10, msg=lambda s, n=name: f"grad {n}: {s}")


@pytest.mark.parametrize("mlp,stack,eta_stacked,alpha_stacked,read,self_target", CASES)
def test_manual_backward_matches_autograd(mlp, stack, eta_stacked, alpha_stacked, read, self_target):
    leaves = _leaves(mlp, stack, eta_stacked, alpha_stacked)
    _assert_matches_autograd(dgd_chunk_manual, leaves, read, self_target, 1 if stack else None)


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_manual_backward_gradcheck(mlp):
    leaves = [x.requires_grad_() for x in _leaves(mlp, 2, True, False, L=4, B=1, H=1, d=3, hid=3)]
    n_w = len(leaves) - 5

    def f(*xs):
        y, new = dgd_chunk_manual(list(xs[:n_w]), *xs[n_w:], True, 0)
        return (y, *new)

    assert torch.autograd.gradcheck(f, leaves)


def test_dgd_chunk_dispatches_on_dtype():
    """fp32/fp64 take the hand-written backward, half precision the autograd form."""
    leaves = [x.float().requires_grad_() for x in _leaves(True, 0, False, False)]
    y, _ = dgd_chunk(leaves[:2], *leaves[2:])
    assert type(y.grad_fn).__name__ == "_DGDChunkBackward"
    half = [x.detach().bfloat16().requires_grad_() for x in leaves]
    y, _ = dgd_chunk(half[:2], *half[2:])
    assert type(y.grad_fn).__name__ != "_DGDChunkBackward"


def _bmm_count(fn, leaves, read, self_target, read_index):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func is torch.ops.aten.bmm.default
            return func(*args, **(kwargs or {}))

    with Count():
        _run(fn, leaves, read, self_target, read_index)
    return Count.n


@pytest.mark.parametrize("mlp,stack,eta_stacked,alpha_stacked,read,self_target", CASES)
def test_stacked_chunk_matches_autograd(mlp, stack, eta_stacked, alpha_stacked, read, self_target):
    """`dgd_chunk_stacked` (W2's and W1's systems as one batch, [k; v] rows through M_b) equals
    the plain chunk in values and every gradient; with hidden = input width it takes its own
    path, which the fewer batched matmuls show."""
    leaves = _leaves(mlp, stack, eta_stacked, alpha_stacked, hid=5)
    read_index = 1 if stack else None
    _assert_matches_autograd(dgd_chunk_stacked, leaves, read, self_target, read_index)
    if mlp:
        counts = [_bmm_count(f, leaves, read, self_target, read_index) for f in (dgd_chunk_autograd, dgd_chunk_stacked)]
        assert counts[1] < counts[0], counts


def test_stacked_chunk_falls_back_when_widths_differ():
    """hidden ≠ input width: the matrices' systems differ in shape and the plain chunk runs."""
    leaves = _leaves(True, 3, True, False, hid=4)
    out_a, grad_a = _run(dgd_chunk_autograd, leaves, True, True, 1)
    out_s, grad_s = _run(dgd_chunk_stacked, leaves, True, True, 1)
    for a, m in zip(out_a + grad_a, out_s + grad_s):
        torch.testing.assert_close(m, a, rtol=0, atol=0)
