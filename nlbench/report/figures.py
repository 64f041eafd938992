"""Report figures (matplotlib Agg, PNG + SVG): forgetting curves, accuracy-matrix heatmaps,
retention curves of in-context entries, final accuracy vs forgetting, accuracy vs throughput.

Every figure is drawn per stream setting (section label: stream, protocol and stream
configuration) from its primary section (accuracy when it has it, else loss) of the leaderboard
document, so the points are the same seed means the tables show.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FORMATS = ("png", "svg")
# SVG text stays text (smaller, searchable) and the output is reproducible run to run.
matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "nlbench"})


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "x"


def save(fig, stem, formats=FORMATS) -> list[str]:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in formats:
        p = stem.with_name(stem.name + "." + f)
        fig.savefig(p, format=f, dpi=110, bbox_inches="tight", metadata={"Date": None} if f == "svg" else None)
        paths.append(str(p))
    return paths


def label(section: dict) -> str:
    """The section's stream setting (documents written before the `section` key: the stream)."""
    return section.get("section") or section["stream"]


def primary_sections(doc: dict) -> list[dict]:
    by = {}
    for s in doc["streams"]:
        if label(s) not in by or s["score"] == "accuracy":
            by[label(s)] = s
    return [by[k] for k in sorted(by)]


def _grid(n: int, sharey: bool = False):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False, sharey=sharey)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()


def task_boundaries(curves: pd.DataFrame) -> list[float]:
    """Tokens seen at the start of every task but the first. A task's curve opens with the score
    measured before its first step (nlbench.protocol.loop), i.e. at the end of the previous task;
    the previous task's last own point is one `eval_every` earlier, not the boundary."""
    starts = curves.groupby("train_task")["tokens_seen"].min().sort_index()
    return [float(x) for x in starts.iloc[1:]]


def forgetting_curves(section: dict, curves: pd.DataFrame, stem) -> list[str] | None:
    """Score on each task vs tokens seen, one panel per entry (seed mean), task boundaries dashed."""
    c = curves[curves["metric"] == section["score"]] if "metric" in curves else curves
    entries = [e for e in section["entries"] if c["run_id"].isin(e["run_ids"]).any()]
    if not entries:
        return None
    fig, axes = _grid(len(entries), sharey=True)  # one y scale: panels compare models
    for ax, e in zip(axes, entries):
        g = c[c["run_id"].isin(e["run_ids"])]
        for task, h in g.groupby("eval_task"):
            m = h.groupby("tokens_seen")["value"].mean()
            ax.plot(m.index, m.values, marker=".", ms=3, lw=1.2, label=f"task {int(task)}")
        for x in task_boundaries(g):
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        ax.set_title(e["entry"] + (" (did not learn)" if e["did_not_learn"] else ""), fontsize=9)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel(section["score"])
        ax.legend(fontsize=7)
    fig.suptitle(f"{label(section)}: forgetting curves (seed mean; dashed: task boundaries)", fontsize=10)
    fig.tight_layout()
    paths = save(fig, stem)
    plt.close(fig)
    return paths


def heatmaps(section: dict, matrix: pd.DataFrame, stem) -> list[str] | None:
    """Seed-mean accuracy matrix per entry: rows = after task (init first), columns = eval task."""
    mx = matrix[matrix["metric"] == section["score"]]
    entries = [e for e in section["entries"] if mx["run_id"].isin(e["run_ids"]).any()]
    if not entries:
        return None
    T = section["num_tasks"]
    fig, axes = _grid(len(entries))
    vals = mx["value"].astype(float)
    vmin, vmax = float(vals.min()), float(vals.max())
    cmap = "viridis" if section["higher_is_better"] else "viridis_r"
    for ax, e in zip(axes, entries):
        g = mx[mx["run_id"].isin(e["run_ids"])]
        A = np.full((T + 1, T), np.nan)
        for (a, j), v in g.groupby(["after_task", "eval_task"])["value"].mean().items():
            A[int(a) + 1, int(j)] = v
        im = ax.imshow(A, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for (i, j), v in np.ndenumerate(A):
            if not math.isnan(v):
                bright = (v - vmin) / (vmax - vmin or 1.0) > 0.6  # viridis turns yellow: dark text
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color=("k" if bright == section["higher_is_better"] else "w"))
        ax.set_xticks(range(T), [str(j) for j in range(T)])
        ax.set_yticks(range(T + 1), ["init"] + [str(i) for i in range(T)])
        ax.set_xlabel("eval task j")
        ax.set_ylabel("after task i")
        ax.set_title(e["entry"], fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"{label(section)}: R[i][j] ({section['score']}, seed mean)", fontsize=10)
    fig.tight_layout()
    paths = save(fig, stem)
    plt.close(fig)
    return paths


def _errbar(ax, entries, xget, yget):
    """Seed means with 95% CI bars; × marks an entry that did not learn."""
    for e in entries:
        x, y = xget(e), yget(e)
        if x["mean"] is None or y["mean"] is None:
            continue
        xe = None if x.get("ci_low") is None else [[x["mean"] - x["ci_low"]], [x["ci_high"] - x["mean"]]]
        ye = None if y.get("ci_low") is None else [[y["mean"] - y["ci_low"]], [y["ci_high"] - y["mean"]]]
        ax.errorbar([x["mean"]], [y["mean"]], xerr=xe, yerr=ye, fmt="x" if e["did_not_learn"] else "o", capsize=3,
                    label=e["entry"] + (" (did not learn)" if e["did_not_learn"] else ""))


def scatter_acc_forgetting(doc: dict, stem) -> list[str] | None:
    secs = [s for s in primary_sections(doc) if s["entries"]]
    if not secs:
        return None
    fig, axes = _grid(len(secs))
    for ax, s in zip(axes, secs):
        _errbar(ax, s["entries"], lambda e: e["metrics"]["forgetting"], lambda e: e["metrics"]["acc_final"])
        ax.set_xlabel("forgetting (lower is better)")
        ax.set_ylabel(f"acc_final ({s['score']})")
        ax.set_title(label(s), fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("final score vs forgetting (seed mean, 95% CI)", fontsize=10)
    fig.tight_layout()
    paths = save(fig, stem)
    plt.close(fig)
    return paths


def scatter_acc_throughput(doc: dict, stem) -> list[str] | None:
    secs = [s for s in primary_sections(doc) if any(e["train_tokens_per_s"]["mean"] for e in s["entries"])]
    if not secs:
        return None
    fig, axes = _grid(len(secs))
    for ax, s in zip(axes, secs):
        _errbar(ax, s["entries"], lambda e: e["train_tokens_per_s"], lambda e: e["metrics"]["acc_final"])
        ax.set_xscale("log")
        ax.set_xlabel("train tokens/s")
        ax.set_ylabel(f"acc_final ({s['score']})")
        ax.set_title(label(s), fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("final score vs training throughput", fontsize=10)
    fig.tight_layout()
    paths = save(fig, stem)
    plt.close(fig)
    return paths


def retention_figure(section: dict, matrix: pd.DataFrame, curves: pd.DataFrame, stem) -> list[str] | None:
    """In-context entries: score on a task against the tokens read since that task ended
    (nlbench.retention), mean over the entry's tasks and seeds, chance dashed."""
    from nlbench.retention import retention_curve

    entries = [e for e in section["entries"] if e.get("protocol") == "in_context"]
    if not entries:
        return None
    ids = {r for e in entries for r in e["run_ids"]}
    m = matrix[matrix["run_id"].isin(ids)]
    c = curves[curves["run_id"].isin(ids)] if curves is not None and not curves.empty else None
    curve = retention_curve(m, c, metric=section["score"])
    if curve.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for e in entries:
        pts = curve[curve["run_id"].isin(e["run_ids"])].groupby("tokens_since")["value"].mean()
        line, = ax.plot(pts.index, pts.values, marker="o", ms=3, label=e["entry"])
        chance = (e.get("chance") or {}).get("mean")
        if section["score"] == "accuracy" and chance is not None:
            ax.axhline(chance, ls="--", lw=0.8, color=line.get_color())
    ax.set_xlabel("tokens since the task ended")
    ax.set_ylabel(section["score"])
    ax.set_title(f"{label(section)}: retention")
    ax.legend(fontsize=7)
    paths = save(fig, stem)
    plt.close(fig)
    return paths


def make_figures(doc: dict, res, fig_dir) -> dict[str, list[str]]:
    """Draw every figure the inputs allow; returns {figure name: [png path, svg path]}."""
    fig_dir = Path(fig_dir)
    out: dict[str, list[str]] = {}
    for s in primary_sections(doc):
        name, lab = slug(label(s)), label(s)
        if not res.curves.empty:
            p = forgetting_curves(s, res.curves, fig_dir / f"curves_{name}")
            if p:
                out[f"forgetting curves: {lab}"] = p
        if not res.matrix.empty:
            p = heatmaps(s, res.matrix, fig_dir / f"matrix_{name}")
            if p:
                out[f"accuracy matrix: {lab}"] = p
            p = retention_figure(s, res.matrix, res.curves, fig_dir / f"retention_{name}")
            if p:
                out[f"retention: {lab}"] = p
    for title, fn, stem in (
        ("final score vs forgetting", scatter_acc_forgetting, "acc_vs_forgetting"),
        ("final score vs throughput", scatter_acc_throughput, "acc_vs_throughput"),
    ):
        p = fn(doc, fig_dir / stem)
        if p:
            out[title] = p
    return out
