"""`torch.compile` for the per-chunk memory kernels (`NLModel.compiled`, `compile:` in a bench
config).

Static shapes: a chunk loop calls its kernel with the same shapes every chunk (a shorter last
chunk compiles once more). On CPU, inductor's C++ wrapper calls the generated kernels from
C++ instead of Python: faster steps for a longer first compile (docs/decisions.md).

Two modes (`COMPILE_MODES`):

* ``default``: inductor's defaults; matmuls call ATen (MKL / oneDNN on CPU).
* ``max-autotune``: inductor also generates matmul kernels for the exact shapes (C++ micro-GEMM
  templates on CPU, Triton templates on CUDA), benchmarks them against ATen while compiling,
  and keeps the faster one. It pays off for Hope's small chunk matmuls (16 × 32 × 32,
  batch 160), where ATen's batched GEMM costs per call about what it costs per FLOP, and not
  for the Transformer's large GEMMs (figures in docs/decisions.md). The first compile takes
  minutes instead of seconds (every distinct matmul is benchmarked); inductor caches on disk.
  Epilogue fusion is off in this mode: with it, inductor's CPU GEMM template failed an
  internal assertion on Hope's chunk step (torch 2.13).
"""

from __future__ import annotations

import torch

__all__ = ["COMPILE_MODES", "autotune_options", "compile_kernel", "compile_mode", "compile_options"]

COMPILE_MODES = ("default", "max-autotune")


def compile_mode(compiled) -> str | None:
    """The compile mode a `compiled=` argument asks for: None (eager) for False/None, "default"
    for True, else one of `COMPILE_MODES`."""
    if compiled is None or compiled is False:
        return None
    if compiled is True:
        return "default"
    if compiled not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(map(repr, COMPILE_MODES))} (or True / False); "
                         f"got {compiled!r}.")
    return compiled


def autotune_options(mode: str) -> dict:
    """inductor options of a compile mode (empty for "default"); the autotuning tables inductor
    prints by default (one per distinct matmul) are turned off."""
    if compile_mode(mode) != "max-autotune":
        return {}
    return dict(max_autotune=True, epilogue_fusion=False, autotune_num_choices_displayed=0,
                max_autotune_report_choices_stats=False)


def compile_options(device_type: str, mode: str = "default") -> dict | None:
    """inductor options of `compile_kernel` for one device type and mode."""
    options = {"cpp_wrapper": True} if device_type == "cpu" else {}
    options.update(autotune_options(mode))
    return options or None


def compile_kernel(fn, device_type: str, mode: str = "default"):
    """`fn` through `torch.compile` for tensors on `device_type` ("cpu" | "cuda" | ...)."""
    return torch.compile(fn, dynamic=False, options=compile_options(device_type, mode))
