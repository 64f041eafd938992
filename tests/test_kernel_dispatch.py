"""Backend dispatch of the DGD memory (nlbench.kernels.dgd) and the memory-kernel benchmark.

Runs in this pytest process WITHOUT the Triton interpreter: the triton memory kernel on CPU must be
refused with an explanation; the interpreted path is tested in test_triton_kernels.py.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.nn.functional as F

from nlbench.kernels.dgd import DGD_MEMORY_KERNELS, dgd_memory, dgd_memory_chunked, dgd_memory_reference, resolve_memory_kernel, triton_status

torch.set_num_threads(1)


def _inputs(mlp=False, B=1, H=2, T=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(B, H, d, d, generator=g) * 0.5 for _ in range(2 if mlp else 1)]
    q, k, v = (F.normalize(torch.randn(B, H, T, d, generator=g), dim=-1) for _ in range(3))
    eta = 0.5 * torch.rand(B, H, T, generator=g)
    alpha = 0.5 + 0.5 * torch.rand(B, H, T, generator=g)
    return ws, q, k, v, eta, alpha


def test_bad_backend_names_the_allowed_values():
    ws, q, k, v, eta, alpha = _inputs()
    with pytest.raises(ValueError, match="memory_kernel must be one of 'reference', 'chunked', 'triton', 'auto'.*'cuda'"):
        dgd_memory(ws, q, k, v, eta, alpha, 4, memory_kernel="cuda")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process runs the triton interpreter")
def test_triton_on_cpu_without_interpreter_is_refused_with_the_fix():
    ws, q, k, v, eta, alpha = _inputs()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dgd_memory(ws, q, k, v, eta, alpha, 4, memory_kernel="triton")


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("memory_kernel,fn", [("reference", dgd_memory_reference), ("chunked", dgd_memory_chunked),
                                        ("auto", dgd_memory_chunked)])
def test_memory_kernels_route_to_their_implementation(mlp, memory_kernel, fn):
    # bitwise equal: the dispatcher adds no computation of its own (auto on CPU = chunked)
    ws, q, k, v, eta, alpha = _inputs(mlp)
    for self_target in (True, False):
        y, w = dgd_memory(ws, q, k, v, eta, alpha, 3, self_target=self_target, memory_kernel=memory_kernel)
        y0, w0 = fn(ws, q, k, v, eta, alpha, 3, self_target)
        assert torch.equal(y, y0) and all(torch.equal(a, b) for a, b in zip(w, w0))


def test_reference_and_chunked_agree_through_dispatch_with_and_without_reads():
    ws, q, k, v, eta, alpha = _inputs(mlp=True, T=9)
    for reads in (q, None):
        y0, w0 = dgd_memory(ws, reads, k, v, eta, alpha, 4, memory_kernel="reference")
        y1, w1 = dgd_memory(ws, reads, k, v, eta, alpha, 4, memory_kernel="chunked")
        assert (y0 is None) == (reads is None) == (y1 is None)
        if reads is not None:
            torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
        for a, b in zip(w1, w0):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_resolve_memory_kernel_auto_picks_triton_only_on_cuda():
    assert set(DGD_MEMORY_KERNELS) == {"reference", "chunked", "triton", "auto"}
    assert resolve_memory_kernel("auto", torch.device("cpu")) == "chunked"
    assert resolve_memory_kernel("auto", "cuda:0") == ("triton" if triton_status()[0] else "chunked")
    assert resolve_memory_kernel("reference", "cuda") == "reference"


def test_bench_memory_kernels_reports_speedups():
    from nlbench.bench.kernels import bench_memory_kernels

    lines = bench_memory_kernels("cpu", seq_len=8, B=1, H=1, d=4, chunk_sizes=(4,), repeats=1)
    text = "\n".join(lines)
    for kind in ("linear", "mlp"):
        assert re.search(rf"{kind} +reference \(per-token\) +[0-9.]+ ms", text), text
        assert re.search(rf"{kind} +chunked C=4 +[0-9.]+ ms +[0-9.]+x vs reference", text), text
    assert text.count("x vs reference (goal >= 20x") == 2
    assert "triton: skipped" in text or "vs chunked" in text


def test_auto_keeps_chunked_for_inputs_the_fused_kernel_does_not_take():
    from nlbench.kernels.dgd import _triton_fits

    ws, q, k, v, eta, alpha = _inputs()
    assert _triton_fits(ws, k) and _triton_fits(ws, k.bfloat16())
    assert not _triton_fits(ws, k.double())  # the kernel accumulates in fp32
    big = [torch.zeros(1, 2, 4, 129)]  # state must stay on chip: dims ≤ 128
    assert not _triton_fits(big, k)
