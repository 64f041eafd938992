"""Continual-learning metrics against hand-computed matrices (docs/METRICS.md) and properties."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from nlbench import metrics as M

# 3×3: forgetting equals −BWT here (each task's best earlier score is its diagonal).
R3 = np.array([[0.90, 0.10, 0.20], [0.60, 0.80, 0.30], [0.70, 0.50, 0.85]])
B3 = np.array([0.10, 0.15, 0.20])

# 4×4 built on the traps: task 0's best earlier score is row 1 (not the diagonal), task 1 ends
# above every earlier score (its forgetting term is −0.05, and 0 if the final row entered the max).
R4 = np.array([
    [0.50, 0.10, 0.10, 0.10],
    [0.80, 0.60, 0.20, 0.10],
    [0.40, 0.70, 0.90, 0.30],
    [0.60, 0.75, 0.50, 0.40],
])
B4 = np.array([0.10, 0.10, 0.15, 0.20])


def test_hand_computed_3x3():
    assert M.acc_final(R3) == pytest.approx((0.70 + 0.50 + 0.85) / 3)
    assert M.acc_avg_incremental(R3) == pytest.approx((0.90 + (0.60 + 0.80) / 2 + (0.70 + 0.50 + 0.85) / 3) / 3)
    assert M.bwt(R3) == pytest.approx(((0.70 - 0.90) + (0.50 - 0.80)) / 2)  # −0.25
    assert M.fwt(R3, B3) == pytest.approx(((0.10 - 0.15) + (0.30 - 0.20)) / 2)  # 0.025
    assert M.forgetting(R3) == pytest.approx(((0.90 - 0.70) + (0.80 - 0.50)) / 2)  # 0.25
    assert M.plasticity(R3) == pytest.approx((0.90 + 0.80 + 0.85) / 3)


def test_hand_computed_4x4_and_the_spec_traps():
    assert M.acc_final(R4) == pytest.approx(0.5625)
    assert M.acc_avg_incremental(R4) == pytest.approx((0.5 + 0.7 + 2.0 / 3 + 0.5625) / 4)
    assert M.bwt(R4) == pytest.approx((0.10 + 0.15 - 0.40) / 3)  # over T−1 = 3 tasks: −0.05
    assert M.fwt(R4, B4) == pytest.approx((0.00 + 0.05 + 0.10) / 3)  # 0.05
    assert M.plasticity(R4) == pytest.approx(0.6)
    # per task: max(0.5, 0.8, 0.4) − 0.6 = 0.2; max(0.6, 0.7) − 0.75 = −0.05; 0.9 − 0.5 = 0.4
    f = M.forgetting(R4)
    assert f == pytest.approx(0.55 / 3)
    assert f != pytest.approx(0.60 / 3)  # final row inside the max clamps task 1 at 0
    assert f != pytest.approx(0.55 / 4)  # averaging over T instead of T−1
    # a run that only ever improves old tasks has negative forgetting
    assert M.forgetting([[0.5, 0.0], [0.7, 0.9]]) == pytest.approx(-0.2)


def test_single_task_is_nan_with_a_reason_not_zero():
    R, b = np.array([[0.7]]), np.array([0.1])
    assert M.acc_final(R) == pytest.approx(0.7) and M.plasticity(R) == pytest.approx(0.7)
    for value in (M.bwt(R), M.fwt(R, b), M.forgetting(R)):
        assert isinstance(value, M.Undefined) and math.isnan(value)
        assert "at least 2 tasks" in value.reason
    out = M.all_metrics(R, b, chance=0.1)
    assert {"bwt", "fwt", "forgetting", "lca"} <= set(out["reasons"])
    assert all(math.isnan(out[k]) for k in ("bwt", "fwt", "forgetting"))
    assert "acc_final" not in out["reasons"]


def test_lca_hand_computed_and_too_short():
    Z = np.array([[0.1, 0.5, 0.7, 0.8], [0.2, 0.6, 0.9, 0.9]])
    assert M.lca(Z, beta=0) == pytest.approx(0.15)
    assert M.lca(Z, beta=2) == pytest.approx((0.15 + 0.55 + 0.80) / 3)
    assert M.lca(Z, beta=3) == pytest.approx((0.15 + 0.55 + 0.80 + 0.85) / 4)
    short = M.lca(Z, beta=4)
    assert isinstance(short, M.Undefined) and "5 evaluation points" in short.reason
    ragged = Z.copy()
    ragged[1, 3] = np.nan
    assert math.isnan(M.lca(ragged, beta=3)) and M.lca(ragged, beta=2) == pytest.approx(0.5)
    with pytest.raises(M.MetricsError, match="beta"):
        M.lca(Z, beta=-1)


def test_curve_matrix_orders_by_tokens_and_uses_current_task_only():
    rows = []
    for k, values in enumerate([[0.1, 0.5, 0.7], [0.2, 0.6]]):
        for p, v in enumerate(values):
            rows.append(dict(train_task=k, eval_task=k, tokens_seen=1000 * k + 10 * p, value=v))
            rows.append(dict(train_task=k, eval_task=1 - k, tokens_seen=1000 * k + 10 * p, value=-1.0))
    df = pd.DataFrame(rows[::-1])
    Z = M.curve_matrix(df)
    np.testing.assert_allclose(Z, [[0.1, 0.5, 0.7], [0.2, 0.6, np.nan]])


def test_all_metrics_in_accuracy_mode_matches_the_functions():
    Z = np.array([[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]])
    out = M.all_metrics(R4[:3, :3], B4[:3], chance=0.1, Z=Z, lca_beta=1)
    assert out["bwt"] == M.bwt(R4[:3, :3]) and out["fwt"] == M.fwt(R4[:3, :3], B4[:3])
    assert out["forgetting"] == M.forgetting(R4[:3, :3]) and out["lca"] == pytest.approx(0.4)
    assert out["did_not_learn"] is False and out["higher_is_better"] is True
    assert set(out["reasons"]) == {"relearn_savings"}  # no recurring task: NaN with a reason
    assert set(M.METRIC_NAMES) <= set(out)


def test_loss_mode_flips_the_transfer_signs():
    L = np.array([[1.0, 3.0, 3.0], [1.5, 0.8, 2.9], [1.2, 1.1, 0.7]])
    b = np.array([3.2, 3.1, 3.0])
    out = M.all_metrics(L, b, chance=0.1, higher_is_better=False)
    assert out["bwt"] == pytest.approx(-0.25)  # losses rose on old tasks: negative, as for accuracy
    assert out["forgetting"] == pytest.approx(0.25)  # (1.2 − min(1.0, 1.5) + 1.1 − 0.8) / 2
    assert out["fwt"] == pytest.approx(0.1)  # loss before training fell below init: positive
    assert out["acc_final"] == pytest.approx(1.0)  # level metrics stay raw mean loss
    assert out["plasticity"] == pytest.approx(2.5 / 3)
    assert out["did_not_learn"] is None and "accuracy" in out["reasons"]["did_not_learn"]
    raw = M.all_metrics(L, b)
    assert raw["bwt"] == pytest.approx(0.25) and raw["fwt"] == pytest.approx(-0.1)


def test_did_not_learn_threshold():
    assert M.learn_margin(0.1) == pytest.approx(0.09) and M.learn_margin(0.5) == pytest.approx(0.05)
    assert M.did_not_learn(0.18, 0.1) and not M.did_not_learn(0.20, 0.1)
    assert M.did_not_learn(0.54, 0.5) and not M.did_not_learn(0.56, 0.5)
    # per-task chance is averaged: mean 0.3 -> margin 0.07 -> threshold 0.37
    assert M.did_not_learn(0.36, [0.1, 0.5]) and not M.did_not_learn(0.38, [0.1, 0.5])
    assert M.did_not_learn(float("nan"), 0.1)
    assert M.all_metrics(np.full((2, 2), 0.12), [0.1, 0.1], chance=[0.1, 0.1])["did_not_learn"] is True
    assert M.all_metrics(np.full((2, 2), 0.12), [0.1, 0.1])["did_not_learn"] is None
    unknown = M.all_metrics(np.full((2, 2), 0.12), [0.1, 0.1], chance=[0.1, None])
    assert unknown["did_not_learn"] is None and "unknown" in unknown["reasons"]["did_not_learn"]


def test_bad_shapes_are_named():
    with pytest.raises(M.MetricsError, match="square"):
        M.bwt(np.zeros((2, 3)))
    with pytest.raises(M.MetricsError, match="one initial score per task"):
        M.fwt(np.zeros((3, 3)), np.zeros(2))


def test_metric_info_table_covers_every_metric():
    assert list(M.METRIC_INFO) == ["acc_final", "acc_avg_incremental", "bwt", "fwt", "forgetting", "plasticity", "lca",
                                   "forgetting_normalized", "relearn_savings"]
    assert all(info["formula"] and info["source"] for info in M.METRIC_INFO.values())
    assert "t" in M.CI_METHOD and "95%" in M.CI_METHOD


# ----------------------------------------------------------------------------- seed aggregation


def test_forgetting_normalized_divides_by_the_gain_over_chance():
    assert M.forgetting_normalized(0.15, 0.9, [0.2, 0.2, 0.2]) == pytest.approx(0.15 / 0.7)
    assert M.forgetting_normalized(0.1, 0.6, [0.1, 0.3]) == pytest.approx(0.1 / 0.4)  # chance averaged per task
    at_chance = M.forgetting_normalized(0.0, 0.2, 0.2)
    assert math.isnan(at_chance) and "not above chance" in at_chance.reason
    m = M.all_metrics([[0.9, 0.2], [0.5, 0.8]], [0.2, 0.2], chance=[0.2, 0.2])
    assert m["forgetting_normalized"] == pytest.approx(0.4 / (0.85 - 0.2))
    loss = M.all_metrics([[2.0, 3.0], [2.5, 1.5]], [4.0, 4.0], chance=[0.1, 0.1], higher_is_better=False)
    assert math.isnan(loss["forgetting_normalized"]) and "accuracy" in loss["reasons"]["forgetting_normalized"]


def test_paired_difference_uses_common_seeds_and_a_t_interval():
    from scipy import stats

    a = {0: 0.50, 1: 0.60, 2: 0.55, 3: 0.9}
    b = {0: 0.45, 1: 0.50, 2: 0.52, 7: 0.1}  # seeds 3 and 7 are not shared: left out
    mean, lo, hi, n = M.paired_difference(a, b)
    d = np.array([0.05, 0.10, 0.03])
    half = stats.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert n == 3 and mean == pytest.approx(d.mean()) and (lo, hi) == pytest.approx((d.mean() - half, d.mean() + half))
    # pairing removes the shared per-seed offset: unpaired intervals would overlap, the paired one excludes 0
    offset = {s: 0.3 * s for s in range(5)}
    mean, lo, hi, n = M.paired_difference({s: 0.51 + o for s, o in offset.items()}, {s: 0.5 + o for s, o in offset.items()})
    assert lo == pytest.approx(0.01) and hi == pytest.approx(0.01) and n == 5
    one = M.paired_difference({0: 1.0}, {0: 0.5})
    assert one[0] == 0.5 and math.isnan(one[1]) and one[3] == 1
    assert M.paired_difference({0: float("nan"), 1: 1.0, 2: 2.0}, {0: 0.0, 1: 0.0, 2: 1.0})[3] == 2


def test_aggregate_t_interval_hand_computed():
    mean, lo, hi, n = M.aggregate([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) · s / √n, s = 1
    assert (mean, n) == (2.0, 3)
    assert lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)


def test_aggregate_small_n_and_nan():
    assert M.aggregate([0.7])[0] == 0.7 and math.isnan(M.aggregate([0.7])[1]) and M.aggregate([0.7])[3] == 1
    assert M.aggregate([])[3] == 0 and math.isnan(M.aggregate([])[0])
    assert M.aggregate([1.0, float("nan"), 3.0])[::3] == (2.0, 2)  # NaN seeds are left out of n


def test_ci_shrinks_with_more_seeds():
    widths = []
    for k in (1, 2, 4, 8, 16):
        _, lo, hi, n = M.aggregate([0.4, 0.6] * k)
        assert n == 2 * k
        widths.append(hi - lo)
    assert all(a > b for a, b in zip(widths, widths[1:]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=12))
def test_ci_contains_the_mean(values):
    mean, lo, hi, n = M.aggregate(values)
    assert n == len(values) and lo <= mean + 1e-9 and mean - 1e-9 <= hi
    assert mean == pytest.approx(np.mean(values), abs=1e-9)


def test_aggregate_by_groups():
    df = pd.DataFrame(dict(
        model=["hope"] * 3 + ["transformer"] * 2, stream=["s"] * 5, seed=[0, 1, 2, 0, 1],
        bwt=[-0.1, -0.2, -0.3, -0.5, float("nan")], acc_final=[0.5, 0.6, 0.7, 0.4, 0.4],
    ))
    out = M.aggregate_by(df, by=["model", "stream"])
    assert list(out.columns) == ["model", "stream", "metric", "mean", "ci_low", "ci_high", "n"]
    hope_bwt = out[(out.model == "hope") & (out.metric == "bwt")].iloc[0]
    assert (hope_bwt["mean"], hope_bwt["n"]) == (pytest.approx(-0.2), 3)
    assert hope_bwt["ci_low"] == pytest.approx(M.aggregate([-0.1, -0.2, -0.3])[1])
    tf_bwt = out[(out.model == "transformer") & (out.metric == "bwt")].iloc[0]
    assert tf_bwt["n"] == 1 and math.isnan(tf_bwt["ci_low"])
    with pytest.raises(M.MetricsError, match="group column"):
        M.aggregate_by(df, by=["size"])


# ----------------------------------------------------------------------------- long tables


def _long(R, b, run_id="r", metric="accuracy"):
    T = len(b)
    rows = [dict(run_id=run_id, after_task=-1, eval_task=j, metric=metric, value=b[j]) for j in range(T)]
    rows += [dict(run_id=run_id, after_task=i, eval_task=j, metric=metric, value=R[i][j]) for i in range(T) for j in range(T)]
    return pd.DataFrame(rows)


def test_matrix_from_long_round_trip_and_errors():
    df = _long(R4, B4)
    R, b = M.matrix_from_long(df.sample(frac=1.0, random_state=0))
    np.testing.assert_array_equal(R, R4)
    np.testing.assert_array_equal(b, B4)
    holed = df[~((df.after_task == 2) & (df.eval_task == 1))]
    with pytest.raises(M.MetricsError, match=r"\(2, 1\)"):
        M.matrix_from_long(holed)
    R, _ = M.matrix_from_long(holed, allow_missing=True)
    assert math.isnan(R[2, 1]) and R[2, 2] == 0.9
    both = pd.concat([df, _long(1 - R4, 1 - B4, metric="loss")])
    with pytest.raises(M.MetricsError, match="metric"):
        M.matrix_from_long(both)
    np.testing.assert_array_equal(M.matrix_from_long(both, metric="loss")[0], 1 - R4)
    with pytest.raises(M.MetricsError, match="run_id"):
        M.matrix_from_long(pd.concat([df, _long(R4, B4, run_id="other")]))
    with pytest.raises(M.MetricsError, match="two rows"):
        M.matrix_from_long(pd.concat([df, df.iloc[:1]]))


def test_per_run_metrics_uses_chance_and_both_scores():
    matrix = pd.concat([_long(R4, B4, "a"), _long(1 - R4, 1 - B4, "a", metric="loss"), _long(R3, B3, "b")])
    matrix["model"], matrix["stream"], matrix["seed"] = "hope", "s", 0
    runs = pd.DataFrame(dict(run_id=["a", "b"], chance=[json.dumps([0.25] * 4), json.dumps([0.9] * 3)]))
    curves = pd.DataFrame([
        dict(run_id="a", metric="accuracy", train_task=k, eval_task=e, tokens_seen=10 * p, value=v + k / 10 if e == k else -9)
        for k in range(4) for e in range(4) for p, v in enumerate((0.1, 0.3))
    ])
    out = M.per_run_metrics(matrix, runs, curves, lca_beta=1).set_index(["run_id", "score"])
    assert out.loc[("a", "accuracy"), "lca"] == pytest.approx((0.25 + 0.45) / 2)  # Z_0 = 0.1 + 0.15, Z_1 = 0.3 + 0.15
    assert math.isnan(out.loc[("a", "loss"), "lca"]) and "lca" in json.loads(out.loc[("a", "loss"), "reasons"])
    assert out.loc[("a", "accuracy"), "forgetting"] == pytest.approx(M.forgetting(R4))
    assert out.loc[("a", "loss"), "forgetting"] == pytest.approx(M.forgetting(R4))  # loss = 1 − acc, sign-normalized
    assert out.loc[("a", "accuracy"), "did_not_learn"] in (False,)  # 0.6 ≥ 0.25 + 0.075
    assert out.loc[("b", "accuracy"), "did_not_learn"] in (True,)  # 0.85 < 0.9 + 0.05
    assert out.loc[("a", "loss"), "did_not_learn"] is None
    assert out.loc[("b", "accuracy"), "T"] == 3


# ----------------------------------------------------------------------------- properties


def _reference(R, b):
    """Straight loops over the spec's formulas, written independently of the vectorized code."""
    T = len(R)
    ref = dict(acc_final=sum(R[T - 1][j] for j in range(T)) / T, plasticity=sum(R[j][j] for j in range(T)) / T)
    ref["acc_avg_incremental"] = sum(sum(R[i][j] for j in range(i + 1)) / (i + 1) for i in range(T)) / T
    if T > 1:
        ref["bwt"] = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)
        ref["fwt"] = sum(R[j - 1][j] - b[j] for j in range(1, T)) / (T - 1)
        ref["forgetting"] = sum(max(R[l][j] for l in range(j, T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)
    return ref


square = st.integers(1, 6).flatmap(lambda T: st.tuples(
    arrays(np.float64, (T, T), elements=st.floats(0, 1, allow_nan=False)),
    arrays(np.float64, (T,), elements=st.floats(0, 1, allow_nan=False)),
))
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(square)
def test_matches_reference_loops(Rb):
    R, b = Rb
    out = M.all_metrics(R, b)
    for k, v in _reference(R.tolist(), b.tolist()).items():
        assert out[k] == pytest.approx(v, abs=1e-12), k
    if len(b) == 1:
        assert all(math.isnan(out[k]) for k in ("bwt", "fwt", "forgetting"))


@PROPS
@given(square)
def test_nothing_forgotten_means_no_forgetting(Rb):
    R, _ = Rb
    R = R.copy()
    for j in range(len(R)):  # every old task's score only rises after it is learned
        for i in range(j + 1, len(R)):
            R[i, j] = max(R[i, j], R[i - 1, j])
    if len(R) > 1:
        assert M.forgetting(R) <= 1e-12 and M.bwt(R) >= -1e-12


@PROPS
@given(square)
def test_bounds_and_forgetting_dominates_negative_bwt(Rb):
    R, _ = Rb
    assert R[-1].min() - 1e-12 <= M.acc_final(R) <= R[-1].max() + 1e-12
    assert np.diag(R).min() - 1e-12 <= M.plasticity(R) <= np.diag(R).max() + 1e-12
    if len(R) > 1:  # the max over [j, T−2] includes l = j
        assert M.forgetting(R) >= -M.bwt(R) - 1e-12


@PROPS
@given(square, st.floats(-5, 5), st.floats(0.1, 10))
def test_shift_and_scale(Rb, c, k):
    R, b = Rb
    base, shifted, scaled = M.all_metrics(R, b), M.all_metrics(R + c, b + c), M.all_metrics(k * R, k * b)
    for name in ("acc_final", "acc_avg_incremental", "plasticity"):
        assert shifted[name] == pytest.approx(base[name] + c, abs=1e-9)
    for name in ("bwt", "fwt", "forgetting"):
        if len(b) > 1:  # differences: shift-invariant
            assert shifted[name] == pytest.approx(base[name], abs=1e-9)
    for name in M.METRIC_NAMES[:-1]:
        if not math.isnan(base[name]):
            assert scaled[name] == pytest.approx(k * base[name], abs=1e-9)


@PROPS
@given(square)
def test_loss_mode_is_accuracy_mode_on_the_negated_matrix(Rb):
    L, b = Rb
    loss, neg = M.all_metrics(L, b, higher_is_better=False), M.all_metrics(-L, -b)
    for name in ("bwt", "fwt", "forgetting"):
        assert loss[name] == pytest.approx(neg[name], nan_ok=True)
    for name in ("acc_final", "acc_avg_incremental", "plasticity"):
        assert loss[name] == pytest.approx(-neg[name])


@PROPS
@given(square, st.randoms(use_true_random=False))
def test_long_table_row_order_does_not_matter(Rb, rnd):
    R, b = Rb
    df = _long(R, b)
    order = list(range(len(df)))
    rnd.shuffle(order)
    R2, b2 = M.matrix_from_long(df.iloc[order])
    np.testing.assert_array_equal(R2, R)
    np.testing.assert_array_equal(b2, b)


def test_relearn_savings_hand_computed():
    # A B A C A: A's curve at positions 0, 2, 4 (3 points each); B and C rows are ignored
    Z = np.array([[0.1, 0.5, 0.7], [0.0, 0.0, 0.0], [0.4, 0.7, 0.8], [0.9, 0.9, 0.9], [0.6, 0.8, 0.9]])
    first = (0.1 + 0.5 + 0.7) / 3
    want = (((0.4 + 0.7 + 0.8) / 3 - first) + ((0.6 + 0.8 + 0.9) / 3 - first)) / 2
    assert M.relearn_savings(Z, [[0, 2, 4]]) == pytest.approx(want)
    # a shorter curve: only the points both exposures have
    Zs = Z.copy()
    Zs[2, 2] = np.nan
    assert M.relearn_savings(Zs, [[0, 2]]) == pytest.approx((0.4 + 0.7) / 2 - (0.1 + 0.5) / 2)
    # a run that stopped before the third exposure uses the exposures it has
    assert M.relearn_savings(Z[:3], [[0, 2, 4]]) == pytest.approx((0.4 + 0.7 + 0.8) / 3 - first)
    none = M.relearn_savings(Z, [])
    assert math.isnan(none) and "recurs" in none.reason
    # loss mode: computed on −Z, so relearning faster (lower loss) is still positive
    out = M.all_metrics(np.eye(5), np.zeros(5), higher_is_better=False, Z=1 - Z, recurrences=[[0, 2, 4]])
    assert out["relearn_savings"] == pytest.approx(want)
    plain = M.all_metrics(np.eye(5), np.zeros(5), Z=Z)
    assert math.isnan(plain["relearn_savings"]) and "recurring" in plain["reasons"]["relearn_savings"]


def test_per_run_metrics_computes_relearn_savings_on_recurring_streams_only():
    R = np.full((5, 5), 0.5)
    rows = []
    for stream, rid in (("recurring", "r"), ("permuted-digits", "p")):
        m = _long(R, np.full(5, 0.1), rid)
        m["model"], m["stream"], m["seed"] = "hope", stream, 0
        rows.append(m)
    curves = pd.DataFrame([
        dict(run_id=rid, metric="accuracy", train_task=k, eval_task=k, tokens_seen=10 * (2 * k + p), value=0.1 * k + 0.1 * p)
        for rid in ("r", "p") for k in range(5) for p in range(2)
    ])
    out = M.per_run_metrics(pd.concat(rows), None, curves).set_index("run_id")
    # exposures at 0, 2, 4: curve means 0.05, 0.25, 0.45 -> savings (0.2 + 0.4) / 2
    assert out.loc["r", "relearn_savings"] == pytest.approx(0.3)
    assert math.isnan(out.loc["p", "relearn_savings"])
