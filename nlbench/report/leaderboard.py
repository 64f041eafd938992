"""The leaderboard: per stream, entries ranked by final accuracy with paired 95% intervals.

An *entry* is one configuration evaluated over several seeds: model label, size, protocol,
strategy, and — when runs of the same label differ in anything else (learning rate, tokens per
task, …) — a short fingerprint of that configuration, so two configurations are never pooled as
if they were seeds of one.

Per-run metrics come from :func:`nlbench.metrics.per_run_metrics` (docs/METRICS.md), seed
aggregation from :func:`nlbench.metrics.aggregate`. Sections are per (stream setting, score), a
*stream setting* being the stream with its protocol and configuration (:func:`section_labels`:
an in-context markov-languages stream of 8-token languages is not the fine-tuning one, so its
entries are never ranked or paired against those); in each:
``accuracy`` (higher is better) and, for language-modelling streams, ``loss`` (lower is better;
the transfer metrics are computed on −R so a positive BWT/FWT still means "helped" and a
positive forgetting "got worse").

Runs of different entries with the same seed share the task data, so entries are compared per
seed (:func:`nlbench.metrics.paired_difference`). Rank: 1 + the number of entries whose paired
acc_final interval lies wholly on the better side; entries whose paired interval covers 0 share
a rank. Each section's ``paired`` rows compare every entry with the best non-Hope entry of a
continual-learning strategy (the reference points ``joint`` and ``fresh`` are never that baseline),
and the ``verdict`` puts each Hope entry against the best non-Hope entry of its own strategy per
forgetting stream (naive against naive, replay against replay, …). Capability streams (passkey,
modular-arithmetic, text-domains) are reported in their own section, outside the verdict.
Entries flagged "did not learn" are listed but never ranked.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from nlbench import metrics as M
from nlbench.report.load import ReportError, Results
from nlbench.tasks import capability_streams

SCHEMA_VERSION = 2
# The metrics of the table, in the order shown (forgetting always next to plasticity); lca needs
# current-task curves, so it is JSON only.
TABLE_METRICS = ("acc_final", "plasticity", "forgetting", "forgetting_normalized", "bwt", "fwt", "acc_avg_incremental")
RANK_METRIC = "acc_final"  # the one metric a rank is computed from (no metric counted twice)
PAIRED_METRICS = ("acc_final", "plasticity", "forgetting", "forgetting_normalized")
# Streams that test a capability (transfer, learnability at a budget), not forgetting: their own
# section of the report, outside the verdict. The stream registry marks them (StreamSpec.measures).
CAPABILITY_STREAMS = capability_streams()
# Shown as an extra column only in sections where some entry has a value (recurring streams).
SECTION_EXTRA_METRICS = ("relearn_savings",)
# a forgetting stream ranks only entries that learned it: plasticity >= chance + this fraction of
# (ceiling - chance) for every ranked entry, else the stream is reported as a capability test
LEARNABLE_FRACTION = 0.2
HEADLINE_FIGURES = ("final score vs forgetting",)  # shown right after the verdict; the rest with the details
RANKING_RULE = (
    "per stream section: entries that learned, by acc_final; rank = 1 + the number of entries whose paired "
    "acc_final difference (95% Student t interval over the common seeds) lies wholly on the better side, so "
    "entries whose paired interval covers 0 share a rank (with fewer than 2 common seeds there is no interval "
    "and the two tie). In a report where some entries were selected on tuning seeds, entries without a selection "
    "(`untuned`) are listed and paired but not ranked. No overall rank across streams: the verdict compares each Hope entry with the best "
    "non-Hope entry of the same strategy per forgetting stream"
)
# the reference points: an upper bound (all tasks' data interleaved) and plasticity without interference;
# they are compared with each other, never used as the baseline a continual learner is measured against
REFERENCE_STRATEGIES = ("joint", "fresh")
LOSS_NOTE = (
    "Loss sections (language-modelling streams): lower is better for acc_final, "
    "acc_avg_incremental and plasticity (they are mean losses); bwt, fwt and forgetting are computed "
    "on −R, i.e. their signs flip relative to the formulas, so that positive bwt/fwt still means "
    "'helped' and positive forgetting 'got worse'."
)
_ENTRY_KEYS = ("model", "size", "protocol", "strategy")
DEFAULT_PROTOCOL = "finetune"  # its sections keep the bare stream name
NO_VERDICT = "None: no forgetting stream has both a Hope entry and a non-Hope entry that learned."
LOWER_IS_BETTER = ("loss", "perplexity")  # matrix scores where lower is better


def higher_is_better(metric: str, score: str) -> bool:
    """Direction of a metric in a section: forgetting is always 'lower is better', the transfer
    metrics always 'higher' (metrics.all_metrics flips loss signs), level metrics follow the score."""
    if metric == "forgetting":
        return False
    if metric in ("bwt", "fwt"):
        return True
    return score not in LOWER_IS_BETTER


def _clean(x):
    """JSON-safe: NaN -> None, numpy scalars -> Python."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _loads(s):
    if isinstance(s, dict):
        return s
    if s is None or (isinstance(s, float) and math.isnan(s)) or s == "":
        return {}
    try:
        return json.loads(s)
    except (TypeError, ValueError):
        return {"unparsed": str(s)}


def _fingerprint(config: dict) -> str:
    """Hash of everything in a run config except the seed and the execution device."""
    cfg = json.loads(json.dumps(config))
    cfg.pop("seed", None)
    if isinstance(cfg.get("train"), dict):
        cfg["train"].pop("device", None)
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def _entry_table(runs: pd.DataFrame) -> pd.DataFrame:
    """runs + columns config_dict, fingerprint and entry (the label runs are pooled under)."""
    runs = runs.copy()
    for c in _ENTRY_KEYS:
        if c not in runs.columns:
            runs[c] = ""
        runs[c] = runs[c].fillna("").astype(str)
    runs["config_dict"] = [_loads(c) for c in runs.get("config", pd.Series([None] * len(runs)))]
    runs["fingerprint"] = [_fingerprint(c) for c in runs["config_dict"]]
    base = runs["model"] + "/" + runs["size"] + "/" + runs["protocol"] + "/" + runs["strategy"]
    base = base.str.replace("//", "/", regex=False).str.strip("/")
    runs["entry"] = base
    # same label, several configurations (and same stream): tell them apart by fingerprint
    runs["section"] = section_labels(runs)
    n_fp = runs.groupby(["section", "entry"])["fingerprint"].transform("nunique")
    runs.loc[n_fp > 1, "entry"] = base[n_fp > 1] + "#" + runs.loc[n_fp > 1, "fingerprint"]
    return runs


def _stream_config(config: dict) -> dict:
    stream = config.get("stream")
    return stream if isinstance(stream, dict) else {}


def section_labels(runs: pd.DataFrame) -> pd.Series:
    """The section each run is ranked in: runs of one section share the task data per seed.

    The label is the stream name for the default protocol (finetune), ``"<stream> · <protocol>"``
    for any other, and gets ``#<hash>`` of the stream configuration when one (stream, protocol)
    was run with several configurations (e.g. other options or task counts).
    """
    proto = runs["protocol"].replace("", DEFAULT_PROTOCOL)
    streams = runs["stream"].fillna("").astype(str)
    shash = pd.Series([hashlib.sha1(json.dumps(_stream_config(c), sort_keys=True).encode()).hexdigest()[:8]
                       for c in runs["config_dict"]], index=runs.index)
    base = streams.where(proto == DEFAULT_PROTOCOL, streams + " · " + proto)
    n_cfg = shash.groupby([streams, proto]).transform("nunique")
    return base.where(n_cfg <= 1, base + "#" + shash)


def _environment(g: pd.DataFrame) -> dict:
    def uniq(col):
        if col not in g.columns:
            return []
        return sorted({str(v) for v in g[col].dropna()})

    versions = sorted({json.dumps(_loads(v), sort_keys=True) for v in g["versions"].dropna()}) if "versions" in g else []
    return {
        "device": uniq("device"),
        "host": uniq("host"),
        "git_sha": uniq("git_sha"),
        "versions": [json.loads(v) for v in versions],
    }


def _agg(values) -> dict:
    mean, lo, hi, n = M.aggregate(pd.to_numeric(pd.Series(list(values)), errors="coerce"))
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": n}


def is_hope(entry: dict) -> bool:
    """Hope entries: the config's model name, else the model label (``hope``, ``hope@variant``, …)."""
    name = (entry.get("config") or {}).get("model", {}).get("name") if isinstance((entry.get("config") or {}).get("model"), dict) else None
    return str(name or entry.get("model", "")).split("@")[0].lower().startswith("hope")


def _better_sign(score: str) -> float:
    return 1.0 if higher_is_better(RANK_METRIC, score) else -1.0


def _pair(a: dict, b: dict, metric: str) -> dict:
    mean, lo, hi, n = M.paired_difference(a["_per_seed"][metric], b["_per_seed"][metric])
    return {"diff_mean": mean, "ci_low": lo, "ci_high": hi, "n": n}


def _beats(a: dict, b: dict, score: str) -> bool:
    """a is better than b on the rank metric: the paired interval excludes 0 on a's side."""
    d = _pair(a, b, RANK_METRIC)
    if math.isnan(d["ci_low"]):
        return False
    return d["ci_low"] > 0 if _better_sign(score) > 0 else d["ci_high"] < 0


def _learned(e: dict) -> bool:
    """Learned (the did-not-learn rule) with a defined acc_final."""
    return not e["did_not_learn"] and not math.isnan(e["metrics"][RANK_METRIC]["mean"])


def _rank_section(entries: list[dict], score: str) -> None:
    """Set 'rank' on learned, comparably tuned entries with a defined acc_final (RANKING_RULE); others None."""
    sign = _better_sign(score)
    rankable = [e for e in entries if _learned(e) and not e.get("untuned")]
    for e in entries:
        e["rank"] = None
    for e in rankable:
        e["rank"] = 1 + sum(_beats(o, e, score) for o in rankable if o is not e)
    entries.sort(key=lambda e: (e["rank"] is None, e["rank"] or 0, -sign * e["metrics"][RANK_METRIC]["mean"]
                                if not math.isnan(e["metrics"][RANK_METRIC]["mean"]) else 0.0, e["entry"]))


def _baseline(entries: list[dict], score: str, strategy: str | None = None) -> dict | None:
    """The best ranked non-Hope entry by its acc_final seed mean (ties: entry name): of `strategy`
    when given, else of the continual-learning strategies (any strategy when the section has only
    reference points)."""
    sign = _better_sign(score)
    cands = [e for e in entries if _learned(e) and not is_hope(e)]
    if any(not e.get("untuned") for e in cands):  # a tuned baseline when there is one
        cands = [e for e in cands if not e.get("untuned")]
    if strategy is not None:
        cands = [e for e in cands if e.get("strategy", "") == strategy]
    elif any(e.get("strategy", "") not in REFERENCE_STRATEGIES for e in cands):
        cands = [e for e in cands if e.get("strategy", "") not in REFERENCE_STRATEGIES]
    cands.sort(key=lambda e: (-sign * e["metrics"][RANK_METRIC]["mean"], e["entry"]))
    return cands[0] if cands else None


def paired_rows(entries: list[dict], baseline: dict | None) -> list[dict]:
    """``{entry, baseline, metric, diff_mean, ci_low, ci_high, n}`` of every entry against ``baseline``."""
    if baseline is None:
        return []
    return [
        {"entry": e["entry"], "baseline": baseline["entry"], "metric": m, **_pair(e, baseline, m)}
        for e in entries if e is not baseline for m in PAIRED_METRICS
    ]


def _outcome(d: dict, score: str) -> str:
    if d["ci_low"] is None or math.isnan(d["ci_low"]):
        return "no interval"
    better = d["ci_low"] > 0 if _better_sign(score) > 0 else d["ci_high"] < 0
    worse = d["ci_high"] < 0 if _better_sign(score) > 0 else d["ci_low"] > 0
    return "better" if better else "worse" if worse else "tie"


def _strategy_pairs(entries: list[dict], score: str) -> dict[str, dict]:
    """Per Hope entry: the best non-Hope entry of its strategy and the paired rows against it."""
    out = {}
    for e in entries:
        if is_hope(e):
            base = _baseline(entries, score, strategy=e.get("strategy", ""))
            out[e["entry"]] = {"baseline": base["entry"] if base else None,
                               "pairs": {m: _pair(e, base, m) for m in PAIRED_METRICS} if base else {}}
    return out


def verdict_rows(sections: list[dict]) -> list[dict]:
    """Per forgetting stream setting (its primary section): each Hope entry against the best non-Hope
    entry of its own strategy."""
    rows = []
    for s in sections:
        by_hope = s.pop("_verdict", {})
        if s["kind"] != "forgetting" or not s["primary"]:
            continue
        for e in s["entries"]:
            if not is_hope(e):
                continue
            v = by_hope.get(e["entry"], {"baseline": None, "pairs": {}})
            pairs = {(e["entry"], m): p for m, p in v["pairs"].items()}
            row = {"section": s["section"], "stream": s["stream"], "protocol": s["protocol"], "score": s["score"],
                   "entry": e["entry"], "baseline": v["baseline"],
                   "did_not_learn": e["did_not_learn"]}
            if v["baseline"] is None:
                row["outcome"] = "no baseline"
            elif e["did_not_learn"]:
                row["outcome"] = "did not learn"
            else:
                row["outcome"] = _outcome(pairs[(e["entry"], RANK_METRIC)], s["score"])
            for m in PAIRED_METRICS:
                p = pairs.get((e["entry"], m))
                row[m] = {k: p[k] for k in ("diff_mean", "ci_low", "ci_high", "n")} if p else None
            rows.append(row)
    return rows


def _mean_of_lists(values) -> float | None:
    """Mean over runs of each run's mean per-task value (JSON lists); None when any value is unknown."""
    per_run = []
    for v in values:
        lst = _loads(v) if isinstance(v, str) else v
        if not isinstance(lst, list) or not lst or any(x is None for x in lst):
            return None
        per_run.append(float(np.mean(lst)))
    return float(np.mean(per_run)) if per_run else None


def build_leaderboard(res: Results, ablation: Results | None = None) -> dict:
    """The leaderboard document (the JSON of ``reports/README.md``, schema_version 1).

    ``ablation``: results read only for the CMS ablation section (``nlbench report --ablation``), so
    an ablation's Hope arms never enter the ranked sections or the verdict; without it the
    ablation is looked for in ``res``.
    """
    doc = {
        "schema_version": SCHEMA_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": list(res.sources),
        "ci_method": M.CI_METHOD,
        "did_not_learn_rule": M.DID_NOT_LEARN_RULE,
        "metrics": {
            name: dict(
                info,
                higher_is_better_accuracy=higher_is_better(name, "accuracy"),
                higher_is_better_loss=higher_is_better(name, "loss"),
            )
            for name, info in M.METRIC_INFO.items()
        },
        "ranking_rule": RANKING_RULE,
        "paired_metrics": list(PAIRED_METRICS),
        "capability_streams": list(CAPABILITY_STREAMS),
        "notes": [],
        "warnings": list(res.warnings),
        "verdict": [],
        "cms_ablation": [],
        "ablation_sources": list(ablation.sources) if ablation is not None else [],
        "streams": [],
    }
    if ablation is not None:
        from nlbench.report.cms_ablation import build_ablation

        doc["cms_ablation"] = build_ablation(ablation)
        doc["warnings"] += [f"ablation: {w}" for w in ablation.warnings]
    if res.runs.empty:
        return _clean(doc)
    runs = _entry_table(res.runs)
    status = runs["status"].fillna("unknown") if "status" in runs else pd.Series(["completed"] * len(runs))
    done = runs[status == "completed"]
    matrix = res.matrix[res.matrix["run_id"].isin(set(done["run_id"]))] if not res.matrix.empty else res.matrix
    missing = sorted(set(done["run_id"]) - set(matrix["run_id"] if not matrix.empty else []))
    if missing:
        doc["warnings"].append(f"{len(missing)} completed run(s) have no rows in 'matrix' and are left out (e.g. {missing[0]!r})")
    if matrix.empty:
        doc["warnings"].append("no matrix rows for any completed run: nothing to rank")
        return _clean(doc)
    try:
        per_run = M.per_run_metrics(matrix, runs=done, curves=res.curves if not res.curves.empty else None)
    except M.MetricsError as e:
        raise ReportError(f"cannot compute metrics from the 'matrix' table: {e}") from e
    # the chance rule lives on accuracy; a run's loss section inherits its accuracy flag
    acc_flag = per_run[per_run["score"] == "accuracy"].set_index("run_id")["did_not_learn"].to_dict()
    per_run["did_not_learn"] = [acc_flag.get(r, f) for r, f in zip(per_run["run_id"], per_run["did_not_learn"])]
    keep = ["run_id", "entry", "section", "config_dict", "status", *_ENTRY_KEYS,
            *[c for c in ("seed", "train_tokens_per_s", "chance", "ceiling") if c in runs]]
    per_run = per_run.drop(columns=["model", "seed"]).merge(runs[[c for c in keep if c in runs]], on="run_id", how="left")
    if set(LOWER_IS_BETTER) & set(per_run["score"]):
        doc["notes"].append(LOSS_NOTE)
    dup = per_run.groupby(["section", "score", "entry", "seed"]).size()
    if (dup > 1).any():
        raise ReportError(f"entry/seed pairs with more than one run: {list(dup[dup > 1].index)[:3]}; cannot aggregate seeds")

    failed = runs[status != "completed"]
    chance_of = _run_chance(done)
    # ranks claim an equal tuning budget: once any entry was selected on tuning seeds, entries
    # without a selection are listed with their paired rows but not ranked (their own report ranks them)
    tuned_report = any(bool(c.get("selected")) for c in done["config_dict"])
    order = {lab: (st, lab) for lab, st in zip(per_run["section"], per_run["stream"])}
    for (label, score), sec in sorted(per_run.groupby(["section", "score"], sort=True), key=lambda kv: order[kv[0][0]]):
        stream = sec["stream"].iloc[0]
        entries = []
        for entry, g in sec.groupby("entry", sort=True):
            first = g.iloc[0]
            flags = [bool(f) for f in g["did_not_learn"] if f is not None and not (isinstance(f, float) and math.isnan(f))]
            n_dnl = sum(flags)
            f_runs = failed[(failed["entry"] == entry) & (failed["section"] == label)]
            entries.append({
                "entry": entry,
                **{k: first[k] for k in _ENTRY_KEYS},
                "n_seeds": int(len(g)),
                "seeds": sorted(int(s) for s in g["seed"].dropna()) if "seed" in g else [],
                "run_ids": sorted(g["run_id"]),
                "num_tasks": int(g["T"].max()),
                # the majority of its seeds did not learn: listed, not ranked
                "did_not_learn": bool(flags) and n_dnl * 2 > len(flags),
                "n_did_not_learn": int(n_dnl),
                "n_failed": int(len(f_runs)),
                "failed": [
                    {"run_id": r.run_id, "seed": _clean(getattr(r, "seed", None)), "status": r.status, "error": getattr(r, "error", None)}
                    for r in f_runs.itertuples()
                ],
                "ceiling": _mean_of_lists(g["ceiling"]) if "ceiling" in g else None,
                # chosen hyper-parameters with the seeds they were tuned on; null until selection exists
                "selected": first["config_dict"].get("selected"),
                "untuned": tuned_report and not first["config_dict"].get("selected"),
                "metrics": {m: _agg(g[m]) for m in M.METRIC_NAMES},
                "_per_seed": {m: {int(sd): float(v) for sd, v in zip(g["seed"], pd.to_numeric(g[m], errors="coerce"))
                                  if not (isinstance(sd, float) and math.isnan(sd))} for m in M.METRIC_NAMES},
                # mean per-task chance of each run (majority baseline), over seeds
                "chance": _agg([chance_of.get(r, math.nan) for r in g["run_id"]]),
                "train_tokens_per_s": _agg(g["train_tokens_per_s"]) if "train_tokens_per_s" in g else _agg([]),
                "config": {k: v for k, v in first["config_dict"].items() if k != "seed"},
                "environment": _environment(runs[runs["run_id"].isin(set(g["run_id"]))]),
            })
        _rank_section(entries, score)
        baseline = _baseline(entries, score)
        scores = set(per_run.loc[per_run["section"] == label, "score"])
        doc["streams"].append({
            "section": label,
            "stream": stream,
            "protocol": sec["protocol"].iloc[0] or DEFAULT_PROTOCOL,
            "stream_config": _stream_config(sec["config_dict"].iloc[0]),
            "score": score,
            "kind": "capability" if stream in CAPABILITY_STREAMS else "forgetting",
            "primary": score == "accuracy" or "accuracy" not in scores,
            "higher_is_better": score not in LOWER_IS_BETTER,
            "num_tasks": int(sec["T"].max()),
            "baseline": baseline["entry"] if baseline else None,
            "paired": paired_rows(entries, baseline),
            "entries": entries,
            "_verdict": _strategy_pairs(entries, score),  # consumed by verdict_rows
        })
        for e in entries:
            del e["_per_seed"]
    _demote_unlearned(doc["streams"])
    doc["verdict"] = verdict_rows(doc["streams"])
    from nlbench.report.cms_ablation import build_ablation

    if ablation is None:
        doc["cms_ablation"] = build_ablation(res)  # [] unless the runs hold such an ablation
    return _clean(doc)


def learnability_failures(section: dict) -> list[str]:
    """Ranked entries of an accuracy section whose plasticity is below chance + LEARNABLE_FRACTION ·
    (ceiling − chance) (ceiling 1 where unknown): the stream does not measure their forgetting."""
    out = []
    for e in section["entries"]:
        if e["rank"] is None and not (e.get("untuned") and _learned(e)):
            continue
        p, c = e["metrics"]["plasticity"]["mean"], e["chance"]["mean"]
        if p is None or c is None or math.isnan(p) or math.isnan(c):
            continue
        ceiling = e["ceiling"] if e.get("ceiling") is not None else 1.0
        need = c + LEARNABLE_FRACTION * (ceiling - c)
        if p < need:
            out.append(f"{e['entry']} plasticity {p:.3f} < chance {c:.3f} + {LEARNABLE_FRACTION:g}·(ceiling "
                       f"{ceiling:.3f} − chance) = {need:.3f}")
    return out


def _demote_unlearned(sections: list[dict]) -> None:
    """A forgetting stream where a ranked entry barely learns is reported as a capability test."""
    reasons = {}
    for s in sections:
        if s["kind"] == "forgetting" and s["score"] == "accuracy":
            failed = learnability_failures(s)
            if failed:
                reasons[s["section"]] = ("reported as a capability test: " + "; ".join(failed))
    for s in sections:
        if s["section"] in reasons:
            s["kind"], s["kind_reason"] = "capability", reasons[s["section"]]
        else:
            s["kind_reason"] = None


def _run_chance(runs) -> dict:
    """run_id -> mean of the run's per-task chance (the runs table's `chance` JSON list)."""
    out = {}
    if "chance" not in runs:
        return out
    for rid, c in zip(runs["run_id"], runs["chance"]):
        values = json.loads(c) if isinstance(c, str) and c else None
        if values:
            out[rid] = sum(values) / len(values)
    return out


# ------------------------------------------------------------------------------- rendering


def fmt_ci(a: dict | None, digits: int = 3) -> str:
    """'0.812 ± [0.790, 0.834] (n=3)' style cell: mean [lo, hi] n."""
    if not a or a.get("mean") is None:
        return "—"
    s = f"{a['mean']:.{digits}f}"
    if a.get("ci_low") is not None:
        s += f" [{a['ci_low']:.{digits}f}, {a['ci_high']:.{digits}f}]"
    return s


def fmt_rate(a: dict | None) -> str:
    if not a or a.get("mean") is None:
        return "—"
    return f"{a['mean']:,.0f}"


def section_rows(section: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    """Header and rows (display text, sort value) of one stream section's table."""
    shown = TABLE_METRICS + tuple(m for m in SECTION_EXTRA_METRICS if any(
        (e["metrics"].get(m) or {}).get("mean") is not None and not math.isnan(e["metrics"][m]["mean"])
        for e in section["entries"]))
    head = ["rank", "entry", "seeds", "chance", *shown, "train tok/s", "flags"]
    rows = []
    for e in section["entries"]:
        flags = []
        if e["did_not_learn"]:
            flags.append(f"did not learn ({e['n_did_not_learn']}/{e['n_seeds']} seeds)")
        if e["n_failed"]:
            flags.append(f"{e['n_failed']} failed run(s)")
        if e.get("untuned"):
            flags.append("not tuned: listed, not ranked beside tuned entries")
        edge = (e.get("selected") or {}).get("edge") or {}
        if edge:
            flags.append("selected at range edge: " + ", ".join(f"{k} ({v['edge']})" for k, v in edge.items()))
        row = [
            (str(e["rank"]) if e["rank"] is not None else "—", e["rank"]),
            (e["entry"], e["entry"]),
            (str(e["n_seeds"]), e["n_seeds"]),
            (f"{e['chance']['mean']:.3f}" if e["chance"]["mean"] is not None and not math.isnan(e["chance"]["mean"]) else "—",
             e["chance"]["mean"]),
            *[(fmt_ci(e["metrics"][m]), e["metrics"][m]["mean"]) for m in shown],
            (fmt_rate(e["train_tokens_per_s"]), e["train_tokens_per_s"]["mean"]),
            ("; ".join(flags), "; ".join(flags)),
        ]
        rows.append(row)
    return head, rows


def fmt_diff(d: dict | None, digits: int = 3) -> str:
    """Paired difference cell: '+0.012 [+0.004, +0.020] (n=5)'."""
    if not d or d.get("diff_mean") is None:
        return "—"
    s = f"{d['diff_mean']:+.{digits}f}"
    if d.get("ci_low") is not None:
        s += f" [{d['ci_low']:+.{digits}f}, {d['ci_high']:+.{digits}f}]"
    return s + f" (n={d['n']})"


def verdict_table(doc: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    """Each Hope entry vs the best non-Hope entry of its strategy per forgetting stream: paired
    differences (Hope − baseline)."""
    head = ["stream", "Hope entry", "baseline (same strategy)", "outcome (acc_final)", *[f"Δ {m}" for m in PAIRED_METRICS]]
    rows = [
        [(r["section"], r["section"]), (r["entry"], r["entry"]), (r["baseline"] or "—", r["baseline"] or ""),
         (r["outcome"], r["outcome"]),
         *[(fmt_diff(r[m]), (r[m] or {}).get("diff_mean")) for m in PAIRED_METRICS]]
        for r in doc["verdict"]
    ]
    return head, rows


def paired_table(section: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    """One row per entry: its paired differences against the section's baseline, metric by metric."""
    head = ["rank", "entry", *[f"Δ {m}" for m in PAIRED_METRICS]]
    by_entry: dict[str, dict] = {}
    for p in section["paired"]:
        by_entry.setdefault(p["entry"], {})[p["metric"]] = p
    ranks = {e["entry"]: e["rank"] for e in section["entries"]}
    rows = [
        [(str(ranks[name]) if ranks.get(name) is not None else "—", ranks.get(name)), (name, name),
         *[(fmt_diff(ms.get(m)), (ms.get(m) or {}).get("diff_mean")) for m in PAIRED_METRICS]]
        for name, ms in by_entry.items()
    ]
    return head, rows


def _fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def selection_table(doc: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    """One row per (entry, stream) whose runs carry a selection (nlbench leaderboard): the chosen
    values, the seeds they were tuned on (disjoint from the reporting seeds), edge flags."""
    head = ["stream", "entry", "selected values", "tuning seeds", "reporting seeds", "objective on tuning seeds",
            "trials", "at range edge"]
    rows = []
    for s in doc["streams"]:
        if not s["primary"]:
            continue
        for e in s["entries"]:
            sel = e.get("selected")
            if not sel:
                continue
            values = ", ".join(f"{k}={_fmt_value(v)}" for k, v in (sel.get("values") or {}).items())
            obj = sel.get("objective") or {}
            edge = ", ".join(f"{k} ({v['edge']})" for k, v in (sel.get("edge") or {}).items()) or "—"
            where = s.get("section") or s["stream"]
            rows.append([(where, where), (e["entry"], e["entry"]), (values, values),
                         (str(sel.get("tuning_seeds")), str(sel.get("tuning_seeds"))),
                         (str(e["seeds"]), str(e["seeds"])),
                         (f"{obj.get('metric')} = {obj['value']:.4f}" if obj.get("value") is not None else "—",
                          obj.get("value")),
                         (f"{sel.get('budget')}", sel.get("budget")), (edge, edge)])
    return head, rows


SELECTION_SENTENCE = ("Hyper-parameters chosen per entry and stream family by `nlbench leaderboard`: an equal trial "
                      "budget per entry on the tuning seeds, which are disjoint from the reporting seeds; a value at "
                      "the edge of its search range is flagged (the best value may lie outside it).")


def verdict_sentence(doc: dict) -> str:
    return ("Hope − the best non-Hope entry of the same strategy (by acc_final) on each forgetting stream, "
            "paired over common seeds, "
            "95% Student t interval; outcome on acc_final: better/worse when the interval excludes 0, else tie. "
            "Lower is better for Δ forgetting; read it with Δ plasticity.")


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c[0]).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def metric_notes(doc: dict) -> list[str]:
    lines = [f"- **{name}** = {info['formula']} — {info['source']}" for name, info in doc["metrics"].items()]
    return lines


def _md_section(s: dict) -> list[str]:
    direction = "higher is better" if s["higher_is_better"] else "lower is better; bwt/fwt/forgetting signs flipped"
    out = [f"### {s['section']} — {s['score']} ({direction}, T = {s['num_tasks']})", ""]
    if s.get("kind_reason"):
        out += [f"> {s['kind_reason']}", ""]
    out += [_md_table(*section_rows(s)), ""]
    if s["paired"]:
        out += [f"Paired differences against **{s['baseline']}** (entry − baseline, 95% CI over common seeds):", ""]
        out += [_md_table(*paired_table(s)), ""]
    return out


def render_markdown(doc: dict, throughput_md: str | None = None, figures: dict | None = None) -> str:
    out = ["# nlbench leaderboard", ""]
    abl = f" (CMS ablation from {', '.join(doc['ablation_sources'])})" if doc.get("ablation_sources") else ""
    out.append(f"Generated {doc['generated_at']} from {', '.join(doc['sources'])}{abl}.")
    out.append("")
    if doc["verdict"]:
        out += ["## Verdict: Hope vs the best baseline", "", verdict_sentence(doc), ""]
        out += [_md_table(*verdict_table(doc)), ""]
    elif doc["streams"]:
        out += ["## Verdict: Hope vs the best baseline", "", NO_VERDICT, ""]
    headline = {k: v for k, v in (figures or {}).items() if k in HEADLINE_FIGURES}
    if headline:
        out += ["## Headline figures", ""] + [f"![{k}]({v})" for k, v in headline.items()] + [""]
    from nlbench.report.cms_ablation import render_markdown as ablation_markdown

    out += ablation_markdown(doc.get("cms_ablation") or [], figures, _md_table)
    out += ["## Details", ""]
    out.append(f"Cells: seed mean [95% CI]. CI method: {doc['ci_method']}. {doc['did_not_learn_rule']}; "
               "such entries are flagged and not ranked. Ranking: " + doc["ranking_rule"] + ".")
    out.append("")
    for n in doc["notes"]:
        out += [f"> {n}", ""]
    for w in doc["warnings"]:
        out += [f"> **warning:** {w}", ""]
    sel_head, sel_rows = selection_table(doc)
    if sel_rows:
        out += ["## Selected hyper-parameters", "", SELECTION_SENTENCE, "", _md_table(sel_head, sel_rows), ""]
    forgetting = [s for s in doc["streams"] if s["kind"] == "forgetting"]
    capability = [s for s in doc["streams"] if s["kind"] == "capability"]
    if forgetting:
        out += ["## Forgetting streams", ""]
        for s in forgetting:
            out += _md_section(s)
    if capability:
        out += ["## Capability streams (not in the verdict)", "",
                "These streams test transfer or learnability at a budget rather than forgetting.", ""]
        for s in capability:
            out += _md_section(s)
    if doc["streams"]:
        out += ["## Metrics", ""] + metric_notes(doc) + [""]
    else:
        out += ["No completed runs to rank.", ""]
    rest = {k: v for k, v in (figures or {}).items() if k not in HEADLINE_FIGURES and not k.startswith("CMS ablation")}
    if rest:
        out += ["## Figures", ""] + [f"![{k}]({v})" for k, v in rest.items()] + [""]
    if throughput_md:
        out += [throughput_md, ""]
    return "\n".join(out)
