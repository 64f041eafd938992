"""The one interface every nlbench model implements.

    out = model(tokens, state=None, update_state=True)
    out.logits: [B, T, vocab]  -- logits[:, t] predicts token t + 1 (targets are shifted
                                 once, by the task, never by the model)
    out.state:  the model's fast state (in-context memories), a pytree of tensors, or None

`state=None` means "start from the meta-learned initial state" (`model.init_state(B)`).
`update_state=False` runs the same computation (the memories still write within the
sequence: later tokens see the updates of earlier ones, since that is how the layer mixes
tokens) and discards only the final state: the returned state is the input state, untouched
(evaluation probes in the in-context protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Size presets: (d_model, n_layers, n_heads). Every model family sizes its own inner widths
# so that its parameter count matches the Transformer's at the same preset (within 15%).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2),
    "small": dict(d_model=128, n_layers=2, n_heads=4),
    "medium": dict(d_model=256, n_layers=4, n_heads=8),
    "large": dict(d_model=512, n_layers=6, n_heads=8),
}


@dataclass
class ModelOutput:
    logits: torch.Tensor
    state: Any = None


def map_state(fn, state):
    """Apply `fn` to every tensor of a state pytree (dict / list / tuple / None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(fn, v) for v in state)
    return state


def detach_state(state):
    return map_state(lambda t: t.detach(), state)


def clone_state(state):
    return map_state(lambda t: t.detach().clone(), state)


class NLModel(nn.Module):
    """Base class: a token embedding, a stack of blocks, a norm and an LM head (nanoGPT-like).

    Subclasses implement `forward(tokens, state=None, update_state=True) -> ModelOutput`,
    `init_state(batch_size)` and `flops_per_token(seq_len)`.
    """

    family: str = "?"

    def init_state(self, batch_size: int):  # noqa: ARG002 - stateless models
        return None

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and hasattr(self, "tok_emb"):
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        raise NotImplementedError

    def compiled(self, mode: str = "default"):
        """The callable `torch.compile` makes of this model (`compile:` in a bench config), in one
        of `nlbench.kernels.compiling.COMPILE_MODES`: the whole model by default. Models whose
        forward pass is a Python loop over chunks override it to compile their per-chunk kernels
        instead: tracing Hope's whole unrolled chunk loop takes too long to be usable."""
        from nlbench.kernels.compiling import autotune_options

        return torch.compile(self, options=autotune_options(mode) or None)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device
