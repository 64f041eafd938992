"""Typed model options: one pydantic class per model family, next to its model (`HopeOptions` in
hope.py, `TransformerOptions` and `TitansOptions` in baselines/), registered with its factory in
`nlbench.models.MODELS`. The factory reads its options through the class, and configs, bench
configs and tune check a model's options with `validate_options` — the same class, without
building a model.

Values are strict (no "16" for 16, no `true` for 1; an int is a float), unknown keys are refused,
and every error names the option and the allowed values as the factories always did:
"model 'hope': option 'eta_init' must be a number in (0, 1); got 1.5."
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["ModelConfigError", "ModelOptions", "SIZE_FIELDS", "check_size", "in_unit", "options_error", "parse_options", "positive_int",
           "with_options"]

class ModelConfigError(ValueError):
    """A bad model name, size or option; the message names the field and the allowed values."""


# set by the size preset, overridable per model like any option
SIZE_FIELDS = ("d_model", "n_layers", "n_heads")


class ModelOptions(BaseModel):
    """Base of every family's options (fields: the options, with their defaults)."""

    model_config = ConfigDict(extra="forbid", strict=True)


def positive_int(value, minimum: int = 1):
    """For `mode="before"` validators: an int (not a bool) >= minimum, else a ValueError that
    reads "must be an integer >= 1, got 0"."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"must be an integer >= {minimum}, got {value!r}")
    return value


def in_unit(value, closed_high: bool = False):
    """A number in (0, 1) (or (0, 1] with closed_high), as a float."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (0 < value <= 1 if closed_high else 0 < value < 1))
    if not ok:
        raise ValueError(f"must be a number in {'(0, 1]' if closed_high else '(0, 1)'}, got {value!r}")
    return float(value)


def _allowed_text(cls: type[ModelOptions]) -> str:
    return ", ".join(sorted(cls.model_fields))


def options_error(model: str, cls: type[ModelOptions], e: ValidationError):
    """A ValidationError as the one-paragraph ModelConfigError the factories have always raised."""
    unknown = [str(err["loc"][0]) for err in e.errors() if err["type"] == "extra_forbidden"]
    if unknown:
        return ModelConfigError(f"model '{model}': unknown option(s) {', '.join(map(repr, sorted(unknown)))}. "
                                f"Valid options: {_allowed_text(cls)}.")
    parts = []
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").rstrip(".")
        if err["type"] == "value_error":  # our validators' messages carry the value themselves
            parts.append(msg if not field else f"option '{field}' {msg}" if msg.startswith("must") else
                         f"option '{field}': {msg}")
            continue
        msg = "must be " + msg.removeprefix("Input should be ") if msg.startswith("Input should be ") else msg
        parts.append(f"option '{field}' {msg}, got {err.get('input')!r}")
    return ModelConfigError(f"model '{model}': " + "; ".join(parts) + ".")


def parse_options(model: str, cls: type[ModelOptions], options: dict[str, Any]) -> ModelOptions:
    """`cls` validated from `options`, or the ModelConfigError naming what is wrong."""
    try:
        return cls.model_validate(options)
    except ValidationError as e:
        raise options_error(model, cls, e) from None


def check_size(model: str, d_model, n_layers, n_heads) -> None:
    """The size fields (preset or overridden): positive integers, d_model divisible by n_heads."""
    for field, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
        try:
            positive_int(value)
        except ValueError as e:
            raise ModelConfigError(f"model '{model}': option '{field}' {e}.") from None
    if d_model % n_heads:
        raise ModelConfigError(f"model '{model}': d_model={d_model} must be divisible by n_heads={n_heads}.")


def with_options(cls: type[ModelOptions]):
    """Register a factory's options class with it (`factory.options`): `nlbench.models` finds a
    model's options through its factory, so the registry entry is the single place to add one."""
    def mark(factory):
        factory.options = cls
        return factory
    return mark
