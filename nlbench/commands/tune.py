"""`nlbench tune CONFIG --out OUT`: an Optuna search whose trials run on Ray (nlbench.tune).

CONFIG names a base experiment (`base:` path or inline `experiment:`), the search space and the
objective(s). `--trials N` is the study's total: re-running with a larger N adds only the missing
trials, and re-running after a crash finishes the study (the Optuna storage in OUT is the single
source of truth). Exit codes: 0 done, 1 no trial completed, 2 invalid config / arguments.
"""

from __future__ import annotations

import json
import sys

import click


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder: Optuna journal, trials table, best.yaml / pareto/, plots.")
@click.option("--address", default=None, help="Ray cluster to join ('auto', 'ray://host:10001', 'host:port'); default: embedded Ray.")
@click.option("--trials", "trials", type=int, default=None, help="The study's TOTAL number of finished trials (default: the config's).")
@click.option("--storage", default=None, metavar="URL",
              help="Optuna storage: an RDB URL (sqlite:///…, postgresql://…) or a journal file path; default OUT/study.journal.")
@click.option("--parallel", "parallel", type=int, default=None, help="Trials in flight at once (default: config's, else what the cluster fits).")
def tune(config, out, address, trials, storage, parallel):
    """Search CONFIG's space with Optuna, trials executed on Ray, results into OUT."""
    from rich.console import Console
    from rich.table import Table

    from nlbench.execution import SweepError
    from nlbench.tune import TuneConfigError, load_tune_config, run_tune

    console = Console() if sys.stdout.isatty() else Console(width=160)
    if trials is not None and trials < 1:
        click.echo(f"error: --trials must be >= 1 (the study's total number of finished trials); got {trials}.", err=True)
        sys.exit(2)
    if parallel is not None and parallel < 1:
        click.echo(f"error: --parallel must be >= 1; got {parallel}.", err=True)
        sys.exit(2)
    from nlbench.preflight import check_address, check_writable

    check_writable(out)
    check_address(address)
    try:
        tc, experiment = load_tune_config(config)
        summary = run_tune(tc, experiment, out, trials=trials, parallel=parallel, storage=storage, address=address,
                           log=lambda m: console.print(m, markup=False, highlight=False))
    except (TuneConfigError, SweepError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)

    console.print(f"study {summary['study']} ({summary['storage']}): {summary['finished']} finished trial(s); this call "
                  f"ran {summary['new']} (complete {summary['complete']}, pruned {summary['pruned']}, failed "
                  f"{summary['failed']}) in {summary['wall_s']:.1f}s")
    names = [o.label for o in tc.objectives]
    if summary["best"]:
        b = summary["best"]
        console.print(f"best trial {b['number']}: {names[0]} = {b['value']:.4f} -> {b['path']}")
        console.print(f"  {json.dumps(b['overrides'])}", markup=False, highlight=False)
    if summary["pareto"]:
        table = Table(title=f"Pareto front ({len(summary['pareto'])} trials)")
        for h in ["trial", *names, "config"]:
            table.add_column(h)
        for p in summary["pareto"]:
            table.add_row(str(p["number"]), *(f"{v:.4g}" for v in p["values"]), p["path"])
        console.print(table)
    for target, imp in summary["importances"].items():
        console.print(f"importances ({target}): " + ", ".join(f"{k} {v:.2f}" for k, v in imp.items()), markup=False)
    for target, n in summary.get("noise", {}).items():
        verdict = ("the search space moves it beyond seed noise" if n["meaningful"] else
                   "NOT beyond seed noise: the best trial is a lucky draw and the importances mean nothing")
        console.print(f"signal ({target}): SD of the {n['trials']} trials' values {n['between_trials_sd']:.4g} vs the "
                      f"noise standard error {n['noise_se']:.4g} (ratio {n['ratio']:.2f}): {verdict}", markup=False)
    sys.exit(0 if (summary["best"] or summary["pareto"]) else 1)
