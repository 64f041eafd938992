"""`nlbench report`: leaderboard numbers, ranking, dedupe, bad inputs, throughput, CLI outputs.

The result directories are written with the real ResultStore from hand-made accuracy matrices
whose metrics are worked out below (docs/METRICS.md formulas), so every number the report
prints can be checked by hand.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from nlbench.commands.report import report
from nlbench.report import ReportError, build_report, load_results
from nlbench.report.leaderboard import build_leaderboard, render_markdown
from nlbench.report.throughput import throughput_report
from nlbench.results import ResultStore, RunRecord

T975_2 = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2), for the 3-seed CI

# split-digits, T = 3, chance 0.2 per task, b = 0.2 everywhere.
# hope: acc_final 0.8, bwt −0.15, forgetting (0.2 + 0.1)/2 = 0.15, fwt 0, plasticity 0.9,
#       acc_avg_incremental (0.9 + 0.85 + 0.8)/3 = 0.85
HOPE = [[0.9, 0.2, 0.2], [0.8, 0.9, 0.2], [0.7, 0.8, 0.9]]
# transformer: acc_final 0.5, bwt −0.6, forgetting 0.6, fwt 0, plasticity 0.9, acc_avg (0.9+0.6+0.5)/3
TRANSFORMER = [[0.9, 0.2, 0.2], [0.3, 0.9, 0.2], [0.3, 0.3, 0.9]]
# titans: never leaves chance: plasticity 0.21 < 0.2 + 0.08 -> "did not learn"
TITANS = [[0.21] * 3] * 3
SHIFT = {0: 0.0, 1: 0.02, 2: -0.02}  # per-seed offset: acc_final 0.80/0.82/0.78, bwt unchanged


def _run_row(model, stream, seed, status="completed", chance=(0.2, 0.2, 0.2), tps=1000.0, lr=1e-3, strategy="naive",
             selected=None, **extra):
    config = {"model": {"name": model, "size": "tiny", "label": model}, "stream": {"name": stream}, "seed": seed,
              "protocol": "finetune", "strategy": strategy,
              "train": {"optimizer": {"name": "adamw", "lr": lr}, "device": "cpu"}}
    if selected is not None:  # as `nlbench leaderboard` writes it into a reporting run's config
        config["selected"] = selected
    from nlbench.results import run_id_for

    return dict(run_id=run_id_for(config), model=model, stream=stream, seed=seed, protocol="finetune", strategy=strategy,
                status=status, error=None if status == "completed" else "loss went NaN at step 3", config=config,
                device="cpu", host="testhost", versions={"nlbench": "0.1.0", "torch": "2.x"}, git_sha="abc123",
                size="tiny", chance=list(chance), train_tokens_per_s=tps, **extra)


def _matrix_rows(R, b, metric="accuracy", tokens_per_task=100):
    T = len(R)
    rows = [dict(after_task=-1, eval_task=j, metric=metric, value=float(b[j]), tokens_seen=0) for j in range(T)]
    rows += [dict(after_task=i, eval_task=j, metric=metric, value=float(R[i][j]), tokens_seen=(i + 1) * tokens_per_task)
             for i in range(T) for j in range(T)]
    return rows


def _curve_rows(R, b, metric="accuracy", tokens_per_task=100):
    """Two points per task: before its first step (previous row of R, or b) and after it."""
    T = len(R)
    rows = []
    for i in range(T):
        before = b if i == 0 else R[i - 1]
        for pt, vals in ((i * tokens_per_task, before), ((i + 1) * tokens_per_task, R[i])):
            rows += [dict(train_task=i, tokens_seen=pt, eval_task=j, metric=metric, value=float(vals[j])) for j in range(T)]
    return rows


def write_run(store, model, stream, seed, R, b=None, *, status="completed", lm_loss=None, **kw):
    b = b if b is not None else [0.2] * len(R)
    run = _run_row(model, stream, seed, status=status, chance=kw.pop("chance", [0.2] * len(R)), **kw)
    matrix, curves = [], []
    if status == "completed":
        matrix, curves = _matrix_rows(R, b), _curve_rows(R, b)
        if lm_loss is not None:
            Rl, bl = lm_loss
            matrix += _matrix_rows(Rl, bl, "loss")
    store.write_run(RunRecord(run=run, matrix=matrix, curves=curves))
    return run["run_id"]


def make_results(out: Path) -> Path:
    """split-digits: hope/transformer/titans × 3 seeds + one failed transformer run;
    markov-lm (accuracy + loss, 1 seed): hope and transformer."""
    store = ResultStore(out)
    for seed, d in SHIFT.items():
        write_run(store, "hope", "split-digits", seed, (np.array(HOPE) + d).tolist(), tps=1000 + 100 * seed)
        write_run(store, "transformer", "split-digits", seed, (np.array(TRANSFORMER) + d).tolist(), tps=4000.0)
        write_run(store, "titans", "split-digits", seed, TITANS, tps=2000.0)
    write_run(store, "transformer", "split-digits", 3, TRANSFORMER, status="failed")
    ch = [0.01, 0.01]
    write_run(store, "hope", "markov-lm", 0, [[0.5, 0.1], [0.4, 0.5]], [0.0, 0.0], chance=ch,
              lm_loss=([[2.0, 3.0], [2.5, 1.5]], [4.0, 4.0]))
    write_run(store, "transformer", "markov-lm", 0, [[0.5, 0.15], [0.2, 0.5]], [0.0, 0.0], chance=ch,
              lm_loss=([[2.0, 3.0], [3.5, 1.5]], [4.0, 4.0]))
    return out


def write_throughput(out: Path, device: str, dtype: str, rows: list[tuple], key: str, compile_mode=None):
    """rows: (model, size, seq_len, phase, tokens_per_s)."""
    recs = [dict(run_id=f"{key}:{m}:{s}:{t}:{ph}", model=m, size=s, seq_len=t, batch_size=8, phase=ph, tokens_per_s=tps,
                 step_ms_p50=8 * t / tps * 1e3, step_ms_p95=1.1 * 8 * t / tps * 1e3, peak_mem_bytes=2**20 * 100, mfu=0.1,
                 device=device, dtype=dtype, compile_mode=compile_mode) for m, s, t, ph, tps in rows]
    ResultStore(out).write_rows("throughput", recs, key=key)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    return make_results(tmp_path_factory.mktemp("res") / "OUT")


@pytest.fixture(scope="module")
def doc(results_dir):
    return build_leaderboard(load_results([results_dir]))


def _section(doc, stream, score="accuracy"):
    return next(s for s in doc["streams"] if s["stream"] == stream and s["score"] == score)


def _entry(section, model):
    return next(e for e in section["entries"] if e["model"] == model)


# ----------------------------------------------------------------------------- leaderboard numbers


def test_leaderboard_metrics_match_hand_computed_values(doc):
    s = _section(doc, "split-digits")
    hope, tr = _entry(s, "hope"), _entry(s, "transformer")
    m = hope["metrics"]
    assert m["acc_final"]["mean"] == pytest.approx(0.8)
    half = T975_2 * 0.02 / math.sqrt(3)  # seeds 0.80 / 0.82 / 0.78: sample std 0.02
    assert (m["acc_final"]["ci_low"], m["acc_final"]["ci_high"]) == pytest.approx((0.8 - half, 0.8 + half))
    assert m["acc_final"]["n"] == 3 and hope["n_seeds"] == 3 and hope["seeds"] == [0, 1, 2]
    assert m["bwt"]["mean"] == pytest.approx(-0.15)
    assert m["forgetting"]["mean"] == pytest.approx(0.15)
    assert m["fwt"]["mean"] == pytest.approx(0.0, abs=1e-12)
    assert m["plasticity"]["mean"] == pytest.approx(0.9)
    assert m["acc_avg_incremental"]["mean"] == pytest.approx(0.85)
    assert hope["train_tokens_per_s"]["mean"] == pytest.approx(1100.0)
    assert tr["metrics"]["acc_final"]["mean"] == pytest.approx(0.5)
    assert tr["metrics"]["forgetting"]["mean"] == pytest.approx(0.6)
    assert tr["metrics"]["acc_avg_incremental"]["mean"] == pytest.approx((0.9 + 0.6 + 0.5) / 3)
    # the failed 4th transformer run is reported, never counted as a seed
    assert tr["n_seeds"] == 3 and tr["n_failed"] == 1 and tr["failed"][0]["status"] == "failed"
    assert hope["config"]["train"]["optimizer"]["lr"] == 1e-3 and "seed" not in hope["config"]
    assert hope["environment"]["device"] == ["cpu"] and hope["environment"]["git_sha"] == ["abc123"]


def test_did_not_learn_is_flagged_and_not_ranked(doc):
    s = _section(doc, "split-digits")
    assert [(e["model"], e["rank"]) for e in s["entries"]] == [("hope", 1), ("transformer", 2), ("titans", None)]
    titans = _entry(s, "titans")
    assert titans["did_not_learn"] and titans["n_did_not_learn"] == 3
    # the baseline is the best non-Hope entry that learned: titans is never the baseline
    assert s["baseline"] == "transformer/tiny/finetune/naive"
    assert "overall" not in doc and "win_rate" not in json.dumps(doc)  # no mean win rate over correlated metrics


def test_paired_rows_against_the_best_non_hope_entry(doc):
    s = _section(doc, "split-digits")
    rows = {(r["entry"].split("/")[0], r["metric"]): r for r in s["paired"]}
    assert all(r["baseline"] == "transformer/tiny/finetune/naive" for r in s["paired"])
    assert {m for (e, m) in rows if e == "hope"} == {"acc_final", "plasticity", "forgetting", "forgetting_normalized"}
    # both entries shift by the same per-seed offset: the paired differences are exact, zero-width
    acc = rows[("hope", "acc_final")]
    assert (acc["diff_mean"], acc["ci_low"], acc["ci_high"], acc["n"]) == pytest.approx((0.3, 0.3, 0.3, 3))
    assert rows[("hope", "forgetting")]["diff_mean"] == pytest.approx(0.15 - 0.6)
    assert rows[("hope", "plasticity")]["diff_mean"] == pytest.approx(0.0, abs=1e-12)
    # forgetting / (plasticity − chance), per run (plasticity 0.9 + shift): hope 0.15/(0.7 + d), transformer 0.6/(0.7 + d)
    hope = _entry(s, "hope")
    gains = [0.7 + d for d in SHIFT.values()]
    assert hope["metrics"]["forgetting_normalized"]["mean"] == pytest.approx(np.mean([0.15 / g for g in gains]))
    assert rows[("hope", "forgetting_normalized")]["diff_mean"] == pytest.approx(np.mean([(0.15 - 0.6) / g for g in gains]))
    assert hope["chance"]["mean"] == pytest.approx(0.2) and hope["ceiling"] is None and hope["selected"] is None
    assert ("transformer", "acc_final") not in rows  # the baseline is not compared with itself


def test_verdict_puts_hope_against_the_baseline_per_stream(doc):
    v = {r["stream"]: r for r in doc["verdict"]}
    assert v["split-digits"]["outcome"] == "better" and v["split-digits"]["baseline"] == "transformer/tiny/finetune/naive"
    assert v["split-digits"]["acc_final"]["diff_mean"] == pytest.approx(0.3)
    assert v["split-digits"]["forgetting"]["diff_mean"] == pytest.approx(-0.45)
    # markov-lm has one seed: no interval, so no claim either way
    assert v["markov-lm"]["outcome"] == "no interval" and v["markov-lm"]["score"] == "accuracy"


def test_verdict_matches_strategies_and_never_uses_a_reference_point_as_baseline(tmp_path):
    """joint (the upper bound) is the best non-Hope entry by acc_final, yet Hope/naive is measured
    against the best naive baseline and Hope/joint against the joint one; the section's paired rows
    use the best continual learner, not joint."""
    store = ResultStore(tmp_path / "o")
    joint = [[0.9, 0.9, 0.9]] * 3
    for seed, d in SHIFT.items():
        write_run(store, "hope", "s", seed, (np.array(HOPE) + d).tolist())
        write_run(store, "transformer", "s", seed, (np.array(TRANSFORMER) + d / 2).tolist())
        write_run(store, "transformer", "s", seed, (np.array(joint) - 0.05 + d).tolist(), strategy="joint")
        write_run(store, "hope", "s", seed, (np.array(joint) - 0.1 + d / 2).tolist(), strategy="joint")
    doc = build_leaderboard(load_results([tmp_path / "o"]))
    s = doc["streams"][0]
    assert s["baseline"] == "transformer/tiny/finetune/naive"
    v = {r["entry"]: r for r in doc["verdict"]}
    assert v["hope/tiny/finetune/naive"]["baseline"] == "transformer/tiny/finetune/naive"
    assert v["hope/tiny/finetune/naive"]["outcome"] == "better"  # 0.8 vs 0.5 on every seed
    assert v["hope/tiny/finetune/joint"]["baseline"] == "transformer/tiny/finetune/joint"
    assert v["hope/tiny/finetune/joint"]["outcome"] == "worse"  # 0.8 vs 0.85 on every seed
    assert v["hope/tiny/finetune/joint"]["acc_final"]["diff_mean"] == pytest.approx(-0.05, abs=0.02)


def test_a_section_of_reference_points_only_still_has_a_baseline(tmp_path):
    store = ResultStore(tmp_path / "o")
    for seed, d in SHIFT.items():
        write_run(store, "hope", "s", seed, (np.array(HOPE) + d).tolist(), strategy="joint")
        write_run(store, "transformer", "s", seed, (np.array(TRANSFORMER) + d).tolist(), strategy="joint")
    doc = build_leaderboard(load_results([tmp_path / "o"]))
    assert doc["streams"][0]["baseline"] == "transformer/tiny/finetune/joint"
    assert doc["verdict"][0]["outcome"] == "better"


def test_entries_whose_paired_interval_covers_zero_share_a_rank(tmp_path):
    store = ResultStore(tmp_path / "o")
    for seed, (d_hope, d_tr) in {0: (0.0, 0.05), 1: (0.0, -0.05), 2: (0.01, 0.0)}.items():
        write_run(store, "hope", "s", seed, (np.array(HOPE) + d_hope).tolist())
        write_run(store, "transformer", "s", seed, (np.array(HOPE) + d_tr).tolist())
        write_run(store, "lstm", "s", seed, (np.array(TRANSFORMER) + d_hope).tolist())
    doc = build_leaderboard(load_results([tmp_path / "o"]))
    s = doc["streams"][0]
    ranks = {e["model"]: e["rank"] for e in s["entries"]}
    # hope − transformer per seed: −0.05, +0.05, +0.01: the interval covers 0 -> a shared rank 1;
    # lstm is 0.3 below both on every seed -> 1 + 2 entries that beat it
    assert ranks == {"hope": 1, "transformer": 1, "lstm": 3}
    assert doc["verdict"][0]["outcome"] == "tie" and doc["verdict"][0]["baseline"] == "transformer/tiny/finetune/naive"


def test_capability_streams_have_their_own_section_outside_the_verdict(tmp_path):
    from nlbench.report.leaderboard import CAPABILITY_STREAMS
    from nlbench.tasks.registry import STREAMS

    assert set(CAPABILITY_STREAMS) <= set(STREAMS)
    store = ResultStore(tmp_path / "o")
    for seed in (0, 1):
        write_run(store, "hope", "passkey", seed, HOPE)
        write_run(store, "transformer", "passkey", seed, TRANSFORMER)
    build_report([tmp_path / "o"], formats=("json", "md"), figures=False)
    doc = json.loads((tmp_path / "o" / "report" / "leaderboard.json").read_text())
    assert doc["streams"][0]["kind"] == "capability" and doc["verdict"] == []
    md = (tmp_path / "o" / "report" / "leaderboard.md").read_text()
    assert md.index("## Capability streams") > md.index("## Verdict")


def test_loss_section_flips_signs_and_ranks_lower_first(doc):
    s = _section(doc, "markov-lm", "loss")
    assert s["higher_is_better"] is False
    hope, tr = _entry(s, "hope"), _entry(s, "transformer")
    # loss of task 0 rose 2.0 -> 2.5: on −R that is bwt −0.5 and forgetting +0.5
    assert hope["metrics"]["bwt"]["mean"] == pytest.approx(-0.5)
    assert hope["metrics"]["forgetting"]["mean"] == pytest.approx(0.5)
    assert hope["metrics"]["acc_final"]["mean"] == pytest.approx(2.0)
    assert tr["metrics"]["acc_final"]["mean"] == pytest.approx(2.5)
    assert hope["metrics"]["acc_final"]["mean"] < tr["metrics"]["acc_final"]["mean"]
    assert (hope["rank"], tr["rank"]) == (1, 1)  # one seed: no paired interval, so no claim -> shared rank
    assert [e["model"] for e in s["entries"]] == ["hope", "transformer"]  # lower loss listed first
    assert hope["metrics"]["acc_final"]["ci_low"] is None  # one seed: no interval, not a fake one
    assert any("signs flip" in n for n in doc["notes"])


def test_same_label_different_config_is_not_pooled_as_seeds(tmp_path):
    store = ResultStore(tmp_path / "o")
    write_run(store, "hope", "s", 0, HOPE, lr=1e-3)
    write_run(store, "hope", "s", 0, TRANSFORMER, lr=3e-3)
    doc = build_leaderboard(load_results([tmp_path / "o"]))
    entries = doc["streams"][0]["entries"]
    assert len(entries) == 2 and all(e["n_seeds"] == 1 for e in entries)
    assert sorted(e["metrics"]["acc_final"]["mean"] for e in entries) == pytest.approx([0.5, 0.8])
    assert all("#" in e["entry"] for e in entries)


def test_single_task_stream_gives_undefined_transfer_not_zero(tmp_path):
    store = ResultStore(tmp_path / "o")
    write_run(store, "hope", "one", 0, [[0.9]], [0.2])
    write_run(store, "transformer", "one", 0, [[0.7]], [0.2])
    build_report([tmp_path / "o"], formats=("json", "md"), figures=False)
    doc = json.loads((tmp_path / "o" / "report" / "leaderboard.json").read_text())
    e = doc["streams"][0]["entries"][0]
    assert e["metrics"]["acc_final"]["mean"] == pytest.approx(0.9)
    assert all(e["metrics"][m]["mean"] is None and e["metrics"][m]["n"] == 0 for m in ("bwt", "fwt", "forgetting"))
    assert doc["verdict"][0]["outcome"] == "no interval"  # one seed
    assert "| 1 | hope/tiny/finetune/naive | 1 | 0.200 | 0.900 | 0.900 | — | — | — | — |" in (tmp_path / "o" / "report" / "leaderboard.md").read_text()


def write_setting(store, model, stream, seed, R, *, protocol="finetune", options=None):
    """One run of ``stream`` under ``protocol`` with stream ``options`` (another stream setting)."""
    from nlbench.results import run_id_for

    run = _run_row(model, stream, seed)
    run["config"] = dict(run["config"], protocol=protocol, stream={"name": stream, "options": options or {}})
    run.update(protocol=protocol, run_id=run_id_for(run["config"]))
    b = [0.2] * len(R)
    store.write_run(RunRecord(run=run, matrix=_matrix_rows(R, b), curves=_curve_rows(R, b)))


def test_in_context_entries_get_their_own_section_in_a_combined_report(tmp_path):
    # the published report combines a fine-tuning run and an in-context run of the same stream name
    # (reports/data/*/): in-context entries must be in it, and never ranked or paired against the
    # fine-tuned ones (other task data, other protocol)
    ft, ic = ResultStore(tmp_path / "ft"), ResultStore(tmp_path / "ic")
    for seed, d in SHIFT.items():
        write_setting(ft, "hope", "markov-languages", seed, (np.array(HOPE) + d).tolist())
        write_setting(ft, "transformer", "markov-languages", seed, (np.array(TRANSFORMER) + d).tolist())
        write_setting(ic, "hope", "markov-languages", seed, (np.array(TRANSFORMER) + d).tolist(),
                      protocol="in_context", options={"vocab_size": 8})
        write_setting(ic, "titans", "markov-languages", seed, (np.array(HOPE) + d).tolist(),
                      protocol="in_context", options={"vocab_size": 8})
    got = build_report([tmp_path / "ft", tmp_path / "ic"], out_dir=tmp_path / "rep", formats=("json", "md", "html"))
    doc = json.loads((tmp_path / "rep" / "leaderboard.json").read_text())
    by = {s["section"]: s for s in doc["streams"]}
    assert sorted(by) == ["markov-languages", "markov-languages · in_context"]
    fs, cs = by["markov-languages"], by["markov-languages · in_context"]
    assert (fs["protocol"], cs["protocol"]) == ("finetune", "in_context") and cs["stream"] == "markov-languages"
    assert cs["stream_config"] == {"name": "markov-languages", "options": {"vocab_size": 8}}
    assert {e["protocol"] for e in fs["entries"]} == {"finetune"}
    assert {e["protocol"] for e in cs["entries"]} == {"in_context"} and len(cs["entries"]) == 2
    for e in cs["entries"]:
        assert e["chance"]["mean"] == pytest.approx(0.2) and e["n_seeds"] == 3
    # baselines and paired rows stay inside their section: titans is the in-context baseline and
    # beats Hope there, while Hope leads the fine-tuning section
    assert cs["baseline"] == "titans/tiny/in_context/naive" and fs["baseline"] == "transformer/tiny/finetune/naive"
    assert {p["entry"] for p in cs["paired"]} == {"hope/tiny/in_context/naive"}
    assert _entry(cs, "titans")["rank"] == 1 and _entry(cs, "hope")["rank"] == 2 and _entry(fs, "hope")["rank"] == 1
    outcomes = {r["section"]: (r["protocol"], r["outcome"]) for r in doc["verdict"]}
    assert outcomes == {"markov-languages": ("finetune", "better"), "markov-languages · in_context": ("in_context", "worse")}
    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "### markov-languages · in_context — accuracy" in md and "### markov-languages — accuracy" in md
    figs = {Path(f).name for f in got["files"]}
    assert {"retention_markov-languages_in_context.png", "curves_markov-languages.png",
            "curves_markov-languages_in_context.png"} <= figs
    assert "retention_markov-languages.png" not in figs  # no retention figure for fine-tuning


def test_one_stream_with_two_configurations_is_two_sections(tmp_path):
    store = ResultStore(tmp_path / "o")
    for seed in (0, 1):
        write_setting(store, "hope", "markov-languages", seed, HOPE, options={"vocab_size": 8})
        write_setting(store, "hope", "markov-languages", seed, TRANSFORMER, options={"vocab_size": 16})
    doc = build_leaderboard(load_results([tmp_path / "o"]))
    labels = sorted(s["section"] for s in doc["streams"])
    assert len(labels) == 2 and all(lab.startswith("markov-languages#") for lab in labels)
    assert all(len(s["entries"]) == 1 and s["entries"][0]["n_seeds"] == 2 for s in doc["streams"])
    assert sorted(s["entries"][0]["metrics"]["acc_final"]["mean"] for s in doc["streams"]) == pytest.approx([0.5, 0.8])


# ----------------------------------------------------------------------------- bad or mixed inputs


def test_two_directories_with_the_same_runs_are_counted_once(results_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(results_dir, copy, ignore=shutil.ignore_patterns("report"))
    res = load_results([results_dir, copy])
    assert any("counted once" in w for w in res.warnings)
    doc = build_leaderboard(res)
    hope = _entry(_section(doc, "split-digits"), "hope")
    assert hope["n_seeds"] == 3 and hope["metrics"]["acc_final"]["n"] == 3


def test_rerun_in_another_directory_with_other_timings_is_counted_once(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_run(ResultStore(a), "hope", "s", 0, HOPE, tps=1000.0)
    write_run(ResultStore(b), "hope", "s", 0, HOPE, tps=1234.0)  # same run, same numbers, other speed
    res = load_results([a, b])
    assert len(res.runs) == 1 and len(res.matrix) == 12 and any("counted once" in w for w in res.warnings)
    e = build_leaderboard(res)["streams"][0]["entries"][0]
    assert e["n_seeds"] == 1 and e["train_tokens_per_s"]["mean"] == 1000.0  # the first directory wins


def test_same_run_id_with_different_numbers_is_an_error(results_dir, tmp_path):
    other = tmp_path / "other"
    write_run(ResultStore(other), "hope", "split-digits", 0, TRANSFORMER)  # same config -> same run id
    with pytest.raises(ReportError, match="different 'matrix' rows"):
        load_results([results_dir, other])


def _cli(*args):
    return CliRunner().invoke(report, [str(a) for a in args])


def test_future_schema_version_is_a_clear_error(results_dir, tmp_path):
    out = tmp_path / "future"
    shutil.copytree(results_dir, out, ignore=shutil.ignore_patterns("report"))
    f = next((out / "runs").glob("*.parquet"))
    t = pq.read_table(f)
    meta = dict(t.schema.metadata)
    meta[b"nlbench.schema_version"] = b"99"
    pq.write_table(t.replace_schema_metadata(meta), f)
    r = _cli(out, "--format", "json", "--no-figures")
    assert r.exit_code != 0
    assert "schema version 99" in r.output and f.name in r.output
    assert not (out / "report" / "leaderboard.json").exists()


def test_corrupt_file_is_a_clear_error(results_dir, tmp_path):
    out = tmp_path / "corrupt"
    shutil.copytree(results_dir, out, ignore=shutil.ignore_patterns("report"))
    f = next((out / "matrix").glob("*.parquet"))
    f.write_bytes(b"PAR1 this is not parquet")
    r = _cli(out, "--format", "md", "--no-figures")
    assert r.exit_code != 0 and "corrupt" in r.output and f.name in r.output


def test_missing_tables(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli(empty, "--no-figures")
    assert r.exit_code != 0 and "holds none of the tables" in r.output
    r = _cli(tmp_path / "nope", "--no-figures")
    assert r.exit_code != 0 and "does not exist" in r.output
    # a missing --ablation directory: the same clear error, nothing written
    ok = tmp_path / "ok"
    write_run(ResultStore(ok), "hope", "s", 0, HOPE)
    r = _cli(ok, "--no-figures", "--ablation", str(tmp_path / "nope-ablation"))
    assert r.exit_code != 0 and "nope-ablation does not exist" in r.output and "Traceback" not in r.output
    assert not (ok / "report").exists()
    # runs without curves: a warning, the leaderboard still comes out
    out = tmp_path / "nocurves"
    write_run(ResultStore(out), "hope", "s", 0, HOPE)
    shutil.rmtree(out / "curves")
    r = _cli(out, "--format", "json")
    assert r.exit_code == 0, r.output
    assert "no 'curves' table" in r.output
    doc = json.loads((out / "report" / "leaderboard.json").read_text())
    assert doc["streams"][0]["entries"][0]["metrics"]["acc_final"]["mean"] == pytest.approx(0.8)
    # runs without a matrix cannot be scored
    shutil.rmtree(out / "matrix")
    r = _cli(out, "--no-figures")
    assert r.exit_code != 0 and "no 'matrix' table" in r.output


# ----------------------------------------------------------------------------- throughput


def test_throughput_devices_side_by_side_with_speedup(tmp_path):
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    write_throughput(cpu, "cpu:x86_64:2threads", "float32", [("hope", "tiny", 64, "train", 1000.0),
                                                           ("hope", "tiny", 64, "infer", 3000.0),
                                                           ("transformer", "tiny", 64, "train", 2000.0)], "a")
    write_throughput(cpu, "cpu:x86_64:2threads", "float32", [("hope", "tiny", 64, "train", 1400.0)], "b")  # repeat
    write_throughput(gpu, "NVIDIA H100 80GB HBM3", "bfloat16", [("hope", "tiny", 64, "train", 60000.0),
                                                              ("hope", "tiny", 64, "infer", 300000.0)], "c")
    res = load_results([cpu, gpu])
    rep = throughput_report(res.throughput)
    cpu_l, gpu_l = "cpu:x86_64:2threads (float32)", "NVIDIA H100 80GB HBM3 (bfloat16)"
    assert rep["devices"] == [cpu_l, gpu_l] and rep["baseline"] == cpu_l
    rows = {(r["model"], r["phase"]): r for r in rep["rows"]}
    hope_train = rows[("hope", "train")]
    assert hope_train["by_device"][cpu_l]["tokens_per_s"] == pytest.approx(1200.0)  # median of 1000, 1400
    assert hope_train["by_device"][cpu_l]["n"] == 2
    assert hope_train["speedup"][gpu_l] == pytest.approx(60000 / 1200)
    assert rows[("hope", "infer")]["speedup"][gpu_l] == pytest.approx(100.0)
    assert gpu_l not in rows[("transformer", "train")]["by_device"]  # measured on CPU only: no speed-up
    assert math.isnan(rows[("transformer", "train")]["speedup"].get(gpu_l, math.nan))
    got = build_report([cpu, gpu], out_dir=tmp_path / "rep", formats=("md",))
    md = (tmp_path / "rep" / "throughput.md").read_text()
    assert "50.00×" in md and "100.00×" in md and "speed-up H100 bf16 / cpu 2t fp32" in md
    assert any(p.endswith("throughput.png") for p in got["files"])


def test_throughput_compiled_runs_get_their_own_column(tmp_path):
    """Rows measured through torch.compile (`compile_mode`) are a column of their own next to the
    eager rows of the same device, with the speed-up over eager."""
    eager, comp = tmp_path / "eager", tmp_path / "compiled"
    write_throughput(eager, "cpu:x86_64:2threads", "float32", [("hope", "medium", 512, "train", 1800.0)], "e")
    write_throughput(comp, "cpu:x86_64:2threads", "float32", [("hope", "medium", 512, "train", 3000.0)], "c",
                     compile_mode="max-autotune")
    rep = throughput_report(load_results([eager, comp]).throughput)
    cpu_l, comp_l = "cpu:x86_64:2threads (float32)", "cpu:x86_64:2threads (float32) [max-autotune]"
    assert rep["devices"] == [cpu_l, comp_l] and rep["baseline"] == cpu_l
    assert rep["short"] == {cpu_l: "cpu 2t fp32", comp_l: "cpu 2t fp32 max-autotune"}
    assert rep["rows"][0]["speedup"][comp_l] == pytest.approx(3000 / 1800)


# ----------------------------------------------------------------------------- the command end to end


def test_cli_writes_every_format_and_figure(results_dir, tmp_path):
    src = tmp_path / "OUT"
    shutil.copytree(results_dir, src, ignore=shutil.ignore_patterns("report"))
    write_throughput(src, "cpu:x86_64:2threads", "float32", [("hope", "tiny", 64, "train", 1000.0)], "cpu1")
    out = tmp_path / "rep"
    r = _cli(src, "--out-dir", out)
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "leaderboard.json").read_text())  # strict JSON: NaN written as null
    assert doc["schema_version"] == 2 and "Student t" in doc["ci_method"]
    assert doc["throughput"]["rows"][0]["by_device"]["cpu:x86_64:2threads (float32)"]["tokens_per_s"] == 1000.0
    md = (out / "leaderboard.md").read_text()
    assert "Chaudhry et al. 2018" in md and "Rebuffi et al. 2017" in md and "Student t" in md
    assert "did not learn (3/3 seeds)" in md and "signs flip" in md
    hope_line = next(line for line in md.splitlines() if line.startswith("| 1 | hope/tiny/finetune/naive | 3 |"))
    assert "0.800 [0.750, 0.850]" in hope_line
    figs = out / "figures"
    for stem in ("curves_split-digits", "matrix_split-digits", "acc_vs_forgetting", "acc_vs_throughput", "throughput"):
        png, svg = figs / f"{stem}.png", figs / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000, stem
        assert "<svg" in svg.read_text(), stem
    # one panel per entry, titled by the entry; the did-not-learn one says so
    curves_svg = (figs / "curves_split-digits.svg").read_text()
    assert all(name in curves_svg for name in ("hope/tiny/finetune/naive", "transformer/tiny", "(did not learn)"))
    assert (out / "leaderboard.html").stat().st_size > 10_000


def test_readme_documents_every_json_key(doc):
    readme = (Path(__file__).resolve().parents[1] / "reports" / "README.md").read_text()
    keys = (set(doc) | {"throughput"} | set(doc["streams"][0]) | set(doc["streams"][0]["entries"][0])
            | set(doc["verdict"][0]) | set(doc["streams"][0]["paired"][0]))
    missing = sorted(k for k in keys if f"`{k}`" not in readme)
    assert not missing, f"reports/README.md does not document {missing}"


def test_task_boundaries_are_where_each_task_starts():
    """The dashed lines of the forgetting curves: tokens seen when task k+1 starts (its curve's first
    point, measured before its first step), not task k's last mid-task evaluation."""
    import pandas as pd

    from nlbench.report.figures import task_boundaries

    rows = []
    for k, (start, end) in enumerate([(0, 300), (300, 600), (600, 900)]):
        for t in range(start, end, 80):  # eval_every 80: the last mid-task point is 240, 540, 840
            rows.append(dict(train_task=k, tokens_seen=t))
    assert task_boundaries(pd.DataFrame(rows)) == [300.0, 600.0]


def test_results_written_before_the_ceiling_column_still_report(tmp_path):
    """runs.ceiling came with results schema v6: a v5 runs file (without it) reports, ceiling null."""
    from nlbench.results import SCHEMA_VERSION_KEY

    store = ResultStore(tmp_path / "o")
    for seed in (0, 1):
        write_run(store, "hope", "s", seed, HOPE, ceiling=[0.95, 0.95, 0.95])
        write_run(store, "transformer", "s", seed, TRANSFORMER)
    doc = build_leaderboard(load_results([tmp_path / "o"]))
    assert _entry(doc["streams"][0], "hope")["ceiling"] == pytest.approx(0.95)
    assert _entry(doc["streams"][0], "transformer")["ceiling"] is None  # unknown ceilings stay unknown
    for f in (tmp_path / "o" / "runs").glob("*.parquet"):
        t = pq.read_table(f)
        t = t.drop_columns(["ceiling"])
        pq.write_table(t.replace_schema_metadata({**t.schema.metadata, SCHEMA_VERSION_KEY.encode(): b"5"}), f)
    old = build_leaderboard(load_results([tmp_path / "o"]))
    assert old["schema_version"] == 2 and _entry(old["streams"][0], "hope")["ceiling"] is None
    assert old["verdict"][0]["outcome"] == "better"


def test_recurring_stream_section_shows_relearn_savings(tmp_path):
    # A B A: A's curve is [b, R[0][0]] = [0.2, 0.9] the first time and [R[1][2], R[2][2]] = [0.6, 0.95]
    # when it comes back: savings (0.6 + 0.95)/2 − (0.2 + 0.9)/2 = 0.225
    R = [[0.9, 0.2, 0.9], [0.6, 0.9, 0.6], [0.95, 0.3, 0.95]]
    store = ResultStore(tmp_path / "o")
    for seed in (0, 1):
        write_run(store, "hope", "recurring", seed, R)
        write_run(store, "hope", "split-digits", seed, HOPE)
    build_report([tmp_path / "o"], formats=("json", "md"), figures=False)
    doc = json.loads((tmp_path / "o" / "report" / "leaderboard.json").read_text())
    by_stream = {s["stream"]: s for s in doc["streams"]}
    assert by_stream["recurring"]["kind"] == "forgetting"
    assert by_stream["recurring"]["entries"][0]["metrics"]["relearn_savings"]["mean"] == pytest.approx(0.225)
    md = (tmp_path / "o" / "report" / "leaderboard.md").read_text()
    header_lines = [line for line in md.splitlines() if line.startswith("| rank |")]
    assert sum("relearn_savings" in line for line in header_lines) == 1   # only the recurring section
    assert "0.225" in md


def test_untuned_entries_are_paired_but_not_ranked_beside_tuned_ones(results_dir, tmp_path):
    # ranks claim an equal tuning budget: with a tuned entry in the report, untuned ones are listed
    # (with their paired rows and verdict) but unranked; alone, the same runs are ranked
    tuned = tmp_path / "tuned"
    sel = {"values": {"train.optimizer.lr": 0.01}, "tuning_seeds": [100, 101], "study": "s", "trial": 0}
    for seed in range(3):
        write_run(ResultStore(tuned), "transformer", "other", seed, TRANSFORMER, selected=sel)
    doc = build_leaderboard(load_results([results_dir, tuned]))
    split = next(s for s in doc["streams"] if s["section"] == "split-digits" and s["score"] == "accuracy")
    assert all(e["rank"] is None and e["untuned"] for e in split["entries"])
    assert split["baseline"] and split["paired"]
    assert any(v["section"] == "split-digits" and v["outcome"] in ("better", "worse", "tie") for v in doc["verdict"])
    other = next(s for s in doc["streams"] if s["section"] == "other")
    assert [(e["rank"], e["untuned"]) for e in other["entries"]] == [(1, False)]
    assert "not tuned" in render_markdown(doc)
    alone = build_leaderboard(load_results([results_dir]))
    split = next(s for s in alone["streams"] if s["section"] == "split-digits" and s["score"] == "accuracy")
    assert not any(e["untuned"] for e in split["entries"])
    assert all((e["rank"] is not None) == (not e["did_not_learn"]) for e in split["entries"])
