"""Experiment configs: a YAML file describes a sweep, `expand_runs` turns it into runs.

    cfg = load_config("configs/quick.yaml")     # ExperimentConfig; ConfigError names the field
    specs = expand_runs(cfg)                     # models × streams × seeds × protocols ×
                                                 # strategies × variants, one RunSpec each
    spec.config                                  # the fully resolved config of ONE run (dict)
    spec.run_id                                  # content hash of what affects the results

A run's resolved config (`RunSpec.config`) has the keys

    model:    {name, size, options, label}
    stream:   {name, num_tasks, seq_len, options}      (None = the stream's default)
    seed, protocol, strategy, variant
    replay:   {buffer_size, ratio}                     (used by strategy 'replay')
    ewc:      {lam, fisher_samples}                    (used by strategy 'ewc')
    train:    {tokens_per_task, batch_size, optimizer{name, lr, ...}, grad_clip, eval_every,
               device, dtype}
    eval:     {max_sequences, batch_size, curve_tasks}
    pretrain: {stream, tasks, steps, ...}              (only when the experiment has a
                                                        `pretrain:` block; nlbench/pretrain)

`model_optimizer: {<model label>: {name, lr, ...}}` gives one model entry its own outer optimizer
in place of train.optimizer (e.g. Hope with M3 next to Hope with Muon); other runs are unchanged.

`apply_override(config, "train.optimizer.lr", 3e-3)` sets one dotted path of such a dict (list
items by index: "model.options.cms_periods.1"); `validate_run_config` re-checks the result.
Variants in a config are lists of such overrides, each swept as extra runs.

Resources (cpus/gpus per run, max failures) and the execution device never enter the run id:
they change where a run executes, not what it computes.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nlbench.errors import validation_text
from nlbench.models import MODELS, PRESETS
from nlbench.optim.build import OPTIMIZERS
from nlbench.protocol import PROTOCOLS as PROTOCOL_REGISTRY
from nlbench.protocol.strategies import STRATEGIES as STRATEGY_REGISTRY
from nlbench.pretrain.config import PretrainConfig, resolve_block
from nlbench.pretrain.tasks import PRETRAIN_SEED_BASE

# names from the registries that build them (the single source: a new entry there is valid here)
PROTOCOLS = tuple(PROTOCOL_REGISTRY)
STRATEGIES = tuple(STRATEGY_REGISTRY)
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16")

# Keys of a run config that do not change its results (kept out of the run id).
_NOT_HASHED = ("device",)


class ConfigError(ValueError):
    """An invalid experiment config; the message names the field path and the allowed values."""


def _stream_names() -> list[str]:
    from nlbench.tasks import STREAMS

    return sorted(STREAMS)


# PyYAML (YAML 1.1) reads 1e-3 (no dot) as a string; such values are floats to every user.
_SCI_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml_floats(value):
    if isinstance(value, str) and _SCI_FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_yaml_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _yaml_floats(v) for k, v in value.items()}
    return value


def _allowed(values) -> str:
    return ", ".join(repr(v) for v in values)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelEntry(_Strict):
    """One model of the sweep: a registered name, a size preset, options for its factory."""

    name: str
    size: str = "tiny"
    options: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None

    @field_validator("options", mode="before")
    @classmethod
    def _options_floats(cls, v):
        return _yaml_floats(v)

    @field_validator("name")
    @classmethod
    def _known_model(cls, v):
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; allowed models: {_allowed(sorted(MODELS))}")
        return v

    @field_validator("size")
    @classmethod
    def _known_size(cls, v):
        if v not in PRESETS:
            raise ValueError(f"unknown size {v!r}; allowed sizes: {_allowed(PRESETS)}")
        return v

    @model_validator(mode="after")
    def _default_label(self):
        if self.label is None:
            object.__setattr__(self, "label", self.name)
        return self


class StreamEntry(_Strict):
    """One task stream; num_tasks / seq_len None = the stream's own default."""

    name: str
    num_tasks: int | None = Field(None, ge=1)
    seq_len: int | None = Field(None, ge=2)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_stream(cls, v):
        names = _stream_names()
        if v not in names:
            raise ValueError(f"unknown stream {v!r}; allowed streams: {_allowed(names)}")
        return v

    @field_validator("options", mode="before")
    @classmethod
    def _options_floats(cls, v):
        return _yaml_floats(v)

    @field_validator("num_tasks")
    @classmethod
    def _task_count(cls, v, info):
        from nlbench.tasks import STREAMS

        name = info.data.get("name")
        max_tasks = getattr(STREAMS.get(name), "max_tasks", None)
        if v is not None and max_tasks is not None and v > max_tasks:
            raise ValueError(f"stream {name!r} has at most {max_tasks} tasks; num_tasks must be in [1, {max_tasks}], got {v}")
        return v

    @field_validator("options")
    @classmethod
    def _known_knobs(cls, v, info):
        from nlbench.tasks import STREAMS

        name = info.data.get("name")
        if name not in STREAMS:  # the name's own error is reported
            return v
        knobs = [*getattr(STREAMS[name], "knobs", {}), "eval_size"]
        unknown = sorted(set(v) - set(knobs))
        if unknown:
            raise ValueError(f"stream {name!r}: unknown option(s) {_allowed(unknown)}; allowed options: {_allowed(knobs)}")
        # counts (eval_size and every knob whose default is a positive integer: vocab_size, ...)
        # must be positive integers; the stream's builder checks finer bounds when a run starts
        counts = {"eval_size", *(k for k, d in getattr(STREAMS[name], "knobs", {}).items()
                                 if isinstance(d, int) and not isinstance(d, bool) and d >= 1)}
        for key in sorted(counts & set(v)):
            value = v[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"stream {name!r}: option {key!r} must be an integer >= 1, got {value!r}")
        return v


class OptimizerConfig(BaseModel):
    """The outer optimizer; any extra key is a hyper-parameter passed to build_optimizer."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: Literal[OPTIMIZERS] = "adamw"
    lr: float = Field(3e-3, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _hparam_floats(cls, data):
        return _yaml_floats(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _scalar_hparams(self):
        try:
            from nlbench.optim.build import ADAMW_HP, MAIN_HP
        except ImportError:
            ADAMW_HP, MAIN_HP = None, None
        if MAIN_HP is not None and self.name in MAIN_HP:
            allowed = sorted({*MAIN_HP[self.name], *ADAMW_HP, "name"})
            unknown = sorted(set(self.model_extra or {}) - set(allowed))
            if unknown:
                raise ValueError(
                    f"optimizer {self.name!r}: unknown hyper-parameter(s) {_allowed(unknown)}; allowed: {_allowed(allowed)}"
                )
        for key, value in (self.model_extra or {}).items():
            ok = isinstance(value, (int, float, str, bool)) or (
                isinstance(value, (list, tuple)) and all(isinstance(x, (int, float)) for x in value)
            )
            if not ok:
                raise ValueError(f"hyper-parameter {key!r} must be a number, string, bool or list of numbers, got {value!r}")
            # signs torch would reject only once a run builds its optimizer
            if key.endswith(("weight_decay", "eps")) and not (_is_number(value) and value >= 0):
                raise ValueError(f"hyper-parameter {key!r} must be a number >= 0, got {value!r}")
            if key.endswith("lr") and not (_is_number(value) and value > 0):
                raise ValueError(f"hyper-parameter {key!r} must be a number > 0, got {value!r}")
        return self


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class TrainConfig(_Strict):
    tokens_per_task: int = Field(..., ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    grad_clip: float | None = Field(1.0, gt=0)
    # evaluate every task this often (in training tokens) for the learning curves; None = only
    # after each task
    eval_every: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"


class EvalConfig(_Strict):
    max_sequences: int | None = Field(256, ge=1)
    batch_size: int = Field(64, ge=1)
    # which tasks the eval_every curve points score: every task, or only the one being trained
    curve_tasks: Literal["all", "current"] = "all"


class ReplayConfig(_Strict):
    """Experience replay: a reservoir buffer of `buffer_size` training sequences; every batch of
    B new sequences is extended with round(ratio · B) sequences drawn from the buffer."""

    buffer_size: int = Field(256, ge=1)
    ratio: float = Field(0.5, gt=0)


class EWCConfig(_Strict):
    """Elastic weight consolidation: penalty lam/2 Σ_k Σ_i F_k,i (θ_i − θ*_k,i)², F_k the diagonal
    empirical Fisher of task k estimated on `fisher_samples` training sequences."""

    lam: float = Field(100.0, ge=0)
    fisher_samples: int = Field(64, ge=1)


class ResourcesConfig(_Strict):
    cpus_per_run: float = Field(1.0, gt=0)
    gpus_per_run: float = Field(0.0, ge=0)
    max_failures: int = Field(2, ge=0)


class Variant(_Strict):
    label: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)


def _as_list(v):
    return v if isinstance(v, list) else [v]


class ExperimentConfig(_Strict):
    name: str = "experiment"
    models: list[ModelEntry] = Field(..., min_length=1)
    streams: list[StreamEntry] = Field(..., min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    protocol: list[Literal[PROTOCOLS]] = Field(default_factory=lambda: ["finetune"], min_length=1)
    strategy: list[Literal[STRATEGIES]] = Field(default_factory=lambda: ["naive"], min_length=1)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    ewc: EWCConfig = Field(default_factory=EWCConfig)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    variants: list[Variant] = Field(default_factory=list)
    # meta-train the outer weights first (nlbench/pretrain); every run starts from them
    pretrain: PretrainConfig | None = None
    # the outer optimizer of one model entry, by its label, in place of train.optimizer: e.g. Hope
    # with M3 as its own entry next to Hope with the sweep's Muon (other runs are unchanged)
    model_optimizer: dict[str, OptimizerConfig] = Field(default_factory=dict)

    @field_validator("models", "streams", mode="before")
    @classmethod
    def _names_to_entries(cls, v):
        return [{"name": x} if isinstance(x, str) else x for x in _as_list(v)]

    @field_validator("protocol", "strategy", "seeds", mode="before")
    @classmethod
    def _listify(cls, v):
        return _as_list(v)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v):
        if any(s < 0 or s >= PRETRAIN_SEED_BASE for s in v):
            # seeds from 2^62 up are the pretraining pools' (nlbench/pretrain/tasks.py)
            raise ValueError(f"seeds must be integers in [0, 2^62), got {v}")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _distinct_labels(self):
        labels = [m.label for m in self.models]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(
                f"models: label(s) {dup} used twice; give each model entry of the same name a distinct 'label'"
            )
        vlabels = [v.label for v in self.variants if v.label is not None]
        vdup = sorted({x for x in vlabels if vlabels.count(x) > 1})
        if vdup:
            raise ValueError(f"variants: label(s) {vdup} used twice")
        unknown = sorted(set(self.model_optimizer) - set(labels))
        if unknown:
            raise ValueError(f"model_optimizer: {_allowed(unknown)} is not the label of a model entry; "
                             f"labels: {_allowed(labels)}")
        return self


class RunConfig(_Strict):
    """The resolved config of a single run (what `RunSpec.config` holds)."""

    model: ModelEntry
    stream: StreamEntry
    seed: int = Field(..., ge=0, lt=PRETRAIN_SEED_BASE)
    protocol: Literal[PROTOCOLS]
    strategy: Literal[STRATEGIES]
    variant: str | None = None
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    ewc: EWCConfig = Field(default_factory=EWCConfig)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pretrain: PretrainConfig | None = None
    # provenance of a leaderboard run (nlbench.selection): the values chosen on the tuning seeds,
    # those seeds, the study; None (and absent from the dict, so run ids stay) for other runs
    selected: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _strategy_fits_protocol(self):
        if self.protocol == "in_context" and self.strategy != "naive":
            raise ValueError(
                f"strategy {self.strategy!r} needs outer training; protocol 'in_context' freezes the "
                "outer parameters and allows only strategy 'naive'"
            )
        return self


# ---------------------------------------------------------------------------------- errors


def _error_text(e: ValidationError, intro: str) -> str:
    """One paragraph naming every failing field (nlbench.errors.validation_text), with the keys
    allowed where an unknown one was found."""
    return validation_text(e, intro, known_keys=_known_keys)


_SECTIONS: dict[str, type[BaseModel]] = {
    "models": ModelEntry, "model": ModelEntry, "streams": StreamEntry, "stream": StreamEntry,
    "train": TrainConfig, "eval": EvalConfig, "pretrain": PretrainConfig, "replay": ReplayConfig, "ewc": EWCConfig,
    "resources": ResourcesConfig, "variants": Variant, "optimizer": OptimizerConfig,
}


def _known_keys(loc) -> list[str]:
    names = [p for p in loc if isinstance(p, str)]
    if not names:
        return list(ExperimentConfig.model_fields)
    cls = _SECTIONS.get(names[-1])
    return list(cls.model_fields) if cls else []


def _check_model_options(entries: list[ModelEntry], prefix: str) -> None:
    """Each model's options through its family's typed options class (nlbench.models.options):
    unknown or invalid options fail now, not hours into a sweep, and no model is built."""
    from nlbench.models import ModelConfigError, validate_options

    for i, m in enumerate(entries):
        try:
            validate_options(m.name, m.options, getattr(m, "size", "tiny"))
        except ModelConfigError as e:
            where = f"{prefix}.{i}.options" if prefix == "models" else f"{prefix}.options"
            raise ConfigError(f"invalid config: field '{where}': {e}") from None


def validate_config(raw: dict, source: str = "") -> ExperimentConfig:
    """Validate a config mapping; raise ConfigError naming every bad field and the allowed values."""
    src = f"'{source}'" if source else "(mapping)"
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {src}: it must be a mapping of fields, got {type(raw).__name__}.")
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_error_text(e, f"invalid config {src}")) from None
    _check_model_options(cfg.models, "models")
    # every variant must resolve to valid runs: catch bad override paths before anything runs
    for _ in _expand(cfg):
        pass
    return cfg


def read_yaml(path: str | Path, error: type[Exception] = ConfigError, what: str = "config file"):
    """The parsed YAML at `path`; a missing file or bad YAML raises `error` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} '{path}' does not exist.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} '{path}' is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8.") from None
    except OSError as e:
        raise error(f"{what} '{path}' cannot be read: {e.strerror or e}.") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise error(f"{what} '{path}' is not valid YAML: {e}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (YAML keeps the last one
    silently, so a typo'd override would quietly lose a setting)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:  # unhashable key: SafeLoader reports it
                break
            if dup:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (each key may appear once per mapping)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate a YAML experiment config."""
    return validate_config(read_yaml(path), source=str(path))


def validate_run_config(config: dict) -> dict:
    """Validate (and normalize) the resolved config of one run, e.g. after apply_override."""
    try:
        rc = RunConfig.model_validate(config)
    except ValidationError as e:
        raise ConfigError(_error_text(e, "invalid run config")) from None
    out = rc.model_dump(mode="json")
    if out["selected"] is None:
        del out["selected"]
    if out["pretrain"] is None:
        del out["pretrain"]  # runs without pretraining keep the ids they had before the block existed
    else:
        out["pretrain"] = _resolve_pretrain(out)
    return out


def _resolve_pretrain(run: dict, where: str = "pretrain") -> dict:
    try:
        return resolve_block(run["pretrain"], run["stream"], run["seed"])
    except ValidationError as e:
        raise ConfigError(_error_text(e, f"invalid config: field '{where}'")) from None
    except ValueError as e:  # resolve_block names the field itself
        raise ConfigError(f"invalid config: {e}.") from None


# ------------------------------------------------------------------------------- overrides


def apply_override(config: dict, path: str, value: Any) -> dict:
    """Return a copy of `config` with the dotted `path` set to `value`.

    Each segment names a key of a mapping or an index of a list ("model.options.cms_periods.1").
    Every segment but the last must exist; the last may be new only inside an open mapping
    (`options` of a model or stream, `train.optimizer` hyper-parameters), so a typo never
    silently adds a key the run ignores.
    """
    if not isinstance(path, str) or not path or any(not s for s in path.split(".")):
        raise ConfigError(f"override path {path!r} must be dotted keys like 'train.optimizer.lr'.")
    out = copy.deepcopy(config)
    node, walked = out, []
    segments = path.split(".")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        here = ".".join(walked) or "<root>"
        if isinstance(node, list):
            if not seg.lstrip("-").isdigit():
                raise ConfigError(f"override '{path}': '{here}' is a list; '{seg}' must be an index 0..{len(node) - 1}.")
            idx = int(seg)
            if not 0 <= idx < len(node):
                raise ConfigError(f"override '{path}': index {idx} out of range for '{here}' (length {len(node)}).")
            if last:
                node[idx] = copy.deepcopy(value)
            else:
                node = node[idx]
        elif isinstance(node, dict):
            open_map = bool(walked) and walked[-1] in ("options", "optimizer")
            if seg not in node and not (last and open_map):
                keys = _allowed(sorted(node)) if node else "none"
                raise ConfigError(f"override '{path}': '{here}' has no key '{seg}'; existing keys: {keys}.")
            if last:
                node[seg] = copy.deepcopy(value)
            else:
                node = node[seg]
        else:
            raise ConfigError(f"override '{path}': '{here}' is a value ({node!r}), not a mapping or list.")
        walked.append(seg)
    return out


# -------------------------------------------------------------------------------- expansion


@dataclass(frozen=True)
class RunSpec:
    """One run: its resolved config (plain, JSON-able dict), its content hash, its resources."""

    config: dict
    run_id: str
    resources: dict = field(default_factory=dict)

    @property
    def model(self) -> str:
        return run_label(self.config)

    @property
    def stream(self) -> str:
        return self.config["stream"]["name"]

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def protocol(self) -> str:
        return self.config["protocol"]

    @property
    def strategy(self) -> str:
        return self.config["strategy"]

    @property
    def name(self) -> str:
        return f"{self.model}/{self.stream}/{self.protocol}/{self.strategy}/seed{self.seed}"


def run_label(config: dict) -> str:
    """The `model` column of a run: the model label, plus '@variant' for variant runs."""
    label = config["model"]["label"]
    return f"{label}@{config['variant']}" if config.get("variant") else label


def hashed_part(config: dict) -> dict:
    """What the run id covers: everything that changes results (not the execution device)."""
    cfg = copy.deepcopy(config)
    for key in _NOT_HASHED:
        cfg["train"].pop(key, None)
    return cfg


def compute_run_id(config: dict) -> str:
    from nlbench.results import run_id_for

    return run_id_for(hashed_part(config))


def _variant_label(v: Variant) -> str:
    if v.label:
        return v.label
    return ",".join(f"{k}={val}" for k, val in v.overrides.items())


def _expand(cfg: ExperimentConfig, check_options: bool = True):
    """Yield each run's resolved, validated config dict."""
    variants = cfg.variants or [None]
    base_common = {
        "replay": cfg.replay.model_dump(mode="json"),
        "ewc": cfg.ewc.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "eval": cfg.eval.model_dump(mode="json"),
    }
    checked: set[str] = set()
    combos = []
    for protocol in dict.fromkeys(cfg.protocol):
        # in_context freezes the outer parameters: replay / ewc have nothing to act on, so the
        # protocol runs once, as 'naive', whatever the strategy list holds
        strategies = ["naive"] if protocol == "in_context" else list(dict.fromkeys(cfg.strategy))
        combos += [(protocol, s) for s in strategies]
    for m, s, seed, (protocol, strategy), (vi, v) in itertools.product(
        cfg.models, cfg.streams, cfg.seeds, combos, enumerate(variants)
    ):
        run = {
            "model": m.model_dump(mode="json"),
            "stream": s.model_dump(mode="json"),
            "seed": seed,
            "protocol": protocol,
            "strategy": strategy,
            "variant": None if v is None else _variant_label(v),
            **copy.deepcopy(base_common),
        }
        if m.label in cfg.model_optimizer:
            run["train"]["optimizer"] = cfg.model_optimizer[m.label].model_dump(mode="json")
        if cfg.pretrain is not None:
            run["pretrain"] = cfg.pretrain.model_dump(mode="json")
        if v is not None:
            for path, value in v.overrides.items():
                try:
                    run = apply_override(run, path, value)
                except ConfigError as e:
                    raise ConfigError(f"invalid config: field 'variants.{vi}.overrides': {e}") from None
            try:
                run = validate_run_config(run)
            except ConfigError as e:
                raise ConfigError(f"invalid config: field 'variants.{vi}.overrides' makes an invalid run: {e}") from None
            touches_model = any(p == "model" or p.startswith("model.") for p in v.overrides)
            if check_options and touches_model:
                key = json.dumps(run["model"], sort_keys=True)
                if key not in checked:
                    checked.add(key)
                    _check_model_options([ModelEntry.model_validate(run["model"])], f"variants.{vi}.overrides.model")
        elif run.get("pretrain") is not None:
            run["pretrain"] = _resolve_pretrain(run)
        yield run


def expand_runs(cfg: ExperimentConfig) -> list[RunSpec]:
    """models × streams × seeds × protocols × strategies × variants, in that nesting order."""
    resources = cfg.resources.model_dump(mode="json")
    specs, seen = [], set()
    for run in _expand(cfg):
        rid = compute_run_id(run)
        if rid in seen:  # e.g. two variants that resolve to the same run
            continue
        seen.add(rid)
        specs.append(RunSpec(config=run, run_id=rid, resources=dict(resources)))
    return specs


def spec_from_config(config: dict, resources: dict | None = None) -> RunSpec:
    """A RunSpec for one resolved run config (validated), e.g. built by the tuner."""
    run = validate_run_config(config)
    return RunSpec(config=run, run_id=compute_run_id(run), resources=dict(resources or ResourcesConfig().model_dump()))


__all__ = [
    "ConfigError", "ExperimentConfig", "RunConfig", "RunSpec", "PROTOCOLS", "STRATEGIES", "OPTIMIZERS",
    "apply_override", "compute_run_id", "expand_runs", "load_config", "run_label", "spec_from_config",
    "validate_config", "validate_run_config",
]
