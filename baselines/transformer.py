"""Transformer baseline (nanoGPT style): pre-norm blocks of causal RoPE attention + SwiGLU MLP.

It has no fast state (`state` is always None) and defines the parameter budget that every
other family matches within 15% at each size preset.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nlbench.models import ModelConfigError, check_overrides
from nlbench.models.base import ModelOutput, NLModel
from nlbench.models.layers import CausalSelfAttention, RMSNorm, SwiGLU, attention_flops, init_weights, swiglu_hidden


def check_tokens(tokens) -> None:
    """Clear errors for the token batch every model receives."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        dtype = getattr(tokens, "dtype", None)
        raise ValueError(f"tokens must be an integer tensor [batch, seq_len]; got {got} of dtype {dtype}.")
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold at least one position (seq_len >= 1).")


def check_positive_int(model: str, name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelConfigError(f"model '{model}': option '{name}' must be an integer >= {minimum}, got {value!r}.")
    return value


def scale_residual_init(model: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 init: projections writing into the residual stream get std / sqrt(2 n_layers)."""
    for name, p in model.named_parameters():
        if name.endswith(("proj.weight", "w_down.weight", "out_proj.weight")):
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * n_layers))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.norm2 = RMSNorm(d_model)
        self.mlp = SwiGLU(d_model, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Transformer(NLModel):
    family = "transformer"

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, mlp_hidden: int | None = None):
        super().__init__()
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.mlp_hidden = mlp_hidden or swiglu_hidden(d_model)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, self.mlp_hidden) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        init_weights(self)
        scale_residual_init(self, n_layers)

    def forward(self, tokens, state=None, update_state: bool = True):  # noqa: ARG002 - stateless
        check_tokens(tokens)
        x = self.tok_emb(tokens)
        for block in self.blocks:
            x = block(x)
        return ModelOutput(self.lm_head(self.norm(x)), None)

    def flops_per_token(self, seq_len: int) -> float:
        d, h = self.d_model, self.mlp_hidden
        per_layer = 2 * (4 * d * d + 3 * d * h) + attention_flops(seq_len, d)
        return float(self.n_layers * per_layer + 2 * d * self.vocab_size)


TRANSFORMER_OPTIONS = {"mlp_hidden": "SwiGLU hidden width (default swiglu_hidden(d_model))"}


def build_transformer(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Transformer:
    check_overrides("transformer", overrides, TRANSFORMER_OPTIONS)
    for name, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
        check_positive_int("transformer", name, value)
    if d_model % n_heads:
        raise ModelConfigError(f"model 'transformer': d_model={d_model} must be divisible by n_heads={n_heads}.")
    if overrides.get("mlp_hidden") is not None:
        check_positive_int("transformer", "mlp_hidden", overrides["mlp_hidden"])
    return Transformer(vocab_size, d_model, n_layers, n_heads, **overrides)
