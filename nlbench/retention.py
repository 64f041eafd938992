"""Retention curves: the score on task j as a function of the
training tokens read since task j ended.

    curve = retention_curve(store.read("matrix"), store.read("curves"))
    # run_id, model, stream, seed, metric, eval_task, tokens_since, value

Task j ends at the `tokens_seen` of its matrix row `after_task == j`; its retention points are
that row (tokens_since = 0), every later matrix row (`after_task > j`) and every learning-curve
point taken while a later task trained (`train_task > j`, with train.eval_every). In the
in_context protocol this is how long the fast state keeps a task; in finetune, how long the
weights do. `retention_summary` averages over tasks per (run, tokens_since).
"""

from __future__ import annotations

COLUMNS = ["run_id", "model", "stream", "seed", "metric", "eval_task", "tokens_since", "value"]


def retention_curve(matrix, curves=None, metric: str | None = "accuracy"):
    """Long table of retention points (see module docstring); `metric=None` keeps every metric."""
    import pandas as pd

    m = matrix if metric is None else matrix[matrix["metric"] == metric]
    ends = (m[m["after_task"] == m["eval_task"]][["run_id", "metric", "eval_task", "tokens_seen"]]
            .rename(columns={"tokens_seen": "end"}))
    parts = [m[m["after_task"] >= m["eval_task"]][[*COLUMNS[:6], "tokens_seen", "value"]]]
    if curves is not None and not curves.empty:
        c = curves if metric is None else curves[curves["metric"] == metric]
        later = c[c["train_task"] > c["eval_task"]]
        parts.append(later[[*COLUMNS[:6], "tokens_seen", "value"]])
    points = pd.concat(parts, ignore_index=True).merge(ends, on=["run_id", "metric", "eval_task"])
    points["tokens_since"] = (points["tokens_seen"] - points["end"]).astype("int64")
    out = points[COLUMNS].drop_duplicates(["run_id", "metric", "eval_task", "tokens_since"])
    return out.sort_values(["run_id", "metric", "eval_task", "tokens_since"]).reset_index(drop=True)


def retention_summary(curve):
    """Mean score over tasks at each tokens_since, per run and metric (tasks still in the stream
    at that distance only; the count is in `n_tasks`)."""
    g = curve.groupby(["run_id", "model", "stream", "seed", "metric", "tokens_since"], sort=True)["value"]
    return g.agg(value="mean", n_tasks="count").reset_index()


__all__ = ["retention_curve", "retention_summary"]
