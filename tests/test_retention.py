"""Retention curves: score on task j against tokens read since task j ended."""

from __future__ import annotations

import pandas as pd

from nlbench.retention import retention_curve, retention_summary


def _matrix():
    rows = []
    # 3 tasks, 100 tokens each; R[i][j] = 0.9 − 0.2·(i − j) once j is learned, 0.1 before
    for i in range(-1, 3):
        for j in range(3):
            v = 0.1 if i < j else 0.9 - 0.2 * (i - j)
            rows.append(dict(run_id="r", model="m", stream="s", seed=0, after_task=i, eval_task=j, metric="accuracy",
                             value=v, tokens_seen=100 * (i + 1)))
            rows.append(dict(run_id="r", model="m", stream="s", seed=0, after_task=i, eval_task=j, metric="loss",
                             value=1.0, tokens_seen=100 * (i + 1)))
    return pd.DataFrame(rows)


def _curves():
    # a mid-task point of task 1's training (tokens 150): task 0 at 0.8, task 1 itself at 0.5
    return pd.DataFrame([
        dict(run_id="r", model="m", stream="s", seed=0, train_task=1, tokens_seen=150, eval_task=0, metric="accuracy", value=0.8),
        dict(run_id="r", model="m", stream="s", seed=0, train_task=1, tokens_seen=150, eval_task=1, metric="accuracy", value=0.5),
    ])


def test_points_start_when_the_task_ends_and_include_later_curve_points():
    c = retention_curve(_matrix(), _curves())
    t0 = c[c["eval_task"] == 0]
    assert list(t0["tokens_since"]) == [0, 50, 100, 200]
    assert list(t0["value"].round(6)) == [0.9, 0.8, 0.7, 0.5]
    assert list(c[c["eval_task"] == 1]["tokens_since"]) == [0, 100]  # its own training point is not retention
    assert list(c[c["eval_task"] == 2]["tokens_since"]) == [0]
    assert set(c["metric"]) == {"accuracy"}


def test_summary_averages_over_the_tasks_present_at_each_distance():
    s = retention_summary(retention_curve(_matrix()))
    assert list(s["tokens_since"]) == [0, 100, 200]
    assert list(s["n_tasks"]) == [3, 2, 1]
    assert list(s["value"].round(6)) == [0.9, 0.7, 0.5]


def test_a_real_in_context_run_gives_a_curve_per_task(tmp_path):
    from nlbench.config import expand_runs, validate_config
    from nlbench.runner import execute_run
    from tests.conftest import tiny_config

    cfg = tiny_config(seeds=(0,), num_tasks=3, tokens_per_task=64, seq_len=16, protocol="in_context",
                      models=("transformer",))
    cfg["models"][0]["options"] = {"kv_window": 32}
    cfg["train"]["batch_size"] = 2
    rec = execute_run(expand_runs(validate_config(cfg))[0])
    assert rec.run["status"] == "completed", rec.run["error"]
    c = retention_curve(pd.DataFrame(rec.matrix))
    assert sorted(c.groupby("eval_task")["tokens_since"].max()) == [0, 64, 128]
