"""Continual-learning metrics, as written in ``docs/METRICS.md``.

Notation (spec, "Continual-learning metrics nlbench reports"): ``R[i, j]`` is the score on task
``j``'s held-out split after training on tasks ``0..i`` (``T`` tasks, 0-based), ``b[j]`` the score of
the same model on task ``j`` at initialization. Public libraries disagree on BWT and forgetting,
so every function is named by its variant and :data:`METRIC_INFO` carries formula and source for
the report to print.

Metrics that need two tasks or more (``bwt``, ``fwt``, ``forgetting``) return :class:`Undefined`
for ``T = 1``: a float NaN that also carries ``.reason`` (the spec's "NaN with a reason, not 0").
:func:`all_metrics` collects those reasons in its ``"reasons"`` entry.

Loss matrices (lower is better): :func:`all_metrics` with ``higher_is_better=False`` evaluates the
transfer metrics (``bwt``, ``fwt``, ``forgetting``) on ``-R`` and ``-b``, i.e. their signs flip, so
that in both modes a positive BWT/FWT means "helped" and a positive forgetting means "got worse".
The level metrics (``acc_final``, ``acc_avg_incremental``, ``plasticity``, ``lca``) stay in the
matrix's own unit (mean loss).

Seeds are aggregated with a Student t interval (:data:`CI_METHOD`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CI_LEVEL", "CI_METHOD", "DID_NOT_LEARN_RULE", "LCA_BETA", "METRIC_INFO", "METRIC_NAMES",
    "MetricsError", "TRANSFER_METRICS", "Undefined", "acc_avg_incremental", "acc_final", "aggregate", "aggregate_by",
    "all_metrics", "bwt", "curve_matrix", "did_not_learn", "forgetting", "forgetting_normalized", "fwt", "lca",
    "learn_margin", "matrix_from_long", "paired_difference", "per_run_metrics", "plasticity", "relearn_savings",
]

CI_LEVEL = 0.95
CI_METHOD = "95% Student t interval over seeds: mean ± t(0.975, n−1)·s/√n (s: sample std, ddof=1)"
LCA_BETA = 10  # A-GEM (Chaudhry et al. 2019) reports LCA@10
DID_NOT_LEARN_RULE = (
    "did not learn: plasticity < chance + max(0.05, 0.1·(1 − chance)), chance = mean per-task chance "
    "(accuracy matrices only)"
)

# name -> (formula, source); the report prints this table verbatim.
METRIC_INFO: dict[str, dict[str, str]] = {
    "acc_final": dict(formula="(1/T) Σ_j R[T−1][j]", source="Lopez-Paz & Ranzato 2017 (GEM), ACC"),
    "acc_avg_incremental": dict(
        formula="(1/T) Σ_i (1/(i+1)) Σ_{j≤i} R[i][j]", source="Rebuffi et al. 2017 (iCaRL), average incremental accuracy"
    ),
    "bwt": dict(formula="(1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j])", source="Lopez-Paz & Ranzato 2017 (GEM), BWT"),
    "fwt": dict(formula="(1/(T−1)) Σ_{j≥1} (R[j−1][j] − b_j)", source="Lopez-Paz & Ranzato 2017 (GEM), FWT"),
    "forgetting": dict(
        formula="(1/(T−1)) Σ_{j<T−1} max_{l∈[j,T−2]} (R[l][j] − R[T−1][j])",
        source="Chaudhry et al. 2018 (RWalk), max over earlier rows only; can be negative",
    ),
    "plasticity": dict(formula="(1/T) Σ_j R[j][j]", source="score just after learning each task"),
    "lca": dict(
        formula="(1/(β+1)) Σ_{b=0..β} Z_b, Z_b = (1/T) Σ_k Z[k][b]",
        source="Chaudhry et al. 2019 (A-GEM), learning curve area; Z[k][b]: task-k score after b evaluation points of task k",
    ),
    "forgetting_normalized": dict(
        formula="forgetting / (plasticity − chance), chance = mean per-task chance",
        source="forgetting as a share of what was learned above chance; NaN when plasticity ≤ chance (accuracy only)",
    ),
    "relearn_savings": dict(
        formula="mean over later exposures p of a recurring task with first exposure a of (1/n) Σ_{b<n} (Z[p][b] − Z[a][b])",
        source="savings (Ebbinghaus 1885): how much faster a task is learned again than the first time, as the "
               "area under its learning curve; recurring streams only (A B A C A …)",
    ),
}
METRIC_NAMES = tuple(METRIC_INFO)
TRANSFER_METRICS = ("bwt", "fwt", "forgetting")  # their signs flip for lower-is-better scores (all_metrics)


class MetricsError(ValueError):
    """Bad input to a metric (shape, missing cells, mixed runs)."""


class Undefined(float):
    """NaN that says why: ``math.isnan(x)`` holds and ``x.reason`` explains it."""

    reason: str

    def __new__(cls, reason: str):
        obj = super().__new__(cls, "nan")
        obj.reason = reason
        return obj

    def __repr__(self):
        return f"Undefined({self.reason!r})"

    def __reduce__(self):
        return (Undefined, (self.reason,))


# ----------------------------------------------------------------------------- input checks


def _matrix(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise MetricsError(
            f"R must be a square T×T accuracy/loss matrix with T ≥ 1 (row i: after training task i, "
            f"column j: evaluated on task j); got shape {R.shape}."
        )
    return R


def _baseline(b, T: int) -> np.ndarray:
    b = np.asarray(b, dtype=float)
    if b.shape != (T,):
        raise MetricsError(f"b must hold one initial score per task, shape ({T},); got shape {b.shape}.")
    return b


def _needs_two(name: str, T: int) -> Undefined | None:
    if T < 2:
        return Undefined(f"{name} needs at least 2 tasks (it averages over T−1 = {T - 1} tasks); T = {T}")
    return None


# ----------------------------------------------------------------------------- the metrics


def acc_final(R) -> float:
    """ACC (GEM): mean of the last row, ``(1/T) Σ_j R[T−1][j]``."""
    R = _matrix(R)
    return float(R[-1].mean())


def acc_avg_incremental(R) -> float:
    """Average incremental accuracy (iCaRL): ``(1/T) Σ_i (1/(i+1)) Σ_{j≤i} R[i][j]``."""
    R = _matrix(R)
    return float(np.mean([R[i, : i + 1].mean() for i in range(R.shape[0])]))


def bwt(R) -> float:
    """Backward transfer (GEM): ``(1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j])``; Undefined for T = 1."""
    R = _matrix(R)
    T = R.shape[0]
    if undefined := _needs_two("bwt", T):
        return undefined
    j = np.arange(T - 1)
    return float((R[T - 1, j] - R[j, j]).mean())


def fwt(R, b) -> float:
    """Forward transfer (GEM): ``(1/(T−1)) Σ_{j≥1} (R[j−1][j] − b_j)``; Undefined for T = 1."""
    R = _matrix(R)
    T = R.shape[0]
    b = _baseline(b, T)
    if undefined := _needs_two("fwt", T):
        return undefined
    j = np.arange(1, T)
    return float((R[j - 1, j] - b[j]).mean())


def forgetting(R) -> float:
    """Forgetting (Chaudhry et al. 2018): ``(1/(T−1)) Σ_{j<T−1} max_{l∈[j,T−2]} (R[l][j] − R[T−1][j])``.

    The max runs over the rows *before* the final one (including ``l = j``), so the measure is
    negative when every old task ended better than it ever was; Undefined for T = 1.
    """
    R = _matrix(R)
    T = R.shape[0]
    if undefined := _needs_two("forgetting", T):
        return undefined
    per_task = [R[j : T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]
    return float(np.mean(per_task))


def forgetting_normalized(forgetting_value: float, plasticity_value: float, chance) -> float:
    """``forgetting / (plasticity − chance)``: the share of what was learned above chance that was lost.

    Raw forgetting rewards a model that learns little (it has little to lose); dividing by the
    headroom it actually gained makes entries of different plasticity comparable. Undefined when
    plasticity ≤ chance or either value is NaN. ``chance``: scalar or per-task list (averaged).
    """
    c = float(np.mean(np.asarray(chance, dtype=float)))
    gain = plasticity_value - c
    if math.isnan(forgetting_value) or math.isnan(gain):
        return Undefined("forgetting_normalized needs a defined forgetting, plasticity and chance")
    if gain <= 0:
        return Undefined(f"forgetting_normalized: plasticity {plasticity_value:.4f} is not above chance {c:.4f}")
    return float(forgetting_value / gain)


def paired_difference(a, b) -> tuple[float, float, float, int]:
    """``(diff_mean, ci_low, ci_high, n)`` of ``a[s] − b[s]`` over the seeds ``s`` both define.

    ``a``, ``b``: mappings seed -> value. Runs of two entries with the same seed share the task
    data, so the per-seed differences carry far less noise than the two unpaired means; the
    interval is :data:`CI_METHOD` applied to the differences (Student t, ddof = 1). Seeds where
    either value is NaN are left out; ``n < 2`` gives a NaN interval.
    """
    common = sorted(set(a) & set(b), key=repr)
    diffs = [float(a[s]) - float(b[s]) for s in common]
    return aggregate(diffs)


def plasticity(R) -> float:
    """Mean score just after learning each task: ``(1/T) Σ_j R[j][j]``."""
    R = _matrix(R)
    return float(np.diag(R).mean())


def lca(Z, beta: int = LCA_BETA) -> float:
    """Learning curve area LCA@β (A-GEM): ``(1/(β+1)) Σ_{b=0..β} Z_b`` with ``Z_b = (1/T) Σ_k Z[k][b]``.

    ``Z[k][b]`` is the score on task ``k`` after ``b`` evaluation points of training on task ``k``
    (``b = 0``: before its first step), e.g. from :func:`curve_matrix`. Undefined when a task has
    fewer than ``β + 1`` points.
    """
    if isinstance(beta, bool) or not isinstance(beta, (int, np.integer)) or beta < 0:
        raise MetricsError(f"lca: beta must be an integer ≥ 0 (number of evaluation points after the first); got {beta!r}.")
    Z = np.asarray(Z, dtype=float)
    if Z.ndim != 2 or Z.shape[0] == 0:
        raise MetricsError(f"lca: Z must be a 2-D array [task, evaluation point]; got shape {Z.shape}.")
    head = Z[:, : beta + 1]
    if Z.shape[1] < beta + 1 or np.isnan(head).any():
        have = int((~np.isnan(Z)).sum(axis=1).min()) if Z.shape[1] else 0
        return Undefined(f"lca@{beta} needs {beta + 1} evaluation points per task; the shortest curve has {have}")
    return float(head.mean(axis=0).mean())


def relearn_savings(Z, recurrences) -> float:
    """How much faster a recurring task is learned again than the first time (docs/METRICS.md).

    ``Z[p][b]``: score on the task trained at stream position ``p`` after ``b`` evaluation points of
    that position (:func:`curve_matrix`; ``b = 0`` before its first step). ``recurrences``: lists of
    positions that train the same task, e.g. ``[[0, 2, 4]]`` for A B A C A. For each later
    exposure ``p`` of a task first trained at ``a``: the mean of ``Z[p][b] − Z[a][b]`` over the
    points both curves have; the result is the mean over all later exposures. Positive: relearned
    faster (what was kept plus what comes back quickly). Undefined without recurrences or curves.
    """
    Z = np.asarray(Z, dtype=float)
    if Z.ndim != 2:
        raise MetricsError(f"relearn_savings: Z must be a 2-D array [position, evaluation point]; got shape {Z.shape}.")
    if not recurrences:
        return Undefined("relearn_savings needs a task that recurs (a recurring stream such as A B A C A)")
    diffs = []
    for positions in recurrences:
        first = positions[0]
        for p in positions[1:]:
            if max(first, p) >= Z.shape[0]:
                continue  # the run ended before this exposure
            n = int(min((~np.isnan(Z[first])).sum(), (~np.isnan(Z[p])).sum()))
            if n > 0:
                diffs.append(float((Z[p, :n] - Z[first, :n]).mean()))
    if not diffs:
        return Undefined("relearn_savings needs learning curves of a recurring task's first and later exposures")
    return float(np.mean(diffs))


# ----------------------------------------------------------------------------- all at once


def learn_margin(chance: float) -> float:
    """How far above chance plasticity must be to count as learning: ``max(0.05, 0.1·(1 − chance))``.

    An absolute floor of 5 points, widened to a tenth of the headroom above chance for low-chance tasks
    (chance 0.1 -> 0.09, chance 0.5 -> 0.05).
    """
    return max(0.05, 0.1 * (1.0 - chance))


def did_not_learn(plasticity_value: float, chance) -> bool:
    """:data:`DID_NOT_LEARN_RULE`; ``chance`` is a scalar or one chance level per task (averaged)."""
    c = float(np.mean(np.asarray(chance, dtype=float)))
    return bool(not (plasticity_value >= c + learn_margin(c)))  # a NaN plasticity did not learn either


def all_metrics(
    R,
    b,
    chance=None,
    higher_is_better: bool = True,
    *,
    Z=None,
    lca_beta: int = LCA_BETA,
    recurrences=None,
) -> dict[str, Any]:
    """Every metric of :data:`METRIC_INFO` for one run, plus the "did not learn" flag.

    Returns ``{metric: float, ..., "did_not_learn": bool | None, "higher_is_better": bool,
    "reasons": {metric: why it is NaN}}``. With ``higher_is_better=False`` (loss matrices) the
    transfer metrics are computed on ``-R, -b`` (module docstring) and ``did_not_learn`` is None:
    the chance rule is defined on accuracies. ``chance``: scalar or per-task list; None -> flag None.
    ``Z``: current-task learning curves for LCA (:func:`curve_matrix`); None -> lca NaN with reason.
    ``recurrences``: positions that train the same task (recurring streams) for ``relearn_savings``,
    computed on ``Z`` (on ``-Z`` for loss matrices, so positive always means relearned faster).
    """
    R = _matrix(R)
    b = _baseline(b, R.shape[0])
    sign = 1.0 if higher_is_better else -1.0
    out: dict[str, Any] = {
        "acc_final": acc_final(R),
        "acc_avg_incremental": acc_avg_incremental(R),
        "bwt": bwt(sign * R),
        "fwt": fwt(sign * R, sign * b),
        "forgetting": forgetting(sign * R),
        "plasticity": plasticity(R),
        "lca": lca(Z, lca_beta) if Z is not None else Undefined("lca needs learning curves (Z); none were given"),
        "relearn_savings": (relearn_savings(sign * np.asarray(Z, dtype=float), recurrences) if Z is not None and recurrences
                            else Undefined("relearn_savings needs a recurring stream and its learning curves")),
    }
    if chance is None or not higher_is_better:
        out["forgetting_normalized"] = Undefined(
            "forgetting_normalized needs a chance level and an accuracy matrix" if higher_is_better
            else "forgetting_normalized is defined on accuracy matrices (chance is an accuracy)")
    else:
        c = np.asarray([np.nan if x is None else x for x in np.atleast_1d(np.asarray(chance, dtype=object))], dtype=float)
        out["forgetting_normalized"] = forgetting_normalized(out["forgetting"], out["plasticity"], c)
    reasons = {k: v.reason for k, v in out.items() if isinstance(v, Undefined)}
    reasons.update({k: "score is NaN (a matrix cell is NaN)" for k, v in out.items() if k not in reasons and math.isnan(v)})
    chance_values = None if chance is None else np.asarray(
        [np.nan if c is None else c for c in np.atleast_1d(np.asarray(chance, dtype=object))], dtype=float
    )
    if chance_values is None:
        flag = None
        reasons["did_not_learn"] = "no chance level given"
    elif np.isnan(chance_values).any():
        flag = None
        reasons["did_not_learn"] = "the chance level of some task is unknown"
    elif not higher_is_better:
        flag = None
        reasons["did_not_learn"] = "the chance rule is defined on accuracy matrices; use the run's accuracy matrix"
    else:
        flag = did_not_learn(out["plasticity"], chance_values)
    out = {k: (float("nan") if isinstance(v, Undefined) else v) for k, v in out.items()}
    out.update(did_not_learn=flag, higher_is_better=bool(higher_is_better), reasons=reasons)
    return out


# ----------------------------------------------------------------------------- seed aggregation


def aggregate(values: Iterable[float]) -> tuple[float, float, float, int]:
    """``(mean, ci_low, ci_high, n)`` over seeds with :data:`CI_METHOD`.

    NaN values (undefined metric, failed run) are left out and not counted in ``n``. ``n = 1``
    gives a NaN interval (one seed says nothing about spread); ``n = 0`` gives all NaN.
    """
    from scipy import stats

    x = np.asarray([v for v in np.asarray(list(values), dtype=float).ravel() if not math.isnan(v)])
    n = int(x.size)
    if n == 0:
        return (math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return (mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return (mean, mean - half, mean + half, n)


def aggregate_by(df, by: Sequence[str] = ("model", "stream"), metrics: Sequence[str] | None = None):
    """Aggregate per-run metric columns of ``df`` over seeds, one row per (group, metric).

    ``df``: one row per run (e.g. :func:`per_run_metrics`), group columns ``by``; ``metrics``
    defaults to the :data:`METRIC_NAMES` present. Returns a long DataFrame with columns
    ``[*by, "metric", "mean", "ci_low", "ci_high", "n"]``.
    """
    import pandas as pd

    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise MetricsError(f"aggregate_by: group column(s) {missing} not in the frame; columns are {list(df.columns)}.")
    metrics = [m for m in METRIC_NAMES if m in df.columns] if metrics is None else list(metrics)
    absent = [m for m in metrics if m not in df.columns]
    if absent:
        raise MetricsError(f"aggregate_by: metric column(s) {absent} not in the frame; columns are {list(df.columns)}.")
    rows = []
    for key, group in df.groupby(by, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        for m in metrics:
            mean, lo, hi, n = aggregate(pd.to_numeric(group[m], errors="coerce"))
            rows.append({**dict(zip(by, key)), "metric": m, "mean": mean, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "ci_low", "ci_high", "n"])


# ----------------------------------------------------------------------------- from the results store


def _one_value(df, column: str, what: str):
    values = sorted(df[column].dropna().unique().tolist())
    if len(values) > 1:
        raise MetricsError(f"{what}: the rows hold several {column} values {values}; select one first.")
    return values[0] if values else None


def matrix_from_long(df, metric: str | None = None, allow_missing: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(R, b)`` from the long ``matrix`` table of one run (``after_task = −1`` is ``b``).

    ``metric`` picks accuracy/loss when the rows hold both. Missing cells raise unless
    ``allow_missing`` (then NaN, e.g. for a run that failed mid-stream); T = number of eval tasks.
    """
    need = {"after_task", "eval_task", "value"}
    if not need <= set(df.columns):
        raise MetricsError(f"matrix_from_long: the frame needs columns {sorted(need)}; got {list(df.columns)}.")
    if "run_id" in df.columns:
        _one_value(df, "run_id", "matrix_from_long")
    if metric is not None:
        if "metric" not in df.columns:
            raise MetricsError("matrix_from_long: metric given but the frame has no 'metric' column.")
        df = df[df["metric"] == metric]
        if df.empty:
            raise MetricsError(f"matrix_from_long: no rows with metric == {metric!r}.")
    elif "metric" in df.columns:
        _one_value(df, "metric", "matrix_from_long")
    if df.empty:
        raise MetricsError("matrix_from_long: no rows.")
    after = df["after_task"].astype(int).to_numpy()
    evalt = df["eval_task"].astype(int).to_numpy()
    T = int(evalt.max()) + 1
    if evalt.min() < 0 or after.min() < -1 or after.max() > T - 1:
        raise MetricsError(
            f"matrix_from_long: after_task must lie in [-1, {T - 1}] and eval_task in [0, {T - 1}] "
            f"(T = {T} eval tasks); got after_task in [{after.min()}, {after.max()}], eval_task min {evalt.min()}."
        )
    M = np.full((T + 1, T), np.nan)
    seen = np.zeros((T + 1, T), dtype=bool)
    for a, e, v in zip(after, evalt, df["value"].astype(float).to_numpy()):
        if seen[a + 1, e]:
            raise MetricsError(f"matrix_from_long: two rows for after_task={a}, eval_task={e}.")
        seen[a + 1, e] = True
        M[a + 1, e] = v
    if not allow_missing and not seen.all():
        holes = [(int(a) - 1, int(e)) for a, e in zip(*np.nonzero(~seen))][:8]
        raise MetricsError(
            f"matrix_from_long: missing cells (after_task, eval_task) {holes}"
            f"{' …' if (~seen).sum() > 8 else ''}; pass allow_missing=True to get NaN there."
        )
    return M[1:], M[0]


def curve_matrix(curves, metric: str | None = None) -> np.ndarray:
    """LCA's ``Z[k][b]`` from the long ``curves`` table of one run: task-``k`` scores while training on ``k``.

    Uses rows with ``eval_task == train_task``, ordered by ``tokens_seen``; shorter curves are
    NaN-padded. Point 0 should be the evaluation before the task's first step (A-GEM).
    """
    need = {"train_task", "eval_task", "tokens_seen", "value"}
    if not need <= set(curves.columns):
        raise MetricsError(f"curve_matrix: the frame needs columns {sorted(need)}; got {list(curves.columns)}.")
    if "run_id" in curves.columns:
        _one_value(curves, "run_id", "curve_matrix")
    if metric is not None:
        curves = curves[curves["metric"] == metric]
    elif "metric" in curves.columns:
        _one_value(curves, "metric", "curve_matrix")
    own = curves[curves["train_task"] == curves["eval_task"]].sort_values(["train_task", "tokens_seen"])
    if own.empty:
        raise MetricsError("curve_matrix: no rows with eval_task == train_task.")
    T = int(own["train_task"].max()) + 1
    per_task = [own.loc[own["train_task"] == k, "value"].astype(float).to_numpy() for k in range(T)]
    Z = np.full((T, max(len(v) for v in per_task)), np.nan)
    for k, v in enumerate(per_task):
        Z[k, : len(v)] = v
    return Z


def per_run_metrics(matrix, runs=None, curves=None, lca_beta: int = LCA_BETA):
    """One row per (run, metric kind) with every metric, from the store's ``matrix`` table.

    ``runs`` (optional) supplies each run's per-task ``chance`` (JSON list) for the "did not learn"
    flag; ``curves`` (optional) supplies LCA. Loss rows are computed with ``higher_is_better=False``.
    Columns: run_id, model, stream, seed, score (accuracy/loss/…), T, every metric, did_not_learn.
    """
    import json

    import pandas as pd

    from nlbench.tasks import recurrence_positions

    chance_by_run = {}
    if runs is not None and "chance" in runs.columns:
        for rid, c in zip(runs["run_id"], runs["chance"]):
            if isinstance(c, str) and c:
                chance_by_run[rid] = json.loads(c)
    own_curves = {}
    if curves is not None and not curves.empty:
        own = curves[curves["train_task"] == curves["eval_task"]]
        own_curves = {key: g for key, g in own.groupby(["run_id", "metric"], sort=False)}
    rows = []
    for (rid, score), g in matrix.groupby(["run_id", "metric"], sort=True):
        R, b = matrix_from_long(g, allow_missing=True)
        higher = score == "accuracy"
        Z = curve_matrix(own_curves[(rid, score)]) if (rid, score) in own_curves else None
        first = g.iloc[0]
        recurrences = recurrence_positions(str(first.get("stream")), R.shape[0]) if first.get("stream") else []
        m = all_metrics(R, b, chance=chance_by_run.get(rid), higher_is_better=higher, Z=Z, lca_beta=lca_beta,
                        recurrences=recurrences)
        rows.append(dict(
            run_id=rid, model=first.get("model"), stream=first.get("stream"), seed=first.get("seed"), score=score,
            T=R.shape[0], **{k: m[k] for k in METRIC_NAMES}, did_not_learn=m["did_not_learn"],
            reasons=json.dumps(m["reasons"], sort_keys=True),
        ))
    cols = ["run_id", "model", "stream", "seed", "score", "T", *METRIC_NAMES, "did_not_learn", "reasons"]
    return pd.DataFrame(rows, columns=cols)
