"""A forgetting stream ranks only entries that learned it: when a ranked entry's
plasticity is below chance + 0.2·(ceiling − chance), the stream is reported as a capability test,
outside the verdict, and the section says why. Hand-made score matrices, the real report."""

from __future__ import annotations

import json

import pandas as pd

from nlbench.report.leaderboard import build_leaderboard, render_markdown
from nlbench.report.load import Results


def _results(plasticity_b: float) -> Results:
    """Two-task stream, chance 0.5 per task; hope learns each task to 0.9, transformer to plasticity_b."""
    runs, matrix = [], []
    for model, p in (("hope", 0.9), ("transformer", plasticity_b)):
        for seed in range(5):
            rid = f"{model}-{seed}"
            w = 0.005 * (seed - 2)
            cfg = {"model": {"name": model, "size": "tiny", "label": model}, "stream": {"name": "s"}, "seed": seed,
                   "protocol": "finetune", "strategy": "naive", "train": {"device": "cpu"}}
            runs.append(dict(run_id=rid, model=model, stream="s", seed=seed, protocol="finetune", strategy="naive",
                             size="tiny", status="completed", config=json.dumps(cfg), chance=json.dumps([0.5, 0.5])))
            for after, row in ((-1, (0.5, 0.5)), (0, (p + w, 0.5)), (1, (0.5 + w, p + w))):
                for j, v in enumerate(row):
                    matrix.append(dict(run_id=rid, model=model, stream="s", seed=seed, after_task=after, eval_task=j,
                                       metric="accuracy", value=v))
    return Results(runs=pd.DataFrame(runs), matrix=pd.DataFrame(matrix), curves=pd.DataFrame(),
                   throughput=pd.DataFrame(), sources=["hand-made"])


def test_a_stream_a_ranked_entry_barely_learns_is_a_capability_test():
    doc = build_leaderboard(_results(0.58))   # ranked (above the did-not-learn margin 0.55), below 0.6
    (s,) = doc["streams"]
    assert [e["rank"] is not None for e in s["entries"]] == [True, True]
    assert s["kind"] == "capability" and doc["verdict"] == []
    assert "transformer/tiny/finetune/naive plasticity 0.580 < chance 0.500 + 0.2·(ceiling 1.000 − chance) = 0.600" \
        in s["kind_reason"]
    md = render_markdown(doc)
    assert md.index("## Capability streams") < md.index("reported as a capability test")


def test_a_stream_every_ranked_entry_learned_stays_a_forgetting_stream():
    doc = build_leaderboard(_results(0.65))
    (s,) = doc["streams"]
    assert s["kind"] == "forgetting" and s["kind_reason"] is None
    assert [r["entry"] for r in doc["verdict"]] == ["hope/tiny/finetune/naive"]
