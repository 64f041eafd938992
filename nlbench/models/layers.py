"""Building blocks shared by every model: RMSNorm, RoPE, SwiGLU, short causal conv, attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nlbench.models.inputs import report_conv_input


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    """y = W_down (SiLU(W_gate x) * W_up x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=False)
        self.w_up = nn.Linear(dim, hidden, bias=False)
        self.w_down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


def swiglu_hidden(dim: int, mult: float = 8 / 3, multiple_of: int = 16) -> int:
    h = int(dim * mult)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def rope_cache(seq_len: int, head_dim: int, device, dtype=torch.float32, base: float = 10000.0):
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: [B, H, T, D]; rotate pairs (even, odd) by position."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[: x.shape[-2]], sin[: x.shape[-2]]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


def causal_conv(x, tail, weight):
    """Depthwise causal conv over time continuing from the previous call's last inputs: x [B, T, D],
    tail [B, K−1, D] (the last inputs seen), weight [D·m, 1, K] (input channel c feeds outputs
    c·m .. c·m+m−1, as `F.conv1d(groups=D)`). Returns ([B, T, D·m], new tail).

    Written as K shifted multiply-adds in the [B, T, D] layout rather than `F.conv1d`: no
    transposes around the conv, and under `torch.compile` the taps fuse with the L2 norms that
    follow instead of calling oneDNN's depthwise conv, whose backward was slow at these sizes
    (docs/decisions.md)."""
    xx = torch.cat([tail, x], dim=1)
    (B, T, D), K = x.shape, weight.shape[-1]
    w = weight.view(D, weight.shape[0] // D, K)
    y = xx[:, :T, :, None] * w[:, :, 0]
    for j in range(1, K):
        y = y + xx[:, j:j + T, :, None] * w[:, :, j]
    return y.flatten(-2), xx[:, xx.shape[1] - tail.shape[1]:]


class ShortConv(nn.Module):
    """Depthwise causal 1-D convolution over time (window 4 by default), as in Titans/Hope; the
    weight lives in an `nn.Conv1d` (its init and parameter name), the forward is `causal_conv`."""

    def __init__(self, dim: int, kernel_size: int = 4):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(dim, dim, kernel_size, groups=dim, padding=0, bias=False)

    def forward(self, x):  # x: [B, T, D], zeros before the first token
        tail = x.new_zeros(x.shape[0], self.kernel_size - 1, x.shape[-1])
        report_conv_input(self.conv.weight, x, tail)  # DGD sees the conv's inputs (models/inputs.py)
        return causal_conv(x, tail, self.conv.weight)[0]


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with RoPE via F.scaled_dot_product_attention.

    `window`: sliding-window attention (each token sees the last `window` tokens, itself
    included); `n_prefix`: number of leading positions (e.g. persistent-memory tokens) that
    every token may attend to regardless of the window.
    """

    def __init__(self, dim: int, n_heads: int, window: int | None = None):
        super().__init__()
        assert dim % n_heads == 0, f"d_model={dim} must be divisible by n_heads={n_heads}"
        self.n_heads, self.head_dim, self.window = n_heads, dim // n_heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, n_prefix: int = 0):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        cos, sin = rope_cache(T, self.head_dim, x.device, q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.window is None and n_prefix == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(T, self.window, n_prefix, x.device))
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


def attention_mask(T: int, window: int | None, n_prefix: int, device) -> torch.Tensor:
    """Boolean [T, T] mask, True = may attend. Causal, optional sliding window, prefix always visible."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    m = j <= i
    if window is not None:
        m = m & ((i - j < window) | (j < n_prefix))
    return m


def attention_flops(seq_len: int, dim: int, window: int | None = None) -> float:
    """Matmul FLOPs per token of the score and value products (causal: average context T/2)."""
    ctx = seq_len / 2 if window is None else min(window, seq_len / 2)
    return 2 * 2 * ctx * dim


def init_weights(module: nn.Module, std: float = 0.02):
    """nanoGPT-style init for Linear/Embedding; leaves other parameters as their modules set them."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)

