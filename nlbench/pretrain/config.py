"""The `pretrain:` block of an experiment config, its resolution per run, and the content key.

    pretrain:
      stream: {name: markov-languages, seq_len: 128, options: {}}   # default: each run's stream
      tasks: fresh            # a new generated task per segment, or N: a pool of N tasks
      steps: 300              # optimizer steps, one meta-sequence batch each
      batch_size: 8
      segments: 4             # task segments per meta-sequence
      segment_sequences: 2    # sequences of seq_len tokens per segment
      tbptt: 2                # sequences per truncated-backprop window
      probe_weight: 0.0       # > 0: meta-continual loss on probes of earlier segments
      optimizer: {name: adamw, lr: 1e-3}   # 3e-3 diverged (docs/decisions.md)
      grad_clip: 1.0
      seed: 0                 # or "run": one pretraining per run seed
      checkpoint_every: 50    # steps between resumable progress checkpoints

A run config holds the block resolved (`resolve_block`): stream filled in from the run's own
stream, seed an integer. The checkpoint key (`pretrain_key`) is the content hash of the model
(name, size, options) and that resolved block: runs that agree on both share one checkpoint.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

KEY_FORMAT = 1  # bump when training semantics change, so old checkpoints are not reused


class PretrainStream(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    seq_len: int | None = Field(None, ge=2)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_stream(cls, v):
        from nlbench.tasks import STREAMS

        if v not in STREAMS:
            raise ValueError(f"unknown stream {v!r}; allowed streams: {', '.join(map(repr, sorted(STREAMS)))}")
        return v

    @field_validator("options")
    @classmethod
    def _known_knobs(cls, v, info):
        from nlbench.tasks import STREAMS

        name = info.data.get("name")
        if name not in STREAMS:
            return v
        knobs = list(STREAMS[name].knobs)
        unknown = sorted(set(v) - set(knobs))
        if unknown:
            raise ValueError(f"stream {name!r}: unknown option(s) {unknown}; allowed options: {knobs}")
        return v


class PretrainOptimizer(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Literal["adamw", "muon", "m3", "dgd"] = "adamw"
    # 3e-3 took Titans-LMM to NaN near step 110-136 on associative-recall whatever the tbptt
    # window; 1e-3 trained it and every model of configs/in-context-cpu.yaml (docs/decisions.md)
    lr: float = Field(1e-3, gt=0)


class PretrainConfig(BaseModel):
    """Meta-training of the outer weights on sequences of generated tasks (nlbench/pretrain)."""

    model_config = ConfigDict(extra="forbid")
    stream: PretrainStream | None = None
    tasks: int | Literal["fresh"] = "fresh"
    steps: int = Field(300, ge=1)
    batch_size: int = Field(8, ge=1)
    segments: int = Field(4, ge=1)
    segment_sequences: int = Field(2, ge=1)
    tbptt: int = Field(2, ge=1)
    probe_weight: float = Field(0.0, ge=0)
    optimizer: PretrainOptimizer = Field(default_factory=PretrainOptimizer)
    grad_clip: float | None = Field(1.0, gt=0)
    seed: int | Literal["run"] = 0
    checkpoint_every: int = Field(50, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"tasks must be 'fresh' or an integer >= 1, got {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError(f"seed must be an integer >= 0 or 'run', got {v}")
        return v


# keys that change where or how often progress is saved, not the weights: outside the key
_NOT_HASHED = ("checkpoint_every",)


def resolve_block(block: dict | None, stream: dict, seed: int) -> dict | None:
    """The block as a run config holds it: validated, stream defaulted to the run's own stream
    (name, seq_len, options without eval_size), seed 'run' replaced by the run's seed."""
    if block is None:
        return None
    cfg = PretrainConfig.model_validate(block).model_dump(mode="json")
    if cfg["stream"] is None:
        opts = {k: v for k, v in (stream.get("options") or {}).items() if k != "eval_size"}
        cfg["stream"] = PretrainStream(name=stream["name"], seq_len=stream.get("seq_len"),
                                       options=opts).model_dump(mode="json")
    if cfg["seed"] == "run":
        cfg["seed"] = int(seed)
    from nlbench.tasks import STREAMS

    max_tasks = STREAMS[cfg["stream"]["name"]].max_tasks
    if cfg["tasks"] != "fresh" and cfg["tasks"] > max_tasks:
        raise ValueError(f"field 'pretrain.tasks': stream {cfg['stream']['name']!r} generates at most {max_tasks} tasks "
                         f"per seed, got tasks={cfg['tasks']}")
    return cfg


def pretrain_key(model: dict, block: dict) -> str:
    """Content hash of (model name, size, options, resolved pretrain block incl. its seed)."""
    from nlbench.results import run_id_for

    hashed = copy.deepcopy(block)
    for k in _NOT_HASHED:
        hashed.pop(k, None)
    content = dict(format=KEY_FORMAT, model=dict(name=model["name"], size=model["size"],
                                                  options=model.get("options") or {}), pretrain=hashed)
    return run_id_for(content)


__all__ = ["KEY_FORMAT", "PretrainConfig", "pretrain_key", "resolve_block"]
