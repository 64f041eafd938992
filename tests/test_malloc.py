"""nlbench.malloc: with glibc told to keep freed memory, training steps stop page-faulting their
activations in again every step (counted by the kernel). The workload is the real one: forward
and backward passes of a Hope model, in a fresh process per setting."""

import os
import subprocess
import sys

import pytest

STEPS = """
import resource, torch
from nlbench.malloc import keep_freed_memory
print(keep_freed_memory())
from nlbench.models import build_model
torch.manual_seed(0)
torch.set_num_threads(1)
model = build_model("hope", size="small", vocab_size=64)
tokens = torch.randint(0, 64, (4, 512))
faults = []
for step in range(4):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(tokens).logits.square().mean().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sum(faults[1:]))  # after the first step, which faults everything in once either way
"""


def _faults(tuning: str):
    env = {**os.environ, "NLBENCH_MALLOC_TUNING": tuning}
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_stops_refaulting():
    applied_off, faults_off = _faults("0")
    applied_on, faults_on = _faults("1")
    assert not applied_off and applied_on
    # measured: 18–43 thousand pages faulted in again over steps 2–4 by default, 1–3 thousand kept
    assert faults_off > 5_000, faults_off
    assert faults_on < faults_off / 4, (faults_on, faults_off)
