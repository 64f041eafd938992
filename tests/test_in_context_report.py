"""In-context runs in the leaderboard: their own protocol entries, each with its chance."""

from __future__ import annotations

import json

import pandas as pd

from nlbench.config import expand_runs, validate_config
from nlbench.runner import run_sequential
from tests.conftest import tiny_config


def test_in_context_entries_carry_protocol_chance_and_the_pretrained_checkpoint(tmp_path):
    from nlbench.report.build import build_report

    cfg = tiny_config(seeds=(0, 1), num_tasks=2, tokens_per_task=64, seq_len=16, protocol="in_context")
    cfg["models"][0]["options"] = {"kv_window": 32}
    cfg["train"]["batch_size"] = 2
    cfg["eval"] = {"max_sequences": 4, "batch_size": 4}
    cfg["pretrain"] = dict(tasks="fresh", steps=2, batch_size=2, segments=2, segment_sequences=1)
    records = run_sequential(expand_runs(validate_config(cfg)), tmp_path)
    assert all(r.run["status"] == "completed" for r in records)
    built = build_report([tmp_path], out_dir=tmp_path / "report", formats=("json",))
    doc = built["doc"]
    assert any(f.endswith("retention_markov-languages_in_context.png") for f in built["files"])
    entry = next(e for s in doc["streams"] if s["score"] == "accuracy" for e in s["entries"])
    runs = pd.read_parquet(tmp_path / "runs")
    per_run = [sum(json.loads(c)) / len(json.loads(c)) for c in runs["chance"]]
    assert entry["protocol"] == "in_context" and entry["n_seeds"] == 2
    assert abs(entry["chance"]["mean"] - sum(per_run) / 2) < 1e-12 and entry["chance"]["n"] == 2
    assert entry["config"]["pretrain"]["tasks"] == "fresh"
