"""SiLU and its derivatives, shared by the memory kernels' hand-written gradients.

σ(a) = a·s with s = sigmoid(a); σ′(a) = s(1 + a(1 − s)); σ″(a) = s(1 − s)(2 + a(1 − 2s)).
Written out (not `aten.silu_backward`) because the outer loss differentiates through the
inner gradient, which needs σ′ as a differentiable function and, by hand, σ″. The Triton
kernels carry their own `tl` copies (a `triton.jit` function cannot call PyTorch).
"""

from __future__ import annotations

import torch

__all__ = ["silu_and_grad", "silu_grad", "silu_grad2"]


def silu_grad(a):
    """σ′(a) = s(1 + a(1 − s)), s = sigmoid(a)."""
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s))


def silu_and_grad(a):
    """(σ(a), σ′(a)) from one sigmoid: σ′ = s + σ(a)(1 − s)."""
    s = torch.sigmoid(a)
    sa = a * s
    return sa, torch.addcmul(s, sa, 1 - s)


def silu_grad2(a):
    """σ″(a) = s(1 − s)(2 + a(1 − 2s)), s = sigmoid(a)."""
    s = torch.sigmoid(a)
    return s * (1 - s) * (2 + a * (1 - 2 * s))
