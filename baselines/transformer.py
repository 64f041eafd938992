"""Transformer baseline (nanoGPT style): pre-norm blocks of causal RoPE attention + SwiGLU MLP.

It defines the parameter budget that every other family matches within 15% at each size
preset. By default it has no fast state (`state` is always None). With `kv_window` (an int or
"full") its state is a KV cache carried across calls, the in-context baseline of the
`in_context` protocol: per layer the keys (before RoPE) and values of the last `kv_window`
tokens read so far ("full": all of them). A call's queries attend to the whole cache plus the
causal prefix of their own sequence; RoPE positions count from the cache's first token, so
attention sees relative offsets only. `state=None` starts from an empty cache, which computes
exactly what the stateless model computes; update_state=False returns the cache untouched.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from nlbench.models.base import ModelOutput, NLModel
from nlbench.models.layers import (CausalSelfAttention, RMSNorm, SwiGLU, apply_rope, attention_flops, init_weights,
                                   rope_cache, swiglu_hidden)
from nlbench.models.options import ModelOptions, check_size, parse_options, positive_int, with_options


def check_tokens(tokens) -> None:
    """Clear errors for the token batch every model receives."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        dtype = getattr(tokens, "dtype", None)
        raise ValueError(f"tokens must be an integer tensor [batch, seq_len]; got {got} of dtype {dtype}.")
    if tokens.shape[1] == 0:
        raise ValueError("tokens must hold at least one position (seq_len >= 1).")


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

    def forward(self, x, cache=None, window: int | None = None):
        """Without `cache` plain causal attention; with one (dict k, v [B, H, L, hd]) the queries
        also attend to the L cached tokens, and the new cache (last `window` tokens, None = all)
        is returned with the output."""
        if cache is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        a, cache = cached_attention(self.attn, self.norm1(x), cache, window)
        x = x + a
        return x + self.mlp(self.norm2(x)), cache


def cached_attention(attn: CausalSelfAttention, x, cache: dict, window: int | None):
    """Causal attention over [cache ; x] for the queries of x; keys are cached before RoPE and
    rotated by their position in the concatenation, the queries by theirs (L … L+T−1)."""
    B, T, D = x.shape
    H, hd = attn.n_heads, attn.head_dim
    q, k, v = attn.qkv(x).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    keys, values = torch.cat([cache["k"].to(k.dtype), k], dim=2), torch.cat([cache["v"].to(v.dtype), v], dim=2)
    L = keys.shape[2] - T
    cos, sin = rope_cache(L + T, hd, x.device, q.dtype)
    qr, kr = apply_rope(q, cos[L:], sin[L:]), apply_rope(keys, cos, sin)
    if L == 0:
        y = F.scaled_dot_product_attention(qr, kr, values, is_causal=True)
    else:
        mask = torch.arange(L + T, device=x.device)[None, :] <= (L + torch.arange(T, device=x.device))[:, None]
        y = F.scaled_dot_product_attention(qr, kr, values, attn_mask=mask)
    keep = keys.shape[2] if window is None else min(window, keys.shape[2])
    new = {"k": keys[:, :, keys.shape[2] - keep:], "v": values[:, :, values.shape[2] - keep:]}
    return attn.proj(y.transpose(1, 2).reshape(B, T, D)), new


class Transformer(NLModel):
    family = "transformer"

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, mlp_hidden: int | None = None,
                 kv_window: int | str | None = None):
        super().__init__()
        self.kv_window = kv_window  # None: stateless; int / "full": KV cache carried across calls
        self.n_heads = n_heads
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.mlp_hidden = mlp_hidden or swiglu_hidden(d_model)
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, self.mlp_hidden) for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        init_weights(self)
        scale_residual_init(self, n_layers)

    def init_state(self, batch_size: int):
        """kv_window set: an empty cache per layer; else None (stateless)."""
        if self.kv_window is None:
            return None
        hd = self.d_model // self.n_heads
        ref = self.tok_emb.weight
        empty = lambda: ref.new_zeros(batch_size, self.n_heads, 0, hd)  # noqa: E731
        return [{"k": empty(), "v": empty()} for _ in self.blocks]

    def forward(self, tokens, state=None, update_state: bool = True):
        check_tokens(tokens)
        x = self.tok_emb(tokens)
        if self.kv_window is None:
            for block in self.blocks:
                x = block(x)
            return ModelOutput(self.lm_head(self.norm(x)), None)
        caches = self.init_state(tokens.shape[0]) if state is None else state
        if len(caches) != len(self.blocks):
            raise ValueError(f"state has {len(caches)} layers, the model has {len(self.blocks)}.")
        window = None if self.kv_window == "full" else int(self.kv_window)
        new = []
        for block, cache in zip(self.blocks, caches):
            x, c = block(x, cache, window)
            new.append(c)
        return ModelOutput(self.lm_head(self.norm(x)), new if update_state else state)

    def flops_per_token(self, seq_len: int) -> float:
        d, h = self.d_model, self.mlp_hidden
        per_layer = 2 * (4 * d * d + 3 * d * h) + attention_flops(seq_len, d)
        return float(self.n_layers * per_layer + 2 * d * self.vocab_size)


class TransformerOptions(ModelOptions):
    """Options of `transformer` (the size fields d_model, n_layers, n_heads come from the preset)."""

    mlp_hidden: int | None = Field(None, description="SwiGLU hidden width (default swiglu_hidden(d_model))")
    kv_window: int | str | None = Field(
        None, description="KV cache carried across calls: tokens kept (int >= 1) or 'full'; default none")

    @field_validator("mlp_hidden", mode="before")
    @classmethod
    def _hidden(cls, v):
        return None if v is None else positive_int(v)

    @field_validator("kv_window", mode="before")
    @classmethod
    def _kv(cls, v):
        if v is None or v == "full":
            return v
        try:
            return positive_int(v)
        except ValueError:
            raise ValueError(f"must be an integer >= 1 (tokens kept) or 'full', got {v!r}") from None


@with_options(TransformerOptions)
def build_transformer(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Transformer:
    opts = parse_options("transformer", TransformerOptions, overrides)
    check_size("transformer", d_model, n_layers, n_heads)
    return Transformer(vocab_size, d_model, n_layers, n_heads, **opts.model_dump())
