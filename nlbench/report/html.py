"""One static HTML page: verdict first, headline figures, then the leaderboard details and throughput.

Self-contained (no server, no network, no CDN): figures are embedded as base64 PNG, styles and
the sorting script are inline. Every table with class ``sortable`` reorders its rows when a
column header is clicked (again: reverse order); cells carry their raw value in ``data-sort`` so
numbers sort as numbers and empty cells ("—") always go last.
"""

from __future__ import annotations

import base64
import math
from html import escape
from pathlib import Path

from nlbench.report import leaderboard as lb
from nlbench.report import throughput as tp
from nlbench.report.figures import slug

SORT_JS = r"""
(function () {
  function key(cell) {
    var v = cell ? cell.getAttribute('data-sort') : '';
    if (v === null || v === '') return null;
    var x = Number(v);
    return isFinite(x) ? x : v.toLowerCase();
  }
  function compare(a, b) {
    if (typeof a === 'number' && typeof b === 'number') return a - b;
    return String(a) < String(b) ? -1 : String(a) > String(b) ? 1 : 0;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.addEventListener('click', function () {
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.map.call(body.rows, function (r, i) { return [key(r.cells[col]), i, r]; });
        rows.sort(function (p, q) {
          if (p[0] === null || q[0] === null) {   // missing values last, whatever the direction
            return (p[0] === null) - (q[0] === null) || p[1] - q[1];
          }
          var c = compare(p[0], q[0]);
          return (asc ? c : -c) || p[1] - q[1];
        });
        rows.forEach(function (r) { body.appendChild(r[2]); });
      });
    });
  });
})();
"""

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
td { white-space: nowrap; }
.scroll { overflow-x: auto; }
td:nth-child(2), th:nth-child(2) { text-align: left; }
th { background: #eef; cursor: pointer; user-select: none; }
th[aria-sort=ascending]::after { content: " ▲"; }
th[aria-sort=descending]::after { content: " ▼"; }
tr.dnl td { color: #999; }
.note { background: #ffd; padding: 0.4em 0.8em; border-left: 4px solid #cc4; }
.warn { background: #fee; padding: 0.4em 0.8em; border-left: 4px solid #c44; }
figure { margin: 1em 0; } figure img { max-width: 100%; }
"""


def _sort_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, (int, float)):
        return repr(float(v))
    return str(v)


def table_html(head, rows, table_id: str, row_classes=None) -> str:
    out = [f'<div class="scroll"><table class="sortable" id="{escape(table_id)}"><thead><tr>']
    out += [f'<th data-col="{i}">{escape(h)}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for k, r in enumerate(rows):
        cls = f' class="{row_classes[k]}"' if row_classes and row_classes[k] else ""
        out.append(f"<tr{cls}>" + "".join(f'<td data-sort="{escape(_sort_value(v))}">{escape(str(t))}</td>' for t, v in r) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _img(path: str, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{escape(alt)}</figcaption></figure>'


def _section_html(s: dict) -> list[str]:
    direction = "higher is better" if s["higher_is_better"] else "lower is better; bwt/fwt/forgetting signs flipped"
    p = [f"<h3>{escape(s.get('section') or s['stream'])} — {escape(s['score'])} ({direction}, T = {s['num_tasks']})</h3>"]
    if s.get("kind_reason"):
        p.append(f'<p class="note">{escape(s["kind_reason"])}</p>')
    head, rows = lb.section_rows(s)
    tid = f"stream-{slug(s.get('section') or s['stream'])}-{s['score']}"
    p.append(table_html(head, rows, tid, ["dnl" if e["did_not_learn"] else "" for e in s["entries"]]))
    if s["paired"]:
        p.append(f"<p>Paired differences against <b>{escape(s['baseline'])}</b> (entry − baseline, 95% CI over common seeds):</p>")
        p.append(table_html(*lb.paired_table(s), f"paired-{slug(s.get('section') or s['stream'])}-{s['score']}"))
    return p


def _ablation_html(ablations: list[dict], figures: dict) -> list[str]:
    """The CMS ablation section (nlbench.report.cms_ablation): verdict, then per stream figure and tables."""
    from nlbench.report import cms_ablation as ca

    if not ablations:
        return []
    p = ["<h2>CMS ablation: does multi-frequency CMS beat its controls?</h2>", f"<p>{escape(ca.INTRO)}</p>",
         f"<p><b>Verdict.</b> {escape(ca.verdict_text(ablations))}</p>", f"<p>Rule: {escape(ca.RULE)}.</p>"]
    for ab in ablations:
        p.append(f"<h3>{escape(ab['section'])}</h3><p>{escape(ab['verdict'])}.</p>")
        key = f"CMS ablation: {ab['section']}"
        paths = (figures or {}).get(key)
        if paths and paths[0].endswith(".png"):
            p.append(_img(paths[0], key))
        p.append(table_html(*ca.points_rows(ab), f"cms-points-{slug(ab['section'])}"))
        if ab["comparisons"]:
            p.append("<p>Paired differences (multi-frequency arm − control, per seed):</p>")
            p.append(table_html(*ca.pair_rows(ab), f"cms-pairs-{slug(ab['section'])}"))
    return p


def render_html(doc: dict, throughput: dict | None = None, figures: dict[str, list[str]] | None = None) -> str:
    """The page leads with the answer: verdict table, headline figures, then the details."""
    p = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">', "<title>nlbench leaderboard</title>",
         f"<style>{CSS}</style></head><body>", "<h1>nlbench leaderboard</h1>"]
    if doc.get("verdict"):
        p += ["<h2>Verdict: Hope vs the best baseline</h2>", f"<p>{escape(lb.verdict_sentence(doc))}</p>",
              table_html(*lb.verdict_table(doc), "verdict")]
    elif doc.get("streams"):
        p += ["<h2>Verdict: Hope vs the best baseline</h2>", f"<p>{escape(lb.NO_VERDICT)}</p>"]
    figures = figures or {}
    headline = {k: v for k, v in figures.items() if k in lb.HEADLINE_FIGURES}
    if headline:
        p.append("<h2>Headline figures</h2>")
        p += [_img(paths[0], name) for name, paths in headline.items() if paths and paths[0].endswith(".png")]
    p += _ablation_html(doc.get("cms_ablation") or [], figures)
    p.append("<h2>Details</h2>")
    if doc.get("sources"):
        abl = f" (CMS ablation from {', '.join(doc['ablation_sources'])})" if doc.get("ablation_sources") else ""
        p.append(f"<p>Generated {escape(doc['generated_at'])} from {escape(', '.join(doc['sources']) + abl)}. "
                 "Click a column header to sort.</p>")
        p.append(f"<p>Cells: seed mean [95% CI]. CI method: {escape(doc['ci_method'])}. "
                 f"{escape(doc['did_not_learn_rule'])}; such entries are greyed out and not ranked. "
                 f"Ranking: {escape(doc['ranking_rule'])}.</p>")
    for n in doc.get("notes", []):
        p.append(f'<p class="note">{escape(n)}</p>')
    for w in doc.get("warnings", []):
        p.append(f'<p class="warn">warning: {escape(w)}</p>')
    if doc.get("streams"):
        sel_head, sel_rows = lb.selection_table(doc)
        if sel_rows:
            p += ["<h2>Selected hyper-parameters</h2>", f"<p>{escape(lb.SELECTION_SENTENCE)}</p>",
                  table_html(sel_head, sel_rows, "selection")]
    forgetting = [s for s in doc.get("streams", []) if s["kind"] == "forgetting"]
    capability = [s for s in doc.get("streams", []) if s["kind"] == "capability"]
    if forgetting:
        p.append("<h2>Forgetting streams</h2>")
        for s in forgetting:
            p += _section_html(s)
    if capability:
        p += ["<h2>Capability streams (not in the verdict)</h2>",
              "<p>These streams test transfer or learnability at a budget rather than forgetting.</p>"]
        for s in capability:
            p += _section_html(s)
    if doc.get("streams"):
        p.append("<h2>Metrics</h2><ul>")
        p += [f"<li><b>{escape(k)}</b> = {escape(v['formula'])} — {escape(v['source'])}</li>" for k, v in doc["metrics"].items()]
        p.append("</ul>")
    if throughput and throughput["rows"]:
        p.append("<h2>Throughput</h2>")
        p.append(f"<p>{escape(tp.legend(throughput))}</p>")
        p.append(table_html(*tp.table_rows(throughput), "throughput"))
    if throughput and throughput.get("stream"):
        p.append("<h3>Streaming</h3>")
        p.append(f"<p>{escape(tp.STREAM_LEGEND)}</p>")
        p.append(table_html(*tp.stream_table_rows(throughput), "stream"))
    rest = {k: v for k, v in figures.items() if k not in lb.HEADLINE_FIGURES and not k.startswith("CMS ablation")}
    if rest:
        p.append("<h2>Figures</h2>")
        p += [_img(paths[0], name) for name, paths in rest.items() if paths and paths[0].endswith(".png")]
    p.append(f"<script>{SORT_JS}</script></body></html>")
    return "\n".join(p)
