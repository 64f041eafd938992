"""`nlbench report OUT [OUT2 …]`: leaderboard, figures and throughput report of result directories."""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="all", show_default=True, type=click.Choice(["md", "html", "json", "all"]),
              help="Leaderboard format(s) to write.")
@click.option("--out-dir", default=None, type=click.Path(file_okay=False), help="Where to write (default: first OUT/report).")
@click.option("--no-figures", is_flag=True, help="Skip the matplotlib figures.")
@click.option("--ablation", "ablation_dirs", multiple=True, type=click.Path(file_okay=False),
              help="Results directory of a CMS ablation (e.g. configs/cms-ablation.yaml's OUT), repeatable: its runs "
                   "feed only the report's CMS ablation section, never the ranked sections or the verdict.")
def report(dirs, fmt, out_dir, no_figures, ablation_dirs):
    """Rank models per stream (95% CI over seeds), draw figures, line up throughput per device."""
    from pathlib import Path

    from nlbench.preflight import check_writable
    from nlbench.report import ReportError, build_report

    check_writable(out_dir or (dirs[0] if "://" in dirs[0] else Path(dirs[0]) / "report"),
                   "--out-dir" if out_dir else "report folder")

    formats = ("md", "html", "json") if fmt == "all" else (fmt,)
    try:
        got = build_report(list(dirs), out_dir=out_dir, formats=formats, figures=not no_figures,
                           ablation_dirs=list(ablation_dirs))
    except ReportError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    for w in got["warnings"]:
        click.echo(f"warning: {w}", err=True)
    for f in got["files"]:
        click.echo(f)
