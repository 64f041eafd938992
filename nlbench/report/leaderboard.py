"""The leaderboard: per stream, entries ranked by final accuracy, with every metric's 95% CI.

An *entry* is one configuration evaluated over several seeds: model label, size, protocol,
strategy, and — when runs of the same label differ in anything else (learning rate, tokens per
task, …) — a short fingerprint of that configuration, so two configurations are never pooled as
if they were seeds of one.

Per-run metrics come from :func:`nlbench.metrics.per_run_metrics` (``docs/METRICS.md``), seed
aggregation from :func:`nlbench.metrics.aggregate` (:data:`nlbench.metrics.CI_METHOD`). Sections
are per (stream, score): ``accuracy`` (higher is better) and, for language-modelling streams,
``loss`` (lower is better; the transfer metrics are computed on −R so a positive BWT/FWT still
means "helped" and a positive forgetting "got worse").

Overall ranking: mean win rate. In each stream's primary section (accuracy when the stream has
it, else loss) and for each ranked metric, an entry's win rate is the share of the *other* ranked
entries it beats on the seed mean (ties count half); the overall score is the mean over metrics
and streams. Entries flagged "did not learn" are listed but never ranked.
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

SCHEMA_VERSION = 1
# The metrics of the table, in the order shown; lca needs current-task curves, so it is JSON only.
TABLE_METRICS = ("acc_final", "bwt", "forgetting", "fwt", "plasticity", "acc_avg_incremental")
RANKED_METRICS = TABLE_METRICS
LOSS_NOTE = (
    "Loss sections (language-modelling streams): lower is better for acc_final, "
    "acc_avg_incremental and plasticity (they are mean losses); bwt, fwt and forgetting are computed "
    "on −R, i.e. their signs flip relative to the formulas, so that positive bwt/fwt still means "
    "'helped' and positive forgetting 'got worse'."
)
_ENTRY_KEYS = ("model", "size", "protocol", "strategy")
NO_OVERALL = "None: no stream has two or more entries that learned, so there is nobody to beat."
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
    n_fp = runs.groupby(["stream", "entry"])["fingerprint"].transform("nunique")
    runs.loc[n_fp > 1, "entry"] = base[n_fp > 1] + "#" + runs.loc[n_fp > 1, "fingerprint"]
    return runs


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


def _rank_section(entries: list[dict], score: str) -> None:
    """Set 'rank' (1 = best acc_final) on learned entries with a defined acc_final; others None."""
    hib = higher_is_better("acc_final", score)
    rankable = [e for e in entries if not e["did_not_learn"] and not math.isnan(e["metrics"]["acc_final"]["mean"])]
    rankable.sort(key=lambda e: ((-1 if hib else 1) * e["metrics"]["acc_final"]["mean"], e["entry"]))
    for e in entries:
        e["rank"] = None
    for i, e in enumerate(rankable, 1):
        e["rank"] = i
    entries.sort(key=lambda e: (e["rank"] is None, e["rank"] or 0, e["entry"]))


def win_rates(entries: list[dict], score: str, metrics=RANKED_METRICS) -> dict[str, float]:
    """Mean over ``metrics`` of the share of other ranked entries each ranked entry beats.

    Ties count half; a metric undefined (NaN) for an entry is skipped for it and does not count as
    an opponent. Sections with fewer than two ranked entries give no win rate (nothing to beat).
    """
    ranked = [e for e in entries if e["rank"] is not None]
    if len(ranked) < 2:
        return {}
    per_entry: dict[str, list[float]] = {e["entry"]: [] for e in ranked}
    for m in metrics:
        sign = 1.0 if higher_is_better(m, score) else -1.0
        vals = {e["entry"]: e["metrics"][m]["mean"] for e in ranked if not math.isnan(e["metrics"][m]["mean"])}
        if len(vals) < 2:
            continue
        for name, v in vals.items():
            others = [w for o, w in vals.items() if o != name]
            beaten = sum(1.0 if sign * (v - w) > 0 else 0.5 if v == w else 0.0 for w in others)
            per_entry[name].append(beaten / len(others))
    return {k: float(np.mean(v)) for k, v in per_entry.items() if v}


def build_leaderboard(res: Results) -> dict:
    """The leaderboard document (the JSON of ``reports/README.md``, schema_version 1)."""
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
        "ranking_rule": (
            "per stream: entries that learned, by acc_final seed mean; overall: mean win rate over "
            f"{', '.join(RANKED_METRICS)} in each stream's primary section (accuracy if present, else loss), "
            "win rate = share of the other ranked entries beaten on the seed mean, ties count half"
        ),
        "notes": [],
        "warnings": list(res.warnings),
        "streams": [],
        "overall": [],
    }
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
    keep = ["run_id", "entry", "config_dict", "status", *_ENTRY_KEYS, *[c for c in ("seed", "train_tokens_per_s") if c in runs]]
    per_run = per_run.drop(columns=["model", "seed"]).merge(runs[[c for c in keep if c in runs]], on="run_id", how="left")
    if set(LOWER_IS_BETTER) & set(per_run["score"]):
        doc["notes"].append(LOSS_NOTE)
    dup = per_run.groupby(["stream", "score", "entry", "seed"]).size()
    if (dup > 1).any():
        raise ReportError(f"entry/seed pairs with more than one run: {list(dup[dup > 1].index)[:3]}; cannot aggregate seeds")

    failed = runs[status != "completed"]
    chance_of = _run_chance(done)
    for (stream, score), sec in per_run.groupby(["stream", "score"], sort=True):
        entries = []
        for entry, g in sec.groupby("entry", sort=True):
            first = g.iloc[0]
            flags = [bool(f) for f in g["did_not_learn"] if f is not None and not (isinstance(f, float) and math.isnan(f))]
            n_dnl = sum(flags)
            f_runs = failed[(failed["entry"] == entry) & (failed["stream"] == stream)]
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
                "metrics": {m: _agg(g[m]) for m in M.METRIC_NAMES},
                # mean per-task chance of each run (majority baseline), over seeds
                "chance": _agg([chance_of.get(r, math.nan) for r in g["run_id"]]),
                "train_tokens_per_s": _agg(g["train_tokens_per_s"]) if "train_tokens_per_s" in g else _agg([]),
                "config": {k: v for k, v in first["config_dict"].items() if k != "seed"},
                "environment": _environment(runs[runs["run_id"].isin(set(g["run_id"]))]),
            })
        _rank_section(entries, score)
        doc["streams"].append({
            "stream": stream,
            "score": score,
            "higher_is_better": score not in LOWER_IS_BETTER,
            "num_tasks": int(sec["T"].max()),
            "entries": entries,
        })
    doc["overall"] = overall_ranking(doc["streams"])
    return _clean(doc)


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


def overall_ranking(sections: list[dict]) -> list[dict]:
    by_stream: dict[str, dict] = {}
    for s in sections:  # primary section: accuracy when the stream has it
        if s["stream"] not in by_stream or s["score"] == "accuracy":
            by_stream[s["stream"]] = s
    per_entry: dict[str, dict] = {}
    for stream, s in sorted(by_stream.items()):
        for name, wr in win_rates(s["entries"], s["score"]).items():
            e = next(x for x in s["entries"] if x["entry"] == name)
            rec = per_entry.setdefault(name, {"entry": name, **{k: e[k] for k in _ENTRY_KEYS}, "per_stream": {}})
            rec["per_stream"][stream] = wr
    rows = []
    for rec in per_entry.values():
        rec["win_rate"] = float(np.mean(list(rec["per_stream"].values())))
        rec["n_streams"] = len(rec["per_stream"])
        rows.append(rec)
    rows.sort(key=lambda r: (-r["win_rate"], r["entry"]))
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


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
    head = ["rank", "entry", "seeds", *TABLE_METRICS, "train tok/s", "flags"]
    rows = []
    for e in section["entries"]:
        flags = []
        if e["did_not_learn"]:
            flags.append(f"did not learn ({e['n_did_not_learn']}/{e['n_seeds']} seeds)")
        if e["n_failed"]:
            flags.append(f"{e['n_failed']} failed run(s)")
        row = [
            (str(e["rank"]) if e["rank"] is not None else "—", e["rank"]),
            (e["entry"], e["entry"]),
            (str(e["n_seeds"]), e["n_seeds"]),
            *[(fmt_ci(e["metrics"][m]), e["metrics"][m]["mean"]) for m in TABLE_METRICS],
            (fmt_rate(e["train_tokens_per_s"]), e["train_tokens_per_s"]["mean"]),
            ("; ".join(flags), "; ".join(flags)),
        ]
        rows.append(row)
    return head, rows


def overall_rows(doc: dict) -> tuple[list[str], list[list[tuple[str, object]]]]:
    streams = sorted({s for r in doc["overall"] for s in r["per_stream"]})
    head = ["rank", "entry", "win rate", "streams", *streams]
    rows = [
        [
            (str(r["rank"]), r["rank"]), (r["entry"], r["entry"]), (f"{r['win_rate']:.3f}", r["win_rate"]),
            (str(r["n_streams"]), r["n_streams"]),
            *[(f"{r['per_stream'][s]:.3f}" if s in r["per_stream"] else "—", r["per_stream"].get(s)) for s in streams],
        ]
        for r in doc["overall"]
    ]
    return head, rows


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c[0]).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def metric_notes(doc: dict) -> list[str]:
    lines = [f"- **{name}** = {info['formula']} — {info['source']}" for name, info in doc["metrics"].items()]
    return lines


def render_markdown(doc: dict, throughput_md: str | None = None, figures: dict | None = None) -> str:
    out = ["# nlbench leaderboard", ""]
    out.append(f"Generated {doc['generated_at']} from {', '.join(doc['sources'])}.")
    out.append("")
    out.append(f"Cells: seed mean [95% CI]. CI method: {doc['ci_method']}. {doc['did_not_learn_rule']}; "
               "such entries are flagged and not ranked.")
    out.append("")
    for n in doc["notes"]:
        out += [f"> {n}", ""]
    for w in doc["warnings"]:
        out += [f"> **warning:** {w}", ""]
    if doc["overall"]:
        out += ["## Overall ranking (mean win rate)", "", doc["ranking_rule"] + ".", ""]
        out += [_md_table(*overall_rows(doc)), ""]
    elif doc["streams"]:
        out += ["## Overall ranking", "", NO_OVERALL, ""]
    for s in doc["streams"]:
        direction = "higher is better" if s["higher_is_better"] else "lower is better; bwt/fwt/forgetting signs flipped"
        out += [f"## {s['stream']} — {s['score']} ({direction}, T = {s['num_tasks']})", ""]
        out += [_md_table(*section_rows(s)), ""]
    if doc["streams"]:
        out += ["## Metrics", ""] + metric_notes(doc) + [""]
    else:
        out += ["No completed runs to rank.", ""]
    if figures:
        out += ["## Figures", ""] + [f"![{k}]({v})" for k, v in figures.items()] + [""]
    if throughput_md:
        out += [throughput_md, ""]
    return "\n".join(out)
