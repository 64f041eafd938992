"""Transformer baseline: the parameter budget, tied head, FLOPs formula, reference attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nlbench.models import ModelConfigError, build_model
from nlbench.models.layers import swiglu_hidden

torch.set_num_threads(1)


def test_parameter_count_by_hand():
    """V·d (tied embedding/head) + L (4d² attention + 3dh SwiGLU + 2d norms) + d final norm."""
    V, d, L = 256, 64, 2
    h = swiglu_hidden(d)
    assert h == 176
    model = build_model("transformer", size="tiny", vocab_size=V)
    assert model.num_params() == V * d + L * (4 * d * d + 3 * d * h + 2 * d) + d
    assert model.num_params(non_embedding=True) == model.num_params() - V * d


def test_head_is_tied_to_embedding():
    model = build_model("transformer", size="tiny", vocab_size=32)
    assert model.lm_head.weight is model.tok_emb.weight


def test_flops_per_token_by_hand():
    """2·(matmul weights) per token + causal attention 2·2·(T/2)·d per layer + LM head."""
    V, d, L, T = 256, 128, 2, 256
    h = swiglu_hidden(d)
    model = build_model("transformer", size="small", vocab_size=V)
    expected = L * (2 * (4 * d * d + 3 * d * h) + 4 * (T / 2) * d) + 2 * d * V
    assert model.flops_per_token(T) == pytest.approx(expected)


def test_forward_matches_explicit_attention():
    """Recompute one block with an explicit softmax(QKᵀ/√d + causal mask) V and RoPE."""
    torch.manual_seed(0)
    model = build_model("transformer", size="tiny", vocab_size=32, n_layers=1).eval()
    x = torch.randint(0, 32, (2, 9))
    blk = model.blocks[0]
    e = model.tok_emb(x)
    h = blk.norm1(e)
    B, T, D = h.shape
    H, hd = 2, D // 2
    q, k, v = blk.attn.qkv(h).view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = pos[:, None] * inv[None]

    def rope(z):
        z1, z2 = z[..., 0::2], z[..., 1::2]
        return torch.stack([z1 * ang.cos() - z2 * ang.sin(), z1 * ang.sin() + z2 * ang.cos()], -1).flatten(-2)

    att = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd)
    att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
    y = blk.attn.proj((att @ v).transpose(1, 2).reshape(B, T, D))
    z = e + y
    z = z + blk.mlp.w_down(F.silu(blk.mlp.w_gate(blk.norm2(z))) * blk.mlp.w_up(blk.norm2(z)))
    expected = model.lm_head(model.norm(z))
    torch.testing.assert_close(model(x).logits, expected, atol=1e-5, rtol=1e-4)


def test_stateless():
    model = build_model("transformer", size="tiny", vocab_size=32)
    x = torch.randint(0, 32, (2, 8))
    assert model.init_state(2) is None
    assert model(x).state is None and model(x, update_state=False).state is None


def test_bad_inputs_give_clear_errors():
    model = build_model("transformer", size="tiny", vocab_size=32)
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.randint(0, 32, (8,)))
    with pytest.raises(ValueError, match=r"integer tensor"):
        model(torch.rand(2, 8))
    with pytest.raises(ModelConfigError, match="divisible"):
        build_model("transformer", size="tiny", vocab_size=32, n_heads=3)
    with pytest.raises(ModelConfigError, match="'mlp_hidden'"):
        build_model("transformer", size="tiny", vocab_size=32, mlp_hidden=0)
