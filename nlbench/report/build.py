"""Everything `nlbench report` writes, from a list of result directories."""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("md", "html", "json")


def build_report(dirs, out_dir=None, formats=FORMATS, figures: bool = True, ablation_dirs=()) -> dict:
    """Read ``dirs`` (and ``ablation_dirs``, whose runs feed only the CMS ablation section), write leaderboard.{md,json,html}, throughput.md and figures/ into ``out_dir``
    (default: ``dirs[0]/report``). Returns {"files": [...], "warnings": [...], "doc": leaderboard}.

    Raises :class:`ReportError` for inputs that cannot give correct numbers.
    """
    from nlbench.report.load import ReportError, load_results
    from nlbench.storage import location

    bad = sorted(set(formats) - set(FORMATS))
    if bad:
        raise ReportError(f"format(s) {bad} unknown; allowed values are {', '.join(FORMATS)} (or 'all')")
    res = load_results(list(dirs))
    ablation = load_results(list(ablation_dirs)) if ablation_dirs else None

    target = location(out_dir) if out_dir else location(dirs[0]).child("report")
    if not target.local:  # render locally, then upload each file whole
        import tempfile

        with tempfile.TemporaryDirectory(prefix="nlbench-report-") as tmp:
            got = _build(res, Path(tmp), formats, figures, ablation)
            files = []
            for f in got["files"]:
                rel = Path(f).relative_to(tmp).as_posix()
                files.append(target.write(rel, Path(f).read_bytes()))
            return dict(got, files=files)
    out = Path(target.root)
    out.mkdir(parents=True, exist_ok=True)
    return _build(res, out, formats, figures, ablation)


def report_document(res, ablation=None) -> tuple[dict, dict | None]:
    """(leaderboard.json's document, the throughput report or None) of loaded results."""
    from nlbench.report import leaderboard as lb
    from nlbench.report import throughput as tp

    doc = lb.build_leaderboard(res, ablation)
    rep = tp.throughput_report(res.throughput) if not res.throughput.empty else None
    if rep is not None:
        doc["throughput"] = lb._clean(rep)
    return doc, rep


def _build(res, out: Path, formats, figures: bool, ablation=None) -> dict:
    from nlbench.report import html as H
    from nlbench.report import leaderboard as lb
    from nlbench.report import throughput as tp
    from nlbench.report.figures import make_figures

    doc, rep = report_document(res, ablation)
    from nlbench.report.cms_ablation import ablation_figures
    figs = {}
    if figures:
        figs = make_figures(doc, res, out / "figures")
        figs.update(ablation_figures(doc["cms_ablation"], out / "figures"))
        if rep is not None and rep["rows"]:
            figs["throughput"] = tp.bar_chart(rep, out / "figures" / "throughput")
        if rep is not None and rep["stream"]:
            figs["streaming: per-token cost vs T"] = tp.stream_chart(rep, out / "figures" / "stream")
    rel = {k: str(Path(v[0]).relative_to(out)) for k, v in figs.items()}
    written = []
    tp_md = tp.render_markdown(rep) if rep is not None and (rep["rows"] or rep["stream"]) else None
    if "md" in formats:
        (out / "leaderboard.md").write_text(lb.render_markdown(doc, tp_md, rel))
        written.append(out / "leaderboard.md")
        if tp_md:
            (out / "throughput.md").write_text(tp_md + "\n")
            written.append(out / "throughput.md")
    if "json" in formats:
        (out / "leaderboard.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
        written.append(out / "leaderboard.json")
    if "html" in formats:
        (out / "leaderboard.html").write_text(H.render_html(doc, rep, figs))
        written.append(out / "leaderboard.html")
    written += [Path(p) for v in figs.values() for p in v]
    return {"files": [str(p) for p in written], "warnings": doc["warnings"], "doc": doc}
