"""The CMS ablation: does multi-frequency CMS beat its two controls?

Arms, read from each Hope run's resolved model options (`runs.model_options`, else its config):

    multi-frequency  periods not all equal, cms_lr_mode 'period' (e.g. [1, 4, 16], [1, S, 4S])
    all-fast         periods all 1 ([1, 1, 1]): the same levels without frequency separation
    lr/C             cms_lr_mode 'scaled': every level steps every step at lr / C^(ℓ)

Hope runs of one stream that differ only in these options, their label / variant and the outer
learning rate `train.optimizer.lr` form one ablation; each arm's (plasticity, forgetting) at each
learning rate, seed mean with its 95% interval, is a point of the arm's curve
(`figures/cms_ablation_<stream>.png`).

Verdict, paired by seed at each learning rate both arms ran (docs/METRICS.md, paired): arm A
*dominates* B at that lr when the Δforgetting (A − B) interval lies below 0 or the Δplasticity
interval above 0, and neither lies on the worse side; *trade-off* when one is better and the
other worse; else *tie*; *did not learn* (not compared) when most seeds of either arm did not
learn there (docs/METRICS.md). A dominates B on the stream when it dominates at one lr or more and is
dominated (or traded off) at none. "Multi-frequency CMS dominates both controls" on a stream when
one multi-frequency arm dominates every control arm there.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd

from nlbench import metrics as M

HOPE_MODELS = ("hope", "hope-attention")
KINDS = {"multi": "multi-frequency", "all_fast": "all-fast control", "scaled": "lr/C control",
         "uniform": "equal periods > 1"}
CONTROL_KINDS = ("all_fast", "scaled")
RULE = ("paired by seed at each learning rate both arms ran (Student t 95% interval of the per-seed "
        "differences); A dominates B at an lr when Δforgetting (A − B) lies below 0 or Δplasticity above 0 "
        "and neither on the worse side; A dominates B on the stream when it dominates at ≥ 1 lr and loses "
        "(dominated or trade-off) at none")


def _loads(s) -> dict:
    if isinstance(s, dict):
        return s
    try:
        return json.loads(s) if isinstance(s, str) and s else {}
    except ValueError:
        return {}


def _arm(opts: dict) -> tuple[str, str] | None:
    """(kind, label) of a Hope run's CMS options; None when they do not say its periods."""
    periods = opts.get("cms_periods")
    if not isinstance(periods, list) or not periods:
        return None
    lr_mode = opts.get("cms_lr_mode") or "period"
    text = "[" + ", ".join(str(p) for p in periods) + "]"
    if lr_mode == "scaled":
        return "scaled", f"lr/C {text}"
    if len(set(periods)) > 1:
        return "multi", text
    return ("all_fast" if periods[0] == 1 else "uniform"), text


def _rest_key(config: dict) -> str:
    """Everything but the ablated options, the label/variant, the outer lr, the seed and the device."""
    cfg = json.loads(json.dumps(config))
    for k in ("seed", "variant", "selected"):
        cfg.pop(k, None)
    cfg.get("train", {}).pop("device", None)
    cfg.get("train", {}).get("optimizer", {}).pop("lr", None)
    model = cfg.get("model", {})
    model.pop("label", None)
    for k in ("cms_periods", "cms_levels", "cms_lr_mode"):
        model.get("options", {}).pop(k, None)
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def _runs_table(res) -> pd.DataFrame:
    runs = res.runs
    if runs.empty or res.matrix.empty:
        return pd.DataFrame()
    runs = runs[runs["status"] == "completed"] if "status" in runs else runs
    rows = []
    for r in runs.itertuples():
        cfg = _loads(getattr(r, "config", None))
        if (cfg.get("model") or {}).get("name") not in HOPE_MODELS:
            continue
        opts = _loads(getattr(r, "model_options", None)) or (cfg.get("model") or {}).get("options") or {}
        arm = _arm(opts)
        lr = ((cfg.get("train") or {}).get("optimizer") or {}).get("lr")
        if arm is None or lr is None:
            continue
        rows.append(dict(run_id=r.run_id, stream=r.stream, seed=int(r.seed), kind=arm[0], arm=arm[1], lr=float(lr),
                         rest=_rest_key(cfg)))
    if not rows:
        return pd.DataFrame()
    t = pd.DataFrame(rows)
    per_run = M.per_run_metrics(res.matrix[res.matrix["run_id"].isin(set(t["run_id"]))], runs=runs)
    per_run = per_run[per_run["score"] == "accuracy"][["run_id", "plasticity", "forgetting", "did_not_learn"]]
    return t.merge(per_run, on="run_id")


def _point(g: pd.DataFrame) -> dict:
    def agg(col):
        mean, lo, hi, n = M.aggregate(pd.to_numeric(g[col], errors="coerce"))
        return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n}

    return {"plasticity": agg("plasticity"), "forgetting": agg("forgetting"),
            "n_did_not_learn": int(g["did_not_learn"].fillna(False).astype(bool).sum()), "seeds": sorted(g["seed"])}


def _outcome(dp: dict, df: dict) -> str:
    if any(x is None or math.isnan(x) for x in (dp["ci_low"], df["ci_low"])):
        return "no interval"
    better = df["ci_high"] < 0 or dp["ci_low"] > 0
    worse = df["ci_low"] > 0 or dp["ci_high"] < 0
    return "dominates" if better and not worse else "dominated" if worse and not better else \
        "trade-off" if better and worse else "tie"


def _did_not_learn(g: pd.DataFrame, lr: float) -> bool:
    flags = g.loc[g["lr"] == lr, "did_not_learn"].fillna(False).astype(bool)
    return bool(len(flags)) and int(flags.sum()) * 2 > len(flags)


def _pair(a: pd.DataFrame, b: pd.DataFrame, lr: float) -> dict:
    a, b = a[a["lr"] == lr], b[b["lr"] == lr]
    out = {"lr": lr}
    for m in ("forgetting", "plasticity"):
        mean, lo, hi, n = M.paired_difference(dict(zip(a["seed"], a[m])), dict(zip(b["seed"], b[m])))
        out[m] = {"diff_mean": mean, "ci_low": lo, "ci_high": hi, "n": n}
    out["outcome"] = _outcome(out["plasticity"], out["forgetting"])
    return out


def _stream_verdict(comparisons: list[dict], controls: list[str]) -> tuple[bool, str]:
    """Does one multi-frequency arm dominate every control arm? (bool, sentence)."""
    by_arm: dict[str, dict[str, bool]] = {}
    for c in comparisons:
        by_arm.setdefault(c["arm"], {})[c["control"]] = c["dominates"]
    winners = [a for a, d in by_arm.items() if controls and all(d.get(k) for k in controls)]
    if winners:
        return True, f"yes: {', '.join(winners)} dominates {' and '.join(controls)}"
    if not controls:
        return False, "no control arm ran on this stream"
    return False, "no: no multi-frequency arm dominates " + " and ".join(controls)


def build_ablation(res) -> list[dict]:
    """One dict per ablation (stream and shared configuration): arms, curve points, paired comparisons, verdict."""
    t = _runs_table(res)
    if t.empty:
        return []
    out = []
    groups = list(t.groupby(["stream", "rest"], sort=True))
    per_stream = pd.Series([s for (s, _), _ in groups]).value_counts()
    for (stream, rest), g in groups:
        kinds = set(g["kind"])
        if "multi" not in kinds or not kinds & set(CONTROL_KINDS):
            continue
        arms = []
        for arm, ga in g.groupby("arm", sort=True):
            arms.append({"arm": arm, "kind": ga["kind"].iloc[0], "kind_text": KINDS[ga["kind"].iloc[0]],
                         "points": [dict(lr=lr, **_point(gl)) for lr, gl in ga.groupby("lr", sort=True)]})
        controls = sorted(a["arm"] for a in arms if a["kind"] in CONTROL_KINDS)
        comparisons = []
        for a in (x for x in arms if x["kind"] == "multi"):
            ga = g[g["arm"] == a["arm"]]
            for c in controls:
                gc = g[g["arm"] == c]
                lrs = sorted(set(ga["lr"]) & set(gc["lr"]))
                pairs = [_pair(ga, gc, lr) for lr in lrs]
                for p in pairs:  # a point where either arm did not learn (most seeds) is not compared
                    if _did_not_learn(ga, p["lr"]) or _did_not_learn(gc, p["lr"]):
                        p["outcome"] = "did not learn"
                wins = sum(p["outcome"] == "dominates" for p in pairs)
                losses = sum(p["outcome"] in ("dominated", "trade-off") for p in pairs)
                comparisons.append({"arm": a["arm"], "control": c, "pairs": pairs, "wins": wins, "losses": losses,
                                    "dominates": bool(wins >= 1 and losses == 0)})
        ok, sentence = _stream_verdict(comparisons, controls)
        label = stream if per_stream[stream] == 1 else f"{stream}#{rest}"
        out.append({"stream": stream, "section": label, "config": rest, "arms": arms, "controls": controls,
                    "comparisons": comparisons, "multi_dominates_controls": ok, "verdict": sentence, "rule": RULE})
    return out


# ------------------------------------------------------------------------------- figure


def ablation_figure(ab: dict, stem) -> list[str]:
    """Forgetting (y) against plasticity (x), one curve per arm through its learning rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nlbench.report.figures import save

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for arm in ab["arms"]:
        pts = [p for p in arm["points"] if p["plasticity"]["mean"] is not None and not math.isnan(p["plasticity"]["mean"])]
        if not pts:
            continue
        x = [p["plasticity"]["mean"] for p in pts]
        y = [p["forgetting"]["mean"] for p in pts]

        def half(p, m):
            lo, hi = p[m]["ci_low"], p[m]["ci_high"]
            return 0.0 if lo is None or math.isnan(lo) else (hi - lo) / 2

        style = "-o" if arm["kind"] == "multi" else "--s"
        line = ax.errorbar(x, y, xerr=[half(p, "plasticity") for p in pts], yerr=[half(p, "forgetting") for p in pts],
                           fmt=style, capsize=3, label=f"{arm['arm']} ({arm['kind_text']})")
        for p, xi, yi in zip(pts, x, y):
            ax.annotate(f"lr {p['lr']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color=line[0].get_color())
    ax.set_xlabel("plasticity (accuracy just after learning each task) →")
    ax.set_ylabel("forgetting (lower is better)")
    ax.set_title(f"CMS ablation: {ab['section']}\n{ab['verdict']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths = save(fig, stem)
    plt.close(fig)
    return paths


def ablation_figures(ablations: list[dict], fig_dir) -> dict[str, list[str]]:
    from pathlib import Path

    from nlbench.report.figures import slug

    return {f"CMS ablation: {ab['section']}": ablation_figure(ab, Path(fig_dir) / f"cms_ablation_{slug(ab['section'])}")
            for ab in ablations}


# ------------------------------------------------------------------------------- text


def _ci(a: dict) -> str:
    if a.get("mean") is None or math.isnan(a["mean"]):
        return "—"
    s = f"{a['mean']:.3f}"
    if a.get("ci_low") is not None and not math.isnan(a["ci_low"]):
        s += f" [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
    return s


def _diff(d: dict) -> str:
    if d.get("diff_mean") is None or math.isnan(d["diff_mean"]):
        return "—"
    s = f"{d['diff_mean']:+.3f}"
    if d.get("ci_low") is not None and not math.isnan(d["ci_low"]):
        s += f" [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    return s + f" (n={d['n']})"


def verdict_text(ablations: list[dict]) -> str:
    """One sentence per stream: does multi-frequency CMS dominate both controls?"""
    if not ablations:
        return ""
    parts = [f"{ab['section']}: {ab['verdict']}" for ab in ablations]
    yes = [ab["section"] for ab in ablations if ab["multi_dominates_controls"]]
    head = (f"Multi-frequency CMS dominates both controls on {len(yes)} of {len(ablations)} stream(s)"
            + (f" ({', '.join(yes)})" if yes else "") + ". ")
    return head + "; ".join(parts) + "."


def points_rows(ab: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    head = ["arm", "kind", "lr", "plasticity", "forgetting", "seeds", "did not learn"]
    rows = []
    for arm in ab["arms"]:
        for p in arm["points"]:
            rows.append([(arm["arm"], arm["arm"]), (arm["kind_text"], arm["kind_text"]), (f"{p['lr']:g}", p["lr"]),
                         (_ci(p["plasticity"]), p["plasticity"]["mean"]), (_ci(p["forgetting"]), p["forgetting"]["mean"]),
                         (str(len(p["seeds"])), len(p["seeds"])),
                         (f"{p['n_did_not_learn']}/{len(p['seeds'])}", p["n_did_not_learn"])])
    return head, rows


def pair_rows(ab: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    head = ["multi-frequency arm", "control", "lr", "Δ forgetting", "Δ plasticity", "outcome"]
    rows = []
    for c in ab["comparisons"]:
        for p in c["pairs"]:
            rows.append([(c["arm"], c["arm"]), (c["control"], c["control"]), (f"{p['lr']:g}", p["lr"]),
                         (_diff(p["forgetting"]), p["forgetting"]["diff_mean"]),
                         (_diff(p["plasticity"]), p["plasticity"]["diff_mean"]), (p["outcome"], p["outcome"])])
    return head, rows


INTRO = ("Hope with CMS periods that differ across levels (multi-frequency) against the same model with all "
         "periods 1 (all-fast control) and with every level stepped every step at lr / C (lr/C control), each at "
         "several learning rates; points are seed means with 95% intervals.")


def render_markdown(ablations: list[dict], figures: dict[str, str] | None, md_table) -> list[str]:
    if not ablations:
        return []
    out = ["## CMS ablation: does multi-frequency CMS beat its controls?", "", INTRO, "",
           f"**Verdict.** {verdict_text(ablations)}", "", f"Rule: {RULE}.", ""]
    for ab in ablations:
        out += [f"### {ab['section']}", "", f"{ab['verdict']}.", ""]
        key = f"CMS ablation: {ab['section']}"
        if figures and key in figures:
            out += [f"![{key}]({figures[key]})", ""]
        out += [md_table(*points_rows(ab)), ""]
        if ab["comparisons"]:
            out += ["Paired differences (multi-frequency arm − control, per seed):", "", md_table(*pair_rows(ab)), ""]
    return out


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
