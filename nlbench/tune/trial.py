"""One trial, the body of its Ray task: the trial's runs executed one task boundary at a time.

`execute_run(..., stop_after_task=i)` stops a run after task i with status `stopped`, keeping
the per-task checkpoint the runner writes; the next call resumes from it, so every run computes
exactly what one undisturbed call computes (runner contract), and between two tasks the trial
knows the score matrix so far. After task i it reports the objective on the tasks seen so far to
the Optuna storage (`trial.report(value, step=i)`) and asks `should_prune()`, so a median or
successive-halving pruner compares it with the other trials at the same task. Multi-objective
studies do not prune (Optuna has none).
"""

from __future__ import annotations

import math
import shutil
import warnings
from typing import Any

from nlbench.runner import STOPPED, execute_run
from nlbench.tune.config import TuneConfig
from nlbench.tune.objective import ObjectiveSpec, objective_value
from nlbench.tune.study import make_pruner, open_storage

__all__ = ["execute_trial"]


def execute_trial(payload: dict) -> dict:
    """Body of the Ray task: run the trial's runs task by task, report, maybe prune.

    Returns {state: complete | pruned | fail, values, reason, records, reported}.
    """
    import torch

    cpus, gpus = payload["cpus"], payload["gpus"]
    threads = max(1, int(math.floor(cpus)))
    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    specs, ckpt_dir = payload["specs"], payload["checkpoint_dir"]
    objectives = [ObjectiveSpec.model_validate(o) for o in payload["objectives"]]
    trial = None
    if payload["prune"]:
        import optuna

        tc = TuneConfig.model_validate(payload["tune_config"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.load_study(study_name=payload["study"], storage=open_storage(payload["storage"]),
                                      pruner=make_pruner(tc))
        trial = optuna.trial.Trial(study, payload["trial_id"])
    last: dict[str, Any] = {}
    open_ids = [s.run_id for s in specs]
    reported, step = [], 0
    while open_ids:
        for spec in specs:
            if spec.run_id not in open_ids:
                continue
            rec = execute_run(spec, checkpoint_dir=ckpt_dir, device=device, threads=threads, stop_after_task=step)
            last[spec.run_id] = rec
            if rec.run["status"] == "completed":
                open_ids.remove(spec.run_id)
            elif rec.run["status"] != STOPPED:
                err = (rec.run.get("error") or rec.run["status"]).splitlines()[0]
                return dict(state="fail", values=None, reason=f"run {spec.name} {rec.run['status']}: {err}",
                            records=list(last.values()), reported=reported)
        if trial is not None and open_ids:
            value = objective_value(list(last.values()), objectives[0], upto=step)
            if math.isfinite(value):
                trial.report(value, step)
                reported.append((step, value))
                if trial.should_prune():
                    shutil.rmtree(ckpt_dir, ignore_errors=True)
                    return dict(state="pruned", values=None, reason=f"pruned after task {step}",
                                records=list(last.values()), reported=reported)
        step += 1
    records = [last[s.run_id] for s in specs]
    values = [objective_value(records, o) for o in objectives]
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if not all(math.isfinite(v) for v in values):
        return dict(state="fail", values=None, reason=f"objective value(s) not finite: {values}", records=records,
                    reported=reported)
    per_run = [[objective_value([rec], o) for o in objectives] for rec in records]
    return dict(state="complete", values=values, reason=None, records=records, reported=reported,
                per_run_values=per_run)
