"""`nlbench bench`: a real (tiny) measurement writes the throughput table; bad configs exit 2."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from nlbench.bench.bench_config import BenchConfigError, load_bench_config
from nlbench.bench.throughput import datasheet_peak
from nlbench.results import ResultStore

NLBENCH = [sys.executable, "-m", "nlbench.cli"]


def test_datasheet_peak_known_devices_bf16_only():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert datasheet_peak("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", torch.float32) is None
    assert datasheet_peak("cpu:x86_64:2threads", torch.bfloat16) is None


def test_bench_cli_writes_throughput_rows(tmp_path):
    cfg = tmp_path / "tb.yaml"
    cfg.write_text(
        "name: tb\nmodels: [transformer, hope]\nsizes: [tiny]\nseq_lens: [32]\nbatch_size: 2\n"
        "warmup_steps: 1\nsteps: 2\nkernel_seq_len: null\nthreads: 1\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run([*NLBENCH, "bench", str(cfg), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = ResultStore(out).read("throughput")
    assert len(df) == 4 and set(df.phase) == {"train", "infer"} and set(df.model) == {"transformer", "hope"}
    assert (df.tokens_per_s > 0).all() and (df.step_ms_p95 >= df.step_ms_p50).all()
    assert (df.mfu > 0).all() and (df.mfu < 1).all() and (df.peak_mem_bytes > 0).all()
    assert df.command.str.contains("bench").all() and (df.torch_version == torch.__version__).all()
    from nlbench.environment import git_sha, versions

    assert (df.ray_version == versions()["ray"]).all() and (df.git_sha == git_sha()).all()
    # the directory reads whole with pandas too
    assert len(pd.read_parquet(out / "throughput")) == 4
    assert "goal: Hope/Transformer train tokens/s" in proc.stdout and "median step times:" in proc.stdout
    assert df.compile_mode.isna().all()  # eager
    assert "Hope's CPU kernel: C++" in proc.stdout


def test_bench_says_when_hope_runs_without_its_cpu_kernel(tmp_path):
    cfg = tmp_path / "tb.yaml"
    cfg.write_text("name: tb\nmodels: [hope]\nsizes: [tiny]\nseq_lens: [16]\nbatch_size: 1\nphases: [train]\n"
                   "warmup_steps: 1\nsteps: 1\nkernel_seq_len: null\nthreads: 1\n")
    proc = subprocess.run([*NLBENCH, "bench", str(cfg), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "NLBENCH_CPU_KERNEL": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Hope's CPU kernel: PyTorch ops (NLBENCH_CPU_KERNEL=0)" in proc.stdout


def _train_row(model, tok_s, p50, compile_mode=None):
    return dict(model=model, size="medium", seq_len=512, phase="train", tokens_per_s=tok_s, step_ms_p50=p50,
                peak_mem_bytes=2**20, compile_mode=compile_mode)


def test_compiled_goal_takes_each_model_in_its_faster_mode():
    """A compiled run says 0.65x, and compares Hope's faster mode with the Transformer's: here the
    Transformer is faster eager, so the ratio is against its eager figure."""
    from rich.console import Console

    from nlbench.commands.bench import _print_goals

    console = Console(record=True, width=400)
    rows = [_train_row("hope", 3000, 680, "default"), _train_row("transformer", 4500, 455, "default")]
    eager = {("hope", "medium", 512): _train_row("hope", 2900, 700),
             ("transformer", "medium", 512): _train_row("transformer", 5000, 410)}
    _print_goals(console, rows, eager)
    text = console.export_text()
    assert "T=512, compiled: 0.67x (goal >= 0.65x" in text
    assert ("each model in its faster mode: 0.60x (goal >= 0.65x; Hope compiled 3,000 (eager 2,900), "
            "Transformer eager 5,000 (compiled 4,500); median step times: 0.60x)") in text
    console = Console(record=True, width=400)
    _print_goals(console, [_train_row("hope", 3000, 680), _train_row("transformer", 4500, 455)])
    text = console.export_text()
    assert "T=512: 0.67x (goal >= 0.5x" in text and "faster mode" not in text


@pytest.mark.compile
def test_compiled_bench_measures_the_eager_references_in_the_same_run(tmp_path):
    cfg = tmp_path / "tc.yaml"
    cfg.write_text("name: tc\nmodels: [transformer, hope]\nsizes: [tiny]\nseq_lens: [32]\nbatch_size: 1\n"
                   "phases: [train]\ncompile: true\nwarmup_steps: 1\nsteps: 1\nkernel_seq_len: null\nthreads: 1\n")
    proc = subprocess.run([*NLBENCH, "bench", str(cfg), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "reference for the faster-mode goal" in proc.stdout
    assert "each model in its faster mode:" in proc.stdout and "(goal >= 0.65x" in proc.stdout
    df = ResultStore(tmp_path / "out").read("throughput")
    assert len(df) == 2 and (df.compile_mode == "default").all()  # the eager references are not rows


def test_bench_compile_field_takes_a_mode(tmp_path):
    """`compile:` is false, true (the default mode) or a mode name; anything else names the field
    and the allowed values."""
    cfg = tmp_path / "c.yaml"
    for value, mode in (("false", None), ("true", "default"), ("max-autotune", "max-autotune")):
        cfg.write_text(f"models: [hope]\ncompile: {value}\n")
        assert load_bench_config(cfg).compile_mode == mode
    cfg.write_text("models: [hope]\ncompile: fast\n")
    with pytest.raises(BenchConfigError, match=r"field 'compile'.*'default', 'max-autotune'.*got 'fast'"):
        load_bench_config(cfg)


def test_bad_bench_config_exits_2_naming_the_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models: [transformer, gpt9]\nsizes: [huge]\n")
    with pytest.raises(BenchConfigError, match=r"models\.1\.name.*allowed"):
        load_bench_config(cfg)
    out = tmp_path / "out"
    proc = subprocess.run([*NLBENCH, "bench", str(cfg), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "sizes" in proc.stderr and "gpt9" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_device_check_quick_runs_and_writes_its_json(tmp_path, capsys):
    """The accelerator check (torch + triton only) on a CPU with tiny shapes: every goal line is
    printed and the JSON names the device, the rows and the Hope/Transformer ratio."""
    import json

    from nlbench.bench.device_check import main

    main(["--out", str(tmp_path), "--device", "cpu", "--quick"])
    printed = capsys.readouterr().out
    assert "vs reference (goal >= 20x" in printed and "Hope/Transformer train tokens/s" in printed
    got = json.loads((tmp_path / "device_check.json").read_text())
    assert {(r["model"], r["phase"]) for r in got["rows"]} == {
        (m, p) for m in ("transformer", "hope") for p in ("train", "infer")}
    assert all(r["tokens_per_s"] > 0 for r in got["rows"]) and got["hope_over_transformer"] > 0
    assert [r["goal_mfu"] for r in got["rows"] if r["phase"] == "train"] == [0.40, 0.25]
    assert not (tmp_path / "device_check.json.tmp").exists()
    assert got["partial"] is False


def test_report_lines_up_device_check_json_as_a_device_column_group(tmp_path):
    """`nlbench report CPU_BENCH_DIR CHECK_DIR`: device_check.json's cases become throughput rows
    (Hope on the Triton kernel as `hope[triton]`), so a GPU run gets its column group and speed-up
    next to the CPU bench; a malformed file is a clear error, never partly read."""
    import json

    from nlbench.bench.device_check import main
    from nlbench.report import ReportError, build_report

    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    main(["--out", str(cpu), "--device", "cpu", "--quick"])
    got = json.loads((cpu / "device_check.json").read_text())
    # the same cases as if measured on an H200 in bf16, plus Hope on the Triton kernel
    rows = [dict(r, device="NVIDIA H200", dtype="bfloat16", tokens_per_s=r["tokens_per_s"] * 50) for r in got["rows"]]
    rows += [dict(r, memory_kernel="triton", tokens_per_s=r["tokens_per_s"] * 2) for r in rows if r["model"] == "hope"]
    gpu.mkdir()
    (gpu / "device_check.json").write_text(json.dumps(dict(got, device="NVIDIA H200", dtype="bfloat16", rows=rows)))
    rep = build_report([str(cpu), str(gpu)], out_dir=str(tmp_path / "rep"), formats=("md",), figures=False)
    md = (tmp_path / "rep" / "throughput.md").read_text()
    assert "H200 bf16 tok/s" in md and "cpu" in md and "speed-up H200 bf16" in md
    assert "| hope[triton] | tiny | 32 | 2 | train |" in md
    assert rep["doc"]["throughput"]["rows"]
    # a planted or broken file: one clear error naming it, no report written
    for text, says in (("{not json", "is not the JSON that device_check writes"),
                       (json.dumps(dict(got, rows=[dict(rows[0], tokens_per_s="fast")])), "row 0 lacks a valid tokens_per_s"),
                       (json.dumps(dict(got, rows=[rows[0], dict(rows[1], step_ms_p50="x", device={"a": 1})])),
                        "row 1 lacks a valid step_ms_p50, device"),
                       (json.dumps(dict(got, rows=[7])), "row 0 is not a mapping")):
        (gpu / "device_check.json").write_text(text)
        with pytest.raises(ReportError, match=says) as e:
            build_report([str(cpu), str(gpu)], out_dir=str(tmp_path / "rep2"), formats=("md",), figures=False)
        assert "device_check.json" in str(e.value) and not (tmp_path / "rep2").exists()


def test_device_check_keeps_finished_cases_when_cut(tmp_path, monkeypatch):
    """A check stopped by a time limit (here: the Hope case raises) leaves the cases it finished
    in device_check.json, marked partial."""
    import json

    from nlbench.bench import device_check

    real = device_check.bench_case

    def cut(case, **kw):
        if case.model == "hope":
            raise KeyboardInterrupt  # what a timeout's signal looks like to the check
        return real(case, **kw)

    monkeypatch.setattr(device_check, "bench_case", cut)
    with pytest.raises(KeyboardInterrupt):
        device_check.main(["--out", str(tmp_path), "--device", "cpu", "--quick"])
    got = json.loads((tmp_path / "device_check.json").read_text())
    assert got["partial"] is True
    assert {(r["model"], r["phase"]) for r in got["rows"]} == {("transformer", "train"), ("transformer", "infer")}


@pytest.mark.compile
def test_device_check_compile_adds_compiled_rows(tmp_path, capsys):
    """`--compile`: the same cases again through model.compiled(), flagged, with compile time,
    and a compiled Hope/Transformer ratio."""
    import json

    from nlbench.bench.device_check import main

    main(["--out", str(tmp_path), "--device", "cpu", "--quick", "--compile"])
    printed = capsys.readouterr().out
    assert "Hope/Transformer train tokens/s (compiled)" in printed and "compiled C=4" in printed
    got = json.loads((tmp_path / "device_check.json").read_text())
    compiled = [r for r in got["rows"] if r["compiled"]]
    assert {(r["model"], r["phase"]) for r in compiled} == {
        (m, p) for m in ("transformer", "hope") for p in ("train", "infer")}
    assert all(r["compile_s"] is not None and r["tokens_per_s"] > 0 for r in compiled)
    assert got["hope_over_transformer_compiled"] > 0


def test_labelled_entries_stay_apart_and_the_memory_goal_is_printed(tmp_path):
    """Two entries of one model with different options (`label`) give rows of their own, and the
    bench prints each Hope entry's training peak memory over the Transformer's."""
    cfg = tmp_path / "lb.yaml"
    cfg.write_text(
        "name: lb\nmodels: [transformer, hope, {name: hope, label: hope-recompute, options: {recompute_chunks: true}}]\n"
        "sizes: [tiny]\nseq_lens: [32]\nbatch_size: 2\nphases: [train]\nwarmup_steps: 1\nsteps: 1\n"
        "kernel_seq_len: null\nthreads: 1\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run([*NLBENCH, "bench", str(cfg), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = ResultStore(out).read("throughput")
    assert sorted(df.model) == ["hope", "hope-recompute", "transformer"]
    for name in ("hope", "hope-recompute"):
        assert f"goal: {name}/Transformer train peak memory at tiny, T=32:" in proc.stdout
