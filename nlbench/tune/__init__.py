"""Hyper-parameter search: Optuna over CMS periods, M3 momentum scales or any numeric config option,
each trial a set of ordinary nlbench runs executed by a Ray task.

    tc, experiment = load_tune_config("configs/tune-cms.yaml")   # TuneConfigError names the field
    summary = run_tune(tc, experiment, out_dir, trials=8, parallel=2, address=None, storage=None)

One module per job:

- `config`: the tune config's schema, read and checked before any trial runs (every search path
  applied at the corners of its range to the base experiment and validated);
- `space`: the parameter types and how a trial samples them (CMS periods strictly increasing by
  construction);
- `objective`: the metric a study optimizes, its value on the tasks seen so far, seed noise;
- `study`: Optuna storage (the single source of truth for resume), sampler, pruner, one tuner per
  study (a lock), interrupted trials;
- `trial`: one trial's runs, task boundary by task boundary, reporting to the pruner (a Ray task);
- `outputs`: the trials table, best.yaml / pareto/, plots;
- `driver`: `run_tune`, the ask-and-tell loop over Ray.

Outputs in OUT: `trials/` (ResultStore table), `runs/ matrix/ curves/` of the finished trials'
runs, `best.yaml` (multi-objective: `pareto/trial-NNNNN.yaml`), `importances.yaml`, `noise.yaml`,
and PNG plots `history*.png`, `importances*.png`, `pareto.png`.
"""

from nlbench.tune.config import (SEARCH_ROOTS, StudySettings, TuneConfig, TuneConfigError, TuneResources,
                                 apply_sample, base_experiment, load_tune_config, validate_tune_config)
from nlbench.tune.driver import run_tune
from nlbench.tune.objective import (METRIC_DIRECTIONS, NOISE_RATIO_MIN, ObjectiveSpec, objective_noise,
                                    objective_value, score_matrix)
from nlbench.tune.outputs import export_config, write_plots, write_trial
from nlbench.tune.space import (PARAM_TYPES, CategoricalParam, CmsPeriodsParam, FloatParam, IntParam, LogRange,
                                corner_samples, flat_params, sample_overrides)
from nlbench.tune.study import (INTERRUPTED, JOURNAL_NAME, finished_count, make_pruner, open_storage, open_study,
                                recover_interrupted, tuner_lock)
from nlbench.tune.trial import execute_trial

__all__ = [
    "CategoricalParam", "CmsPeriodsParam", "FloatParam", "INTERRUPTED", "IntParam", "JOURNAL_NAME", "LogRange",
    "METRIC_DIRECTIONS", "NOISE_RATIO_MIN", "ObjectiveSpec", "PARAM_TYPES", "SEARCH_ROOTS", "StudySettings",
    "TuneConfig", "TuneConfigError", "TuneResources", "apply_sample", "base_experiment", "corner_samples",
    "execute_trial", "export_config", "finished_count", "flat_params", "load_tune_config", "make_pruner",
    "objective_noise", "objective_value", "open_storage", "open_study", "recover_interrupted", "run_tune",
    "sample_overrides", "score_matrix", "tuner_lock", "validate_tune_config", "write_plots", "write_trial",
]
