"""One short accelerator check of the throughput goals, needing only torch and triton —
what a bare GPU machine has (no Ray, Optuna or pydantic):

    pip install --no-deps --no-build-isolation -e .          # offline: nlbench itself only
    python -m pytest -q tests/test_triton_kernels.py        # Triton vs PyTorch on CUDA, bf16 too
    python -m nlbench.bench.device_check --out DIR          # prints and writes DIR/device_check.json
    nlbench report CPU_BENCH_OUT DIR                        # its cases as a device column group

It measures, in one run on one device:

* the memory kernels, forward + backward (`nlbench.bench.kernels`): chunked vs per-token
  reference (goal ≥ 20×) and, on CUDA, Triton vs chunked (goal ≥ 3×);
* training and inference tokens/s and MFU of the Transformer and Hope at `--size` (default
  `large`), T = `--seq-len` (default 2048), in `--dtype` (default bf16 on CUDA): goals
  Transformer MFU ≥ 40% and Hope ≥ 25% of the datasheet bf16 peak (989 TFLOP/s for H100 SXM /
  H200), and the matmul peak measured in the same run for reference.

On CUDA with Triton, Hope runs a third time with its memories on the Triton kernel
(`memory_kernel: triton`). `--compile` adds the same measurements with `torch.compile` (`model.compiled()`) and the
compiled memory kernel. `--quick` shrinks everything (tiny preset, short sequences) so that the path runs on a CPU in
seconds: the test suite runs it that way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from nlbench.atomic import atomic_write_text
from nlbench.bench.kernels import bench_memory_kernels
from nlbench.kernels.dgd import resolve_memory_kernel
from nlbench.bench.throughput import (
    BenchCase, bench_case, datasheet_peak, device_name, measure_matmul_peak, versions,
)

GOALS_MFU = {"transformer": 0.40, "hope": 0.25}


def run_check(device: str, size: str, seq_len: int, batch_size: int, dtype: torch.dtype,
              kernel_seq_len: int, steps: int, quick: bool = False, compile_too: bool = False,
              warmup_steps: int = 3, on_rows=None) -> dict:
    """`on_rows(partial_result)` is called after each measured case, so a run cut by a time limit
    keeps what it measured."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    lines = bench_memory_kernels(dev, seq_len=kernel_seq_len, compiled=compile_too,
                                 **(dict(B=1, H=2, d=8, chunk_sizes=(4,)) if quick else {}))
    for line in lines:
        print(line, flush=True)
    peak = measure_matmul_peak(dev, dtype, n=256 if quick else None)
    sheet = datasheet_peak(device_name(dev), dtype)
    print(f"{device_name(dev)} {dtype}: measured matmul peak {peak / 1e12:.1f} TFLOP/s; datasheet "
          f"{'unknown' if sheet is None else f'{sheet / 1e12:.0f} TFLOP/s'}", flush=True)
    rows, ratios = [], {}
    cases = [("transformer", {})]
    if resolve_memory_kernel("auto", dev) == "triton":  # Hope's memories on the Triton kernel as well,
        cases.append(("hope", {"memory_kernel": "triton"}))  # first: the chunked path is the slow one there
    cases.append(("hope", {}))
    for compiled in (False, True) if compile_too else (False,):
        tag = " (compiled)" if compiled else ""
        for model, options in cases:
            if compiled and options:  # the Triton kernel is not traced by torch.compile
                continue
            got = bench_case(BenchCase(model, size, seq_len, batch_size, dict(options)), device=dev, dtype=dtype,
                             vocab_size=256 if quick else 32000, optimizer="adamw", lr=1e-4,
                             warmup_steps=1 if quick else warmup_steps, steps=steps, phases=["train", "infer"],
                             compile=compiled, peak_flops=peak)
            for r in got:
                goal = GOALS_MFU.get(model) if r["phase"] == "train" else None
                mfu = r["mfu_datasheet"] if r["mfu_datasheet"] is not None else r["mfu"]
                r["compiled"], r["memory_kernel"] = compiled, options.get("memory_kernel")
                r["goal_mfu"], r["goal_met"] = goal, (None if goal is None else bool(mfu >= goal))
                label = model + (f"[{options['memory_kernel']}]" if options else "")
                print(f"{label:>14} {size} T={seq_len} {r['phase']:<5} {r['tokens_per_s']:>10.0f} tok/s  "
                      f"p50 {r['step_ms_p50']:.1f} ms  MFU {100 * r['mfu']:.1f}% of measured"
                      + (f", {100 * r['mfu_datasheet']:.1f}% of datasheet" if r["mfu_datasheet"] is not None else "")
                      + ("" if goal is None else f"  (goal >= {100 * goal:.0f}%: {'met' if r['goal_met'] else 'NOT met'})")
                      + tag + (f", compile {r['compile_s']:.1f} s" if compiled else ""),
                      flush=True)
                rows.append(r)
            if on_rows is not None:
                on_rows(dict(device=device_name(dev), dtype=str(dtype).replace("torch.", ""), matmul_peak=peak,
                             datasheet_peak=sheet, kernel_lines=lines, rows=rows, partial=True,
                             versions=versions(), wall_s=time.perf_counter() - t0))
        train = {(r["model"], r["memory_kernel"]): r["tokens_per_s"] for r in rows
                 if r["phase"] == "train" and r["compiled"] == compiled}
        ratios[compiled] = train["hope", None] / train["transformer", None]
        print(f"Hope/Transformer train tokens/s{tag}: {ratios[compiled]:.2f}x", flush=True)
        if ("hope", "triton") in train:
            ratios["triton"] = train["hope", "triton"] / train["hope", None]
            print(f"Hope train tokens/s, Triton memory kernel / chunked: {ratios['triton']:.2f}x "
                  f"(goal >= 3x for the kernel itself; see the kernel lines above)", flush=True)
    return dict(device=device_name(dev), dtype=str(dtype).replace("torch.", ""), matmul_peak=peak,
                datasheet_peak=sheet, kernel_lines=lines, rows=rows, hope_over_transformer=ratios[False],
                hope_over_transformer_compiled=ratios.get(True), hope_triton_over_chunked=ratios.get("triton"),
                versions=versions(),
                wall_s=time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser(description="Accelerator check of nlbench's throughput goals (torch + triton only).")
    p.add_argument("--out", required=True, help="directory for device_check.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", default="large")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--kernel-seq-len", type=int, default=4096)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run of this path on a CPU")
    p.add_argument("--compile", action="store_true",
                   help="also measure with torch.compile (model.compiled(): Hope's chunk steps, the Transformer whole)")
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype or ("bfloat16" if a.device == "cuda" else "float32"))
    if a.quick:
        a.size, a.seq_len, a.batch_size, a.kernel_seq_len, a.steps = "tiny", 32, 2, 16, 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(result):  # atomic: never a half file, and a cut run leaves its finished cases
        atomic_write_text(out / "device_check.json", json.dumps(result, indent=1, default=str))

    result = run_check(a.device, a.size, a.seq_len, a.batch_size, dtype, a.kernel_seq_len, a.steps, quick=a.quick,
                       compile_too=a.compile, warmup_steps=a.warmup, on_rows=write)
    write(dict(result, partial=False))
    print(f"wrote {out / 'device_check.json'}")


if __name__ == "__main__":
    main()
