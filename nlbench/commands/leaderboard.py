"""`nlbench leaderboard CONFIG --out OUT`: per entry and stream family, select hyper-parameters on
the tuning seeds (an equal Optuna trial budget each, trials on Ray), run the reporting seeds with
the chosen values, write the report (nlbench.selection).

Re-running resumes: finished trials and completed runs are kept. Exit codes: 0 done, 1 an entry
had no complete trial or a reporting run failed, 2 invalid config / arguments (nothing written).
"""

from __future__ import annotations

import sys

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder: tuning/ (Optuna journal, studies), selection.json, runs, report/.")
@click.option("--address", default=None, help="Ray cluster to join ('auto', 'ray://host:10001', 'host:port'); default: embedded Ray.")
@click.option("--parallel", "parallel", type=int, default=None, help="Trials of a study in flight at once (default: config's, else what the cluster fits).")
@click.option("--studies-at-once", "studies_at_once", type=int, default=None,
              help="Studies tuned at once, sharing the cluster (default: the config's studies_at_once, 2); "
                   "the selection does not depend on it.")
@click.option("--until", "until", default="report", show_default=True, type=click.Choice(["tune", "runs", "report"]),
              help="Stop after the selection (tune), after the reporting runs (runs), or write the report too.")
@click.option("--no-figures", is_flag=True, help="Skip the report's matplotlib figures.")
def leaderboard(config, out, address, parallel, studies_at_once, until, no_figures):
    """Select per entry on tuning seeds, run the reporting seeds, write OUT/report."""
    from nlbench.preflight import check_address, check_writable
    from nlbench.selection import load_leaderboard_config, run_leaderboard

    for flag, v in (("--parallel", parallel), ("--studies-at-once", studies_at_once)):
        if v is not None and v < 1:
            click.echo(f"error: {flag} must be >= 1; got {v}.", err=True)
            sys.exit(2)
    lc, plans = load_leaderboard_config(config)  # a user error: one paragraph, exit 2, nothing written
    if "://" in out:
        click.echo(f"error: --out {out!r}: the leaderboard keeps its Optuna journal and locks in OUT, so OUT must be "
                   f"a local (or shared-file-system) folder, not an object-store URI.", err=True)
        sys.exit(2)
    check_writable(out)
    check_address(address)
    click.echo(f"leaderboard {lc.name}: {len(plans)} studies of {lc.trials} trial(s) on seeds {lc.tuning_seeds} -> {out}")
    summary = run_leaderboard(lc, plans, out, address=address, parallel=parallel, until=until,
                              figures=not no_figures, log=click.echo, studies_at_once=studies_at_once)
    for sel in summary["selections"]:
        for name, e in sel["edge"].items():
            click.echo(f"edge: {sel['study']}: {name} = {e['value']} is at the {e['edge']} end of {e['range']}; "
                       f"widen the range", err=True)
    sweep = summary["sweep"] or {}
    if summary["report"]:
        for w in summary["report"]["warnings"]:
            click.echo(f"warning: {w}", err=True)
        click.echo(f"report: {out}/report/leaderboard.md")
    click.echo(f"done in {summary['wall_s']:.1f}s: {len(summary['selections'])} selection(s), "
               f"{len(summary['missing'])} without a complete trial; reporting runs: completed "
               f"{sweep.get('completed', 0)}, skipped {sweep.get('skipped', 0)}, failed {sweep.get('failed', 0)}")
    sys.exit(1 if summary["missing"] or sweep.get("failed") else 0)
