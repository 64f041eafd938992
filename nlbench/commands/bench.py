"""`nlbench bench CONFIG --out OUT [--address ADDR]`: throughput of every model, written to OUT/throughput
(with --address: on each kind of node of a Ray cluster, nlbench.bench.cluster)."""

from __future__ import annotations

import re
import shlex
import sys
from datetime import datetime, timezone

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Results directory (OUT/throughput).")
@click.option("--only", default=None, help="Only models whose name contains this string.")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]), help="Override the config's device.")
@click.option("--address", default=None,
              help="Measure on a Ray cluster (HOST:PORT, ray://HOST:PORT or auto): one node of each kind "
                   "(CPU, each GPU type), all rows into one OUT/throughput.")
def bench(config, out, only, device, address):
    """Measure train/inference tokens/s, p50/p95 step time, peak memory and MFU."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from nlbench.bench.bench_config import load_bench_config
    from nlbench.bench.suite import measure_suite
    from nlbench.preflight import check_address, check_writable
    from nlbench.results import ResultStore

    console = Console()
    if not console.is_terminal:  # logs and CI: don't wrap rows at 80 columns
        console = Console(width=160)

    cfg = load_bench_config(config)
    check_writable(out)
    check_address(address)
    models = [m for m in cfg.models if only is None or only in m.row_name]
    if not models:
        click.echo(f"error: --only {only!r} matches none of the config's models "
                      f"({', '.join(m.name for m in cfg.models)}); nothing measured or written.", err=True)
        sys.exit(2)
    if device:
        cfg = cfg.model_copy(update={"device": device})
    cmd = " ".join(shlex.quote(a) for a in ["nlbench", *sys.argv[1:]])
    stamp = datetime.now(timezone.utc).isoformat()

    if address is not None:
        from nlbench.bench.cluster import bench_on_cluster

        rows, errors = bench_on_cluster(cfg, models, address, console.print, command=cmd, stamp=stamp, only=only)
        if errors:
            click.echo("error: the bench failed on " + "; ".join(errors) + f". Nothing was written to {out} "
                       f"(the other kinds' rows too: rerun with `device: cpu` or `device: cuda` to measure "
                       f"only some kinds).", err=True)
            sys.exit(1)
        devices = sorted({r["device"] for r in rows})
        title = f"throughput — {', '.join(devices)} ({cfg.dtype})"
    else:
        dev_str = cfg.device
        if dev_str == "auto":
            dev_str = "cuda" if torch.cuda.is_available() else "cpu"
        if dev_str == "cuda" and not torch.cuda.is_available():
            console.print("[red]error:[/red] device 'cuda' requested but torch sees no CUDA device; use device: cpu or auto.")
            sys.exit(2)
        got = measure_suite(cfg, models, dev_str, console.print, command=cmd, stamp=stamp, only=only)
        rows = got["rows"]
        title = f"throughput — {got['device']} ({cfg.dtype})"

    store = ResultStore(out)
    key = re.sub(r"[^A-Za-z0-9._+@-]", "_", f"{cfg.name}-{stamp}")
    store.write_rows("throughput", rows, key=key)

    table = Table(title=title)
    multi = len({r["device"] for r in rows}) > 1
    cols = ["model", "size", "T", "phase", "tokens/s", "p50 ms", "p95 ms", "peak MiB", "MFU %"]
    for col in (["device"] if multi else []) + cols:
        table.add_column(col, justify="right" if col not in ("model", "phase", "device") else "left")
    for r in (r for r in rows if r["phase"] != "stream"):
        table.add_row(*([r["device"]] if multi else []), r["model"], r["size"], str(r["seq_len"]), r["phase"],
                      f"{r['tokens_per_s']:.0f}", f"{r['step_ms_p50']:.1f}", f"{r['step_ms_p95']:.1f}",
                      f"{r['peak_mem_bytes'] / 2**20:.0f}", f"{100 * r['mfu']:.1f}")
    console.print(table)
    for dev_name in sorted({r["device"] for r in rows}):
        of_device = [r for r in rows if r["device"] == dev_name]
        if any(r["phase"] == "stream" for r in of_device):
            console.print(_stream_table(of_device, dev_name, cfg.dtype))
        _print_goals(console, of_device, {} if address is not None else got.get("eager_train", {}))
    if address is None:
        for line in got["kernel_lines"]:
            console.print(line)
    console.print(f"wrote {len(rows)} rows to {str(out).rstrip('/')}/throughput")


def _stream_table(rows, device, dtype):
    from rich.table import Table

    table = Table(title=f"stream (batch 1, state carried) — {device} ({dtype})")
    for col in ["model", "size", "T", "chunk", "tokens/s", "ms/token p50", "ms/token p95", "peak MiB"]:
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in (r for r in rows if r["phase"] == "stream"):
        table.add_row(r["model"], r["size"], str(r["seq_len"]), str(r["stream_chunk"]), f"{r['tokens_per_s']:.0f}",
                      f"{r['token_ms_p50']:.3f}", f"{r['token_ms_p95']:.3f}", f"{r['peak_mem_bytes'] / 2**20:.0f}")
    return table


def _faster_mode(name, compiled, eager):
    """(the faster of a model's compiled and eager train rows, "Name mode tok/s (other mode tok/s)")."""
    fast, slow = (("compiled", compiled), ("eager", eager))
    if eager["tokens_per_s"] > compiled["tokens_per_s"]:
        fast, slow = slow, fast
    return fast[1], f"{name} {fast[0]} {fast[1]['tokens_per_s']:,.0f} ({slow[0]} {slow[1]['tokens_per_s']:,.0f})"


def _print_goals(console, rows, eager_train=None):
    """Ratios the project sets goals on, from this run's own measurements: tokens/s (mean step
    time), and the same ratio of median step times, which one step slowed by the machine (a
    shared CPU) moves less. A compiled run's goal is 0.65x with each model in its faster mode:
    `eager_train` holds the same run's eager train rows of Hope and the Transformer."""
    by = {(r["model"], r["size"], r["seq_len"], r["phase"]): r for r in rows}
    eager_train = eager_train or {}
    for (model, size, t, phase), r in sorted(by.items()):
        ref = by.get(("transformer", size, t, "train"))
        if model.startswith("hope") and not model.startswith("hope-attention") and phase == "train" and ref:
            console.print(f"goal: {model}/Transformer train peak memory at {size}, T={t}: "
                          f"{r['peak_mem_bytes'] / ref['peak_mem_bytes']:.2f}x ({r['peak_mem_bytes'] / 2**20:.0f} vs "
                          f"{ref['peak_mem_bytes'] / 2**20:.0f} MiB; goal <= 2x)")
        if model == "hope" and phase == "train" and ref is not None:
            ratio = r["tokens_per_s"] / ref["tokens_per_s"]
            median_ratio = ref["step_ms_p50"] / r["step_ms_p50"]
            compiled = bool(r.get("compile_mode"))
            console.print(f"goal: Hope/Transformer train tokens/s at {size}, T={t}{', compiled' if compiled else ''}: "
                          f"{ratio:.2f}x (goal >= {0.65 if compiled else 0.5}x; median step times: {median_ratio:.2f}x)")
            e_hope, e_ref = eager_train.get(("hope", size, t)), eager_train.get(("transformer", size, t))
            if compiled and e_hope and e_ref:
                (h, h_text), (tr, tr_text) = _faster_mode("Hope", r, e_hope), _faster_mode("Transformer", ref, e_ref)
                console.print(
                    f"goal: Hope/Transformer train tokens/s at {size}, T={t}, each model in its faster mode: "
                    f"{h['tokens_per_s'] / tr['tokens_per_s']:.2f}x (goal >= 0.65x; {h_text}, {tr_text}; "
                    f"median step times: {tr['step_ms_p50'] / h['step_ms_p50']:.2f}x)", markup=False)
    from nlbench.bench.stream import flatness

    for (model, size), x in sorted(flatness(rows).items()):
        ts = sorted(r["seq_len"] for r in rows if r["phase"] == "stream" and (r["model"], r["size"]) == (model, size))
        goal = " (goal <= 1.5x: flat in T)" if model == "hope" else ""
        console.print(f"stream: {model} at {size}: per-token latency (median) at T={ts[-1]} / T={ts[0]}: "
                      f"{x:.2f}x{goal}")
