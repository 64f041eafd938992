"""`nlbench bench CONFIG --out OUT`: throughput of every model, written to OUT/throughput."""

from __future__ import annotations

import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Results directory (OUT/throughput).")
@click.option("--only", default=None, help="Only models whose name contains this string.")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]), help="Override the config's device.")
def bench(config, out, only, device):
    """Measure train/inference tokens/s, p50/p95 step time, peak memory and MFU."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from nlbench.bench.bench_config import load_bench_config
    from nlbench.bench.throughput import BenchCase, bench_case, device_name, measure_matmul_peak, versions
    from nlbench.malloc import keep_freed_memory
    from nlbench.results import ResultStore

    console = Console()
    if not console.is_terminal:  # logs and CI: don't wrap rows at 80 columns
        console = Console(width=160)
    from nlbench.preflight import check_writable

    cfg = load_bench_config(config)
    check_writable(out)
    models = [m for m in cfg.models if only is None or only in m.row_name]
    if not models:
        click.echo(f"error: --only {only!r} matches none of the config's models "
                      f"({', '.join(m.name for m in cfg.models)}); nothing measured or written.", err=True)
        sys.exit(2)
    dev_str = device or cfg.device
    if dev_str == "auto":
        dev_str = "cuda" if torch.cuda.is_available() else "cpu"
    if dev_str == "cuda" and not torch.cuda.is_available():
        console.print("[red]error:[/red] device 'cuda' requested but torch sees no CUDA device; use device: cpu or auto.")
        sys.exit(2)
    dev = torch.device(dev_str)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # as in training runs (nlbench.malloc)
    dtype = getattr(torch, cfg.dtype)
    if dev.type == "cpu" and dtype != torch.float32:
        console.print(f"[yellow]note:[/yellow] dtype {cfg.dtype} on CPU runs under autocast; MFU is against the {cfg.dtype} matmul peak.")

    peak = measure_matmul_peak(dev, dtype)
    console.print(f"device {device_name(dev)}  dtype {cfg.dtype}  measured matmul peak {peak / 1e9:.1f} GFLOP/s")
    cmd = " ".join(shlex.quote(a) for a in ["nlbench", *sys.argv[1:]])
    stamp = datetime.now(timezone.utc).isoformat()
    meta = dict(versions(), command=cmd, timestamp=stamp, matmul_peak_flops=peak, config_name=cfg.name)

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
                    console.print(f"[yellow]skip[/yellow] {m.name}/{size}/T={seq_len}: out of memory ({e})")
                    continue
                for r in got:
                    r.update(meta)
                    r["run_id"] = f"{cfg.name}:{r['model']}:{size}:{seq_len}:{cfg.batch_size}:{r['phase']}:{r['dtype']}:{stamp}"
                    console.print(
                        f"{r['model']:>15} {size:>6} T={seq_len:<5} {r['phase']:<5} {r['tokens_per_s']:>10.0f} tok/s "
                        f"p50 {r['step_ms_p50']:.1f} ms  MFU {100 * r['mfu']:.1f}%  ({time.perf_counter() - t0:.0f}s)"
                    )
                rows.extend(got)
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
                r["run_id"] = f"{cfg.name}:{r['model']}:{size}:{r['seq_len']}:1:stream:{r['dtype']}:{stamp}"
                console.print(
                    f"{r['model']:>15} {size:>6} T={r['seq_len']:<5} stream {r['tokens_per_s']:>9.0f} tok/s "
                    f"per token p50 {r['token_ms_p50']:.3f} ms p95 {r['token_ms_p95']:.3f} ms "
                    f"({time.perf_counter() - t0:.0f}s)"
                )
            rows.extend(got)
    store = ResultStore(Path(out))
    key = re.sub(r"[^A-Za-z0-9._+@-]", "_", f"{cfg.name}-{stamp}")
    store.write_rows("throughput", rows, key=key)

    table = Table(title=f"throughput — {device_name(dev)} ({cfg.dtype})")
    for col in ["model", "size", "T", "phase", "tokens/s", "p50 ms", "p95 ms", "peak MiB", "MFU %"]:
        table.add_column(col, justify="right" if col not in ("model", "phase") else "left")
    for r in (r for r in rows if r["phase"] != "stream"):
        table.add_row(r["model"], r["size"], str(r["seq_len"]), r["phase"], f"{r['tokens_per_s']:.0f}",
                      f"{r['step_ms_p50']:.1f}", f"{r['step_ms_p95']:.1f}", f"{r['peak_mem_bytes'] / 2**20:.0f}",
                      f"{100 * r['mfu']:.1f}")
    console.print(table)
    if any(r["phase"] == "stream" for r in rows):
        console.print(_stream_table(rows, device_name(dev), cfg.dtype))
    _print_goals(console, rows)
    if cfg.kernel_seq_len:
        from nlbench.bench.kernels import bench_memory_kernels

        for line in bench_memory_kernels(dev, seq_len=cfg.kernel_seq_len, compiled=cfg.compile_mode or False):
            console.print(line)
    console.print(f"wrote {len(rows)} rows to {Path(out) / 'throughput'}")


def _stream_table(rows, device, dtype):
    from rich.table import Table

    table = Table(title=f"stream (batch 1, state carried) — {device} ({dtype})")
    for col in ["model", "size", "T", "chunk", "tokens/s", "ms/token p50", "ms/token p95", "peak MiB"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in (r for r in rows if r["phase"] == "stream"):
        table.add_row(r["model"], r["size"], str(r["seq_len"]), str(r["stream_chunk"]), f"{r['tokens_per_s']:.0f}",
                      f"{r['token_ms_p50']:.3f}", f"{r['token_ms_p95']:.3f}", f"{r['peak_mem_bytes'] / 2**20:.0f}")
    return table


def _print_goals(console, rows):
    """Ratios the project sets goals on, from this run's own measurements: tokens/s (mean step
    time), and the same ratio of median step times, which one step slowed by the machine (a
    shared CPU) moves less."""
    by = {(r["model"], r["size"], r["seq_len"], r["phase"]): r for r in rows}
    for (model, size, t, phase), r in sorted(by.items()):
        ref = by.get(("transformer", size, t, "train"))
        if model.startswith("hope") and not model.startswith("hope-attention") and phase == "train" and ref:
            console.print(f"goal: {model}/Transformer train peak memory at {size}, T={t}: "
                          f"{r['peak_mem_bytes'] / ref['peak_mem_bytes']:.2f}x ({r['peak_mem_bytes'] / 2**20:.0f} vs "
                          f"{ref['peak_mem_bytes'] / 2**20:.0f} MiB; goal <= 2x)")
        if model == "hope" and phase == "train" and ref is not None:
            ratio = r["tokens_per_s"] / ref["tokens_per_s"]
            median_ratio = ref["step_ms_p50"] / r["step_ms_p50"]
            console.print(f"goal: Hope/Transformer train tokens/s at {size}, T={t}: {ratio:.2f}x (goal >= 0.5x; "
                          f"median step times: {median_ratio:.2f}x)")
    from nlbench.bench.stream import flatness

    for (model, size), x in sorted(flatness(rows).items()):
        ts = sorted(r["seq_len"] for r in rows if r["phase"] == "stream" and (r["model"], r["size"]) == (model, size))
        goal = " (goal <= 1.5x: flat in T)" if model == "hope" else ""
        console.print(f"stream: {model} at {size}: per-token latency (median) at T={ts[-1]} / T={ts[0]}: "
                      f"{x:.2f}x{goal}")
