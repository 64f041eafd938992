"""The search space: parameter types of a tune config's `space:` mapping and how an Optuna trial
samples them (define-by-run, so the periods of a variable number of CMS levels are natural).

Types: {type: float | int, low, high, log, step}, {type: categorical, choices}, and
{type: cms_periods, levels: [Kmin, Kmax], base, first_exponent: [lo, hi], increment: [lo, hi],
lr: {low, high, log}} on `model.options.cms_periods` (docs/ALGORITHMS.md, CMS chunk sizes C^(ℓ)):
K levels, period of level ℓ = base^e_ℓ with e_0 sampled and e_ℓ = e_{ℓ−1} + d_ℓ, d_ℓ ≥ 1 sampled,
so the periods strictly increase from the fastest level to the slowest BY CONSTRUCTION (no
rejected samples); `lr` searches the in-context CMS step of every level (`model.options.cms_lr`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["CategoricalParam", "CmsPeriodsParam", "FloatParam", "IntParam", "LogRange", "PARAM_TYPES", "Param",
           "corner_samples", "flat_params", "sample_overrides"]


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


def corner_samples(path: str, p) -> list[dict[str, Any]]:
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


def flat_params(overrides: dict[str, Any]) -> dict[str, Any]:
    """Trials-table columns: one per searched config path, list items as path.<index>."""
    out = {}
    for path, v in overrides.items():
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                out[f"{path}.{i}"] = x
        else:
            out[path] = v
    return out
