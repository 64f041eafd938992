"""What a study leaves in OUT besides its runs: the `trials` table (one row per trial and
objective, one `param_<config path>` column per searched value, e.g.
`param_model.options.cms_periods.1`), full experiment configs of the best / Pareto-optimal trials
(`nlbench run` accepts them unchanged) and PNG plots (history, parameter importances, Pareto front).
"""

from __future__ import annotations

import json
import warnings
from datetime import datetime, timezone
from pathlib import Path

import yaml

from nlbench.atomic import atomic_write_text
from nlbench.tune.config import apply_sample
from nlbench.tune.space import flat_params

__all__ = ["export_config", "trial_rows", "write_plots", "write_trial"]


def trial_rows(study_name: str, t, objectives, experiment: dict) -> list[dict]:
    params = {f"param_{k}": v for k, v in flat_params(t.user_attrs.get("overrides", {})).items()}
    attrs = {f"attr_{k}": (v if isinstance(v, (int, float, str, bool)) else json.dumps(v))
             for k, v in t.user_attrs.items() if k in ("fail_reason", "requeued_from")}
    start, end = t.datetime_start, t.datetime_complete
    base = dict(
        study=study_name, trial=t.number, model=",".join(m["label"] for m in experiment["models"]),
        stream=",".join(s["name"] for s in experiment["streams"]), state=t.state.name.lower(),
        run_ids=t.user_attrs.get("run_ids", []), params=dict(t.params), seeds=len(experiment["seeds"]),
        started_at=start, finished_at=end,
        duration_s=(end - start).total_seconds() if start and end else None,
        timestamp=datetime.now(timezone.utc), **params, **attrs,
    )
    if t.intermediate_values:
        # a pruned trial's last report is measured on fewer tasks: kept apart from `value`
        last = max(t.intermediate_values)
        base.update(attr_last_report_task=int(last), attr_last_report_value=float(t.intermediate_values[last]))
    rows = []
    for i, o in enumerate(objectives):
        value = t.values[i] if t.values is not None and t.state.name == "COMPLETE" else None
        rows.append(dict(base, objective=o.label, direction=o.direction, value=value))
    return rows


def write_trial(store, study_name, t, objectives, experiment):
    store.write_rows("trials", trial_rows(study_name, t, objectives, experiment), key=f"{study_name}-{t.number:05d}")


def export_config(experiment: dict, overrides: dict, path: Path, header: str) -> Path:
    """A full experiment config (`nlbench run` accepts it unchanged) with the trial's values set."""
    cfg = apply_sample(experiment, overrides)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(cfg, sort_keys=False)
    atomic_write_text(path, text)
    return path


def _savefig(ax, path: Path):
    import matplotlib.pyplot as plt

    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(study, objectives, out: Path) -> tuple[list[Path], dict]:
    """Optimization history, parameter importances (≥ 2 complete trials), Pareto front (multi)."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as vis

    written, importances = [], {}
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return written, importances
    multi = len(objectives) > 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
        for i, o in enumerate(objectives):
            suffix = f"-{o.label}" if multi else ""
            target = (lambda t, i=i: t.values[i]) if multi else None
            tname = o.label
            p = out / f"history{suffix}.png"
            _savefig(vis.plot_optimization_history(study, target=target, target_name=tname), p)
            written.append(p)
            # conditional parameters (the increment of a level only some trials have) would restrict
            # the evaluation to the few trials that have them: assess those every trial has
            common = set.intersection(*(set(t.params) for t in complete))
            varied = sorted(k for k in common if len({str(t.params[k]) for t in complete}) > 1)
            values = {t.values[i] for t in complete}
            if len(complete) >= 2 and varied and len(values) > 1:
                # fANOVA, seeded: Optuna's default (PED-ANOVA, which contrasts the top 10% of trials)
                # had 2 trials to go on in a 24-trial study and ranked last the one parameter
                # that separated the six best trials from all others (tune-m3: rms_normalize)
                evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
                try:
                    imp = optuna.importance.get_param_importances(study, evaluator=evaluator, target=target,
                                                                  params=varied)
                except (RuntimeError, ValueError):
                    continue  # e.g. every complete trial has the same value
                importances[tname] = {k: float(v) for k, v in imp.items()}
                p = out / f"importances{suffix}.png"
                _savefig(vis.plot_param_importances(study, evaluator=evaluator, target=target, target_name=tname,
                                                    params=varied), p)
                written.append(p)
        if multi:
            p = out / "pareto.png"
            names = [o.label for o in objectives]
            if len(objectives) <= 3:
                _savefig(vis.plot_pareto_front(study, target_names=names), p)
            else:
                _savefig(vis.plot_pareto_front(study, targets=lambda t: t.values[:2], target_names=names[:2]), p)
            written.append(p)
    return written, importances
