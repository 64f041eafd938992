"""`nlbench run CONFIG --out OUT`: execute every run of an experiment config, then summarize.

Runs go to Ray (`nlbench.execution.run_sweep`: embedded, or the cluster at --address) or, with
--sequential, one after the other in this process. Either way results land in OUT's Parquet
tables, runs already completed there are skipped, and the summary printed at the end is read
back from OUT: per model and stream, ACC, BWT, forgetting and plasticity as mean ± 95% CI over
seeds (n = seeds), and how many runs did not learn (plasticity not clearly above chance).
"""

from __future__ import annotations

import fnmatch
import math
import sys

import click


def select(specs, pattern: str | None):
    """--only: a glob over 'model/stream/protocol/strategy/seedN', or a plain substring of it."""
    if not pattern:
        return specs
    glob = any(c in pattern for c in "*?[")
    return [s for s in specs if (fnmatch.fnmatchcase(s.name, pattern) if glob else pattern in s.name)]


def _fmt(mean, lo, hi, n) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if n >= 2 and not math.isnan(lo):
        return f"{mean:.3f} ± {(hi - lo) / 2:.3f}"
    return f"{mean:.3f}"


def summary_rows(out_dir, run_ids: set[str]) -> tuple[list[str], list[list[str]], dict]:
    """Table rows per (model, stream[, protocol, strategy]) for the given run ids, from OUT."""
    from nlbench.metrics import aggregate_by, per_run_metrics
    from nlbench.results import ResultStore

    store = ResultStore(out_dir)
    runs = store.read("runs")
    runs = runs[runs["run_id"].isin(run_ids)]
    status = runs["status"].value_counts().to_dict()
    matrix = store.read("matrix")
    matrix = matrix[matrix["run_id"].isin(set(runs.loc[runs["status"] == "completed", "run_id"]))]
    if matrix.empty:
        return [], [], status
    curves = store.read("curves")
    curves = curves[curves["run_id"].isin(set(matrix["run_id"]))]
    per_run = per_run_metrics(matrix, runs=runs, curves=curves)
    per_run = per_run[per_run["score"] == "accuracy"].merge(runs[["run_id", "protocol", "strategy"]], on="run_id")
    by = ["model", "stream"]
    for extra in ("protocol", "strategy"):
        if per_run[extra].nunique() > 1:
            by.append(extra)
    agg = aggregate_by(per_run, by=by, metrics=["acc_final", "bwt", "forgetting", "plasticity"])
    header = [*by, "ACC", "BWT", "forgetting", "plasticity", "n seeds", "did not learn"]
    rows = []
    for key, g in agg.groupby(by, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        cell = {r.metric: (r.mean, r.ci_low, r.ci_high, r.n) for r in g.itertuples()}
        mask = (per_run[by] == list(key)).all(axis=1)
        flags = per_run.loc[mask, "did_not_learn"]
        n = int(mask.sum())
        dnl = f"{int(flags.fillna(False).astype(bool).sum())}/{n}"
        rows.append([*map(str, key), *(_fmt(*cell[m]) for m in ("acc_final", "bwt", "forgetting", "plasticity")),
                     str(n), dnl])
    return header, rows, status


def print_summary(console, out_dir, specs) -> dict:
    from rich.table import Table

    header, rows, status = summary_rows(out_dir, {s.run_id for s in specs})
    counts = ", ".join(f"{k} {v}" for k, v in sorted(status.items())) or "no runs recorded"
    if rows:
        table = Table(title=f"accuracy metrics, mean ± 95% CI half-width over seeds ({out_dir})")
        for h in header:
            table.add_column(h, justify="left" if h in ("model", "stream", "protocol", "strategy") else "right")
        for r in rows:
            table.add_row(*r)
        console.print(table)
    console.print(f"runs: {counts}")
    return status


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Results directory (Parquet tables).")
@click.option("--address", default=None, help="Ray cluster to join ('auto', 'ray://host:10001', 'host:port'); default: embedded Ray.")
@click.option("--sequential", is_flag=True, help="Run in this process one after the other, without Ray.")
@click.option("--only", "only", default=None, metavar="PATTERN",
              help="Only runs whose 'model/stream/protocol/strategy/seedN' matches (glob, or substring).")
@click.option("--device", default=None, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Override the config's train.device (--sequential only).")
def run(config, out, address, sequential, only, device):
    """Execute every run of CONFIG into OUT and print the summary table."""
    from rich.console import Console

    from nlbench.config import ConfigError, expand_runs, load_config

    # piped output (CI logs, tests) keeps the table readable instead of squeezing it to 80 columns
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        cfg = load_config(config)
        specs = expand_runs(cfg)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    specs = select(specs, only)
    if not specs:
        click.echo(f"error: --only {only!r} matches none of the config's runs (names look like "
                   f"'model/stream/protocol/strategy/seedN').", err=True)
        sys.exit(2)
    if sequential and address:
        click.echo("error: --sequential runs in this process; it cannot be combined with --address.", err=True)
        sys.exit(2)
    from nlbench.preflight import check_address, check_writable

    check_writable(out)
    check_address(address)
    console.print(f"config {cfg.name}: {len(specs)} run(s) -> {out}")
    announce_repairs(console, out, specs)

    if sequential:
        from nlbench.runner import sequential_threads

        threads = sequential_threads(cfg.resources.cpus_per_run)
        console.print(f"sequential: torch uses {threads} thread(s) (resources.cpus_per_run, at most this machine's CPUs)")
        _run_sequential(console, specs, out, device, threads)
    else:
        if device:
            click.echo("error: --device applies to --sequential; with Ray each run uses a GPU when the config's "
                       "resources.gpus_per_run > 0.", err=True)
            sys.exit(2)
        from nlbench.execution import run_sweep

        run_sweep(specs, out, address=address, resources=cfg.resources.model_dump())

    status = print_summary(console, out, specs)
    sys.exit(1 if status.get("failed") else 0)


def announce_repairs(console, out, specs) -> dict:
    """Say which of these runs are recomputed because their files in OUT were deleted or corrupted
    (nlbench.results.ResultStore.check_runs); returns run id -> what was wrong."""
    import os

    from nlbench.results import ResultStore
    from nlbench.storage import is_uri

    if not is_uri(out) and not os.path.isdir(out):
        return {}
    _, damaged = ResultStore(out).check_runs()
    names = {s.run_id: s.name for s in specs}
    found = {rid: why for rid, why in damaged.items() if rid in names}
    for rid, why in found.items():
        console.print(f"[yellow]recomputing[/yellow] {names[rid]} ({rid}): {why}")
    return found


def _run_sequential(console, specs, out, device, threads):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nlbench.runner import run_sequential

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as bar:
        overall = bar.add_task("runs", total=len(specs))
        current = {"id": None, "task": None}

        def on_step(spec, p):
            if current["id"] != spec.run_id:
                if current["task"] is not None:
                    bar.remove_task(current["task"])
                current["id"] = spec.run_id
                current["task"] = bar.add_task(f"  {spec.name}", total=p.total)
            bar.update(current["task"], completed=p.done, description=f"  {spec.name} {p.message}")

        def on_record(spec, record):
            bar.advance(overall)
            st = record.run["status"]
            color = {"completed": "green", "diverged": "yellow"}.get(st, "red")
            note = "" if st == "completed" else f": {(record.run['error'] or '').splitlines()[0]}"
            bar.console.print(f"[{color}]{st}[/{color}] {spec.name} ({record.run['wall_s']:.1f}s){note}")

        records = run_sequential(specs, out, device=device, progress=on_step, on_record=on_record, threads=threads)
        bar.update(overall, completed=len(specs))
    skipped = len(specs) - len(records)
    if skipped:
        console.print(f"{skipped} run(s) already completed in {out}: skipped")
