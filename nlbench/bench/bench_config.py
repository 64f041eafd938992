"""Schema of throughput-benchmark configs (configs/throughput*.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nlbench.models import MODELS, PRESETS
from nlbench.optim.build import OPTIMIZERS


class BenchConfigError(ValueError):
    pass


class BenchModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict = Field(default_factory=dict)
    # the rows' `model` column (default: name): two entries of one model with different options
    # (e.g. hope and hope with recompute_chunks) stay apart in the table and the report
    label: str | None = Field(None, min_length=1)

    @property
    def row_name(self) -> str:
        return self.label or self.name

    @field_validator("name")
    @classmethod
    def _known(cls, v):
        if v not in MODELS:
            raise ValueError(f"unknown model '{v}'; allowed: {', '.join(sorted(MODELS))}")
        return v


class StreamConfig(BaseModel):
    """The streaming phase (`nlbench.bench.stream`): batch 1, one stream per length, read
    `chunk` tokens per call with the state carried."""
    model_config = ConfigDict(extra="forbid")
    models: list[BenchModel] = Field(..., min_length=1)
    seq_lens: list[int] = [1024, 2048, 4096, 8192]
    chunk: int = Field(16, ge=1)
    warmup_chunks: int = Field(4, ge=1)

    @field_validator("models", mode="before")
    @classmethod
    def _names(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in v]

    @field_validator("seq_lens")
    @classmethod
    def _lens(cls, v):
        if not v or any(t < 1 for t in v):
            raise ValueError("every stream length must be an integer >= 1")
        return v


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "throughput"
    models: list[BenchModel] = Field(..., min_length=1)
    sizes: list[str] = ["small"]
    seq_lens: list[int] = [256]
    batch_size: int = Field(8, ge=1)
    vocab_size: int = Field(256, ge=2)
    optimizer: Literal[OPTIMIZERS] = "adamw"
    lr: float = Field(1e-3, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    phases: list[Literal["train", "infer"]] = ["train", "infer"]
    warmup_steps: int = Field(2, ge=1)
    steps: int = Field(5, ge=1)
    compile: bool | str = False  # true (= "default"), or a mode of compiling.COMPILE_MODES
    threads: int | None = Field(None, ge=1)
    # memory-update micro-benchmark: chunked fast path vs token-by-token reference
    kernel_seq_len: int | None = Field(1024, ge=16)
    # streaming phase (rows with phase "stream"); none when absent
    stream: StreamConfig | None = None

    @field_validator("models", mode="before")
    @classmethod
    def _names(cls, v):
        return [{"name": m} if isinstance(m, str) else m for m in v]

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, v):
        bad = [s for s in v if s not in PRESETS]
        if bad:
            raise ValueError(f"unknown size(s) {bad}; allowed: {', '.join(PRESETS)}")
        return v

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v):
        from nlbench.kernels.compiling import COMPILE_MODES

        if isinstance(v, bool) or v in COMPILE_MODES:
            return v
        raise ValueError(f"must be true, false or a compile mode, one of {', '.join(map(repr, COMPILE_MODES))}; "
                         f"got {v!r}")

    @property
    def compile_mode(self) -> str | None:
        """None (eager), or the compile mode every model of the bench is compiled in."""
        from nlbench.kernels.compiling import compile_mode

        return compile_mode(self.compile)

    @field_validator("seq_lens")
    @classmethod
    def _lens(cls, v):
        if not v or any(t < 2 for t in v):
            raise ValueError("every seq_len must be an integer >= 2")
        return v


def load_bench_config(path: str | Path) -> BenchConfig:
    from nlbench.config import read_yaml
    from nlbench.errors import validation_text

    raw = read_yaml(path, BenchConfigError, "bench config")
    if not isinstance(raw, dict):
        raise BenchConfigError(f"bench config '{path}' must be a mapping of fields, got {type(raw).__name__}.")
    try:
        cfg = BenchConfig.model_validate(raw)
    except ValidationError as e:
        raise BenchConfigError(validation_text(e, f"invalid bench config '{path}'")) from None
    from nlbench.config import ConfigError, _check_model_options

    try:  # each model factory rejects unknown or invalid options before any measuring
        _check_model_options(cfg.models, "models")
        if cfg.stream is not None:
            _check_model_options(cfg.stream.models, "stream.models")
    except ConfigError as e:
        raise BenchConfigError(str(e).replace("invalid config:", f"invalid bench config '{path}':", 1)) from None
    if cfg.stream is not None:
        _check_stateful(cfg.stream.models, path)
    return cfg


def _check_stateful(models, path) -> None:
    """A stream needs a state carried across calls: a stateless model would read each chunk alone."""
    from nlbench.bench.stream import stream_options
    from nlbench.models import build_model

    for i, m in enumerate(models):
        opts = stream_options(m.name, m.options)
        if build_model(m.name, size="tiny", vocab_size=256, **opts).init_state(1) is None:
            raise BenchConfigError(
                f"invalid bench config '{path}': field 'stream.models.{i}': model '{m.name}' with options {opts} "
                f"carries no state across calls, so a stream would read each chunk alone; give it a state "
                f"(the transformer streams with a KV cache, kv_window) or leave it out of stream.models.")
