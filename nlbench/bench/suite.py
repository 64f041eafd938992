"""One bench config measured on one device: every (size, seq_len, model) case, as throughput rows.

The same function runs in `nlbench bench` itself and, with `--address`, inside a Ray task on each
kind of node (nlbench.bench.cluster); `log` receives the lines the command prints (a remote task
collects them and the driver prints them).
"""

from __future__ import annotations

import shlex
import sys
import time
from datetime import datetime, timezone
from typing import Callable

__all__ = ["measure_suite", "row_id"]


def row_id(cfg_name: str, r: dict, stamp: str) -> str:
    # the device too: one `bench --address` measures the same cases on several devices at one stamp
    return f"{cfg_name}:{r['model']}:{r['size']}:{r['seq_len']}:{r['batch_size']}:{r['phase']}:{r['dtype']}:{r['device']}:{stamp}"


def measure_suite(cfg, models, dev_str: str, log: Callable[[str], None], *, command: str | None = None,
                  stamp: str | None = None, only: str | None = None) -> dict:
    """Measure ``models`` (the config's, filtered by --only) and the config's stream models
    matching ``only`` on ``dev_str`` ('cpu' or 'cuda').

    Returns ``dict(device=…, peak=…, rows=[…], kernel_lines=[…])``; every row carries the
    provenance columns (versions, git sha), the command and the timestamp ``stamp`` (one per
    `nlbench bench` invocation, shared by every node it measured on)."""
    import torch

    from nlbench.bench.throughput import BenchCase, bench_case, device_name, measure_matmul_peak, versions
    from nlbench.malloc import keep_freed_memory

    dev = torch.device(dev_str)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # as in training runs (nlbench.malloc)
    dtype = getattr(torch, cfg.dtype)
    if dev.type == "cpu" and dtype != torch.float32:
        log(f"note: dtype {cfg.dtype} on CPU runs under autocast; MFU is against the {cfg.dtype} matmul peak.")
    peak = measure_matmul_peak(dev, dtype)
    name = device_name(dev)
    log(f"device {name}  dtype {cfg.dtype}  measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    if dev.type == "cpu":  # Hope's speed on CPU depends on it (README, "Hope's CPU kernel")
        from nlbench.kernels.dgd import cpu_step

        ok, why = cpu_step.available()
        log("Hope's CPU kernel: C++ (nlbench/kernels/dgd/hope_step.cpp)" if ok
            else f"Hope's CPU kernel: PyTorch ops ({why})")
    command = command or " ".join(shlex.quote(a) for a in ["nlbench", *sys.argv[1:]])
    stamp = stamp or datetime.now(timezone.utc).isoformat()
    meta = dict(versions(), command=command, timestamp=stamp, matmul_peak_flops=peak, config_name=cfg.name)

    rows = []
    for size in cfg.sizes:
        for seq_len in cfg.seq_lens:
            for m in models:
                case = BenchCase(m.name, size, seq_len, cfg.batch_size, m.options, label=m.label)
                t0 = time.perf_counter()
                try:
                    got = bench_case(
                        case, device=dev, dtype=dtype, vocab_size=cfg.vocab_size, optimizer=cfg.optimizer,
                        lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps, phases=list(cfg.phases),
                        compile=cfg.compile_mode or False, peak_flops=peak,
                    )
                except torch.OutOfMemoryError as e:
                    log(f"skip {m.name}/{size}/T={seq_len}: out of memory ({e})")
                    continue
                for r in got:
                    r.update(meta)
                    r["run_id"] = row_id(cfg.name, r, stamp)
                    log(f"{r['model']:>15} {size:>6} T={seq_len:<5} {r['phase']:<5} {r['tokens_per_s']:>10.0f} tok/s "
                        f"p50 {r['step_ms_p50']:.1f} ms  MFU {100 * r['mfu']:.1f}%  ({time.perf_counter() - t0:.0f}s)")
                rows.extend(got)
    eager = _eager_references(cfg, models, rows, dev, dtype, peak, log) if cfg.compile_mode else {}
    stream_models = [m for m in cfg.stream.models if only is None or only in m.row_name] if cfg.stream else []
    for size in cfg.sizes if stream_models else []:
        for m in stream_models:
            from nlbench.bench.stream import bench_stream

            t0 = time.perf_counter()
            got = bench_stream(m.name, size, cfg.stream.seq_lens, chunk=cfg.stream.chunk,
                               warmup_chunks=cfg.stream.warmup_chunks, device=dev, dtype=dtype,
                               vocab_size=cfg.vocab_size, options=m.options, peak_flops=peak)
            for r in got:
                r.update(meta, model=m.row_name)
                r["run_id"] = f"{cfg.name}:{r['model']}:{size}:{r['seq_len']}:1:stream:{r['dtype']}:{r['device']}:{stamp}"
                log(f"{r['model']:>15} {size:>6} T={r['seq_len']:<5} stream {r['tokens_per_s']:>9.0f} tok/s "
                    f"per token p50 {r['token_ms_p50']:.3f} ms p95 {r['token_ms_p95']:.3f} ms "
                    f"({time.perf_counter() - t0:.0f}s)")
            rows.extend(got)
    kernel_lines = []
    if cfg.kernel_seq_len:
        from nlbench.bench.kernels import bench_memory_kernels

        kernel_lines = list(bench_memory_kernels(dev, seq_len=cfg.kernel_seq_len, compiled=cfg.compile_mode or False))
    return dict(device=name, peak=peak, rows=rows, kernel_lines=kernel_lines, eager_train=eager)


def _eager_references(cfg, models, rows, dev, dtype, peak, log) -> dict:
    """In a compiled run, Hope's and the Transformer's train phase once more, eager: the goal on
    compiled throughput compares each model in its faster mode, measured in the same run. Kept
    out of the rows (they would sit in the compiled run's columns); keyed (model, size, T)."""
    import torch

    from nlbench.bench.throughput import BenchCase, bench_case

    entries = {m.row_name: m for m in models}
    out = {}
    for r in rows:
        if r["model"] not in ("hope", "transformer") or r["phase"] != "train" or r["model"] not in entries:
            continue
        m = entries[r["model"]]
        case = BenchCase(m.name, r["size"], r["seq_len"], cfg.batch_size, m.options, label=m.label)
        try:
            got = bench_case(case, device=dev, dtype=dtype, vocab_size=cfg.vocab_size, optimizer=cfg.optimizer,
                             lr=cfg.lr, warmup_steps=cfg.warmup_steps, steps=cfg.steps, phases=["train"],
                             compile=False, peak_flops=peak)
        except torch.OutOfMemoryError as e:
            log(f"skip the eager reference of {r['model']}: out of memory ({e})")
            continue
        out[(r["model"], r["size"], r["seq_len"])] = got[0]
        log(f"{r['model']:>15} {r['size']:>6} T={r['seq_len']:<5} train {got[0]['tokens_per_s']:>10.0f} tok/s eager "
            f"(reference for the faster-mode goal)")
    return out
