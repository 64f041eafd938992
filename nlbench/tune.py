"""Hyper-parameter search: Optuna over CMS periods, M3 momentum scales or any numeric config option,
each trial a set of ordinary nlbench runs executed by a Ray task.

    tc = load_tune_config("configs/tune-cms.yaml")     # TuneConfigError names the field
    summary = run_tune(tc, out_dir, trials=8, parallel=2, address=None, storage=None)

Design (issue 5):

* **Ask-and-tell in the driver.** This process owns the `optuna.Study`: it asks for a trial,
  samples the search space with the trial (define-by-run, so conditional parameters such as the
  periods of a variable number of CMS levels are natural), turns the sample into config
  overrides, and sends the resulting runs to Ray; when the Ray task returns it tells the study the
  objective value(s). Only the driver writes OUT's Parquet tables (one writer, as in
  `nlbench.execution`).
* **One Ray task per trial**, holding `resources.cpus_per_trial` CPUs and `gpus_per_trial` GPUs;
  at most `parallel` trials in flight (default: as many as the cluster fits). A trial's runs (the
  base experiment's seeds × streams × …) execute inside that task one task-boundary at a time:
  `execute_run(..., stop_after_task=i)` leaves the per-task checkpoint the runner already
  writes, the next call resumes from it, so every run computes exactly what one undisturbed call
  computes (runner contract), and between two tasks the trial knows the score matrix so far.
* **Pruning from inside the trial.** After task i the Ray task reports the objective measured on
  the tasks seen so far (`trial.report(value, step=i)`) straight to the Optuna storage and asks
  `should_prune()`, so a MedianPruner / SuccessiveHalving pruner compares it with the other
  trials at the same task and stops a hopeless trial early. Multi-objective studies do not prune
  (Optuna has no multi-objective pruning); they return the Pareto front.
* **The Optuna storage is the single source of truth for resume.** `--trials N` is the study's
  total: a re-run counts the finished trials in the storage (complete, pruned, failed) and runs
  only the missing ones. Trials a killed tuner left RUNNING are marked FAIL with user attribute
  `fail_reason = "interrupted"`, not counted, and their parameters re-enqueued; the re-enqueued
  trial's runs resume from the per-task checkpoints of the interrupted one (checkpoints are keyed
  by the trial's parameters). One tuner process per study at a time.
* **Storage.** Default: an Optuna JournalStorage file `OUT/study.journal` (JournalFileBackend;
  `optuna-dashboard OUT/study.journal` opens it; safe for several processes on one file system).
  `--storage URL` takes an RDB URL (`sqlite:///…`, `postgresql://…`) for clusters, or a path to
  another journal file. On a multi-node cluster OUT must be on storage every node sees (trials
  write their per-task checkpoints there, and journal reports when no RDB URL is given).

Search space (`space:` mapping of dotted run-config path → parameter), checked before any trial:
  {type: float, low, high, log, step}, {type: int, low, high, log, step}, {type: categorical,
  choices}, on any option reachable with `nlbench.config.apply_override` (roots model, stream,
  train, eval, replay, ewc; `model.` / `stream.` apply to every model / stream of the base), and
  {type: cms_periods, levels: [Kmin, Kmax], base, first_exponent: [lo, hi], increment: [lo, hi],
  lr: {low, high, log}} on `model.options.cms_periods` (spec §3, CMS chunk sizes C^(ℓ)): K levels,
  period of level ℓ = base^e_ℓ with e_0 sampled and e_ℓ = e_{ℓ−1} + d_ℓ, d_ℓ ≥ 1 sampled, so the
  periods strictly increase from the fastest level to the slowest BY CONSTRUCTION (no rejected
  samples, no infeasible trials); `lr` searches the in-context CMS step of every level,
`model.options.cms_lr` = [lr_0, …, lr_{K−1}] (trials-table columns `…cms_lr.0`, `…cms_lr.1`, …).

Outputs in OUT: `trials/` (ResultStore table: one row per trial and objective, one
`param_<config path>` column per searched value, e.g. `param_model.options.cms_periods.1`,
`param_train.optimizer.alpha`), `runs/ matrix/ curves/` of the finished trials' runs, `best.yaml`
(multi-objective: `pareto/trial-NNNNN.yaml`) — full experiment configs `nlbench run` accepts
unchanged —, `importances.yaml`, and PNG plots `history*.png`, `importances*.png`, `pareto.png`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "METRIC_DIRECTIONS", "TuneConfig", "TuneConfigError", "apply_sample", "base_experiment", "export_config",
    "load_tune_config", "open_storage", "run_tune", "sample_overrides", "validate_tune_config",
]

# objective metric -> default direction (accuracy score; see ObjectiveSpec for loss)
METRIC_DIRECTIONS = {
    "acc_final": "maximize", "acc_avg_incremental": "maximize", "plasticity": "maximize",
    "bwt": "maximize", "fwt": "maximize", "forgetting": "minimize", "train_tokens_per_s": "maximize",
}
LEVEL_METRICS = ("acc_final", "acc_avg_incremental", "plasticity")
SEARCH_ROOTS = ("model", "stream", "train", "eval", "replay", "ewc")
INTERRUPTED = "interrupted"
JOURNAL_NAME = "study.journal"


class TuneConfigError(ValueError):
    """An invalid tune config or search space; the message names the field and the allowed values."""


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


# ================================================================================ the config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_range(low, high, log, what="high"):
    if high < low:
        raise ValueError(f"low must be <= {what}; got low={low}, high={high}")
    if log and low <= 0:
        raise ValueError(f"log=true needs low > 0; got low={low}")


class FloatParam(_Strict):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("step and log=true cannot be combined (Optuna samples log ranges continuously)")
        return self


class IntParam(_Strict):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("step > 1 and log=true cannot be combined")
        return self


Scalar = Union[bool, int, float, str, None]


class CategoricalParam(_Strict):
    type: Literal["categorical"]
    choices: list[Scalar] = Field(..., min_length=1)


class LogRange(_Strict):
    low: float = Field(..., gt=0)
    high: float = Field(..., gt=0)
    log: bool = True

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high, self.log)
        return self


class CmsPeriodsParam(_Strict):
    """Periods base^e_ℓ, e_ℓ = e_0 + d_1 + … + d_ℓ with d_ℓ ≥ 1: strictly increasing by construction."""

    type: Literal["cms_periods"]
    levels: tuple[int, int] = (2, 4)
    base: int = Field(2, ge=2)
    first_exponent: tuple[int, int] = (0, 2)
    increment: tuple[int, int] = (1, 2)
    lr: LogRange | None = None

    @field_validator("levels", "first_exponent", "increment")
    @classmethod
    def _pair(cls, v, info):
        lo, hi = v
        floor = {"levels": 1, "first_exponent": 0, "increment": 1}[info.field_name]
        if lo < floor:
            raise ValueError(f"[low, high] needs low >= {floor}; got {list(v)}")
        if hi < lo:
            raise ValueError(f"[low, high] needs low <= high; got {list(v)}")
        return v


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam, CmsPeriodsParam], Field(discriminator="type")]
PARAM_TYPES = ("float", "int", "categorical", "cms_periods")


class ObjectiveSpec(_Strict):
    """metric of the base experiment's runs, averaged over them; score: which matrix it reads."""

    metric: Literal["acc_final", "acc_avg_incremental", "plasticity", "bwt", "fwt", "forgetting",
                    "train_tokens_per_s"]
    direction: Literal["maximize", "minimize"] | None = None
    score: Literal["accuracy", "loss"] = "accuracy"

    @model_validator(mode="after")
    def _default_direction(self):
        if self.direction is None:
            d = METRIC_DIRECTIONS[self.metric]
            if self.score == "loss" and self.metric in LEVEL_METRICS:
                d = "minimize"  # level metrics stay in the matrix's unit (mean loss)
            self.direction = d
        return self

    @property
    def label(self) -> str:
        return self.metric if self.score == "accuracy" else f"{self.metric}_{self.score}"


class StudySettings(_Strict):
    name: str | None = None
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    pruner: Literal["median", "successive_halving", "none"] = "median"
    # trials before TPE models the space / before the median pruner prunes
    startup_trials: int = Field(2, ge=0)


class TuneResources(_Strict):
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)


class TuneConfig(_Strict):
    name: str = "tune"
    base: str | None = None
    experiment: dict[str, Any] | None = None
    space: dict[str, Param] = Field(..., min_length=1)
    objective: ObjectiveSpec | list[ObjectiveSpec]
    trials: int = Field(8, ge=1)
    parallel: int | None = Field(None, ge=1)
    resources: TuneResources = Field(default_factory=TuneResources)
    study: StudySettings = Field(default_factory=StudySettings)

    @model_validator(mode="after")
    def _one_base(self):
        if (self.base is None) == (self.experiment is None):
            raise ValueError("give exactly one of 'base' (path to an experiment config) or 'experiment' (inline mapping)")
        if isinstance(self.objective, list):
            if not self.objective:
                raise ValueError("objective list is empty; give one objective or several")
            labels = [o.label for o in self.objective]
            if len(set(labels)) != len(labels):
                raise ValueError(f"objectives repeat a metric: {labels}")
        return self

    @property
    def objectives(self) -> list[ObjectiveSpec]:
        return self.objective if isinstance(self.objective, list) else [self.objective]

    @property
    def study_name(self) -> str:
        return self.study.name or self.name

    @model_validator(mode="after")
    def _study_name_chars(self):
        # the study name keys result files (OUT/trials/<study>-NNNNN.parquet): a path separator or
        # a space there would fail only after the first trial ran
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,99}", self.study_name):
            field = "study.name" if self.study.name else "name"
            raise ValueError(f"{field} {self.study_name!r} names the study and its result files: use letters, digits "
                             f"and . _ + @ - only (no '/' or spaces), starting with a letter or digit")
        return self


def _error_text(e: ValidationError, intro: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged-"))))
        loc = loc.replace(".float.", ".").replace(".int.", ".").replace(".categorical.", ".").replace(".cms_periods.", ".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
        elif err["type"] == "union_tag_invalid":
            msg = f"unknown parameter type {err['input'].get('type')!r}; allowed types: {_allowed(PARAM_TYPES)}"
        elif err["type"] == "union_tag_not_found":
            msg = f"missing 'type'; allowed types: {_allowed(PARAM_TYPES)}"
        elif err["type"] == "literal_error":
            msg = msg.replace("Input should be", "must be one of") + f", got {err.get('input')!r}"
        elif err["type"] == "missing":
            msg = "required field is missing"
        parts.append(f"field '{loc or '<root>'}': {msg}")
    return f"{intro}: " + "; ".join(parts) + "."


# ================================================================================ base and paths


def _read_yaml(path: Path, what: str) -> dict:
    from nlbench.config import read_yaml

    return read_yaml(path, TuneConfigError, what)


def base_experiment(tc: TuneConfig, source: Path | None = None) -> dict:
    """The base experiment as a validated, normalized mapping (ExperimentConfig dump).
    `base:` is resolved relative to the tune config's folder, then to the working directory."""
    from nlbench.config import ConfigError, validate_config

    if tc.experiment is not None:
        raw, where = copy.deepcopy(tc.experiment), "experiment"
    else:
        p = Path(tc.base)
        if not p.is_absolute() and source is not None and (source.parent / p).is_file():
            p = source.parent / p
        raw, where = _read_yaml(p, "field 'base': experiment config"), f"base '{p}'"
    try:
        cfg = validate_config(raw, source=where)
    except ConfigError as e:
        raise TuneConfigError(f"invalid tune config: field '{'experiment' if tc.experiment is not None else 'base'}': {e}") from None
    if cfg.variants:
        raise TuneConfigError(
            "invalid tune config: the base experiment has 'variants'; they would be applied over the searched "
            "values. Tune one configuration: remove 'variants' (make each one its own base)."
        )
    return cfg.model_dump(mode="json")


def _experiment_paths(experiment: dict, path: str) -> list[str]:
    """A run-config path as paths of the experiment config ('model.x' -> 'models.<i>.x' for every model)."""
    root, _, rest = path.partition(".")
    if root == "model":
        return [f"models.{i}" + (f".{rest}" if rest else "") for i in range(len(experiment["models"]))]
    if root == "stream":
        return [f"streams.{i}" + (f".{rest}" if rest else "") for i in range(len(experiment["streams"]))]
    return [path]


def apply_sample(experiment: dict, overrides: dict[str, Any]) -> dict:
    """The experiment config of one trial: each run-config override set on every model / stream."""
    from nlbench.config import apply_override

    out = experiment
    for path, value in overrides.items():
        for p in _experiment_paths(out, path):
            out = apply_override(out, p, value)
    return out


def _representative(path: str, p) -> list[dict[str, Any]]:
    """Overrides at the corners of a parameter's range (checked before any trial runs)."""
    if isinstance(p, CmsPeriodsParam):
        out = []
        for K in sorted({p.levels[0], p.levels[1]}):
            for e0, d in ((p.first_exponent[0], p.increment[0]), (p.first_exponent[1], p.increment[1])):
                periods = [p.base ** (e0 + d * l) for l in range(K)]
                o = {"model.options.cms_levels": K, path: periods}
                if p.lr is not None:
                    o["model.options.cms_lr"] = [p.lr.high] * K
                out.append(o)
        return out
    if isinstance(p, CategoricalParam):
        return [{path: c} for c in p.choices]
    return [{path: p.low}, {path: p.high}]


def validate_tune_config(raw: Any, source: str | Path | None = None) -> tuple[TuneConfig, dict]:
    """Validate a tune config mapping; returns (TuneConfig, base experiment mapping).

    Every search path is applied at the corners of its range to the base experiment and the result
    validated (model options by building a tiny model), so a bad path, an option the model rejects
    or a value out of the model's range fails here, before any trial runs.
    """
    from nlbench.config import ConfigError, validate_config

    src = f"'{source}'" if source else "(mapping)"
    if not isinstance(raw, dict):
        raise TuneConfigError(f"invalid tune config {src}: it must be a mapping of fields, got {type(raw).__name__}.")
    try:
        tc = TuneConfig.model_validate(raw)
    except ValidationError as e:
        raise TuneConfigError(_error_text(e, f"invalid tune config {src}")) from None
    experiment = base_experiment(tc, Path(source) if source else None)
    for path, p in tc.space.items():
        where = f"invalid tune config {src}: field 'space.{path}'"
        root = path.split(".", 1)[0]
        if root not in SEARCH_ROOTS:
            raise TuneConfigError(
                f"{where}: searchable paths start with one of {_allowed(SEARCH_ROOTS)} (a run-config path such as "
                f"'train.optimizer.lr' or 'model.options.cms_periods'); got root {root!r}."
            )
        if isinstance(p, CmsPeriodsParam) and path != "model.options.cms_periods":
            raise TuneConfigError(f"{where}: type 'cms_periods' applies to the path 'model.options.cms_periods' only.")
        for overrides in _representative(path, p):
            try:
                validate_config(apply_sample(experiment, overrides), source="trial")
            except ConfigError as e:
                raise TuneConfigError(f"{where}: value(s) {overrides} make an invalid experiment: {e}") from None
    return tc, experiment


def load_tune_config(path: str | Path) -> tuple[TuneConfig, dict]:
    path = Path(path)
    raw = _read_yaml(path, "tune config")
    return validate_tune_config(raw, source=path)


# ================================================================================ sampling


def sample_overrides(space: dict[str, Any], trial) -> dict[str, Any]:
    """Sample the space with an Optuna trial (define-by-run) -> {run-config path: value}."""
    out: dict[str, Any] = {}
    for path, p in space.items():
        if isinstance(p, FloatParam):
            out[path] = trial.suggest_float(path, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            out[path] = trial.suggest_int(path, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, CategoricalParam):
            out[path] = trial.suggest_categorical(path, p.choices)
        else:
            K = trial.suggest_int(f"{path}:levels", *p.levels)
            e = trial.suggest_int(f"{path}:exp0", *p.first_exponent)
            exps = [e]
            for level in range(1, K):
                # a positive exponent increment per level: periods strictly increase, fast -> slow
                e += trial.suggest_int(f"{path}:inc{level}", *p.increment)
                exps.append(e)
            out["model.options.cms_levels"] = K
            out[path] = [p.base ** x for x in exps]
            if p.lr is not None:  # one in-context step per level, fastest level first
                out["model.options.cms_lr"] = [
                    trial.suggest_float(f"{path}:lr{level}", p.lr.low, p.lr.high, log=p.lr.log) for level in range(K)
                ]
    return out


def _flat_params(overrides: dict[str, Any]) -> dict[str, Any]:
    """Trials-table columns: one per searched config path, list items as path.<index>."""
    out = {}
    for path, v in overrides.items():
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                out[f"{path}.{i}"] = x
        else:
            out[path] = v
    return out


# ================================================================================ storage, study


def open_storage(url: str):
    """A journal file path (or 'journal:PATH') -> JournalStorage; anything with '://' -> RDB URL."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if "://" in url and not url.startswith("journal:"):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as e:  # noqa: BLE001 - unknown scheme, missing driver, unreachable server
            cause = " ".join(str(e).split())[:300] or type(e).__name__
            raise TuneConfigError(
                f"--storage {url!r} cannot be opened as an Optuna RDB storage ({type(e).__name__}: {cause}); give "
                f"sqlite:///PATH, postgresql://… or mysql://… with its driver installed, or a journal file path."
            ) from None
    path = url.removeprefix("journal:")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(path))


def _pruner(tc: TuneConfig):
    import optuna

    if len(tc.objectives) > 1 or tc.study.pruner == "none":
        return optuna.pruners.NopPruner()
    if tc.study.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tc.study.startup_trials, n_warmup_steps=0)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)


def _sampler(tc: TuneConfig, trials_so_far: int = 0):
    """The configured sampler. A resumed study seeds it with `seed + trials_so_far`: the same seed
    would restart the sampler's random stream and re-propose the first trials' values."""
    import optuna

    seed = None if tc.study.seed is None else tc.study.seed + trials_so_far
    if tc.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, tc.study.startup_trials),
                                      constant_liar=True)


def open_study(tc: TuneConfig, storage_url: str):
    """Create the study, or load it with a sampler seeded past the trials it already holds."""
    import optuna

    storage = open_storage(storage_url)
    study = optuna.create_study(
        study_name=tc.study_name, storage=storage, sampler=_sampler(tc), pruner=_pruner(tc),
        directions=[o.direction for o in tc.objectives], load_if_exists=True,
    )
    so_far = len(study.get_trials(deepcopy=False))
    if so_far:
        study = optuna.load_study(study_name=tc.study_name, storage=storage, sampler=_sampler(tc, so_far),
                                  pruner=_pruner(tc))
    return study


@contextlib.contextmanager
def tuner_lock(tc: TuneConfig, storage_url: str, out: Path):
    """Hold an exclusive lock for this study while tuning: a second tuner on the same study would
    mark the first one's running trials as interrupted and both would tell the same trials
    (Optuna's UpdateFinishedTrialError). The lock file sits next to a journal storage (else in
    OUT) and names the holder's host and pid; the OS releases it when the holder dies."""
    import fcntl
    import socket

    is_journal = "://" not in storage_url or storage_url.startswith("journal:")
    if is_journal:
        journal = Path(storage_url.removeprefix("journal:")).absolute()
        path = journal.with_name(f"{journal.name}.{tc.study_name}.lock")
    else:
        path = out / f".{tc.study_name}.tune.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise TuneConfigError(
                f"study {tc.study_name!r} in {storage_url} is being tuned right now by {holder} (lock {path}); "
                f"wait for that tuner to finish (re-running then adds the missing trials), or use another "
                f"study.name or --out.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


def recover_interrupted(study) -> list[int]:
    """Trials a killed tuner left RUNNING: mark FAIL (fail_reason 'interrupted'), re-enqueue their
    parameters; returns their numbers."""
    from optuna.trial import TrialState

    lost = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(dict(t.params), user_attrs={"requeued_from": t.number})
        lost.append(t.number)
    return lost


def finished_count(study) -> int:
    """Trials that count toward --trials: complete, pruned, and failed for a reason of their own."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            n += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") != INTERRUPTED:
            n += 1
    return n


# ================================================================================ one trial


def _score_matrix(record, score: str, upto: int | None = None):
    """R (after_task ≥ 0 rows) and b (init row) of one run, truncated to tasks 0..upto."""
    import numpy as np

    rows = [r for r in record.matrix if r["metric"] == score]
    T = 1 + max(r["eval_task"] for r in rows)
    done = 1 + max(r["after_task"] for r in rows)
    n = done if upto is None else min(done, upto + 1)
    R = np.full((n, n), np.nan)
    b = np.full(n, np.nan)
    for r in rows:
        i, j = r["after_task"], r["eval_task"]
        if j < n and i < n:
            if i < 0:
                b[j] = r["value"]
            else:
                R[i, j] = r["value"]
    return R, b, T


def objective_value(records, obj: ObjectiveSpec, upto: int | None = None) -> float:
    """Mean over the trial's runs of `obj.metric` (docs/METRICS.md), on the tasks 0..upto seen so far."""
    from nlbench.metrics import all_metrics

    vals = []
    for rec in records:
        if obj.metric == "train_tokens_per_s":
            v = rec.run.get("train_tokens_per_s")
            vals.append(float("nan") if v is None else float(v))
            continue
        R, b, _ = _score_matrix(rec, obj.score, upto)
        m = all_metrics(R, b, higher_is_better=obj.score == "accuracy")
        vals.append(float(m[obj.metric]))
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _stopped(record, ckpt_dir) -> bool:
    from nlbench.runner import checkpoint_path

    return (record.run["status"] == "failed" and (record.run.get("error") or "").startswith("stopped after task")
            and checkpoint_path(ckpt_dir, record.run["run_id"]).is_file())


def execute_trial(payload: dict) -> dict:
    """Body of the Ray task: run the trial's runs task by task, report, maybe prune.

    Returns {state: complete | pruned | fail, values, reason, records, reported}.
    """
    import shutil

    import torch

    from nlbench.runner import execute_run

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
                                      pruner=_pruner(tc))
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
            elif not _stopped(rec, ckpt_dir):
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


# ================================================================================ outputs


def _trial_rows(study_name: str, t, objectives, experiment: dict) -> list[dict]:
    params = {f"param_{k}": v for k, v in _flat_params(t.user_attrs.get("overrides", {})).items()}
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
    store.write_rows("trials", _trial_rows(study_name, t, objectives, experiment), key=f"{study_name}-{t.number:05d}")


def export_config(experiment: dict, overrides: dict, path: Path, header: str) -> Path:
    """A full experiment config (`nlbench run` accepts it unchanged) with the trial's values set."""
    cfg = apply_sample(experiment, overrides)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(cfg, sort_keys=False)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
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


# ================================================================================ the driver


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
    if "://" in storage_url and not storage_url.startswith("journal:"):
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
                log(f"trial {trial.number} started: {json.dumps(_flat_params(overrides))}")
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
                    if not _is_stop(rec):
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


NOISE_RATIO_MIN = 2.0  # below this the search space does not move the objective beyond seed noise


def objective_noise(complete, objectives) -> dict:
    """Does the search space move the objective more than seed noise does?

    Every trial runs the same base experiment, so its runs line up across trials (same stream,
    same seed: common random numbers) and the values form a trials × runs table x. Per objective,
    a two-way decomposition x_tj = m + a_t + b_j + e_tj separates what all trials share on run j
    (b_j: that seed's data and initialization) from the noise e that makes trials differ by
    chance. `between_trials_sd` is the SD of the trials' means; `noise_se` = √(Σe²/((T−1)(J−1))/J)
    is the standard error such a mean would have from that noise alone; `ratio` = between /
    noise_se is ≈ 1 when the trials differ by noise only, and `meaningful` = ratio ≥
    NOISE_RATIO_MIN. When it is not, the best trial is a lucky draw and the parameter importances
    (fANOVA splits whatever variance there is) mean nothing. Empty without ≥ 2 complete trials of
    ≥ 2 finite runs each, all with the same number of runs."""
    import statistics

    out = {}
    for i, o in enumerate(objectives):
        table = [[r[i] for r in t.user_attrs.get("per_run_values") or []] for t in complete]
        if len(table) < 2 or len({len(row) for row in table}) != 1 or len(table[0]) < 2:
            continue
        if not all(math.isfinite(v) for row in table for v in row):
            continue
        T, J = len(table), len(table[0])
        rows = [sum(row) / J for row in table]
        cols = [sum(row[j] for row in table) / T for j in range(J)]
        grand = sum(rows) / T
        resid = sum((table[t][j] - rows[t] - cols[j] + grand) ** 2 for t in range(T) for j in range(J))
        se = math.sqrt(resid / ((T - 1) * (J - 1)) / J)
        between = statistics.stdev(rows)
        ratio = between / se if se > 0 else float("inf")
        out[o.label] = dict(between_trials_sd=float(between), noise_se=float(se), ratio=float(ratio),
                            meaningful=bool(ratio >= NOISE_RATIO_MIN), trials=T, runs_per_trial=J)
    return out


def _is_stop(rec) -> bool:
    return rec.run["status"] == "failed" and (rec.run.get("error") or "").startswith("stopped after task")


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
                          f"searched: {json.dumps(_flat_params(b.user_attrs['overrides']))}")
            summary["best"] = dict(number=b.number, value=b.value, overrides=b.user_attrs["overrides"],
                                   path=str(out / "best.yaml"))
        else:
            for b in study.best_trials:
                p = out / "pareto" / f"trial-{b.number:05d}.yaml"
                vals = ", ".join(f"{o.label} = {v:.6g}" for o, v in zip(objectives, b.values))
                export_config(experiment, b.user_attrs["overrides"], p,
                              f"nlbench tune: Pareto-optimal trial {b.number} of study {tc.study_name!r}: {vals}\n"
                              f"searched: {json.dumps(_flat_params(b.user_attrs['overrides']))}")
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
