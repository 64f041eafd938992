"""Model registry: one `build_model` for every architecture nlbench compares.

    from nlbench.models import build_model, MODELS, flops_per_token
    model = build_model("hope", size="small", vocab_size=256)
    out = model(tokens)                 # out.logits [B, T, V], out.state (fast memories)

Each registry entry is "module:factory"; the factory is called as
`factory(vocab_size=..., **preset, **overrides)` and must reject unknown overrides with a
clear error (see `check_overrides`).
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from nlbench.models.base import PRESETS, ModelOutput, NLModel, clone_state, detach_state, map_state

MODELS: dict[str, str] = {
    "hope": "nlbench.models.hope:build_hope",
    "hope-attention": "nlbench.models.hope:build_hope_attention",
    "transformer": "nlbench.baselines.transformer:build_transformer",
    "titans-lmm": "nlbench.baselines.titans:build_titans_lmm",
    "titans-mac": "nlbench.baselines.titans:build_titans_mac",
    "titans-mag": "nlbench.baselines.titans:build_titans_mag",
    "titans-mal": "nlbench.baselines.titans:build_titans_mal",
}


class ModelConfigError(ValueError):
    """A bad model name, size or option; the message names the field and the allowed values."""


def check_overrides(model_name: str, overrides: dict[str, Any], allowed: dict[str, Any]) -> None:
    """Raise ModelConfigError naming every unknown option and listing the valid ones."""
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ModelConfigError(
            f"model '{model_name}': unknown option(s) {', '.join(map(repr, unknown))}. "
            f"Valid options: {', '.join(sorted(allowed))}."
        )


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


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Matmul FLOPs per token of one forward pass (incl. in-context memory updates).

    Training costs ~3x this (forward + backward); MFU uses that convention.
    """
    return float(model.flops_per_token(seq_len))


__all__ = [
    "MODELS", "PRESETS", "ModelOutput", "NLModel", "ModelConfigError", "build_model",
    "check_overrides", "clone_state", "detach_state", "flops_per_token", "map_state",
]
