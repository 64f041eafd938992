"""`torch.compile` for the per-chunk memory kernels (`NLModel.compiled`, `compile: true`).

Static shapes: a chunk loop calls its kernel with the same shapes every chunk (a shorter last
chunk compiles once more). On CPU with inductor's C++ wrapper, which calls the generated
kernels from C++ instead of Python: a Hope `medium` train step (T=512, batch 4, 2 threads)
took 829 ms instead of 928 ms (means of five A/B pairs of separate processes, faster in all
five), at the cost of a longer first compile (~26 s instead of ~18 s on a cold cache).
"""

from __future__ import annotations

import torch

__all__ = ["compile_kernel"]


def compile_kernel(fn, device_type: str):
    """`fn` through `torch.compile` for tensors on `device_type` ("cpu" | "cuda" | ...)."""
    options = {"cpp_wrapper": True} if device_type == "cpu" else None
    return torch.compile(fn, dynamic=False, options=options)
