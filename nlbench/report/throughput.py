"""Throughput report: per (model, size, seq_len, batch_size, phase), devices side by side.

Rows of the ``throughput`` table (``nlbench bench``) from any number of result directories — e.g.
one measured on a CPU, one on an H100 — are lined up on the case key ``(model, size, seq_len,
batch_size, phase)``; a case measured on only one device keeps empty cells for the others (a
speed-up needs the same case on both). Each device column is ``device (dtype)``, with
`` [compile mode]`` appended for rows measured through ``torch.compile`` (``compile:`` in the
bench config), so eager and compiled runs of one device sit side by side; repeated
measurements of one case on one device are summarised by their median (``n`` says how many).
Speed-up = tokens/s on the device ÷ tokens/s on the baseline device (the CPU one when there is
one, else the first in name order).
"""

from __future__ import annotations

import math

import pandas as pd

from nlbench.report.load import ReportError

CASE = ("model", "size", "seq_len", "batch_size", "phase")
REQUIRED = (*CASE, "tokens_per_s", "device", "dtype")
VALUES = ("tokens_per_s", "step_ms_p50", "step_ms_p95", "peak_mem_bytes", "mfu")


def series_label(device: str, dtype: str, compile_mode=None) -> str:
    """One throughput series in the tables and plots: device, dtype and compile mode."""
    mode = "" if compile_mode is None or pd.isna(compile_mode) else f" [{compile_mode}]"
    return f"{device} ({dtype}){mode}"


_DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def short_names(devices: list[str]) -> dict[str, str]:
    """Column-header names: 'cpu fp32', 'H100 bf16', 'cpu 2t fp32 max-autotune' (vendor words
    dropped), numbered on collision."""
    out = {}
    for d in devices:
        label, mode = (d[:-1].rsplit(" [", 1) if d.endswith("]") else (d, ""))
        name, _, dtype = label.rpartition(" (")
        dtype = dtype.rstrip(")")
        words = [w for w in name.replace(":", " ").split() if w.upper() not in ("NVIDIA", "GEFORCE", "AMD", "TESLA")]
        threads = [w[: -len("threads")] for w in words if w.endswith("threads")]
        if name.lower().startswith("cpu"):  # cpu:<arch>:<N>threads from nlbench bench
            head = f"cpu {threads[0]}t" if threads else "cpu"
        else:
            head = words[0] if words else name
        out[d] = f"{head} {_DTYPE_SHORT.get(dtype, dtype)}" + (f" {mode}" if mode else "")
    counts = pd.Series(list(out.values())).value_counts()
    seen: dict[str, int] = {}
    for d, s in out.items():
        if counts[s] > 1:
            seen[s] = seen.get(s, 0) + 1
            out[d] = f"{s} #{seen[s]}"
    return out


def throughput_report(df: pd.DataFrame) -> dict:
    """``{"devices", "baseline", "rows": [{case..., by_device: {label: {...}}, speedup: {label: x}}]}``."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ReportError(
            f"throughput table lacks column(s) {missing}; it needs {list(REQUIRED)} "
            "(written by `nlbench bench`)"
        )
    df = df.copy()
    stream = df[df["phase"] == "stream"]
    df = df[df["phase"] != "stream"]
    modes = df["compile_mode"] if "compile_mode" in df.columns else [None] * len(df)
    df["device_label"] = [series_label(str(d), str(t), m) for d, t, m in zip(df["device"], df["dtype"], modes)]
    devices = sorted(df["device_label"].unique(), key=lambda d: (not d.lower().startswith("cpu"), d))
    baseline = devices[0] if devices else None
    rows = []
    for key, g in df.groupby(list(CASE), sort=True, dropna=False):
        case = dict(zip(CASE, key))
        by_device = {}
        for dev, h in g.groupby("device_label"):
            cell = {v: float(pd.to_numeric(h[v], errors="coerce").median()) if v in h else math.nan for v in VALUES}
            cell["n"] = int(len(h))
            by_device[dev] = cell
        base = by_device.get(baseline, {}).get("tokens_per_s", math.nan)
        speedup = {
            dev: (c["tokens_per_s"] / base if base and not math.isnan(base) else math.nan)
            for dev, c in by_device.items()
            if dev != baseline
        }
        rows.append({**case, "by_device": by_device, "speedup": speedup})
    return {"devices": devices, "short": short_names(devices), "baseline": baseline, "rows": rows,
            "stream": stream_report(stream)}


STREAM_VALUES = ("tokens_per_s", "token_ms_p50", "token_ms_p95", "step_ms_p50", "peak_mem_bytes")


def stream_report(df: pd.DataFrame) -> list[dict]:
    """Rows of the streaming phase (`nlbench.bench.stream`), one per (device, model, size, T):
    medians over repeated measurements, sorted by device, model, size, T."""
    if df.empty:
        return []
    df = df.copy()
    modes = df["compile_mode"] if "compile_mode" in df.columns else [None] * len(df)
    df["device_label"] = [series_label(str(d), str(t), m) for d, t, m in zip(df["device"], df["dtype"], modes)]
    out = []
    for (dev, model, size, T), g in df.groupby(["device_label", "model", "size", "seq_len"], sort=True):
        cell = {v: float(pd.to_numeric(g[v], errors="coerce").median()) if v in g else math.nan
                for v in STREAM_VALUES}
        chunk = pd.to_numeric(g["stream_chunk"], errors="coerce").median() if "stream_chunk" in g else math.nan
        out.append({"device": dev, "model": model, "size": size, "seq_len": int(T), "n": int(len(g)),
                    "chunk": None if math.isnan(chunk) else int(chunk), **cell})
    return out


STREAM_LEGEND = ("Streaming: batch 1, one stream of T tokens read `chunk` tokens per call with the state carried "
                 "(the Transformer with a KV cache of the whole stream); per-token latency = a call's time over "
                 "its tokens.")


def stream_table_rows(rep: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    """Header and (display, sort value) cells of the streaming table."""
    head = ["model", "size", "device", "T", "chunk", "tokens/s", "ms/token p50", "ms/token p95", "peak MiB"]
    rows = []
    for r in rep["stream"]:
        vals = [r["model"], r["size"], rep_short(rep, r["device"]), r["seq_len"], r["chunk"],
                _num(r["tokens_per_s"], ",.0f"), _num(r["token_ms_p50"], ".3f"), _num(r["token_ms_p95"], ".3f"),
                _num(r["peak_mem_bytes"] / 2**20 if r["peak_mem_bytes"] == r["peak_mem_bytes"] else math.nan, ",.0f")]
        rows.append([(str(v), v) for v in vals])
    return head, rows


def stream_markdown(rep: dict) -> str:
    """The streaming table: per-token latency and tokens/s against the stream's length."""
    from nlbench.report.leaderboard import _md_table

    return "\n".join(["### Streaming", "", STREAM_LEGEND, "", _md_table(*stream_table_rows(rep))])


def rep_short(rep: dict, device: str) -> str:
    return short_names([device])[device]


def stream_chart(rep: dict, path_stem, formats=("png", "svg")) -> list[str]:
    """Per-token latency (median) against the stream length, one line per model and device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key in sorted({(r["device"], r["model"], r["size"]) for r in rep["stream"]}):
        rs = sorted((r for r in rep["stream"] if (r["device"], r["model"], r["size"]) == key), key=lambda r: r["seq_len"])
        ax.plot([r["seq_len"] for r in rs], [r["token_ms_p50"] for r in rs], marker="o",
                label=f"{key[1]} {key[2]} ({rep_short(rep, key[0])})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("stream length T (tokens)")
    ax.set_ylabel("ms per token (median)")
    ax.set_title("streaming: per-token cost vs stream length (batch 1, state carried)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    from nlbench.report.figures import save

    paths = save(fig, path_stem, formats)
    plt.close(fig)
    return paths


def _num(x, fmt):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table_rows(rep: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    """Header and (display, sort value) cells: per device tokens/s, p50/p95 ms, peak MiB, MFU; then speed-ups."""
    devs = rep["devices"]
    sh = rep["short"]
    others = [d for d in devs if d != rep["baseline"]]
    head = list(CASE)
    for d in devs:
        head += [f"{sh[d]} tok/s", f"{sh[d]} p50 ms", f"{sh[d]} p95 ms", f"{sh[d]} peak MiB", f"{sh[d]} MFU"]
    head += [f"speed-up {sh[d]} / {sh[rep['baseline']]}" for d in others]
    rows = []
    for r in rep["rows"]:
        cells = [(str(r[c]), r[c]) for c in CASE]
        for d in devs:
            c = r["by_device"].get(d, {})
            get = lambda k: c.get(k, math.nan)  # noqa: E731
            mem = get("peak_mem_bytes")
            cells += [
                (_num(get("tokens_per_s"), ",.0f"), get("tokens_per_s")),
                (_num(get("step_ms_p50"), ".2f"), get("step_ms_p50")),
                (_num(get("step_ms_p95"), ".2f"), get("step_ms_p95")),
                (_num(mem / 2**20 if mem == mem else mem, ",.1f"), mem),
                (_num(100 * get("mfu") if get("mfu") == get("mfu") else math.nan, ".1f") + ("%" if get("mfu") == get("mfu") else ""), get("mfu")),
            ]
        for d in others:
            x = r["speedup"].get(d, math.nan)
            cells.append((_num(x, ".2f") + ("×" if x == x else ""), x))
        rows.append(cells)
    return head, rows


def legend(rep: dict) -> str:
    """One sentence naming each device column and the speed-up's baseline."""
    names = "; ".join(f"{rep['short'][d]} = {d}" for d in rep["devices"])
    return (
        f"Devices: {names}. Speed-up = tokens/s ÷ tokens/s on {rep['short'][rep['baseline']]} for the same "
        "(model, size, seq_len, batch_size, phase); medians over repeated measurements."
    )


def render_markdown(rep: dict) -> str:
    from nlbench.report.leaderboard import _md_table

    parts = ["## Throughput", ""]
    if rep["rows"]:
        parts += [legend(rep), "", _md_table(*table_rows(rep))]
    if rep["stream"]:
        parts += (["", ""] if rep["rows"] else []) + [stream_markdown(rep)]
    return "\n".join(parts)


def bar_chart(rep: dict, path_stem, formats=("png", "svg")) -> list[str]:
    """Grouped bars of tokens/s per case, one bar per device, one panel per phase (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    phases = sorted({r["phase"] for r in rep["rows"]})
    devs = rep["devices"]
    fig, axes = plt.subplots(len(phases), 1, figsize=(max(6, 0.9 * len(rep["rows"]) + 3), 3.2 * len(phases)), squeeze=False)
    for ax, phase in zip(axes[:, 0], phases):
        rows = [r for r in rep["rows"] if r["phase"] == phase]
        x = np.arange(len(rows))
        w = 0.8 / max(1, len(devs))
        for i, d in enumerate(devs):
            ys = [r["by_device"].get(d, {}).get("tokens_per_s", np.nan) for r in rows]
            ax.bar(x + (i - (len(devs) - 1) / 2) * w, ys, w, label=d)  # full device name in the legend
        ax.set_xticks(x, [f"{r['model']}\n{r['size']} T={r['seq_len']}" for r in rows], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{phase} throughput")
        ax.legend(fontsize=7)
    fig.tight_layout()
    from nlbench.report.figures import save

    paths = save(fig, path_stem, formats)
    plt.close(fig)
    return paths
