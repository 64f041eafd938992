"""Model registry: one `build_model` for every architecture nlbench compares.

    from nlbench.models import build_model, MODELS, flops_per_token
    model = build_model("hope", size="small", vocab_size=256)
    out = model(tokens)                 # out.logits [B, T, V], out.state (fast memories)

Each registry entry is "module:factory"; the factory is called as
`factory(vocab_size=..., **preset, **overrides)` and reads its options through its typed options
class (`factory.options`, registered with `nlbench.models.options.with_options`), which rejects
unknown or invalid options with a clear error. `validate_options(name, options, size)` checks a
model's options through that class without building the model (configs, bench configs, tune).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from nlbench.models.base import PRESETS, ModelOutput, NLModel, clone_state, detach_state, map_state
from nlbench.models.options import SIZE_FIELDS, ModelConfigError, check_size, parse_options

MODELS: dict[str, str] = {
    "hope": "nlbench.models.hope:build_hope",
    "hope-attention": "nlbench.models.hope:build_hope_attention",
    "transformer": "nlbench.baselines.transformer:build_transformer",
    "titans-lmm": "nlbench.baselines.titans:build_titans_lmm",
    "titans-mac": "nlbench.baselines.titans:build_titans_mac",
    "titans-mag": "nlbench.baselines.titans:build_titans_mag",
    "titans-mal": "nlbench.baselines.titans:build_titans_mal",
}


def _factory(name: str):
    if name not in MODELS:
        raise ModelConfigError(
            f"unknown model '{name}'. Valid models: {', '.join(sorted(MODELS))}."
        )
    module, attr = MODELS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_model(name: str, size: str = "tiny", vocab_size: int = 256, **overrides) -> NLModel:
    """Build a registered model at a size preset; `overrides` set any model option."""
    if size not in PRESETS:
        raise ModelConfigError(f"unknown size '{size}' for model '{name}'. Valid sizes: {', '.join(PRESETS)}.")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ModelConfigError(f"vocab_size must be an integer >= 2, got {vocab_size!r}.")
    factory = _factory(name)
    kwargs = dict(PRESETS[size])
    kwargs.update(overrides)
    model = factory(vocab_size=vocab_size, **kwargs)
    model.model_name, model.size = name, size
    return model


def options_class(name: str):
    """The typed options class of a registered model (nlbench.models.options)."""
    return _factory(name).options


def validate_options(name: str, options: dict[str, Any], size: str = "tiny") -> dict[str, Any]:
    """Check a model's options (size fields over the preset, then the family's options class)
    without building it; returns the options with every default filled in."""
    if size not in PRESETS:
        raise ModelConfigError(f"unknown size '{size}' for model '{name}'. Valid sizes: {', '.join(PRESETS)}.")
    cls = options_class(name)
    dims = {**PRESETS[size], **{k: v for k, v in options.items() if k in SIZE_FIELDS}}
    check_size(name, dims["d_model"], dims["n_layers"], dims["n_heads"])
    return parse_options(name, cls, {k: v for k, v in options.items() if k not in SIZE_FIELDS}).model_dump()


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Matmul FLOPs per token of one forward pass (incl. in-context memory updates).

    Training costs ~3x this (forward + backward); MFU uses that convention.
    """
    return float(model.flops_per_token(seq_len))


__all__ = [
    "MODELS", "PRESETS", "ModelOutput", "NLModel", "ModelConfigError", "build_model",
    "clone_state", "detach_state", "flops_per_token", "map_state", "options_class",
    "validate_options",
]
