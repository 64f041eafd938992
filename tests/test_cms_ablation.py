"""The CMS ablation section: arms read from Hope's resolved CMS options, paired
verdict at each learning rate, figures/cms_ablation_<stream>.png. Hand-made score matrices for
the verdict rule (real per_run_metrics and paired statistics), and one tiny real run (real Hope,
real Parquet) for the figure and the text."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from nlbench.report.cms_ablation import build_ablation, verdict_text
from nlbench.report.load import Results

ARMS = {  # label -> resolved CMS options
    "multi": {"cms_periods": [1, 4, 16], "cms_lr_mode": "period"},
    "fast": {"cms_periods": [1, 1, 1], "cms_lr_mode": "period"},
    "scaled": {"cms_periods": [1, 4, 16], "cms_lr_mode": "scaled"},
}


def _results(scores) -> Results:
    """scores[(arm, lr, seed)] = (R00, R10, R11): two tasks, so plasticity = (R00 + R11) / 2 and
    forgetting = R00 − R10 (docs/METRICS.md)."""
    runs, matrix = [], []
    for (arm, lr, seed), (r00, r10, r11) in scores.items():
        rid = f"{arm}-{lr}-{seed}"
        cfg = {"model": {"name": "hope", "size": "tiny", "label": arm, "options": dict(ARMS[arm])},
               "stream": {"name": "s"}, "seed": seed, "protocol": "finetune", "strategy": "naive",
               "train": {"optimizer": {"name": "muon", "lr": lr}, "device": "cpu"}}
        runs.append(dict(run_id=rid, model=arm, stream="s", seed=seed, protocol="finetune", strategy="naive",
                         status="completed", config=json.dumps(cfg), model_options=json.dumps(ARMS[arm]),
                         chance=json.dumps([0.1, 0.1])))
        for after, row in ((-1, (0.1, 0.1)), (0, (r00, 0.1)), (1, (r10, r11))):
            for j, v in enumerate(row):
                matrix.append(dict(run_id=rid, model=arm, stream="s", seed=seed, after_task=after, eval_task=j,
                                   metric="accuracy", value=v))
    return Results(runs=pd.DataFrame(runs), matrix=pd.DataFrame(matrix), curves=pd.DataFrame(),
                   throughput=pd.DataFrame(), sources=["hand-made"])


def _scores(multi_forgetting, seeds=range(5), lrs=(0.01, 0.02, 0.04)):
    """Every arm learns each task to 0.8 (± a per-seed wobble shared by all arms: paired data);
    the controls forget 0.3, the multi-frequency arm `multi_forgetting(lr)`."""
    out = {}
    for lr in lrs:
        for s in seeds:
            w = 0.01 * ((s * 7) % 5 - 2)
            noise = 0.002 * ((s * 2) % 3 - 1)  # mean 0 over seeds 0-4
            out[("fast", lr, s)] = (0.8 + w, 0.5 + w, 0.8)
            out[("scaled", lr, s)] = (0.8 + w, 0.5 + w + noise, 0.8)
            out[("multi", lr, s)] = (0.8 + w, 0.8 + w - multi_forgetting(lr) + noise, 0.8)
    return out


def test_multi_frequency_that_forgets_less_at_every_lr_dominates_both_controls():
    (ab,) = build_ablation(_results(_scores(lambda lr: 0.1)))
    assert ab["stream"] == "s" and ab["controls"] == ["[1, 1, 1]", "lr/C [1, 4, 16]"]
    assert {a["arm"]: a["kind"] for a in ab["arms"]} == {"[1, 4, 16]": "multi", "[1, 1, 1]": "all_fast",
                                                         "lr/C [1, 4, 16]": "scaled"}
    assert all(len(a["points"]) == 3 for a in ab["arms"])
    for c in ab["comparisons"]:
        assert [p["outcome"] for p in c["pairs"]] == ["dominates"] * 3
        for p in c["pairs"]:  # forgetting 0.1 vs 0.3 (± the scaled arm's noise), plasticity equal
            assert p["forgetting"]["diff_mean"] == pytest.approx(-0.2, abs=0.003)
            assert p["forgetting"]["ci_high"] < 0 and p["plasticity"]["diff_mean"] == pytest.approx(0.0, abs=1e-12)
            assert p["forgetting"]["n"] == 5
    assert ab["multi_dominates_controls"] and ab["verdict"].startswith("yes")
    assert verdict_text([ab]).startswith("Multi-frequency CMS dominates both controls on 1 of 1 stream(s) (s)")


def test_losing_at_one_lr_or_tying_is_not_domination():
    # forgets more than the controls at the largest lr: dominated there, so no stream-level dominance
    (ab,) = build_ablation(_results(_scores(lambda lr: 0.1 if lr < 0.04 else 0.4)))
    outcomes = {c["control"]: [p["outcome"] for p in c["pairs"]] for c in ab["comparisons"]}
    assert outcomes["[1, 1, 1]"] == ["dominates", "dominates", "dominated"]
    assert not ab["multi_dominates_controls"] and ab["verdict"].startswith("no")
    # the same forgetting as the all-fast control (paired differences exactly 0): a tie, not a win
    (ab,) = build_ablation(_results(_scores(lambda lr: 0.3)))
    fast = next(c for c in ab["comparisons"] if c["control"] == "[1, 1, 1]")
    assert {p["outcome"] for p in fast["pairs"]} <= {"tie", "no interval"} and not fast["dominates"]


def test_no_section_without_both_a_multi_frequency_arm_and_a_control():
    scores = {k: v for k, v in _scores(lambda lr: 0.1).items() if k[0] != "multi"}
    assert build_ablation(_results(scores)) == []
    scores = {k: v for k, v in _scores(lambda lr: 0.1).items() if k[0] == "multi"}
    assert build_ablation(_results(scores)) == []


@pytest.mark.slow
def test_tiny_real_ablation_writes_the_figure_and_the_verdict(tmp_path):
    from nlbench.config import expand_runs, validate_config
    from nlbench.report import build_report
    from nlbench.runner import run_sequential

    cfg = {
        "name": "tiny-cms-ablation",
        "models": [{"name": "hope", "size": "tiny", "label": "fast", "options": {"cms_periods": [1, 1, 1]}},
                   {"name": "hope", "size": "tiny", "label": "multi", "options": {"cms_periods": [1, 2, 4]}},
                   {"name": "hope", "size": "tiny", "label": "lr-over-c",
                    "options": {"cms_periods": [1, 2, 4], "cms_lr_mode": "scaled"}}],
        "streams": [{"name": "markov-languages", "num_tasks": 2, "seq_len": 16,
                     "options": {"order": 1, "vocab_size": 16, "branching": 4, "eval_size": 16}}],
        "seeds": [0, 1],
        "train": {"tokens_per_task": 256, "batch_size": 4, "optimizer": {"name": "muon", "lr": 0.02}, "device": "cpu"},
        "eval": {"max_sequences": 16, "batch_size": 16},
        "variants": [{"label": "lr0.01", "overrides": {"train.optimizer.lr": 0.01}},
                     {"label": "lr0.04", "overrides": {"train.optimizer.lr": 0.04}}],
    }
    specs = expand_runs(validate_config(cfg))
    assert len(specs) == 12
    out = tmp_path / "out"
    run_sequential(specs, out, threads=1)
    got = build_report([str(out)], out_dir=str(tmp_path / "report"), formats=("md", "json", "html"))
    png = tmp_path / "report" / "figures" / "cms_ablation_markov-languages.png"
    assert png.is_file() and png.stat().st_size > 5000
    (ab,) = got["doc"]["cms_ablation"]
    assert {a["arm"] for a in ab["arms"]} == {"[1, 1, 1]", "[1, 2, 4]", "lr/C [1, 2, 4]"}
    assert all([p["lr"] for p in a["points"]] == [0.01, 0.04] for a in ab["arms"])
    assert len(ab["comparisons"]) == 2 and all(len(c["pairs"]) == 2 for c in ab["comparisons"])
    md = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "## CMS ablation" in md and "**Verdict.** Multi-frequency CMS dominates both controls on" in md
    assert "figures/cms_ablation_markov-languages.png" in md and ab["verdict"] in md
    assert md.index("## CMS ablation") < md.index("## Details")  # with the answer, before the details
    json.loads((tmp_path / "report" / "leaderboard.json").read_text())["cms_ablation"][0]["verdict"]
    assert "CMS ablation" in (tmp_path / "report" / "leaderboard.html").read_text()


def test_ablation_results_feed_only_the_ablation_section():
    # `nlbench report DIRS --ablation DIR`: the ablation's Hope arms are not ranked entries of the
    # leaderboard (they would crowd a stream's verdict), only the CMS ablation section
    from nlbench.report.leaderboard import build_leaderboard

    full = _results(_scores(lambda lr: 0.1))
    main = _results({k: v for k, v in _scores(lambda lr: 0.1, lrs=(0.02,)).items() if k[0] == "fast"})
    doc = build_leaderboard(main, ablation=full)
    ranked = {e["entry"] for s in doc["streams"] for e in s["entries"]}
    assert ranked and all(e.startswith("fast") for e in ranked)
    (ab,) = doc["cms_ablation"]
    assert len(ab["arms"]) == 3 and ab["multi_dominates_controls"]
    assert doc["ablation_sources"] == ["hand-made"]
    # without the option the same runs are ranked (and their ablation is read from them)
    doc = build_leaderboard(full)
    assert {e["entry"].split("/")[0] for s in doc["streams"] for e in s["entries"]} == {"fast", "multi", "scaled"}
    assert len(doc["cms_ablation"]) == 1 and doc["ablation_sources"] == []
