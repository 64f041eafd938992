"""DGD memory update (spec §2–§3, Eq. 86–93), one module per form, laid out as in
flash-linear-attention:

    naive.py       per-token reference, literally Eq. 86–91 (`dgd_memory_reference`), and the
                   definitions every form shares (`memory_apply`, `memory_gradients`, `step_size`)
    chunk.py       chunked WY form in PyTorch ops (`dgd_chunk_autograd`, `dgd_memory_chunked`)
    chunk_grad.py  the same chunk with a hand-written backward pass (`dgd_chunk_manual`; `dgd_chunk`
                   picks it for fp32 / fp64)
    solve.py       the unit-lower-triangular (WY) solve by an explicit matmul inverse
    stacked.py     Hope's stacked chunk: five memories in one step (`dgd_chunk_stacked`, and
                   `dgd_chunk_triton` on the Triton kernel)
    triton.py      fused Triton forward and backward (imports triton: loaded only when used)
    hope_step.cpp  Hope's whole stacked chunk step (projections, gates, guard, five DGD chunks)
    cpu_step.py    and its inputs (convs, norms) fused per (batch, head) in C++ for CPU, built on
                   first use; `models/smt_step._FusedStep` is the reference (`cpu_step` docstring)

This module chooses the memory kernel of `dgd_memory` (the `memory_kernel` argument):

    reference   per-token loop (`dgd_memory_reference`): the ground truth
    chunked     matmuls per chunk, WY form (`dgd_memory_chunked`): any device, any dtype
    triton      fused Triton kernels, one program per (batch, head) (`triton.py`):
                CUDA tensors, or CPU tensors under the Triton interpreter (TRITON_INTERPRET=1
                set before triton is first imported — tests only, ~1000× slower)
    auto        triton when the tensors are on CUDA, triton imports and the kernel takes the
                inputs (dims ≤ 128, fp32/bf16/fp16), else chunked

All three compute the same function (tests check them against each other, values and gradients).
"""

from __future__ import annotations

import os

import torch

from nlbench.kernels.dgd.chunk import dgd_chunk, dgd_chunk_autograd, dgd_flops_per_token, dgd_memory_chunked
from nlbench.kernels.dgd.chunk_grad import dgd_chunk_manual
from nlbench.kernels.dgd.naive import dgd_memory_reference, memory_apply, memory_gradients
from nlbench.kernels.dgd.solve import unit_lower_solve
from nlbench.kernels.dgd.stacked import dgd_chunk_stacked, dgd_chunk_triton

__all__ = [
    "DGD_MEMORY_KERNELS", "dgd_chunk", "dgd_chunk_autograd", "dgd_chunk_manual", "dgd_chunk_stacked", "dgd_chunk_triton",
    "dgd_flops_per_token", "dgd_memory", "dgd_memory_chunked", "dgd_memory_reference", "memory_apply",
    "memory_gradients", "resolve_memory_kernel", "triton_status", "unit_lower_solve",
]

DGD_MEMORY_KERNELS = ("reference", "chunked", "triton", "auto")


def triton_status() -> tuple[bool, bool, str]:
    """(importable, interpreted, reason): whether the Triton kernels load, whether they were
    built for the CPU interpreter, and why not when they don't load."""
    try:
        from nlbench.kernels.dgd import triton as dgd_triton
    except Exception as e:  # ImportError, or a triton install without a GPU driver backend
        return False, False, f"{type(e).__name__}: {e}"
    from triton.runtime.interpreter import InterpretedFunction

    return True, isinstance(dgd_triton._dgd_linear_fwd_kernel, InterpretedFunction), ""


def resolve_memory_kernel(memory_kernel: str, device) -> str:
    """The concrete memory kernel ("reference" | "chunked" | "triton") for `memory_kernel` on `device`."""
    if memory_kernel not in DGD_MEMORY_KERNELS:
        raise ValueError(
            f"memory_kernel must be one of {', '.join(repr(b) for b in DGD_MEMORY_KERNELS)}, got {memory_kernel!r}: 'reference' is "
            f"the per-token loop, 'chunked' the PyTorch chunked kernel, 'triton' the fused GPU kernel, "
            f"'auto' picks triton on CUDA when it imports and chunked otherwise.")
    dev_type = getattr(device, "type", str(device).split(":")[0])
    if memory_kernel == "auto":
        return "triton" if dev_type == "cuda" and triton_status()[0] else "chunked"
    if memory_kernel == "triton":
        ok, interpreted, why = triton_status()
        if not ok:
            raise RuntimeError(f"memory_kernel 'triton': triton kernels failed to import ({why}); use memory_kernel 'chunked'.")
        if dev_type == "cuda" and interpreted:
            raise RuntimeError(
                "memory_kernel 'triton': the kernels were built for the CPU interpreter (TRITON_INTERPRET=1 was set "
                "when triton was imported) but the tensors are on CUDA; unset TRITON_INTERPRET.")
        if dev_type != "cuda" and not interpreted:
            env = os.environ.get("TRITON_INTERPRET")
            raise RuntimeError(
                f"memory_kernel 'triton' needs CUDA tensors, got tensors on {dev_type!r}; on CPU the kernels only run "
                f"under the Triton interpreter, which needs TRITON_INTERPRET=1 in the environment BEFORE triton "
                f"is first imported (now TRITON_INTERPRET={env!r}). Use memory_kernel 'chunked' or 'auto' on CPU.")
    return memory_kernel


def _triton_fits(weights, k) -> bool:
    """Whether the fused kernel takes these inputs: state kept on chip (dims ≤ MAX_DIM), and a
    dtype it accumulates in fp32 without losing precision (not float64)."""
    from nlbench.kernels.dgd.triton import MAX_DIM

    dims = [k.shape[-1]] + [s for w in weights for s in w.shape[-2:]]
    return max(dims) <= MAX_DIM and k.dtype in (torch.float32, torch.bfloat16, torch.float16)


def dgd_memory(weights, q, k, v, eta, alpha, chunk_size: int, self_target: bool = True, memory_kernel: str = "auto",
               compiled: bool | str = False, normalized_step: bool = True):
    """DGD memory over a sequence (Eq. 86–93) with the chosen memory kernel. Returns (y or None, weights).
    `compiled=True` runs the chunked per-chunk kernel through `torch.compile`.
    `normalized_step=False`: the literal step η_t on every matrix (`naive.step_size`); the Triton
    kernel has only the normalized step, so `auto` then takes `chunked`.

    Shapes: q (or None: no reads), k, v [B, H, T, d]; η, α [B, H, T]; weights: [W] (linear, Eq. 93)
    or [W2, W1] (residual MLP, Eq. 89), each [B, H, out, in]. Differentiable on every memory kernel.
    """
    name = resolve_memory_kernel(memory_kernel, k.device)
    if memory_kernel == "auto" and name == "triton" and (not _triton_fits(weights, k) or not normalized_step):
        name = "chunked"
    if name == "reference":
        return dgd_memory_reference(weights, q, k, v, eta, alpha, chunk_size, self_target, normalized_step)
    if name == "chunked":
        return dgd_memory_chunked(weights, q, k, v, eta, alpha, chunk_size, self_target, compiled, normalized_step)
    if not normalized_step:
        raise ValueError("memory_kernel 'triton' has only the normalized step η/max(1, ‖x‖²); use memory_kernel 'chunked' "
                         "or 'reference' for normalized_step=False.")
    from nlbench.kernels.dgd.triton import dgd_memory_triton

    return dgd_memory_triton(weights, q, k, v, eta, alpha, chunk_size, self_target)
