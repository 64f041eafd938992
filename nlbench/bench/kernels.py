"""Memory-kernel benchmark: forward + backward of the DGD memory update (spec §2–§3, Eq. 86–93)
for a Hope-sized memory, per memory kernel, and the speed-ups the project sets goals on:

    chunked vs per-token reference   goal ≥ 20×  (any device)
    triton  vs chunked               goal ≥ 3×   (CUDA only)

Shape: B = 4, H = 4, d = 32 — the `medium` preset's head dim (256 / 8) — linear (Eq. 93)
and residual MLP (Eq. 89, hidden = d) memories, chunk sizes 16 (Hope's default for all its
memories) and 64. One timed call = forward of reads and final state, then backward of a
fixed random cotangent into every input (q, k, v, η, α, weights), as in training.

    python -m nlbench.bench.kernels [--device cpu|cuda] [--seq-len 1024] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from nlbench.kernels.compiling import compile_mode
from nlbench.kernels.dgd import dgd_memory, resolve_memory_kernel
from nlbench.malloc import keep_freed_memory

__all__ = ["bench_memory_kernels", "memory_inputs", "time_memory_kernel"]

GOAL_CHUNKED = 20.0
GOAL_TRITON = 3.0


def memory_inputs(kind: str, B: int, H: int, T: int, d: int, device, dtype=torch.float32, seed: int = 0):
    """Inputs in the regime the model feeds the memory: unit q, k, v, η ∈ (0, 0.5), α ∈ (0.9, 1)."""
    if kind not in ("linear", "mlp"):
        raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}.")
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    ws = [torch.eye(d).expand(B, H, d, d) + 0.01 * rnd(B, H, d, d)] if kind == "linear" \
        else [rnd(B, H, d, d) / d ** 0.5, 0.02 * rnd(B, H, d, d)]
    q, k, v = (F.normalize(rnd(B, H, T, d), dim=-1) for _ in range(3))
    eta = 0.5 * torch.rand(B, H, T, generator=g)
    alpha = 0.9 + 0.1 * torch.rand(B, H, T, generator=g)
    leaves = [*ws, q, k, v, eta, alpha]
    return [x.to(device=device, dtype=dtype).contiguous().requires_grad_(True) for x in leaves]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_memory_kernel(memory_kernel: str, leaves, chunk_size: int, repeats: int = 3, compiled: bool | str = False,
                       first: list | None = None) -> float:
    """Median seconds of forward + backward (after one warm-up call, which also compiles; its
    seconds are appended to `first` when given). `compiled` (True or a compile mode): the chunked
    kernel through torch.compile."""
    n_w = len(leaves) - 5
    ws, (q, k, v, eta, alpha) = leaves[:n_w], leaves[n_w:]
    device = k.device
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(q.shape, generator=g).to(device=device, dtype=q.dtype)
    gws = [torch.randn(w.shape, generator=g).to(device=device, dtype=w.dtype) for w in ws]

    def step():
        y, w_end = dgd_memory(ws, q, k, v, eta, alpha, chunk_size, memory_kernel=memory_kernel, compiled=compiled)
        torch.autograd.backward([y, *w_end], [gy, *gws])

    t0 = time.perf_counter()
    step()
    _sync(device)
    if first is not None:
        first.append(time.perf_counter() - t0)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        for x in leaves:
            x.grad = None
    return statistics.median(times)


def bench_memory_kernels(device, seq_len: int = 1024, B: int = 4, H: int = 4, d: int = 32,
                         chunk_sizes=(16, 64), repeats: int = 5, compiled: bool | str = False) -> list[str]:
    """Time forward + backward per memory kernel; returns the lines to print (speed-ups vs goals).
    `compiled` (True or a compile mode) adds the chunked kernel through torch.compile (its compile
    time apart)."""
    device = torch.device(device)
    triton_ok = resolve_memory_kernel("auto", device) == "triton"
    lines = [f"memory kernels on {device.type}: B={B} H={H} d={d} T={seq_len}, forward + backward, fp32, "
             f"median of {repeats} (reference: 3)" + (f"; compile mode {compile_mode(compiled)}" if compiled else "")]
    for kind in ("linear", "mlp"):
        leaves = memory_inputs(kind, B, H, seq_len, d, device)
        # the reference's cost does not depend on the chunk size: one median of 3 serves all C
        t_ref = time_memory_kernel("reference", leaves, chunk_sizes[0], repeats=3)
        lines.append(f"  {kind:<6} reference (per-token)  {1e3 * t_ref:9.1f} ms")
        for C in chunk_sizes:
            t_chk = time_memory_kernel("chunked", leaves, C, repeats)
            ratio = t_ref / t_chk
            lines.append(f"  {kind:<6} chunked C={C:<3}          {1e3 * t_chk:9.1f} ms   {ratio:6.1f}x vs reference "
                         f"(goal >= {GOAL_CHUNKED:.0f}x: {'met' if ratio >= GOAL_CHUNKED else 'NOT met'})")
            if compiled:
                first = []
                t_cmp = time_memory_kernel("chunked", leaves, C, repeats, compiled=compiled, first=first)
                ratio = t_ref / t_cmp
                lines.append(f"  {kind:<6} compiled C={C:<3}         {1e3 * t_cmp:9.1f} ms   {ratio:6.1f}x vs reference "
                             f"(goal >= {GOAL_CHUNKED:.0f}x: {'met' if ratio >= GOAL_CHUNKED else 'NOT met'}; "
                             f"first call {first[0]:.1f} s)")
            if triton_ok:
                t_tri = time_memory_kernel("triton", leaves, C, repeats)
                r_tri = t_chk / t_tri
                lines.append(f"  {kind:<6} triton  C={C:<3}          {1e3 * t_tri:9.1f} ms   {r_tri:6.1f}x vs chunked "
                             f"(goal >= {GOAL_TRITON:.0f}x: {'met' if r_tri >= GOAL_TRITON else 'NOT met'})")
    if not triton_ok:
        lines.append("  triton: skipped (needs CUDA tensors and an importable triton)")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description="Benchmark the DGD memory kernels (forward + backward).")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="also time the chunked kernel through torch.compile")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as in training runs (nlbench.malloc)
    for line in bench_memory_kernels(args.device, seq_len=args.seq_len, compiled=args.compile):
        print(line, flush=True)


if __name__ == "__main__":
    main()
