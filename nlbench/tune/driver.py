"""The tuner: `run_tune` asks the study for trials, sends each to Ray as one task, tells the
study what came back, and writes OUT.

Ask-and-tell in the driver: this process owns the `optuna.Study` and is the only writer of OUT's
Parquet tables (as in `nlbench.execution`). One Ray task per trial holds
`resources.cpus_per_trial` CPUs and `gpus_per_trial` GPUs; at most `parallel` trials are in
flight (default: as many as the cluster fits). `--trials N` is the study's total: a re-run counts
the finished trials in the storage and runs only the missing ones. On a multi-node cluster OUT must
be on storage every node sees (trials write their per-task checkpoints there).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import yaml

from nlbench.runner import STOPPED
from nlbench.tune.config import TuneConfig, TuneConfigError, apply_sample
from nlbench.tune.objective import objective_noise
from nlbench.tune.outputs import export_config, write_plots, write_trial
from nlbench.tune.space import flat_params, sample_overrides
from nlbench.tune.study import (JOURNAL_NAME, finished_count, is_rdb_url, open_storage, open_study,
                                recover_interrupted, tuner_lock)
from nlbench.tune.trial import execute_trial

__all__ = ["run_tune"]


def _param_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_tune(tc: TuneConfig, experiment: dict, out_dir, *, trials: int | None = None, parallel: int | None = None,
             storage: str | None = None, address: str | None = None, log=print) -> dict:
    """Run the study until it has `trials` finished trials (default: the config's), write outputs.
    One tuner per study at a time (`tuner_lock`).

    Returns {study, finished, new, failed, pruned, interrupted, best (values/params/number or
    pareto list), importances, storage, wall_s, plots}.
    """
    storage_url = storage or str(Path(out_dir).absolute() / JOURNAL_NAME)
    if is_rdb_url(storage_url):
        open_storage(storage_url)  # a bad RDB URL fails before anything is written
    with tuner_lock(tc, storage_url, Path(out_dir).absolute()):
        return _run_tune(tc, experiment, out_dir, trials=trials, parallel=parallel, storage=storage,
                         address=address, log=log)


def _run_tune(tc: TuneConfig, experiment: dict, out_dir, *, trials: int | None = None, parallel: int | None = None,
              storage: str | None = None, address: str | None = None, log=print) -> dict:
    import optuna
    import ray
    from optuna.trial import TrialState

    from nlbench.config import ConfigError, expand_runs, validate_config
    from nlbench.execution import connect, sweep_capacity
    from nlbench.results import ResultStore

    t0 = time.perf_counter()
    out = Path(out_dir).absolute()
    total = int(trials if trials is not None else tc.trials)
    if total < 1:
        raise TuneConfigError(f"--trials must be >= 1 (the study's total number of finished trials); got {total}.")
    if parallel is not None and parallel < 1:
        raise TuneConfigError(f"--parallel must be >= 1; got {parallel}.")
    storage_url = storage or str(out / JOURNAL_NAME)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(tc, storage_url)
    out.mkdir(parents=True, exist_ok=True)
    stored_dirs = [d.name for d in study.directions]
    wanted = [o.direction for o in tc.objectives]
    if [d.lower() for d in stored_dirs] != wanted:
        raise TuneConfigError(f"study {tc.study_name!r} in {storage_url} has directions {stored_dirs}; the config asks "
                              f"for {wanted}. Use another study.name or --out.")
    lost = recover_interrupted(study)
    if lost:
        log(f"trials {lost} were left running by an earlier tuner: marked FAIL (interrupted), parameters re-enqueued")
    store = ResultStore(out)
    objectives = tc.objectives
    prune = len(objectives) == 1 and tc.study.pruner != "none"
    cpus, gpus = tc.resources.cpus_per_trial, tc.resources.gpus_per_trial
    counts = dict(new=0, complete=0, pruned=0, failed=0)
    need = total - finished_count(study)

    started_ray = False
    if need > 0:
        started_ray = connect(address)
        width = sweep_capacity(cpus, gpus)
        if width == 0:
            raise TuneConfigError(f"no node can hold one trial: resources.cpus_per_trial={cpus}, gpus_per_trial={gpus}, "
                                  f"cluster {ray.cluster_resources()}.")
        width = min(width, parallel or tc.parallel or width)
        remote = ray.remote(execute_trial).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
    in_flight: dict = {}
    busy_keys: set[str] = set()
    try:
        while need > 0 or in_flight:
            while need > 0 and len(in_flight) < width:
                trial = study.ask()
                overrides = sample_overrides(tc.space, trial)
                trial.set_user_attr("overrides", overrides)
                need -= 1
                counts["new"] += 1
                try:
                    specs = expand_runs(validate_config(apply_sample(experiment, overrides), source="trial"))
                except ConfigError as e:  # a sample the model rejects: a failed trial, not a crash
                    trial.set_user_attr("fail_reason", str(e)[:2000])
                    study.tell(trial, state=TrialState.FAIL)
                    counts["failed"] += 1
                    write_trial(store, tc.study_name, study.trials[trial.number], objectives, experiment)
                    continue
                trial.set_user_attr("run_ids", [s.run_id for s in specs])
                key = _param_key(trial.params)
                if key in busy_keys:
                    key = f"{key}-t{trial.number}"
                busy_keys.add(key)
                payload = dict(specs=specs, checkpoint_dir=str(out / "checkpoints" / key), cpus=cpus, gpus=gpus,
                               objectives=[o.model_dump() for o in objectives], prune=prune, study=tc.study_name,
                               storage=storage_url, trial_id=trial._trial_id, tune_config=tc.model_dump(mode="json"))
                in_flight[remote.remote(payload)] = (trial, key, time.perf_counter())
                log(f"trial {trial.number} started: {json.dumps(flat_params(overrides))}")
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                trial, key, t_start = in_flight.pop(ref)
                busy_keys.discard(key)
                try:
                    res = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a crashed worker fails its trial, not the study
                    res = dict(state="fail", values=None, reason=f"trial task crashed: {type(e).__name__}: {e}"[:2000],
                               records=[])
                for rec in res["records"]:
                    if rec.run["status"] != STOPPED:  # a pruned or failed trial's unfinished runs are no results
                        store.write_run(rec)
                if res["state"] == "complete":
                    trial.set_user_attr("per_run_values", res.get("per_run_values"))
                    study.tell(trial, res["values"] if len(objectives) > 1 else res["values"][0])
                    counts["complete"] += 1
                elif res["state"] == "pruned":
                    study.tell(trial, state=TrialState.PRUNED)
                    counts["pruned"] += 1
                else:
                    trial.set_user_attr("fail_reason", res["reason"])
                    study.tell(trial, state=TrialState.FAIL)
                    counts["failed"] += 1
                ft = study.trials[trial.number]
                write_trial(store, tc.study_name, ft, objectives, experiment)
                shown = res["values"] if res["state"] == "complete" else res["reason"]
                log(f"trial {trial.number} {res['state']} in {time.perf_counter() - t_start:.1f}s: {shown}")
    finally:
        if started_ray:
            ray.shutdown()
    return _finish(study, tc, experiment, out, store, storage_url, counts, lost, t0)


def _finish(study, tc, experiment, out, store, storage_url, counts, lost, t0) -> dict:
    from optuna.trial import TrialState

    objectives = tc.objectives
    for t in study.get_trials(deepcopy=False):  # every trial's row, interrupted ones included
        if t.state != TrialState.RUNNING and t.state != TrialState.WAITING:
            write_trial(store, tc.study_name, t, objectives, experiment)
    summary = dict(study=tc.study_name, storage=storage_url, finished=finished_count(study), interrupted=lost,
                   **counts, best=None, pareto=[], importances={}, plots=[])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        if len(objectives) == 1:
            b = study.best_trial
            export_config(experiment, b.user_attrs["overrides"], out / "best.yaml",
                          f"nlbench tune: best trial {b.number} of study {tc.study_name!r}, "
                          f"{objectives[0].label} = {b.value:.6g} ({objectives[0].direction})\n"
                          f"searched: {json.dumps(flat_params(b.user_attrs['overrides']))}")
            summary["best"] = dict(number=b.number, value=b.value, overrides=b.user_attrs["overrides"],
                                   path=str(out / "best.yaml"))
        else:
            for b in study.best_trials:
                p = out / "pareto" / f"trial-{b.number:05d}.yaml"
                vals = ", ".join(f"{o.label} = {v:.6g}" for o, v in zip(objectives, b.values))
                export_config(experiment, b.user_attrs["overrides"], p,
                              f"nlbench tune: Pareto-optimal trial {b.number} of study {tc.study_name!r}: {vals}\n"
                              f"searched: {json.dumps(flat_params(b.user_attrs['overrides']))}")
                summary["pareto"].append(dict(number=b.number, values=list(b.values), overrides=b.user_attrs["overrides"],
                                              path=str(p)))
    plots, importances = write_plots(study, objectives, out)
    summary["noise"] = objective_noise(complete, objectives)
    if summary["noise"]:
        (out / "noise.yaml").write_text(yaml.safe_dump(summary["noise"], sort_keys=False))
    summary["plots"] = [str(p) for p in plots]
    summary["importances"] = importances
    if importances:
        (out / "importances.yaml").write_text(yaml.safe_dump(importances, sort_keys=False))
    try:
        (out / "checkpoints").rmdir()  # only when empty: no trial left a run to resume
    except OSError:
        pass
    summary["wall_s"] = time.perf_counter() - t0
    return summary
