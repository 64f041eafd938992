"""Keep freed heap memory in the process, so a training step does not page-fault its memory in
again every step (glibc `mallopt`).

PyTorch's CPU allocator is plain `malloc`. With glibc's defaults, blocks above a dynamic
threshold are served by `mmap` and unmapped when freed, and free memory at the top of the heap
is handed back to the OS. A training step allocates its activations in the forward pass and
frees them in the backward pass, so every step would zero-fill fresh pages again. With trimming
off and the mmap threshold at its 32 MiB maximum, freed memory stays in the process for the next
step; the price is that the process keeps its peak heap size. `python -m nlbench.bench.malloc`
measures what it buys (page faults and step time, off vs on); docs/decisions.md has the figures.

`keep_freed_memory()` is called where nlbench trains or benchmarks (`runner.execute_run`, in
every Ray worker, and `nlbench bench`). NLBENCH_MALLOC_TUNING=0 turns it off; off glibc (macOS,
musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["keep_freed_memory"]

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's upper limit on 64-bit: larger blocks are mmapped regardless
TOP_PAD = 64 << 20         # grow the heap in steps of 64 MiB rather than page by page

_done = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (once per process). Returns whether it is set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("NLBENCH_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # -1 turns trimming off altogether (mallopt(3)); each call returns 1 on success
    _done = bool(mallopt(M_TRIM_THRESHOLD, -1) and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                 and mallopt(M_TOP_PAD, TOP_PAD))
    return _done
