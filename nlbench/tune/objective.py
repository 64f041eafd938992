"""The objective of a study: which metric of the trial's runs it reads (ObjectiveSpec), its value
on the tasks seen so far (what a pruner compares between trials), and whether the search space
moves it beyond seed noise (objective_noise)."""

from __future__ import annotations

import math

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["LEVEL_METRICS", "METRIC_DIRECTIONS", "NOISE_RATIO_MIN", "ObjectiveSpec", "objective_noise",
           "objective_value", "score_matrix"]

# objective metric -> default direction (accuracy score; see ObjectiveSpec for loss)
METRIC_DIRECTIONS = {
    "acc_final": "maximize", "acc_avg_incremental": "maximize", "plasticity": "maximize",
    "bwt": "maximize", "fwt": "maximize", "forgetting": "minimize", "train_tokens_per_s": "maximize",
}
LEVEL_METRICS = ("acc_final", "acc_avg_incremental", "plasticity")
METRICS = tuple(METRIC_DIRECTIONS)


class ObjectiveSpec(BaseModel):
    """metric of the base experiment's runs, averaged over them; score: which matrix it reads."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal[METRICS]
    direction: Literal["maximize", "minimize"] | None = None
    score: Literal["accuracy", "loss"] = "accuracy"

    @model_validator(mode="after")
    def _default_direction(self):
        if self.direction is None:
            d = METRIC_DIRECTIONS[self.metric]
            if self.score == "loss" and self.metric in LEVEL_METRICS:
                d = "minimize"  # level metrics stay in the matrix's unit (mean loss)
            self.direction = d
        return self

    @property
    def label(self) -> str:
        return self.metric if self.score == "accuracy" else f"{self.metric}_{self.score}"


def score_matrix(record, score: str, upto: int | None = None):
    """R (after_task ≥ 0 rows) and b (init row) of one run's `score` matrix, truncated to the
    tasks 0..upto (default: every task it finished), and T, the stream's task count."""
    import pandas as pd

    from nlbench.metrics import matrix_from_long

    R, b = matrix_from_long(pd.DataFrame(record.matrix), metric=score, allow_missing=True)
    done = 1 + max(r["after_task"] for r in record.matrix if r["metric"] == score)
    n = done if upto is None else min(done, upto + 1)
    return R[:n, :n], b[:n], len(b)


def objective_value(records, obj: ObjectiveSpec, upto: int | None = None) -> float:
    """Mean over the trial's runs of `obj.metric` (docs/METRICS.md), on the tasks 0..upto seen so far."""
    from nlbench.metrics import all_metrics

    vals = []
    for rec in records:
        if obj.metric == "train_tokens_per_s":
            v = rec.run.get("train_tokens_per_s")
            vals.append(float("nan") if v is None else float(v))
            continue
        R, b, _ = score_matrix(rec, obj.score, upto)
        m = all_metrics(R, b, higher_is_better=obj.score == "accuracy")
        vals.append(float(m[obj.metric]))
    return float(sum(vals) / len(vals)) if vals else float("nan")


NOISE_RATIO_MIN = 2.0  # below this the search space does not move the objective beyond seed noise


def objective_noise(complete, objectives) -> dict:
    """Does the search space move the objective more than seed noise does?

    Every trial runs the same base experiment, so its runs line up across trials (same stream,
    same seed: common random numbers) and the values form a trials × runs table x. Per objective,
    a two-way decomposition x_tj = m + a_t + b_j + e_tj separates what all trials share on run j
    (b_j: that seed's data and initialization) from the noise e that makes trials differ by
    chance. `between_trials_sd` is the SD of the trials' means; `noise_se` = √(Σe²/((T−1)(J−1))/J)
    is the standard error such a mean would have from that noise alone; `ratio` = between /
    noise_se is ≈ 1 when the trials differ by noise only, and `meaningful` = ratio ≥
    NOISE_RATIO_MIN. When it is not, the best trial is a lucky draw and the parameter importances
    (fANOVA splits whatever variance there is) mean nothing. Empty without ≥ 2 complete trials of
    ≥ 2 finite runs each, all with the same number of runs."""
    import statistics

    out = {}
    for i, o in enumerate(objectives):
        table = [[r[i] for r in t.user_attrs.get("per_run_values") or []] for t in complete]
        if len(table) < 2 or len({len(row) for row in table}) != 1 or len(table[0]) < 2:
            continue
        if not all(math.isfinite(v) for row in table for v in row):
            continue
        T, J = len(table), len(table[0])
        rows = [sum(row) / J for row in table]
        cols = [sum(row[j] for row in table) / T for j in range(J)]
        grand = sum(rows) / T
        resid = sum((table[t][j] - rows[t] - cols[j] + grand) ** 2 for t in range(T) for j in range(J))
        se = math.sqrt(resid / ((T - 1) * (J - 1)) / J)
        between = statistics.stdev(rows)
        ratio = between / se if se > 0 else float("inf")
        out[o.label] = dict(between_trials_sd=float(between), noise_se=float(se), ratio=float(ratio),
                            meaningful=bool(ratio >= NOISE_RATIO_MIN), trials=T, runs_per_trial=J)
    return out
