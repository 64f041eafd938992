"""Resuming a tune study proposes new trials, not the first ones again; a second tuner on a live
study is refused. Real Optuna journal storage; no trial needs to run."""

from __future__ import annotations

import fcntl

import pytest
import yaml
from click.testing import CliRunner

from nlbench.cli import main
from nlbench.tune import TuneConfigError, open_study, sample_overrides, tuner_lock, validate_tune_config

EXPERIMENT = {
    "name": "tiny-base",
    "models": [{"name": "transformer", "size": "tiny"}],
    "streams": [{"name": "markov-languages", "num_tasks": 2, "seq_len": 32,
                 "options": {"order": 1, "vocab_size": 32, "branching": 4, "eval_size": 32}}],
    "seeds": [0],
    "train": {"tokens_per_task": 2048, "batch_size": 8, "device": "cpu"},
    "eval": {"max_sequences": 32, "batch_size": 32},
}


def _tc(sampler):
    return validate_tune_config({
        "name": "t", "experiment": EXPERIMENT, "trials": 4,
        "space": {"train.optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                  "train.batch_size": {"type": "int", "low": 2, "high": 64}},
        "objective": {"metric": "acc_final"},
        "study": {"sampler": sampler, "seed": 0, "pruner": "none", "startup_trials": 8},
    })


def _ask_tell(tc, url, n):
    """What a tuner does per trial, minus running it: ask, sample, tell a value."""
    study = open_study(tc, url)
    got = []
    for _ in range(n):
        trial = study.ask()
        params = sample_overrides(tc.space, trial)
        study.tell(trial, 0.5)
        got.append(params)
    return got


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_resumed_study_does_not_repropose_its_trials(tmp_path, sampler):
    tc, _ = _tc(sampler)
    url = str(tmp_path / "study.journal")
    first = _ask_tell(tc, url, 2)   # --trials 2
    more = _ask_tell(tc, url, 2)    # then --trials 4: two more
    assert first[0] != first[1]
    assert not any(m in first for m in more), (first, more)
    # the study's stored trials are four distinct points
    params = [tuple(sorted(t.params.items())) for t in open_study(tc, url).trials]
    assert len(set(params)) == 4
    # an unresumed study with the same seed reproduces the first trials (seeding stays reproducible)
    assert _ask_tell(tc, str(tmp_path / "fresh.journal"), 2) == first


def test_second_tuner_on_a_live_study_is_refused(tmp_path):
    tc, _ = _tc("random")
    out = tmp_path / "out"
    url = str(out / "study.journal")
    with tuner_lock(tc, url, out) as lock:
        assert "pid" in lock.read_text()
        with pytest.raises(TuneConfigError, match=r"study 't' .* is being tuned right now by host \S+ pid \d+"):
            with tuner_lock(tc, url, out):
                pass
    # released: the next tuner gets it
    with tuner_lock(tc, url, out):
        pass


def test_tune_command_refuses_while_another_tuner_holds_the_study(tmp_path):
    tc, _ = _tc("random")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(tc.model_dump(mode="json", exclude_none=True)))
    out = tmp_path / "out"
    out.mkdir()
    lock = out / "study.journal.t.lock"
    with open(lock, "w") as held:
        held.write("host elsewhere pid 4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = CliRunner().invoke(main, ["tune", str(cfg), "--out", str(out), "--trials", "1"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert "being tuned right now by host elsewhere pid 4242" in res.output
    assert not (out / "study.journal").exists() and not (out / "trials").exists()  # no trial started
