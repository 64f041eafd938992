"""nlbench leaderboard: per-entry selection on tuning seeds disjoint from the
reporting seeds, then the reporting runs with the selected values, resumable. Real Ray (the
session's runtime), real Optuna journal storage, real Parquet; tiny Transformer runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from nlbench.cli import main
from nlbench.selection import LeaderboardConfigError, validate_leaderboard_config
from nlbench.selection.edges import edge_of

REPORT_SEEDS = [0, 1, 2, 3, 4]
TUNING_SEEDS = [100, 101]


def experiment(num_tasks=2, strategies=("naive", "replay")):
    """Runs of about half a second: tiny Transformer, 4 steps per task of 8 × 32 tokens."""
    return {
        "name": "tiny-lb",
        "models": [{"name": "transformer", "size": "tiny"}],
        "streams": [{"name": "markov-languages", "num_tasks": num_tasks, "seq_len": 32,
                     "options": {"order": 1, "vocab_size": 32, "branching": 4, "eval_size": 32}}],
        "strategy": list(strategies),
        "replay": {"buffer_size": 16, "ratio": 0.5},
        "train": {"tokens_per_task": 1024, "batch_size": 8, "optimizer": {"name": "muon", "lr": 0.02},
                  "device": "cpu"},
        "eval": {"max_sequences": 32, "batch_size": 32},
    }


def lb_config(**kw):
    cfg = {
        "name": "lb",
        "experiment": experiment(kw.pop("num_tasks", 2), kw.pop("strategies", ("naive", "replay"))),
        "seeds": REPORT_SEEDS,
        "tuning_seeds": TUNING_SEEDS,
        "trials": 2,
        "parallel": 2,
        "space": {"train.optimizer.lr": {"type": "float", "low": 0.005, "high": 0.05, "log": True},
                  # two points cannot bracket an optimum: whichever is chosen is at the edge
                  "train.optimizer.adamw_lr": {"type": "categorical", "choices": [0.001, 0.003]}},
        "strategy_space": {"replay": {"replay.buffer_size": {"type": "int", "low": 8, "high": 64, "log": True}}},
        "study": {"sampler": "random", "seed": 0, "pruner": "none"},
    }
    cfg.update(kw)
    return cfg


def _write(tmp_path, cfg, name="lb.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _studies(journal: Path) -> dict:
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
                for s in optuna.get_all_study_summaries(storage)}


def _trial_snapshot(journal: Path) -> dict:
    return {name: sorted((t.number, t.state.name, t.datetime_complete) for t in st.get_trials(deepcopy=False))
            for name, st in _studies(journal).items()}


def _get(config: dict, path: str):
    node = config
    for seg in path.split("."):
        node = node[int(seg)] if isinstance(node, list) else node[seg]
    return node


def _invoke(args):
    result = CliRunner().invoke(main, args)
    return result


# ---------------------------------------------------------------------------- config checks


def test_overlapping_seeds_are_refused_and_nothing_is_written(tmp_path):
    cfg = lb_config(tuning_seeds=[4, 100])
    out = tmp_path / "out"
    result = _invoke(["leaderboard", str(_write(tmp_path, cfg)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error: ") and "\n" not in text and "Traceback" not in text
    assert "field 'tuning_seeds'" in text and "[4]" in text and "reporting seeds" in text
    assert not out.exists()
    # the experiment's own seeds count as reporting seeds when `seeds` is left out
    cfg = lb_config(seeds=None)
    cfg["experiment"]["seeds"] = [0, 1, 2, 3, 100]
    with pytest.raises(LeaderboardConfigError, match=r"seed\(s\) \[100\] are also reporting seeds"):
        validate_leaderboard_config({k: v for k, v in cfg.items() if v is not None})


@pytest.mark.parametrize("change, expect", [
    (dict(seeds=[0, 1, 2]), r"field 'seeds': 3 reporting seed\(s\).*at least 5"),
    (dict(families={"a": ["passkey"]}), r"field 'families.a': stream 'passkey' is not in the experiment"),
    (dict(model_space={"hope": {"model.options.eta_init": {"type": "float", "low": 0.3, "high": 0.9}}}),
     r"field 'model_space.hope': no model of the experiment has this label or name"),
    (dict(strategy_space={"ewc": {"ewc.lam": {"type": "float", "low": 1, "high": 10}}}),
     r"field 'strategy_space.ewc': the experiment runs no entry with strategy 'ewc'"),
    (dict(space={"train.optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}), r"low must be <= high"),
    (dict(space={"train.optimzer.lr": {"type": "float", "low": 0.01, "high": 0.1}}),
     r"entry transformer/finetune/naive, family 'markov-languages': field 'space.train.optimzer.lr'"),
    (dict(trials=0), r"field 'trials'"),
])
def test_invalid_config_names_the_field(change, expect):
    with pytest.raises(LeaderboardConfigError, match=expect):
        validate_leaderboard_config(lb_config(**change))


def test_an_experiment_config_given_as_leaderboard_config_is_named_as_such():
    with pytest.raises(LeaderboardConfigError, match=r"it is an experiment config .* names one with 'base: PATH'"):
        validate_leaderboard_config(experiment())


def test_one_study_per_entry_and_family_with_the_same_budget():
    cfg = lb_config()
    cfg["experiment"]["streams"].append({"name": "permuted-tokens", "num_tasks": 2, "seq_len": 32})
    lc, plans = validate_leaderboard_config(cfg)
    assert sorted(p.name for p in plans) == sorted(
        f"transformer.finetune.{s}.{f}" for s in ("naive", "replay") for f in ("markov-languages", "permuted-tokens"))
    assert {p.tune_config.trials for p in plans} == {2}
    for p in plans:
        assert p.tuning_experiment["seeds"] == TUNING_SEEDS and p.report_experiment["seeds"] == REPORT_SEEDS
        assert [s["name"] for s in p.tuning_experiment["streams"]] == list(p.streams)
        # replay entries also search the buffer size; naive ones do not
        assert ("replay.buffer_size" in p.tune_config.space) == (p.strategy == "replay")
    lc, plans = validate_leaderboard_config(dict(cfg, families={"seq": ["markov-languages", "permuted-tokens"]}))
    assert len(plans) == 2 and all(p.streams == ("markov-languages", "permuted-tokens") for p in plans)


def test_edge_of_range():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    d = FloatDistribution(1e-3, 1e-1, log=True)
    assert edge_of(1e-2, d) is None                     # the middle of the log range
    assert edge_of(0.095, d) == "high" and edge_of(1.1e-3, d) == "low"
    assert edge_of(0.095, FloatDistribution(0.0, 1.0)) is None    # linear range: 0.095 is inside
    assert edge_of(8, IntDistribution(8, 64)) == "low" and edge_of(9, IntDistribution(8, 64)) is None
    assert edge_of(0.003, CategoricalDistribution([0.001, 0.003, 0.01])) is None
    assert edge_of(0.01, CategoricalDistribution([0.001, 0.003, 0.01])) == "high"
    assert edge_of("swiglu", CategoricalDistribution(["swiglu", "mlp"])) is None   # unordered choices


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_selection_on_tuning_seeds_then_reporting_runs_with_the_selected_values(ray_session, tmp_path):
    from nlbench.results import ResultStore

    out = tmp_path / "out"
    path = _write(tmp_path, lb_config())
    journal = out / "tuning" / "study.journal"

    # 1. selection only
    r = _invoke(["leaderboard", str(path), "--out", str(out), "--until", "tune"])
    assert r.exit_code == 0, r.output
    assert not (out / "runs").exists()
    studies = _studies(journal)
    assert sorted(studies) == ["transformer.finetune.naive.markov-languages",
                               "transformer.finetune.replay.markov-languages"]
    tuning_run_ids = set()
    for name, st in studies.items():
        trials = st.get_trials(deepcopy=False)
        assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
        runs = ResultStore(out / "tuning" / name).read("runs")
        assert sorted(set(runs["seed"])) == TUNING_SEEDS        # selection saw the tuning seeds only
        tuning_run_ids |= set(runs["run_id"])
        for t in trials:
            assert set(t.user_attrs["run_ids"]) <= set(runs["run_id"])
    before = _trial_snapshot(journal)
    sel = json.loads((out / "selection.json").read_text())
    assert {s["study"] for s in sel["studies"]} == set(studies)

    # 2. the whole leaderboard: no trial is run again, the reporting seeds run with the selection
    r = _invoke(["leaderboard", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert _trial_snapshot(journal) == before
    runs = ResultStore(out).read("runs")
    assert sorted(set(runs["seed"])) == REPORT_SEEDS and len(runs) == 2 * len(REPORT_SEEDS)
    assert not set(runs["run_id"]) & tuning_run_ids
    for name, st in _studies(journal).items():
        best = st.best_trial
        mine = [json.loads(c) for c in runs["config"] if json.loads(c)["selected"]["study"] == name]
        assert len(mine) == len(REPORT_SEEDS)
        for c in mine:
            for p, v in best.user_attrs["overrides"].items():
                assert _get(c, p) == v, (name, p)
            assert c["selected"]["tuning_seeds"] == TUNING_SEEDS and c["selected"]["trial"] == best.number
            assert c["strategy"] == name.split(".")[2]
    doc = json.loads((out / "report" / "leaderboard.json").read_text())
    entries = doc["streams"][0]["entries"]
    assert len(entries) == 2
    for e in entries:
        assert e["seeds"] == REPORT_SEEDS
        st = _studies(journal)[e["selected"]["study"]]
        assert e["selected"]["values"] == st.best_trial.user_attrs["overrides"]
        assert e["selected"]["tuning_seeds"] == TUNING_SEEDS
        assert e["chance"]["mean"] is not None and "ceiling" in e
        # a two-point grid: the chosen adamw_lr is flagged at its edge, in the JSON and on the page
        assert "train.optimizer.adamw_lr" in e["selected"]["edge"]
    md = (out / "report" / "leaderboard.md").read_text()
    assert "## Selected hyper-parameters" in md and "train.optimizer.adamw_lr" in md
    assert "selected at range edge" in md
    assert "at the" in r.output and "edge" in r.output

    # 3. again: nothing is recomputed (no new trial, no run file rewritten)
    files = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.parquet")}
    r = _invoke(["leaderboard", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert _trial_snapshot(journal) == before
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.parquet")} == files
    assert "skipped 10" in r.output


def test_studies_tuned_at_once_overlap_and_select_what_one_at_a_time_selects(ray_session, tmp_path):
    # two studies share the cluster (their trials interleave), and each study's choice is the one
    # it makes when the studies run one after another
    path = _write(tmp_path, lb_config(parallel=1, strategy_space={}))
    sel, spans = {}, {}
    for k in (1, 2):
        out = tmp_path / f"k{k}"
        r = _invoke(["leaderboard", str(path), "--out", str(out), "--until", "tune", "--studies-at-once", str(k)])
        assert r.exit_code == 0, r.output
        sel[k] = {s["study"]: (s["values"], s["trial"]) for s in json.loads((out / "selection.json").read_text())["studies"]}
        spans[k] = sorted((min(t.datetime_start for t in st.get_trials(deepcopy=False)),
                           max(t.datetime_complete for t in st.get_trials(deepcopy=False)))
                          for st in _studies(out / "tuning" / "study.journal").values())
    assert len(sel[1]) == 2 and sel[1] == sel[2]
    (a1, b1), (a2, b2) = spans[1]
    assert a2 > b1                        # one at a time: the second study starts after the first ends
    (a1, b1), (a2, b2) = spans[2]
    assert a2 < b1                        # at once: the second starts before the first ends
    r = _invoke(["leaderboard", str(path), "--out", str(tmp_path / "k0"), "--studies-at-once", "0"])
    assert r.exit_code == 2 and "--studies-at-once must be >= 1" in r.output and not (tmp_path / "k0").exists()


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_keeps_finished_trials(ray_session, tmp_path):
    from nlbench.selection.config import validate_leaderboard_config as validate

    out = tmp_path / "out"
    # one trial in flight and longer trials, so a kill lands while a trial is running
    cfg = lb_config(num_tasks=5, strategies=("naive",), trials=3, parallel=1, strategy_space={})
    path = _write(tmp_path, cfg)
    exe = Path(sys.executable).parent / "nlbench"
    cmd = [str(exe), "leaderboard", str(path), "--out", str(out), "--address", ray_session["address"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    journal = out / "tuning" / "study.journal"
    deadline = time.time() + 600  # an upper bound only (a loaded machine): the loop ends at the first COMPLETE
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if not journal.exists():
                continue
            try:
                snap = _trial_snapshot(journal)
            except Exception:  # noqa: BLE001 - the journal is being created
                continue
            if any(s == "COMPLETE" for trials in snap.values() for _, s, _ in trials):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]
    before = _trial_snapshot(journal)
    (name, trials), = before.items()
    done_before = {n: c for n, s, c in trials if s == "COMPLETE"}
    assert 1 <= len(done_before) < 3, before

    r = _invoke(["leaderboard", str(path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    after = {n: (s, c) for n, s, c in _trial_snapshot(journal)[name]}
    for n, c in done_before.items():      # finished trials kept as they were, not run again
        assert after[n] == ("COMPLETE", c)
    assert sum(s == "COMPLETE" for s, _ in after.values()) == 3  # the budget, not budget + finished
    lc, plans = validate(yaml.safe_load(path.read_text()))
    from nlbench.results import ResultStore

    assert sorted(set(ResultStore(out).read("runs")["seed"])) == REPORT_SEEDS


@pytest.mark.parametrize("name, studies", [("leaderboard.yaml", 40), ("leaderboard-gpu.yaml", 560)])
def test_shipped_configs_are_valid(name, studies):
    from nlbench.selection import load_leaderboard_config

    lc, plans = load_leaderboard_config(Path(__file__).resolve().parent.parent / "configs" / name)
    assert len(plans) == studies and len(lc.seeds) >= 5 and not set(lc.seeds) & set(lc.tuning_seeds)
    assert len({p.tune_config.trials for p in plans}) == 1  # the same budget for every entry
    assert {p.strategy for p in plans} == {"naive", "replay", "ewc", "joint", "fresh"}
    m3 = [p for p in plans if "m3" in p.model]
    assert m3 and all(p.tuning_experiment["train"]["optimizer"]["name"] == "m3" for p in m3)
