"""nlbench.malloc: glibc is told to keep freed memory. The unit test checks the setting itself
through glibc's own accounting (mallinfo2), which does not depend on the machine's memory
reclaim; what it buys a training step (page faults, step time) is measured by
``python -m nlbench.bench.malloc``, never asserted here."""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes
from nlbench.malloc import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = libc.mallinfo2()
block = libc.malloc(8 << 20)          # an 8 MiB block: mmapped under glibc's defaults
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(applied, during.hblks - before.hblks, during.arena - before.arena, after.arena - before.arena)
"""


def _probe(tuning: str):
    env = {**os.environ, "NLBENCH_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, mmapped, heap_during, heap_after = out.stdout.split()[-4:]
    return applied == "True", int(mmapped), int(heap_during), int(heap_after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_serves_large_blocks_from_a_heap_it_keeps():
    applied, mmapped, heap_during, heap_after = _probe("1")
    assert applied
    assert mmapped == 0                      # served from the heap, not by mmap
    assert heap_during >= 8 << 20
    assert heap_after == heap_during         # freeing it hands nothing back to the OS


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuning_off_leaves_glibc_defaults():
    applied, mmapped, heap_during, heap_after = _probe("0")
    assert not applied
    assert mmapped == 1 and heap_during == 0 and heap_after == 0
