"""Streaming phase of `nlbench bench`: one long stream read chunk by chunk with the state carried.

The use the in-context memories are for: batch 1, a stream of T tokens fed `chunk` tokens per
call, each call starting from the state the previous one returned (Hope and Titans carry their
memories; the Transformer carries a KV cache of the whole stream, `kv_window: "full"`). Per
call it times the forward pass (no gradients: `torch.inference_mode`) and reports

* ``token_ms_p50`` / ``token_ms_p95``: per-token latency, a call's time over its tokens;
* ``step_ms_p50`` / ``step_ms_p95``: the calls' own times (one chunk each);
* ``tokens_per_s``: T over the stream's total time.

A memory model's per-token cost should stay flat in T (its state has a fixed size), the
Transformer's grows with its cache. The chunk defaults to 16 tokens, the chunk size of Hope's and
Titans' memories: a stream split at chunk boundaries computes what one call on the whole
sequence computes (tests/test_bench_stream.py), so the figure is the cost of the same function.
Before each timed stream, a short stream of `warmup_chunks` calls runs untimed.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch

from nlbench.bench.throughput import _PeakRSS, _released_rss, _sync
from nlbench.environment import device_name
from nlbench.models import build_model, flops_per_token

STREAM_PHASE = "stream"


def stream_options(model: str, options: dict) -> dict:
    """The model's options for a stream: the Transformer gets a KV cache of the whole stream
    (`kv_window: "full"`) unless its options name a window; other models keep theirs."""
    if model == "transformer" and options.get("kv_window") is None:
        return {**options, "kv_window": "full"}
    return dict(options)


def stream_forward(model, tokens, chunk: int, state=None, times: list[float] | None = None):
    """Read `tokens` [B, T] `chunk` tokens per call, each call from the state the previous one
    returned. Returns (logits [B, T, vocab], final state); appends each call's seconds to `times`."""
    logits, device = [], tokens.device
    for piece in tokens.split(chunk, dim=1):
        t0 = time.perf_counter()
        out = model(piece, state=state)
        _sync(device)
        if times is not None:
            times.append(time.perf_counter() - t0)
        logits.append(out.logits)
        state = out.state
    return torch.cat(logits, dim=1), state


def bench_stream(model_name: str, size: str, seq_lens: list[int], *, chunk: int, warmup_chunks: int,
                 device: torch.device, dtype: torch.dtype, vocab_size: int, options: dict[str, Any],
                 peak_flops: float) -> list[dict[str, Any]]:
    """One row per stream length: a fresh stream of T tokens at batch 1 (module docstring)."""
    torch.manual_seed(0)
    opts = stream_options(model_name, options)
    model = build_model(model_name, size=size, vocab_size=vocab_size, **opts).to(device).eval()
    if model.init_state(1) is None:
        raise ValueError(f"model '{model_name}' carries no state across calls with options {opts}: a stream "
                         f"would read each chunk alone; give it a state (e.g. kv_window for the transformer) "
                         f"or leave it out of `stream.models`.")
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else torch.autocast(device.type, enabled=False))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in seq_lens:
        tokens = torch.randint(0, vocab_size, (1, T), generator=gen).to(device)
        base_rss = _released_rss() if device.type == "cpu" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times: list[float] = []
        with _PeakRSS() as rss, torch.inference_mode(), autocast:
            stream_forward(model, tokens[:, : warmup_chunks * chunk], chunk)
            t0 = time.perf_counter()
            stream_forward(model, tokens, chunk, times=times)
            total = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else model_bytes + max(0, rss.peak - base_rss))
        per_token = [t / n for t, n in zip(times, (p.shape[1] for p in tokens.split(chunk, dim=1)))]
        fpt = flops_per_token(model, T)
        rows.append(dict(
            model=model_name, size=size, seq_len=T, batch_size=1, phase=STREAM_PHASE,
            tokens_per_s=T / total,
            token_ms_p50=1e3 * float(np.percentile(per_token, 50)),
            token_ms_p95=1e3 * float(np.percentile(per_token, 95)),
            token_ms_mean=1e3 * statistics.mean(per_token),
            step_ms_p50=1e3 * float(np.percentile(times, 50)), step_ms_p95=1e3 * float(np.percentile(times, 95)),
            stream_chunk=chunk, peak_mem_bytes=int(peak), mfu=fpt * (T / total) / peak_flops,
            mfu_datasheet=None, flops_per_token=fpt, params=model.num_params(), device=device_name(device),
            dtype=str(dtype).replace("torch.", ""), compile_s=None, compile_mode=None, steps=len(times),
        ))
    del model
    return rows


def flatness(rows: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Per (model, size): median per-token latency at the longest stream over the shortest (1.0 = flat)."""
    out = {}
    for key in {(r["model"], r["size"]) for r in rows if r["phase"] == STREAM_PHASE}:
        rs = sorted((r for r in rows if (r["model"], r["size"]) == key and r["phase"] == STREAM_PHASE),
                    key=lambda r: r["seq_len"])
        if len(rs) > 1:
            out[key] = rs[-1]["token_ms_p50"] / rs[0]["token_ms_p50"]
    return out
