"""The streaming phase of `nlbench bench`: a stream read chunk by chunk with the state carried
computes what one call on the whole sequence computes (so the phase times the same function),
and the bench writes `phase: stream` rows that `nlbench report` tabulates and draws."""

import subprocess
import sys

import pytest
import torch

from nlbench.bench.bench_config import BenchConfigError, load_bench_config
from nlbench.bench.stream import stream_forward, stream_options
from nlbench.models import build_model
from nlbench.models.base import map_state
from nlbench.results import ResultStore

NLBENCH = [sys.executable, "-m", "nlbench.cli"]


@pytest.mark.parametrize("name", ["hope", "titans-lmm", "transformer"])
def test_streamed_forward_equals_the_full_sequence(name):
    """Hope and Titans carry their memories, the Transformer its KV cache (kv_window: full, set by
    `stream_options`); chunk by chunk or in one call, the outputs and the final state agree."""
    torch.manual_seed(0)
    model = build_model(name, size="tiny", vocab_size=64, **stream_options(name, {})).double().eval()
    tokens = torch.randint(0, 64, (2, 80))
    with torch.no_grad():
        full = model(tokens)
        times = []
        logits, state = stream_forward(model, tokens, 16, times=times)
    assert len(times) == 5 and logits.shape == full.logits.shape
    torch.testing.assert_close(logits, full.logits, rtol=1e-9, atol=1e-9)
    got, want = [], []
    map_state(got.append, state), map_state(want.append, full.state)
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_streaming_the_stateless_transformer_would_differ():
    """The check above can fail: without a cache each chunk is read alone and the logits differ."""
    torch.manual_seed(0)
    model = build_model("transformer", size="tiny", vocab_size=64).double().eval()
    tokens = torch.randint(0, 64, (1, 48))
    with torch.no_grad():
        logits, _ = stream_forward(model, tokens, 16)
        assert not torch.allclose(logits[:, 16:], model(tokens).logits[:, 16:], atol=1e-6)


def test_bench_stream_rows_and_report(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        "name: ts\nmodels: [transformer]\nsizes: [tiny]\nseq_lens: [32]\nbatch_size: 2\nphases: []\n"
        "warmup_steps: 1\nsteps: 1\nkernel_seq_len: null\nthreads: 1\n"
        "stream: {models: [hope, titans-lmm, transformer], seq_lens: [32, 64], chunk: 16, warmup_chunks: 1}\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run([*NLBENCH, "bench", str(cfg), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    df = ResultStore(out).read("throughput")
    assert set(df.phase) == {"stream"} and len(df) == 6
    assert set(df.model) == {"hope", "titans-lmm", "transformer"} and set(df.seq_len) == {32, 64}
    assert (df.batch_size == 1).all() and (df.stream_chunk == 16).all()
    for col in ("token_ms_p50", "token_ms_p95", "token_ms_mean", "tokens_per_s", "step_ms_p50", "peak_mem_bytes"):
        assert df[col].notna().all() and (df[col] > 0).all(), col
    assert (df.token_ms_p95 >= df.token_ms_p50).all()
    assert (df.steps == df.seq_len // 16).all()  # one timed call per chunk
    assert "stream: hope at tiny: per-token latency (median) at T=64 / T=32" in proc.stdout

    rep = tmp_path / "rep"
    proc = subprocess.run([*NLBENCH, "report", str(out), "--out-dir", str(rep)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (rep / "throughput.md").read_text()
    assert "### Streaming" in md and "ms/token p50" in md
    assert md.count("| hope |") == 2 and md.count("| transformer |") == 2
    assert (rep / "figures" / "stream.png").stat().st_size > 0


def test_stream_of_a_stateless_model_is_refused(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("models: [transformer]\nstream: {models: [hope, hope-attention]}\n")
    with pytest.raises(BenchConfigError, match=r"stream\.models\.1.*hope-attention.*no state"):
        load_bench_config(cfg)
    cfg.write_text("models: [transformer]\nstream: {models: [hope], seq_lens: [0]}\n")
    with pytest.raises(BenchConfigError, match=r"stream\.seq_lens"):
        load_bench_config(cfg)
