"""`run_leaderboard`: select on the tuning seeds, run the reporting seeds, write the report.

OUT layout:
    tuning/study.journal          one Optuna journal holding every study (the resume state)
    tuning/<study>/               nlbench.tune's outputs of one (entry, family): trials table, runs
                                  of the tuning seeds, best.yaml, plots
    selection.json                per study: the selected values, tuning seeds, edge flags, noise
    runs/ matrix/ curves/         the reporting runs only (their run config carries `selected`)
    report/                       nlbench report of OUT: leaderboard.{md,json,html}, figures/

Resume: each study runs only its missing trials (nlbench.tune; a trial a killed driver left
running is re-run from its checkpoints), the sweep skips the reporting runs already completed in
OUT, and the report is rebuilt from OUT. A run config carries its selection, so a study that
selects differently after more trials gives new run ids (the old runs stay in OUT, with a warning).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path

from nlbench.selection.config import LeaderboardConfigError
from nlbench.selection.edges import edge_flags

UNTIL = ("tune", "runs", "report")


@contextlib.contextmanager
def _out_lock(out: Path):
    """One leaderboard driver per OUT (two would tell the same trials and write the same runs)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / ".leaderboard.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LeaderboardConfigError(f"--out {out} is in use by another `nlbench leaderboard` ({holder}); wait "
                                         f"for it to finish (re-running then resumes).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


def _write_json(path: Path, doc) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _selection(plan, study, summary: dict | None, tuning_seeds) -> dict | None:
    """The record of one study's choice (None without a complete trial)."""
    from optuna.trial import TrialState

    from nlbench.tune import finished_count

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    best = study.best_trial
    o = plan.tune_config.objectives[0]
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {
        "study": plan.name, "entry": plan.entry, "model": plan.model, "protocol": plan.protocol,
        "strategy": plan.strategy, "family": plan.family, "streams": list(plan.streams),
        "values": best.user_attrs["overrides"], "tuning_seeds": list(tuning_seeds), "trial": best.number,
        "objective": {"metric": o.label, "direction": o.direction, "value": best.value},
        "budget": plan.tune_config.trials, "finished": finished_count(study),
        "complete": states.count(TrialState.COMPLETE), "pruned": states.count(TrialState.PRUNED),
        "edge": edge_flags(best), "noise": ((summary or {}).get("noise") or {}).get(o.label),
    }


def run_config_selection(sel: dict) -> dict:
    """What a reporting run's config carries under `selected` (stable across re-runs: no noise)."""
    keep = ("values", "tuning_seeds", "study", "family", "trial", "objective", "budget", "edge")
    return {k: copy.deepcopy(sel[k]) for k in keep}


def report_specs(plan, sel: dict) -> list:
    """The reporting runs of one study: the reporting seeds with the selected values set."""
    from nlbench.config import RunSpec, compute_run_id, expand_runs, validate_config, validate_run_config
    from nlbench.tune import apply_sample

    cfg = validate_config(apply_sample(plan.report_experiment, sel["values"]), source=f"selection of {plan.name}")
    specs = []
    for s in expand_runs(cfg):
        config = validate_run_config(dict(s.config, selected=run_config_selection(sel))) if "pretrain" not in s.config \
            else dict(s.config, selected=run_config_selection(sel))
        specs.append(RunSpec(config=config, run_id=compute_run_id(config), resources=dict(s.resources)))
    return specs


def run_leaderboard(lc, plans, out_dir, *, address: str | None = None, parallel: int | None = None,
                    until: str = "report", figures: bool = True, log=print, studies_at_once: int | None = None) -> dict:
    """Tune every planned study to its budget, run the reporting seeds with the selected values,
    write selection.json and the report. Returns {selections, missing, sweep, report, wall_s}."""
    from nlbench.execution import connect, run_sweep

    if until not in UNTIL:
        raise LeaderboardConfigError(f"--until must be one of {', '.join(UNTIL)}; got {until!r}.")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    out = Path(out_dir).absolute()
    journal = out / "tuning" / "study.journal"
    started = False
    summary = dict(selections=[], missing=[], sweep=None, report=None, stale_runs=0)

    def connect_once() -> None:
        nonlocal started
        started = connect(address) or started

    with _out_lock(out):
        try:
            tuned = _tune_studies(plans, journal, out, address=address, parallel=parallel,
                                  at_once=studies_at_once or lc.studies_at_once, log=log, connect_once=connect_once)
            for plan, (study, tsum) in zip(plans, tuned):
                sel = _selection(plan, study, tsum, lc.tuning_seeds)
                if sel is None:
                    summary["missing"].append(plan.name)
                    log(f"study {plan.name}: no complete trial; entry {plan.entry} on {plan.family} is left out")
                    continue
                summary["selections"].append(sel)
                edges = ", ".join(f"{k}={v['value']:.4g} ({v['edge']} edge)" if isinstance(v["value"], float)
                                  else f"{k}={v['value']} ({v['edge']} edge)" for k, v in sel["edge"].items())
                log(f"study {plan.name}: selected {json.dumps(sel['values'])} ({sel['objective']['metric']} "
                    f"{sel['objective']['value']:.4f} on seeds {sel['tuning_seeds']})"
                    + (f"; AT THE EDGE of its range: {edges}" if edges else ""))
            _write_json(out / "selection.json", {"name": lc.name, "tuning_seeds": lc.tuning_seeds,
                                                 "studies": summary["selections"], "missing": summary["missing"]})
            if until == "tune":
                return _done(summary, t0)
            by_name = {p.name: p for p in plans}
            specs = [s for sel in summary["selections"] for s in report_specs(by_name[sel["study"]], sel)]
            summary["stale_runs"] = _stale_runs(out, {s.run_id for s in specs})
            if summary["stale_runs"]:
                log(f"warning: {summary['stale_runs']} run(s) in {out} are not runs of the current selection "
                    f"(an earlier selection or config); the report lists them as separate entries")
            from nlbench.results import ResultStore

            pending = set(s.run_id for s in specs) - ResultStore(out).completed_run_ids()
            if pending and not started:
                started = connect(address)
            log(f"reporting runs: {len(specs)} ({len(pending)} to run)")
            resources = plans[0].report_experiment["resources"] if plans else {}
            summary["sweep"] = run_sweep(specs, out, address=address, resources=resources, progress=False)
        finally:
            if started:
                import ray

                ray.shutdown()
        if until == "runs":
            return _done(summary, t0)
        from nlbench.report import build_report

        summary["report"] = build_report([str(out)], out_dir=str(out / "report"), figures=figures)
    return _done(summary, t0)


def _tune_studies(plans, journal: Path, out: Path, *, address, parallel, at_once: int, log, connect_once) -> list[tuple]:
    """Tune every study to its budget, ``at_once`` studies at a time, each in its own thread of this
    driver (their trials share the cluster through Ray's queue, so a study's last trial does not
    leave cores idle). Returns [(study, tuning summary)] in plan order; ``connect_once()`` joins Ray
    when a trial has to run.

    A study's samples do not depend on the others (each has its own seeded sampler and journal
    entry), so the selection is the same at any ``at_once``."""
    from concurrent.futures import ThreadPoolExecutor

    from nlbench.tune import finished_count, open_study, run_tune

    # one open per study (each open appends a create-if-missing record to the journal)
    studies = {p.name: open_study(p.tune_config, str(journal)) for p in plans}
    short = {p.name for p in plans if finished_count(studies[p.name]) < p.tune_config.trials}
    todo = [p for p in plans if p.name in short or not (out / "tuning" / p.name).is_dir()]
    if short:
        connect_once()

    def tune(plan):
        tc = plan.tune_config
        log(f"study {plan.name}: {finished_count(studies[plan.name])}/{tc.trials} trial(s) finished")
        return run_tune(tc, plan.tuning_experiment, out / "tuning" / plan.name, parallel=parallel,
                        storage=str(journal), address=address, log=lambda m, n=plan.name: log(f"  {n}: {m}"))

    sums = {}
    if todo:
        pool = ThreadPoolExecutor(max_workers=max(1, min(at_once, len(todo))), thread_name_prefix="study")
        try:
            futures = {p.name: pool.submit(tune, p) for p in todo}
            sums = {name: f.result() for name, f in futures.items()}
        finally:  # an error or ^C: queued studies are not started; running ones end with Ray's shutdown
            pool.shutdown(wait=False, cancel_futures=True)
    out_studies = []
    for plan in plans:
        study = open_study(plan.tune_config, str(journal)) if plan.name in sums else studies[plan.name]
        tsum = sums.get(plan.name)
        if tsum is None:
            from optuna.trial import TrialState

            from nlbench.tune import objective_noise

            complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            tsum = {"noise": objective_noise(complete, plan.tune_config.objectives)}
        out_studies.append((study, tsum))
    return out_studies


def _stale_runs(out: Path, current: set[str]) -> int:
    from nlbench.results import ResultStore

    if not (out / "runs").is_dir():
        return 0
    runs = ResultStore(out).read("runs")
    return int((~runs["run_id"].isin(current)).sum()) if not runs.empty else 0


def _done(summary: dict, t0: float) -> dict:
    summary["wall_s"] = time.perf_counter() - t0
    return summary
