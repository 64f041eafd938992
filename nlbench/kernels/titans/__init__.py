"""Titans neural long-term memory update (spec §1), one module per form:

    naive.py   per-token reference, literally the equations (`titans_memory_reference`), and the
               memory's forward pass (`memory_forward`, `memory_read`)
    chunk.py   chunked parallel form, matmuls inside a chunk (`titans_memory_chunked`)
    chunk_grad.py  the same chunk with a hand-written backward pass (`titans_chunk_manual`;
               `titans_memory_chunked` takes it for fp32 / fp64 outside autocast, eager)
"""

from __future__ import annotations

from nlbench.kernels.titans.chunk import memory_flops_per_token, titans_memory_chunked
from nlbench.kernels.titans.naive import memory_forward, memory_read, titans_memory_reference

__all__ = ["memory_flops_per_token", "memory_forward", "memory_read", "titans_memory_chunked",
           "titans_memory_reference"]
