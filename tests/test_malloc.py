"""nlbench.malloc: with glibc told to keep freed memory, a loop that allocates and frees
"activations" stops page-faulting them in again every iteration (counted by the kernel)."""

import os
import subprocess
import sys

import pytest

LOOP = """
import resource, sys, torch
from nlbench.malloc import keep_freed_memory
print(keep_freed_memory())
for it in range(6):
    if it == 1:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(1 << 20) for _ in range(32)]  # 32 x 4 MiB allocated, then all freed
    del xs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(tuning: str):
    env = {**os.environ, "NLBENCH_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", LOOP], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_refaulting():
    applied_off, faults_off = _faults("0")
    applied_on, faults_on = _faults("1")
    assert not applied_off and applied_on
    # 5 iterations x 128 MiB: tens of thousands of pages faulted in again by default (how many
    # depends on the kernel's huge-page setting), a few thousand when kept
    assert faults_off > 20_000, faults_off
    assert faults_on < faults_off / 5, (faults_on, faults_off)
