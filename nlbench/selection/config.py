"""The leaderboard config and the studies it plans.

    name: leaderboard
    base: standard.yaml            # or `experiment:` inline; its variants are refused
    seeds: [0, 1, 2, 3, 4]         # reporting seeds (default: the experiment's); at least 5
    tuning_seeds: [100, 101]       # validation seeds: must not overlap the reporting seeds
    trials: 6                      # finished trials per (entry, stream family): an equal budget
    families: {digits: [split-digits, permuted-digits]}   # optional; default one per stream name
    space:                         # searched for every entry
      train.optimizer.lr: {type: float, low: 0.002, high: 0.05, log: true}
      train.optimizer.adamw_lr: {type: float, low: 3e-4, high: 1e-2, log: true}
    model_space:                   # added for entries of that model label (else model name)
      hope: {model.options.eta_init: {type: float, low: 0.3, high: 0.9}}
    strategy_space:                # added for entries of that strategy
      ewc: {ewc.lam: {type: float, low: 1, high: 1e4, log: true}}
    objective: {metric: acc_final}
    study: {sampler: random, seed: 0, pruner: none}
    resources: {cpus_per_trial: 1}

An *entry* is one model entry × protocol × strategy of the experiment (the leaderboard's entries);
a *family* is a set of streams tuned together (the objective is the mean over their runs). Each
(entry, family) is one Optuna study of `nlbench.tune` on the tuning seeds; the search parameters
are the same kinds `nlbench tune` takes (float, int, categorical, cms_periods).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from nlbench.tune import ObjectiveSpec, StudySettings, TuneConfigError, TuneResources
from nlbench.tune.space import Param, _Strict

MIN_REPORT_SEEDS = 5  # every ranked entry has at least 5 paired seeds


class LeaderboardConfigError(ValueError):
    """An invalid leaderboard config; the message names the field and what is allowed."""


class LeaderboardConfig(_Strict):
    name: str = "leaderboard"
    base: str | None = None
    experiment: dict[str, Any] | None = None
    seeds: list[int] | None = None
    tuning_seeds: list[int] = Field(..., min_length=1)
    trials: int = Field(6, ge=1)
    parallel: int | None = Field(None, ge=1)
    # studies tuned at once (threads of the driver sharing the cluster); the selection does not depend on it
    studies_at_once: int = Field(2, ge=1)
    families: dict[str, list[str]] | None = None
    space: dict[str, Param] = Field(default_factory=dict)
    model_space: dict[str, dict[str, Param]] = Field(default_factory=dict)
    strategy_space: dict[str, dict[str, Param]] = Field(default_factory=dict)
    objective: ObjectiveSpec = Field(default_factory=lambda: ObjectiveSpec(metric="acc_final"))
    study: StudySettings = Field(default_factory=lambda: StudySettings(sampler="random", pruner="none"))
    resources: TuneResources = Field(default_factory=TuneResources)

    @model_validator(mode="after")
    def _one_base(self):
        if (self.base is None) == (self.experiment is None):
            raise ValueError("give exactly one of 'base' (path to an experiment config) or 'experiment' (inline mapping)")
        return self

    @field_validator("seeds", "tuning_seeds")
    @classmethod
    def _distinct(cls, v):
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        if v is not None and any(s < 0 for s in v):
            raise ValueError(f"seeds must be integers >= 0, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,99}", v):
            raise ValueError(f"{v!r}: use letters, digits and . _ + @ - only, starting with a letter or digit")
        return v


@dataclass(frozen=True)
class StudyPlan:
    """One (entry, family): the Optuna study on the tuning seeds and the reporting experiment."""

    name: str                 # the study name (also its folder under OUT/tuning)
    model: str                # model label
    model_name: str
    protocol: str
    strategy: str
    family: str
    streams: tuple[str, ...]
    tune_config: Any          # nlbench.tune.TuneConfig
    tuning_experiment: dict   # the base restricted to this entry and family, on the tuning seeds
    report_experiment: dict   # the same on the reporting seeds (selected values not yet applied)

    @property
    def entry(self) -> str:
        return f"{self.model}/{self.protocol}/{self.strategy}"


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+@-]+", "_", text)
    return s if re.match(r"[A-Za-z0-9]", s) else f"x{s}"


def _error_text(e: ValidationError, intro: str) -> str:
    from nlbench.errors import validation_text
    from nlbench.tune import PARAM_TYPES

    return validation_text(e, intro, tags=PARAM_TYPES)


def _base(lc: LeaderboardConfig, source: Path | None, src: str) -> dict:
    from nlbench.config import ConfigError, read_yaml, validate_config

    if lc.experiment is not None:
        raw, where = copy.deepcopy(lc.experiment), "experiment"
    else:
        p = Path(lc.base)
        if not p.is_absolute() and source is not None and (source.parent / p).is_file():
            p = source.parent / p
        raw, where = read_yaml(p, LeaderboardConfigError, f"invalid leaderboard config {src}: field 'base': experiment config"), f"base '{p}'"
    try:
        cfg = validate_config(raw, source=where)
    except ConfigError as e:
        raise LeaderboardConfigError(f"invalid leaderboard config {src}: field '{'experiment' if lc.experiment is not None else 'base'}': {e}") from None
    if cfg.variants:
        raise LeaderboardConfigError(
            f"invalid leaderboard config {src}: the experiment has 'variants'; every entry is tuned and reported as "
            f"one configuration. Make each variant its own model entry (with a 'label') instead.")
    return cfg.model_dump(mode="json")


def _combos(experiment: dict) -> list[tuple[str, str]]:
    """(protocol, strategy) pairs the experiment expands to (in_context runs only as 'naive')."""
    out = []
    for protocol in dict.fromkeys(experiment["protocol"]):
        strategies = ["naive"] if protocol == "in_context" else list(dict.fromkeys(experiment["strategy"]))
        out += [(protocol, s) for s in strategies]
    return out


def _families(lc: LeaderboardConfig, experiment: dict, src: str) -> dict[str, list[str]]:
    names = list(dict.fromkeys(s["name"] for s in experiment["streams"]))
    if lc.families is None:
        return {n: [n] for n in names}
    where = f"invalid leaderboard config {src}: field 'families"
    seen: dict[str, str] = {}
    for fam, members in lc.families.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,99}", fam):
            raise LeaderboardConfigError(f"{where}': family name {fam!r}: use letters, digits and . _ + @ - only.")
        if not members:
            raise LeaderboardConfigError(f"{where}.{fam}': a family needs at least one stream.")
        for m in members:
            if m not in names:
                raise LeaderboardConfigError(f"{where}.{fam}': stream {m!r} is not in the experiment; its streams are "
                                             f"{', '.join(map(repr, names))}.")
            if m in seen:
                raise LeaderboardConfigError(f"{where}': stream {m!r} is in families {seen[m]!r} and {fam!r}; each "
                                             f"stream is tuned in exactly one family.")
            seen[m] = fam
    missing = [n for n in names if n not in seen]
    if missing:
        raise LeaderboardConfigError(f"{where}': stream(s) {', '.join(map(repr, missing))} are in no family; list every "
                                     f"stream of the experiment once (or leave 'families' out: one family per stream).")
    return {f: list(m) for f, m in lc.families.items()}


def validate_leaderboard_config(raw: Any, source: str | Path | None = None) -> tuple[LeaderboardConfig, list[StudyPlan]]:
    """Check the config and every study it plans (each search space at the corners of its range,
    through nlbench.tune's own check) before anything runs; returns (config, studies)."""
    src = f"'{source}'" if source else "(mapping)"
    if not isinstance(raw, dict):
        raise LeaderboardConfigError(f"invalid leaderboard config {src}: it must be a mapping of fields, got "
                                     f"{type(raw).__name__}.")
    if "models" in raw and "base" not in raw and "experiment" not in raw:
        raise LeaderboardConfigError(
            f"invalid leaderboard config {src}: it is an experiment config (it has 'models'); a leaderboard config "
            f"names one with 'base: PATH' (or inline 'experiment:') and adds 'tuning_seeds', 'trials' and the search "
            f"'space' (see configs/leaderboard.yaml).")
    try:
        lc = LeaderboardConfig.model_validate(raw)
    except ValidationError as e:
        raise LeaderboardConfigError(_error_text(e, f"invalid leaderboard config {src}")) from None
    experiment = _base(lc, Path(source) if source else None, src)
    seeds = list(lc.seeds if lc.seeds is not None else experiment["seeds"])
    where_seeds = "seeds" if lc.seeds is not None else "the experiment's seeds"
    overlap = sorted(set(seeds) & set(lc.tuning_seeds))
    if overlap:
        raise LeaderboardConfigError(
            f"invalid leaderboard config {src}: field 'tuning_seeds': seed(s) {overlap} are also reporting seeds "
            f"({where_seeds}: {seeds}). The stream content depends on the seed, so selecting on them would tune on "
            f"the test data; choose tuning seeds disjoint from the reporting seeds (e.g. 100 and up).")
    if len(seeds) < MIN_REPORT_SEEDS:
        raise LeaderboardConfigError(
            f"invalid leaderboard config {src}: field 'seeds': {len(seeds)} reporting seed(s) {seeds}; the leaderboard "
            f"needs at least {MIN_REPORT_SEEDS} paired seeds per entry.")
    from nlbench.config import STRATEGIES

    labels = {m["label"]: m["name"] for m in experiment["models"]}
    for key in lc.model_space:
        if key not in labels and key not in labels.values():
            raise LeaderboardConfigError(
                f"invalid leaderboard config {src}: field 'model_space.{key}': no model of the experiment has this "
                f"label or name; its models are {', '.join(repr(f'{l} ({n})') for l, n in labels.items())}.")
    combos = _combos(experiment)
    strategies = {s for _, s in combos}
    for key in lc.strategy_space:
        if key not in STRATEGIES:
            raise LeaderboardConfigError(f"invalid leaderboard config {src}: field 'strategy_space.{key}': unknown "
                                         f"strategy; allowed: {', '.join(map(repr, STRATEGIES))}.")
        if key not in strategies:
            raise LeaderboardConfigError(f"invalid leaderboard config {src}: field 'strategy_space.{key}': the "
                                         f"experiment runs no entry with strategy {key!r} (it has "
                                         f"{', '.join(map(repr, sorted(strategies)))}).")
    families = _families(lc, experiment, src)
    checked: set[tuple] = set()  # entries whose space corners were checked (they do not depend on the stream)
    plans = []
    for m in experiment["models"]:
        for protocol, strategy in combos:
            space = dict(lc.space)
            space.update(lc.model_space.get(m["name"], {}) if m["label"] not in lc.model_space else {})
            space.update(lc.model_space.get(m["label"], {}))
            space.update(lc.strategy_space.get(strategy, {}))
            for fam, members in families.items():
                plans.append(_plan(lc, experiment, m, protocol, strategy, fam, members, space, seeds, src, checked))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise LeaderboardConfigError(f"invalid leaderboard config {src}: entries {dup} map to the same study name; "
                                     f"give the models distinct labels.")
    return lc, plans


def _plan(lc, experiment, m, protocol, strategy, fam, members, space, seeds, src, checked: set) -> StudyPlan:
    from nlbench.tune import TuneConfig, base_experiment, validate_tune_config

    entry = f"{m['label']}/{protocol}/{strategy}"
    if not space:
        raise LeaderboardConfigError(
            f"invalid leaderboard config {src}: entry {entry} has nothing to search (empty 'space' and no "
            f"'model_space' / 'strategy_space' for it); give at least the learning rate.")
    sub = copy.deepcopy(experiment)
    sub.update(models=[m], streams=[s for s in experiment["streams"] if s["name"] in members],
               protocol=[protocol], strategy=[strategy], variants=[])
    # an entry's own outer optimizer (`model_optimizer`) becomes the study's train.optimizer, so the
    # searched train.optimizer.* values act on the optimizer the entry really uses
    own = (sub.pop("model_optimizer", None) or {}).get(m["label"])
    if own is not None:
        sub["train"]["optimizer"] = own
    tuning = dict(copy.deepcopy(sub), seeds=list(lc.tuning_seeds), name=f"{lc.name}-tuning")
    report = dict(copy.deepcopy(sub), seeds=seeds, name=lc.name)
    study_name = _slug(f"{m['label']}.{protocol}.{strategy}.{fam}")
    raw = dict(name=study_name, experiment=tuning,
               space={k: v.model_dump(mode="json", exclude_none=True) for k, v in space.items()},
               objective=lc.objective.model_dump(mode="json"), trials=lc.trials,
               resources=lc.resources.model_dump(mode="json"),
               study=dict(lc.study.model_dump(mode="json"), name=study_name))
    if lc.parallel is not None:
        raw["parallel"] = lc.parallel
    # the corners of a space on model/train/eval/replay/ewc paths are checked once per entry (they
    # build the model, which dominates the check); a stream path is checked on every family
    key = (m["label"], protocol, strategy)
    try:
        if key in checked and not any(p.split(".", 1)[0] == "stream" for p in space):
            tc = TuneConfig.model_validate(raw)
            tuning = base_experiment(tc)
        else:
            tc, tuning = validate_tune_config(raw)
            checked.add(key)
    except ValidationError as e:
        raise LeaderboardConfigError(_error_text(e, f"invalid leaderboard config {src}: entry {entry}, family {fam!r}")) from None
    except TuneConfigError as e:
        text = str(e).replace("invalid tune config (mapping): ", "")
        raise LeaderboardConfigError(f"invalid leaderboard config {src}: entry {entry}, family {fam!r}: {text}") from None
    return StudyPlan(name=study_name, model=m["label"], model_name=m["name"], protocol=protocol, strategy=strategy,
                     family=fam, streams=tuple(members), tune_config=tc, tuning_experiment=tuning,
                     report_experiment=report)


def load_leaderboard_config(path: str | Path) -> tuple[LeaderboardConfig, list[StudyPlan]]:
    from nlbench.config import read_yaml

    path = Path(path)
    raw = read_yaml(path, LeaderboardConfigError, "leaderboard config")
    return validate_leaderboard_config(raw, source=path)


def plan_studies(raw: Any, source: str | Path | None = None) -> list[StudyPlan]:
    return validate_leaderboard_config(raw, source)[1]
