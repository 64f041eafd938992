"""Throughput benchmark: tokens/s, step-time percentiles, peak memory and MFU per model.

For every (model, size, seq_len) of a bench config this measures

* ``train``: forward + backward + optimizer step on random tokens,
* ``infer``: forward only (``torch.inference_mode``),

after ``warmup_steps`` untimed steps (``torch.compile`` time, when on, is reported apart as
``compile_s``). MFU is achieved matmul FLOP/s over the matmul peak *measured on the same device in
the same run* (``mfu``), and over the datasheet peak when the device is known
(``mfu_datasheet``). Achieved FLOP/s counts ``flops_per_token`` (one forward, memory-update inner
loop included) times 3 for training (forward + backward) and times 1 for inference.

Peak memory: ``torch.cuda.max_memory_allocated`` during the timed steps on CUDA. On CPU (torch's
CPU allocator has no counter): the model's parameter and buffer bytes plus the peak growth of the
process's resident set size during the phase's steps (warm-up included: optimizer state,
gradients, activations) over its size just before them, with freed heap memory returned to the
OS first (``malloc_trim``) so that a case's memory is not hidden in memory an earlier one freed.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import nlbench
from nlbench.environment import device_name, git_sha
from nlbench.environment import versions as versions_of_environment
from nlbench.models import build_model, flops_per_token

# Dense bf16 matmul peaks from vendors' datasheets, in FLOP/s (no sparsity).
DATASHEET_PEAK_BF16 = {
    "A100": 312e12,
    "H100 SXM": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "H200": 989e12,
}


def datasheet_peak(device_name: str, dtype: torch.dtype) -> float | None:
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for key in sorted(DATASHEET_PEAK_BF16, key=len, reverse=True):
        if key.replace(" ", "").lower() in device_name.replace(" ", "").lower():
            return DATASHEET_PEAK_BF16[key]
    return None


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 10) -> float:
    """Best achieved FLOP/s of an n×n×n matmul: the roofline this run's MFU is measured against."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class _PeakRSS:
    """Samples the process's resident set size in a thread (CPU peak-memory proxy)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                import os

                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: fall back to the lifetime peak
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _released_rss() -> int:
    """The process's RSS after freed heap memory went back to the OS (glibc malloc_trim), so that
    the next case's growth counts its own model, optimizer state and activations, not memory an
    earlier case left in the allocator's free lists."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then hide reused memory
        pass
    return _PeakRSS.rss()


@dataclass
class BenchCase:
    model: str
    size: str
    seq_len: int
    batch_size: int
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None  # the rows' `model` (default: the model's name)


def bench_case(
    case: BenchCase,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vocab_size: int,
    optimizer: str,
    lr: float,
    warmup_steps: int,
    steps: int,
    phases: list[str],
    compile: bool | str,
    peak_flops: float,
) -> list[dict[str, Any]]:
    """Measure one (model, size, seq_len); one row per phase. `compile`: False (eager), True or
    a mode of `nlbench.kernels.compiling.COMPILE_MODES`."""
    from nlbench.kernels.compiling import compile_mode
    from nlbench.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(case.model, size=case.size, vocab_size=vocab_size, **case.options).to(device)
    fpt = flops_per_token(model, case.seq_len)
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    opt = build_optimizer(optimizer, model, lr=lr)
    mode = compile_mode(compile)
    fwd = model.compiled(mode) if mode else model  # Hope: its chunk kernels (NLModel.compiled)
    tokens = torch.randint(0, vocab_size, (case.batch_size, case.seq_len), device=device)
    targets = torch.roll(tokens, -1, dims=1)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
    )

    def train_step():
        with autocast:
            logits = fwd(tokens).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), autocast:
            fwd(tokens).logits

    rows = []
    dtype_name = str(dtype).replace("torch.", "")
    for phase in phases:
        step = train_step if phase == "train" else infer_step
        compile_s = None
        base_rss = _released_rss() if device.type == "cpu" else 0
        with _PeakRSS() as rss:  # from the first step: the optimizer state appears there
            t0 = time.perf_counter()
            step()  # first call: includes torch.compile when on
            _sync(device)
            if compile:
                compile_s = time.perf_counter() - t0
            for _ in range(max(0, warmup_steps - 1)):
                step()
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                _sync(device)
                times.append(time.perf_counter() - t0)
        if device.type == "cuda":
            peak_mem = torch.cuda.max_memory_allocated(device)
        else:
            peak_mem = model_bytes + max(0, rss.peak - base_rss)
        ntok = case.batch_size * case.seq_len
        tokens_per_s = ntok / statistics.mean(times)
        flop_mult = 3.0 if phase == "train" else 1.0
        achieved = flop_mult * fpt * tokens_per_s
        sheet = datasheet_peak(device_name(device), dtype)
        rows.append(
            dict(
                model=case.label or case.model,
                size=case.size,
                seq_len=case.seq_len,
                batch_size=case.batch_size,
                phase=phase,
                tokens_per_s=tokens_per_s,
                step_ms_p50=1e3 * float(np.percentile(times, 50)),
                step_ms_p95=1e3 * float(np.percentile(times, 95)),
                peak_mem_bytes=int(peak_mem),
                mfu=achieved / peak_flops,
                mfu_datasheet=(achieved / sheet) if sheet else None,
                flops_per_token=fpt,
                params=model.num_params(),
                device=device_name(device),
                dtype=dtype_name,
                compile_s=compile_s,
                compile_mode=mode,
                steps=steps,
            )
        )
    del model, opt
    return rows


def versions() -> dict[str, str | None]:
    """The throughput table's provenance columns (nlbench.environment): package versions and the
    source commit of the code that measured (git_sha: None outside a git checkout)."""
    v = versions_of_environment()
    return dict(torch_version=torch.__version__, triton_version=v["triton"] or "absent",
                nlbench_version=nlbench.__version__, python_version=v["python"], ray_version=v["ray"],
                git_sha=git_sha())
