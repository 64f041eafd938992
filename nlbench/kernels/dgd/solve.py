"""The unit-lower-triangular solve of the DGD chunk (the WY system, `chunk` module docstring):
(I + A)⁻¹ R for strictly lower-triangular A, by an explicit inverse built from matmuls only
(the UT transform of DeltaNet), with a two-matmul backward pass."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["NEUMANN_BLOCK", "inverse_flops", "strictly_lower", "unit_lower_inverse", "unit_lower_solve"]


def strictly_lower(L: int, device) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced into the graph: a cache would be bypassed anyway
        return torch.ones(L, L, dtype=torch.bool, device=device).tril(-1)
    return _strictly_lower_cached(L, device)


@functools.lru_cache(maxsize=None)
def _strictly_lower_cached(L: int, device) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).tril(-1)



NEUMANN_BLOCK = 16  # diagonal blocks up to this size are inverted by the Neumann product


def _neumann_inverse(a):
    """(I + A)⁻¹ for strictly lower-triangular A [.., L, L], in matmuls: A is nilpotent (Aᴸ = 0),
    so (I + A)⁻¹ = Σ_{j<L} (−A)ʲ = Π_i (I + (−A)^(2^i)) over 2^i < L — ⌈log₂ L⌉ squarings and
    as many products, O(L³ log L)."""
    n = -a
    p = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device) + n
    span = 2
    while span < a.shape[-1]:
        n = n @ n
        p = p + p @ n
        span *= 2
    return p


def _diagonal_blocks(a, size):
    """The diagonal blocks of a [.., L, L] (L a multiple of `size`): [.., L/size, size, size]."""
    n = a.shape[-1] // size
    blocks = a.unflatten(-2, (n, size)).unflatten(-1, (n, size)).diagonal(dim1=-4, dim2=-2)
    return blocks.movedim(-1, -3)


def unit_lower_inverse(a):
    """(I + A)⁻¹ for strictly lower-triangular A [.., L, L] in matmuls only.

    Up to L = 16 the Neumann product (`_neumann_inverse`), faster at Hope's sizes than the
    batched LAPACK triangular solve (docs/decisions.md). Longer chunks would pay L³ log L for
    it, so there the diagonal 16 × 16
    blocks are inverted that way and merged pairwise by recursive doubling,
        (I + [[A₁, 0], [B, A₂]])⁻¹ = [[T₁, 0], [−T₂ B T₁, T₂]],
    every level in two batched matmuls (A is zero-padded to 16 · 2ᵏ; the padding's inverse is I).
    """
    L = a.shape[-1]
    if L <= NEUMANN_BLOCK:
        return _neumann_inverse(a)
    size = NEUMANN_BLOCK
    padded = size
    while padded < L:
        padded *= 2
    if padded != L:
        a = F.pad(a, (0, padded - L, 0, padded - L))
    t = _neumann_inverse(_diagonal_blocks(a, size))  # [.., n, s, s]
    while size < padded:
        lower = _diagonal_blocks(a, 2 * size)[..., size:, :size]  # B of each pair [.., n/2, s, s]
        t1, t2 = t[..., 0::2, :, :], t[..., 1::2, :, :]
        off = -(t2 @ lower @ t1)
        top = torch.cat([t1, torch.zeros_like(t1)], dim=-1)
        t = torch.cat([top, torch.cat([off, t2], dim=-1)], dim=-2)
        size *= 2
    t = t.squeeze(-3)
    return t[..., :L, :L] if padded != L else t


class _UnitLowerSolve(torch.autograd.Function):
    """D = (I + A)⁻¹ R for strictly lower-triangular A (entries on and above the diagonal are
    zero), by the explicit inverse T: then dD = −T dA D, so ∂R = Tᵀ ∂D and ∂A = −(Tᵀ ∂D) Dᵀ on
    the strictly lower part — two matmuls for the backward pass, no second solve."""

    @staticmethod
    def forward(ctx, a, rhs):
        inv = unit_lower_inverse(a)
        d = inv @ rhs
        ctx.save_for_backward(inv, d)
        ctx.shapes = a.shape, rhs.shape
        return d

    @staticmethod
    def backward(ctx, grad_d):
        inv, d = ctx.saved_tensors
        a_shape, rhs_shape = ctx.shapes
        grad_rhs = inv.transpose(-1, -2) @ grad_d
        grad_a = -(grad_rhs @ d.transpose(-1, -2)).tril(-1)
        return grad_a.sum_to_size(a_shape), grad_rhs.sum_to_size(rhs_shape)


def unit_lower_solve(a, rhs):
    """(I + A)⁻¹ R for strictly lower A (`torch.linalg.solve_triangular(A, R, upper=False,
    unitriangular=True)` where A's diagonal is zero); half-precision inputs are solved in fp32."""
    if rhs.dtype in (torch.bfloat16, torch.float16):
        return _UnitLowerSolve.apply(a.float(), rhs.float()).to(rhs.dtype)
    return _UnitLowerSolve.apply(a, rhs)


def inverse_flops(L: int) -> float:
    """Matmul FLOPs of `unit_lower_inverse` for one L × L matrix (as implemented)."""
    def neumann(n):  # one squaring and one product per doubling of the span
        return 2 * 2 * n ** 3 * max(0, math.ceil(math.log2(n)) - 1) if n > 1 else 0
    if L <= NEUMANN_BLOCK:
        return float(neumann(L))
    size, padded = NEUMANN_BLOCK, NEUMANN_BLOCK
    while padded < L:
        padded *= 2
    f = (padded // size) * neumann(size)
    while size < padded:  # per merged pair: −T₂ B T₁, two s × s products
        f += (padded // (2 * size)) * 2 * 2 * size ** 3
        size *= 2
    return float(f)
