"""nlbench tune: search-space validation, the CMS-period construction, objectives on hand-made
matrices, and real studies (Optuna journal storage, trials on the session's Ray runtime)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from nlbench.tune import (
    CmsPeriodsParam, ObjectiveSpec, TuneConfigError, finished_count, load_tune_config, objective_value, open_study,
    run_tune, sample_overrides, validate_tune_config,
)

ROOT = Path(__file__).resolve().parent.parent


def base_experiment(num_tasks=2, model="transformer", optimizer=None):
    """Runs of about half a second: tiny model, 8 steps per task of 8 × 32 tokens."""
    return {
        "name": "tiny-base",
        "models": [{"name": model, "size": "tiny"}],
        "streams": [{"name": "markov-languages", "num_tasks": num_tasks, "seq_len": 32,
                     "options": {"order": 1, "vocab_size": 32, "branching": 4, "eval_size": 32}}],
        "seeds": [0],
        "train": {"tokens_per_task": 2048, "batch_size": 8, "optimizer": optimizer or {"name": "adamw", "lr": 3e-3},
                  "device": "cpu"},
        "eval": {"max_sequences": 32, "batch_size": 32},
    }


def tune_config(**kw):
    cfg = {
        "name": "t",
        "experiment": base_experiment(kw.pop("num_tasks", 2)),
        "space": {"train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
        "objective": {"metric": "acc_final"},
        "trials": 3,
        "parallel": 2,
        "study": {"sampler": "random", "seed": 0, "pruner": "none"},
    }
    cfg.update(kw)
    return cfg


def quiet(*_):
    pass


# ------------------------------------------------------------------------ CMS periods


CMS_SPACE = {"type": "cms_periods", "levels": [1, 5], "base": 2, "first_exponent": [0, 3], "increment": [1, 3],
             "lr": {"low": 0.05, "high": 1.0}}


def test_cms_periods_strictly_increase_in_every_sampled_trial():
    import optuna

    from nlbench.models import build_model

    tc, _ = validate_tune_config(tune_config(experiment=base_experiment(model="hope"),
                                             space={"model.options.cms_periods": CMS_SPACE}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_K = set()
    for n in range(400):
        o = sample_overrides(tc.space, study.ask())
        periods, K = o["model.options.cms_periods"], o["model.options.cms_levels"]
        assert len(periods) == K and 1 <= K <= 5
        assert all(a < b for a, b in zip(periods, periods[1:])), periods
        exps = [p.bit_length() - 1 for p in periods]
        assert [2 ** e for e in exps] == periods and 0 <= exps[0] <= 3
        assert all(1 <= b - a <= 3 for a, b in zip(exps, exps[1:]))
        lrs = o["model.options.cms_lr"]  # one in-context step per level
        assert len(lrs) == K and all(0.05 <= x <= 1.0 for x in lrs)
        seen_K.add(K)
        if n < 20:  # the model accepts what the space produces
            build_model("hope", size="tiny", vocab_size=32, cms_periods=periods, cms_levels=K,
                        cms_lr=o["model.options.cms_lr"])
    assert seen_K == {1, 2, 3, 4, 5}


@settings(max_examples=200, deadline=None)
@given(data=st.data(), base=st.integers(2, 5), k_lo=st.integers(1, 4), k_span=st.integers(0, 3),
       e_lo=st.integers(0, 3), e_span=st.integers(0, 3), d_lo=st.integers(1, 3), d_span=st.integers(0, 3))
def test_cms_periods_constraint_holds_by_construction(data, base, k_lo, k_span, e_lo, e_span, d_lo, d_span):
    import optuna

    p = CmsPeriodsParam(type="cms_periods", levels=(k_lo, k_lo + k_span), base=base,
                        first_exponent=(e_lo, e_lo + e_span), increment=(d_lo, d_lo + d_span))
    name = "model.options.cms_periods"
    K = data.draw(st.integers(k_lo, k_lo + k_span))
    fixed = {f"{name}:levels": K, f"{name}:exp0": data.draw(st.integers(e_lo, e_lo + e_span))}
    for level in range(1, K):  # any draw inside the declared ranges, incl. the extremes
        fixed[f"{name}:inc{level}"] = data.draw(st.integers(d_lo, d_lo + d_span))
    o = sample_overrides({name: p}, optuna.trial.FixedTrial(fixed))
    periods = o[name]
    assert len(periods) == K == o["model.options.cms_levels"]
    assert periods[0] == base ** fixed[f"{name}:exp0"]
    assert all(b > a for a, b in zip(periods, periods[1:]))


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("space, expect", [
    ({"train.optimizer.lr": {"type": "float", "low": 0.1, "high": 0.01}}, ["space.train.optimizer.lr", "low must be <="]),
    ({"train.optimizer.lr": {"type": "uniform", "low": 0.1, "high": 1}}, ["space.train.optimizer.lr", "'uniform'", "'cms_periods'"]),
    ({"train.optimizer.lr": {"type": "float", "low": 0.0, "high": 1, "log": True}}, ["space.train.optimizer.lr", "low > 0"]),
    ({"train.nonexistent": {"type": "int", "low": 1, "high": 2}}, ["space.train.nonexistent", "no key 'nonexistent'"]),
    ({"train.optimizer.bogus": {"type": "int", "low": 1, "high": 2}}, ["space.train.optimizer.bogus", "'bogus'"]),
    ({"seed": {"type": "int", "low": 0, "high": 3}}, ["space.seed", "'model', 'stream', 'train'"]),
    ({"train.batch_size": {"type": "int", "low": 0, "high": 4}}, ["space.train.batch_size", "batch_size"]),
    ({"model.options.cms_periods": {"type": "cms_periods", "levels": [3, 2]}}, ["space.model.options.cms_periods.levels", "low <= high"]),
    ({"model.options.cms_periods": {"type": "cms_periods", "increment": [0, 2]}}, ["space.model.options.cms_periods.increment", "low >= 1"]),
    ({"train.optimizer.lr": {"type": "cms_periods"}}, ["space.train.optimizer.lr", "'model.options.cms_periods' only"]),
    ({"train.optimizer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "mean": 3}}, ["space.train.optimizer.lr.mean", "unknown key"]),
])
def test_invalid_search_space_names_the_field(space, expect):
    experiment = base_experiment(model="hope")
    with pytest.raises(TuneConfigError) as e:
        validate_tune_config(tune_config(experiment=experiment, space=space))
    for text in expect:
        assert text in str(e.value), (text, str(e.value))


def test_invalid_objective_and_base():
    with pytest.raises(TuneConfigError, match="objective.metric.*must be one of.*'acc_final'"):
        validate_tune_config(tune_config(objective={"metric": "accuracy"}))
    with pytest.raises(TuneConfigError, match="exactly one of 'base'"):
        validate_tune_config(tune_config(base="configs/quick.yaml"))
    bad = tune_config()
    bad["experiment"]["models"][0]["name"] = "gpt5"
    with pytest.raises(TuneConfigError, match="field 'experiment'.*unknown model 'gpt5'"):
        validate_tune_config(bad)
    with pytest.raises(TuneConfigError, match="variants"):
        validate_tune_config(tune_config(experiment={**base_experiment(), "variants": [{"overrides": {"seed": 1}}]}))


def test_cli_invalid_space_exits_2_before_any_trial(tmp_path):
    from nlbench.cli import main

    cfg = tune_config(space={"train.optimizer.lr": {"type": "float", "low": 1.0, "high": 0.1}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(main, ["tune", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "space.train.optimizer.lr" in result.output and "low must be <=" in result.output
    assert not (tmp_path / "out" / "study.journal").exists()  # nothing ran, no study was created
    missing = CliRunner().invoke(main, ["tune", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_example_configs_are_valid_and_base_path_resolves(tmp_path):
    reporting = set()
    for name in ("standard.yaml", "quick.yaml"):
        reporting |= set(yaml.safe_load((ROOT / "configs" / name).read_text())["seeds"])
    for name in ("tune-cms.yaml", "tune-m3.yaml"):
        tc, experiment = load_tune_config(ROOT / "configs" / name)
        assert tc.trials >= 4 and experiment["models"][0]["name"] == "hope"
        # tuning on a reporting seed is tuning on the test data (the stream content depends on the seed)
        assert not set(experiment["seeds"]) & reporting, (name, experiment["seeds"])
    # `base:` is resolved next to the tune config
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(base_experiment()))
    cfg = tune_config()
    del cfg["experiment"]
    cfg["base"] = "exp.yaml"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(cfg))
    tc, experiment = load_tune_config(tmp_path / "t.yaml")
    assert experiment["train"]["tokens_per_task"] == 2048


# ------------------------------------------------------------------------ objectives


class _Rec:
    def __init__(self, R, b, tps=100.0):
        self.run = {"train_tokens_per_s": tps}
        self.matrix = [dict(after_task=-1, eval_task=j, metric="accuracy", value=v) for j, v in enumerate(b)]
        self.matrix += [dict(after_task=i, eval_task=j, metric="accuracy", value=v)
                        for i, row in enumerate(R) for j, v in enumerate(row)]


def test_objective_values_hand_computed():
    # R[i][j]: accuracy on task j after training task i
    a = _Rec([[0.8, 0.1, 0.0], [0.5, 0.9, 0.1], [0.4, 0.6, 0.7]], [0.1, 0.1, 0.1], tps=100.0)
    b = _Rec([[0.6, 0.1, 0.0], [0.6, 0.7, 0.1], [0.6, 0.7, 0.5]], [0.1, 0.1, 0.1], tps=300.0)
    acc = ObjectiveSpec(metric="acc_final")
    assert objective_value([a], acc) == pytest.approx((0.4 + 0.6 + 0.7) / 3)
    # intermediate (pruning) values: the same metric on the tasks seen so far
    assert objective_value([a], acc, upto=0) == pytest.approx(0.8)
    assert objective_value([a], acc, upto=1) == pytest.approx((0.5 + 0.9) / 2)
    # mean over the trial's runs
    assert objective_value([a, b], acc, upto=1) == pytest.approx(((0.5 + 0.9) / 2 + (0.6 + 0.7) / 2) / 2)
    forg = ObjectiveSpec(metric="forgetting")
    assert forg.direction == "minimize"
    # RWalk forgetting: task 0 max(0.8, 0.5) − 0.4 = 0.4; task 1 0.9 − 0.6 = 0.3
    assert objective_value([a], forg) == pytest.approx((0.4 + 0.3) / 2)
    assert objective_value([a], forg, upto=1) == pytest.approx(0.8 - 0.5)
    assert objective_value([a, b], ObjectiveSpec(metric="train_tokens_per_s")) == pytest.approx(200.0)


def test_objective_noise_tells_a_flat_objective_from_a_real_effect():
    """Trials × runs table, two-way decomposition: the seed effect all trials share is not noise."""
    from types import SimpleNamespace

    from nlbench.tune import objective_noise

    acc = ObjectiveSpec(metric="acc_final")

    def trial(*runs):
        return SimpleNamespace(values=[sum(runs) / len(runs)], user_attrs={"per_run_values": [[r] for r in runs]})

    # the two seeds disagree in opposite directions from trial to trial: noise only
    flat = objective_noise([trial(0.45, 0.55), trial(0.56, 0.46), trial(0.50, 0.50)], [acc])["acc_final"]
    # by hand: row means .50 .51 .50, col means .503 .503, residuals ±.05 ±.05 0 -> Σe² = .01
    assert flat["between_trials_sd"] == pytest.approx(0.005773503, rel=1e-5)
    assert flat["noise_se"] == pytest.approx((0.01 / 2 / 2) ** 0.5, rel=1e-5)
    assert flat["ratio"] < 1 and not flat["meaningful"]
    # seed 1 is 0.2 better than seed 0 in EVERY trial (shared, not noise); trials 0.3 apart
    real = objective_noise([trial(0.10, 0.30), trial(0.41, 0.59), trial(0.70, 0.90)], [acc])["acc_final"]
    assert real["ratio"] > 10 and real["meaningful"]
    # one run per trial, one trial, or unequal tables: no estimate rather than a made-up one
    assert objective_noise([trial(0.1), trial(0.2)], [acc]) == {}
    assert objective_noise([trial(0.1, 0.2)], [acc]) == {}
    assert objective_noise([trial(0.1, 0.2), trial(0.1, 0.2, 0.3)], [acc]) == {}


# ------------------------------------------------------------------------ real studies


def _trials_table(out):
    from nlbench.results import ResultStore

    return ResultStore(out).read("trials")


def test_parallel_study_writes_trials_best_yaml_and_plots(ray_session, tmp_path):
    import pandas as pd

    from nlbench.config import expand_runs, load_config
    from nlbench.results import ResultStore

    out = tmp_path / "out"
    tc, experiment = validate_tune_config(tune_config())
    summary = run_tune(tc, experiment, out, log=quiet)
    assert summary["complete"] == 3 and summary["finished"] == 3

    study = open_study(tc, str(out / "study.journal"))
    trials = sorted(study.trials, key=lambda t: t.number)
    # two trials were in flight at once: trial 1 started before trial 0 finished
    assert trials[1].datetime_start < trials[0].datetime_complete

    df = _trials_table(out)
    assert sorted(df["trial"]) == [0, 1, 2] and set(df["state"]) == {"complete"}
    assert (df["objective"] == "acc_final").all() and (df["direction"] == "maximize").all()
    for t in trials:
        row = df[df["trial"] == t.number].iloc[0]
        assert row["param_train.optimizer.lr"] == pytest.approx(t.params["train.optimizer.lr"])
        assert row["value"] == pytest.approx(t.value)
    for name in ("history.png", "importances.png"):
        assert (out / name).stat().st_size > 1000
    assert "train.optimizer.lr" in summary["importances"]["acc_final"]
    for t in trials:  # each run's own objective value is kept; their mean is the trial's value
        per_run = t.user_attrs["per_run_values"]
        assert len(per_run) == len(t.user_attrs["run_ids"])
        assert sum(r[0] for r in per_run) / len(per_run) == pytest.approx(t.value)

    # best.yaml: a full experiment config with the best trial's value, accepted unchanged
    best = study.best_trial
    cfg = load_config(out / "best.yaml")
    assert cfg.train.optimizer.lr == pytest.approx(best.params["train.optimizer.lr"])
    specs = expand_runs(cfg)
    assert [s.run_id for s in specs] == best.user_attrs["run_ids"]  # the very runs the trial scored

    # ... and `nlbench run --sequential` reproduces the trial's matrix exactly
    from nlbench.cli import main

    rerun = tmp_path / "rerun"
    result = CliRunner().invoke(main, ["run", str(out / "best.yaml"), "--out", str(rerun), "--sequential"])
    assert result.exit_code == 0, result.output
    m_tune = ResultStore(out).read("matrix")
    m_tune = m_tune[m_tune["run_id"] == specs[0].run_id]
    m_run = ResultStore(rerun).read("matrix")
    key = ["after_task", "eval_task", "metric"]
    joined = pd.merge(m_tune[key + ["value"]], m_run[key + ["value"]], on=key)
    assert len(joined) == len(m_run) > 0
    assert (joined["value_x"] == joined["value_y"]).all()


def test_median_pruner_stops_a_hopeless_trial_from_its_reports(ray_session, tmp_path):
    out = tmp_path / "out"
    cfg = tune_config(num_tasks=3, trials=2, parallel=1,
                      space={"train.optimizer.lr": {"type": "categorical", "choices": [0.03, 1e-7]}},
                      study={"sampler": "random", "seed": 0, "pruner": "median", "startup_trials": 1})
    tc, experiment = validate_tune_config(cfg)
    # an RDB storage (--storage URL): the trials report into it from their Ray workers
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = open_study(tc, url)
    # the storage decides what runs: a good trial first, then one that cannot learn
    study.enqueue_trial({"train.optimizer.lr": 0.03})
    study.enqueue_trial({"train.optimizer.lr": 1e-7})
    summary = run_tune(tc, experiment, out, storage=url, log=quiet)
    assert summary["complete"] == 1 and summary["pruned"] == 1
    assert not (out / "study.journal").exists()
    good, bad = sorted(open_study(tc, url).trials, key=lambda t: t.number)
    assert good.state.name == "COMPLETE" and bad.state.name == "PRUNED"
    # reports came from inside the trials, one per task boundary; the pruned one stopped after task 0
    assert sorted(good.intermediate_values) == [0, 1]
    assert sorted(bad.intermediate_values) == [0]
    assert bad.intermediate_values[0] < good.intermediate_values[0]
    df = _trials_table(out)
    assert dict(zip(df["trial"], df["state"])) == {0: "complete", 1: "pruned"}
    pruned = df[df["trial"] == 1].iloc[0]
    assert pruned["value"] != pruned["value"]  # NaN: a one-task score is not an objective value
    assert pruned["attr_last_report_task"] == 0
    assert pruned["attr_last_report_value"] == pytest.approx(bad.intermediate_values[0])
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_multi_objective_study_exports_the_pareto_front(ray_session, tmp_path):
    from nlbench.config import load_config

    out = tmp_path / "out"
    cfg = tune_config(trials=2, objective=[{"metric": "acc_final"}, {"metric": "forgetting"}],
                      study={"sampler": "random", "seed": 3, "pruner": "median"})
    tc, experiment = validate_tune_config(cfg)
    summary = run_tune(tc, experiment, out, log=quiet)
    assert summary["complete"] == 2 and summary["best"] is None
    study = open_study(tc, str(out / "study.journal"))
    front = {t.number for t in study.best_trials}
    files = sorted((out / "pareto").glob("*.yaml"))
    assert {int(f.stem.split("-")[1]) for f in files} == front
    for f in files:
        load_config(f)
    assert (out / "pareto.png").stat().st_size > 1000
    df = _trials_table(out)
    assert sorted(df["objective"]) == ["acc_final", "acc_final", "forgetting", "forgetting"]
    assert all(not t.intermediate_values for t in study.trials)  # no pruning reports


def test_resume_after_the_tuner_process_is_killed(ray_session, tmp_path):
    import optuna

    out = tmp_path / "out"
    # one trial at a time and longer trials; the tuner is killed once one trial is COMPLETE and
    # the next one RUNNING (waiting for both, not for a moment in between: on a loaded machine a
    # poll can fall between the first trial's tell and the second's ask)
    cfg = tune_config(num_tasks=6, trials=4, parallel=1)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(cfg))
    tc, experiment = load_tune_config(path)
    exe = Path(sys.executable).parent / "nlbench"
    cmd = [str(exe), "tune", str(path), "--out", str(out), "--trials", "4", "--address", ray_session["address"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    journal = out / "study.journal"
    deadline = time.time() + 600  # an upper bound only; the loop ends as soon as the state is reached
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            if not journal.exists():
                continue
            if not _has_study(journal):
                continue
            with _nowarn():
                study = optuna.load_study(study_name="t", storage=optuna.storages.JournalStorage(
                    optuna.storages.journal.JournalFileBackend(str(journal))))
            states = [t.state.name for t in study.get_trials(deepcopy=False)]
            if "COMPLETE" in states and "RUNNING" in states:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-3000:]

    study = open_study(tc, str(journal))
    before = {t.number: (t.state.name, t.values, dict(t.params)) for t in study.trials}
    completed_before = {n for n, (s, _, _) in before.items() if s == "COMPLETE"}
    running_before = {n for n, (s, _, _) in before.items() if s == "RUNNING"}
    assert 1 <= len(completed_before) < 4 and running_before, before

    summary = run_tune(tc, experiment, out, log=quiet)  # the re-run: same OUT, same storage
    assert sorted(summary["interrupted"]) == sorted(running_before)
    study = open_study(tc, str(journal))
    trials = {t.number: t for t in study.trials}
    assert finished_count(study) == 4
    complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert len(complete) == 4  # no finished trial was repeated
    for n in completed_before:  # the trials finished before the kill are kept as they were
        assert trials[n].state.name == "COMPLETE" and trials[n].values == before[n][1]
    for n in running_before:  # interrupted: FAIL, not counted, parameters run again
        t = trials[n]
        assert t.state.name == "FAIL" and t.user_attrs["fail_reason"] == "interrupted"
        again = [u for u in complete if u.user_attrs.get("requeued_from") == n]
        assert len(again) == 1 and again[0].params == before[n][2]
    states = dict(zip(*[_trials_table(out)[c] for c in ("trial", "state")]))
    assert sorted(v for v in states.values()) == ["complete"] * 4 + ["fail"] * len(running_before)

    # a larger --trials adds only the missing trial; the same N adds none
    assert run_tune(tc, experiment, out, trials=4, log=quiet)["new"] == 0
    more = run_tune(tc, experiment, out, trials=5, log=quiet)
    assert more["new"] == 1 and more["finished"] == 5


class _nowarn:
    def __enter__(self):
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _has_study(journal: Path) -> bool:
    import optuna

    try:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        return any(s.study_name == "t" for s in storage.get_all_studies())
    except Exception:  # the journal is being created
        return False
