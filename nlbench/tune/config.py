"""A tune config: its schema (base experiment, search space, objectives, study settings,
resources), read and checked before any trial runs; `apply_sample` turns a trial's sample into
the experiment config its runs execute.

    tc, experiment = load_tune_config("configs/tune-cms.yaml")   # TuneConfigError names the field

The search paths are run-config paths (`nlbench.config.apply_override`) with roots model, stream,
train, eval, replay, ewc; `model.` / `stream.` apply to every model / stream of the base.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from nlbench.config import ConfigError, apply_override, read_yaml, validate_config
from nlbench.errors import validation_text
from nlbench.tune.objective import ObjectiveSpec
from nlbench.tune.space import PARAM_TYPES, CmsPeriodsParam, Param, _Strict, corner_samples

__all__ = ["SEARCH_ROOTS", "StudySettings", "TuneConfig", "TuneConfigError", "TuneResources", "apply_sample",
           "base_experiment", "load_tune_config", "validate_tune_config"]

SEARCH_ROOTS = ("model", "stream", "train", "eval", "replay", "ewc")


class TuneConfigError(ValueError):
    """An invalid tune config or search space; the message names the field and the allowed values."""


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


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


def base_experiment(tc: TuneConfig, source: Path | None = None) -> dict:
    """The base experiment as a validated, normalized mapping (ExperimentConfig dump).
    `base:` is resolved relative to the tune config's folder, then to the working directory."""
    if tc.experiment is not None:
        raw, where = copy.deepcopy(tc.experiment), "experiment"
    else:
        p = Path(tc.base)
        if not p.is_absolute() and source is not None and (source.parent / p).is_file():
            p = source.parent / p
        raw, where = read_yaml(p, TuneConfigError, "field 'base': experiment config"), f"base '{p}'"
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
    out = experiment
    for path, value in overrides.items():
        for p in _experiment_paths(out, path):
            out = apply_override(out, p, value)
    return out


def validate_tune_config(raw: Any, source: str | Path | None = None) -> tuple[TuneConfig, dict]:
    """Validate a tune config mapping; returns (TuneConfig, base experiment mapping).

    Every search path is applied at the corners of its range to the base experiment and the result
    validated (model options through their typed options class), so a bad path, an option the model rejects
    or a value out of the model's range fails here, before any trial runs.
    """
    src = f"'{source}'" if source else "(mapping)"
    if not isinstance(raw, dict):
        raise TuneConfigError(f"invalid tune config {src}: it must be a mapping of fields, got {type(raw).__name__}.")
    try:
        tc = TuneConfig.model_validate(raw)
    except ValidationError as e:
        raise TuneConfigError(validation_text(e, f"invalid tune config {src}", tags=PARAM_TYPES)) from None
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
        for overrides in corner_samples(path, p):
            try:
                validate_config(apply_sample(experiment, overrides), source="trial")
            except ConfigError as e:
                raise TuneConfigError(f"{where}: value(s) {overrides} make an invalid experiment: {e}") from None
    return tc, experiment


def load_tune_config(path: str | Path) -> tuple[TuneConfig, dict]:
    path = Path(path)
    raw = read_yaml(path, TuneConfigError, "tune config")
    return validate_tune_config(raw, source=path)
