"""Titans baselines (spec §1): the neural long-term memory as a layer (LMM), as context (MAC),
as a gate (MAG) and as a layer before sliding-window attention (MAL).

Every block is pre-norm: x = x + mixer(norm(x)); x = x + SwiGLU(norm(x)). The mixer is
  LMM  the memory alone (a recurrent sequence layer);
  MAC  per segment, attention over [persistent ‖ memory read ‖ segment], then the memory
       learns from the attention output y and gates it: o = y ⊗ σ(M(y));
  MAG  sliding-window attention (with persistent tokens) gated by the memory output;
  MAL  the memory layer, then sliding-window attention (with persistent tokens), each with
       its own residual: x = x + M(norm(x)); x = x + SWA([P ‖ norm(x)]).
Each family narrows its SwiGLU so that a block holds as many parameters as a Transformer
block of the same width (the 15% budget of ARCHITECTURE.md).

Fast state, one dict per layer: memory weights "W" and momentum "S" (lists of
[B, H, out, in]) plus the last 3 pre-conv projections ("conv", MAC also "conv_y") so the
causal conv continues exactly across calls. `update_state=False` runs the same computation
(the memory still learns within the sequence -- it is the layer's token mixer) but returns
the input state untouched.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from nlbench.baselines.transformer import check_tokens, scale_residual_init
from nlbench.kernels.compiling import compile_mode
from nlbench.kernels.titans import memory_flops_per_token, memory_read, titans_memory_chunked
from nlbench.models.base import ModelOutput, NLModel
from nlbench.models.inputs import report_chain_inputs, report_conv_input
from nlbench.models.layers import (
    CausalSelfAttention, RMSNorm, ShortConv, SwiGLU, attention_flops, causal_conv, init_weights, swiglu_hidden,
)
from nlbench.models.options import ModelOptions, check_size, in_unit, parse_options, positive_int, with_options

# Gate initialisation (the sigmoid's value at init; the bias is its logit): forgetting
# α ≈ 0.007 so memory decays slowly (not the 0.5-per-token halving of spec §7), momentum
# η = 0.5, the θ sigmoid 0.5. Options `alpha_init`, `eta_init`, `theta_init`.
GATE_INITS = {"eta_init": 0.5, "theta_init": 0.5, "alpha_init": 0.006692850924284856}  # sigmoid(-5)


class NeuralMemory(nn.Module):
    """Titans LMM over multi-head keys/values (spec §1): projections, conv, gates, memory, output.

    q, k, v = SiLU(conv4(x W)); q, k L2-normalised per head. Gates η, α = sigmoid(x W_g + b) and
    θ = max_lr · [(1 − η)] · sigmoid(x W_θ + b_θ) [/ λ_t], one per token and head; the bracketed
    factors are the stabilisers `momentum_coupling` and `key_gram_norm` (gate_values says why).
    With max_lr = 1 and both off (`paper_exact`) θ = sigmoid(x W_θ + b_θ), spec §1 as written.
    The initial memory weights are parameters (meta-learned).
    """

    def __init__(self, d_model: int, n_heads: int, memory: str = "mlp", memory_layers: int = 2,
                 memory_hidden: int | None = None, chunk_size: int = 16, max_lr: float = 0.3,
                 momentum_coupling: bool = True, key_gram_norm: bool = True,
                 eta_init: float = GATE_INITS["eta_init"], theta_init: float = GATE_INITS["theta_init"],
                 alpha_init: float = GATE_INITS["alpha_init"]):
        super().__init__()
        self.compile_kernels = False  # or a compile mode: torch.compile each memory chunk (`Titans.compiled`)
        self.n_heads, self.head_dim, self.chunk_size = n_heads, d_model // n_heads, chunk_size
        self.max_lr, self.momentum_coupling, self.key_gram_norm = max_lr, momentum_coupling, key_gram_norm
        self.gate_inits = (eta_init, theta_init, alpha_init)
        dh = self.head_dim
        hidden = memory_hidden or 2 * dh
        if memory == "linear":
            self.dims = [(dh, dh)]
        else:
            self.dims = [(hidden, dh)] + [(hidden, hidden)] * (memory_layers - 2) + [(dh, hidden)]
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.conv = ShortConv(3 * d_model, kernel_size=4)
        self.gates = nn.Linear(d_model, 3 * n_heads)
        self.w0 = nn.ParameterList(nn.Parameter(torch.randn(n_heads, o, i) / i**0.5) for o, i in self.dims)
        self.out_norm = RMSNorm(d_model)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def reset_gates(self):
        nn.init.zeros_(self.gates.weight)  # gates start input-independent, learn their dependence
        bias = torch.logit(torch.tensor(self.gate_inits, dtype=torch.float64)).float().repeat_interleave(self.n_heads)
        with torch.no_grad():
            self.gates.bias.copy_(bias)

    def init_state(self, batch_size: int, conv_keys=("conv",)) -> dict:
        ref = self.w0[0]
        state = {"W": [w.unsqueeze(0).expand(batch_size, *w.shape) for w in self.w0],
                 "S": [ref.new_zeros(batch_size, *w.shape) for w in self.w0]}
        for key in conv_keys:
            state[key] = ref.new_zeros(batch_size, self.conv.kernel_size - 1, self.qkv.out_features)
        return state

    def heads(self, x):  # [B, T, D] -> [B, H, T, dh]
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

    def project(self, x, tail):
        """q, k, v [B, H, T, dh] through the causal conv continued from `tail`; returns the new tail."""
        qkv = self.qkv(x)
        report_conv_input(self.conv.conv.weight, qkv, tail)  # DGD sees the conv's inputs (models/inputs.py)
        qkv, tail = causal_conv(qkv, tail, self.conv.conv.weight)
        q, k, v = (self.heads(t) for t in F.silu(qkv).chunk(3, dim=-1))
        return F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, tail

    def gate_values(self, x):
        """Momentum η_t, inner learning rate θ_t, forgetting α_t of spec §1, each [B, H, T] in (0, 1).

        Paper form (`paper_exact`): θ_t = sigmoid(x_t W_θ + b_θ). Default (stabilised):
        θ_t = max_lr · (1 − η_t) · sigmoid(x_t W_θ + b_θ) / λ_t, λ_t the Frobenius norm of the
        Gram matrix of the (unit) keys of token t's chunk up to t (1 ≤ λ_t ≤ C, causal; see
        `chunk_key_scale`). Guard, and why: the largest total step the memory can take on one
        gradient must stay bounded whatever gates the outer loop learns. Two things multiply a
        token's step θ_s ∇ℓ_s and neither is bounded by capping θ alone:
          - momentum: S carries ∇ℓ_s into every later update with weight η^j, a total of up
            to θ_s / (1 − η) -- 100× at η = 0.99. Even per-token Titans (C = 1) with θ = 0.1
            and η ≥ 0.9 overshoots, and an MLP memory's gradient grows like ‖W‖³ once W grows,
            so the overshoot runs away to inf;
          - chunking: inside a chunk all C gradients are taken at the chunk-start state M_b
            (spec §1, parallel form) and none sees the others' updates. SiLU-then-normalised
            keys of one sequence are often strongly correlated (cosine ~0.9 measured on
            split-digits after training), so the C frozen gradients add up to ~C times one
            token's step along the shared key direction.
        Titans-MAC on split-digits (quick.yaml, Muon 0.02) learned η → 0.86, θ → 0.085 of a 0.1
        cap: the chunk step grew ~C/(1 − η) ≈ 100× one token's, the memory weights went
        0.8 → 24 → 2.6e3 → 1e31 in a few segments and the loss turned NaN. The factor (1 − η_t)
        makes the total momentum-integrated weight of a gradient θ_s / (1 − η) ≤ max_lr, and
        1 / λ_t keeps the chunk's summed rank-one steps Σ θ_s k_s k_sᵀ within
        max_lr (1 + ln C) in operator norm even for identical keys, while nearly orthogonal keys
        keep most of their step (a fixed 1 / C would slow every write C-fold). The update itself
        is exactly spec §1 (S_t = η_t S_{t−1} − θ_t ∇ℓ, M_t = (1 − α_t) M_{t−1} + S_t); only the
        range of the data-dependent gate θ_t is chosen so that it cannot leave the stable
        region. The price: λ_t grows along a chunk, so a token's step depends on its position in
        the chunk, which the paper form does not. `momentum_coupling` switches the (1 − η_t)
        factor, `key_gram_norm` the 1 / λ_t factor, `max_lr` scales the range. This method
        returns θ before the 1 / λ_t factor (it needs the keys; `memorize` applies it).
        Gap: λ_t covers the first memory layer (its inputs are the unit keys), not the MLP's
        deeper layers, whose inputs SiLU(W1 k) are neither unit nor in the key Gram; the one
        diverged run of the defaults in configs/probe-titans.yaml was layer 2 running away
        (figures and the choice of defaults: docs/decisions.md, "Titans' stabilisers").
        """
        eta, theta, alpha = torch.sigmoid(self.gates(x)).permute(0, 2, 1).chunk(3, dim=1)
        theta = self.max_lr * theta
        return eta, (1 - eta) * theta if self.momentum_coupling else theta, alpha

    def inner_gates(self, x, k):
        """η_t, θ_t, α_t [B, H, T] as the memory update uses them: gate_values, then 1 / λ_t
        when `key_gram_norm` (k: the keys of x, [B, H, T, dh])."""
        eta, theta, alpha = self.gate_values(x)
        if self.key_gram_norm:
            theta = theta / chunk_key_scale(k, self.chunk_size)
        return eta, theta, alpha

    def memorize(self, x, state, conv_key="conv"):
        """Run the memory over x: reads y_t = M_{t-1}(q_t) while learning (k_t, v_t). Returns (out, state)."""
        q, k, v, tail = self.project(x, state[conv_key])
        report_chain_inputs(list(self.w0), q)  # the memory's initial state per head, read at q (DGD)
        eta, theta, alpha = self.inner_gates(x, k)
        y, W, S = titans_memory_chunked(q, k, v, eta, theta, alpha, state["W"], state["S"], self.chunk_size,
                                        compiled=self.compile_kernels)
        return self.output(y), {**state, "W": W, "S": S, conv_key: tail}

    def read(self, q, state):
        """M_b(q) at the current memory, without learning."""
        return self.output(memory_read(state["W"], q))

    def output(self, y):  # [B, H, T, dh] -> [B, T, D]
        B, H, T, dh = y.shape
        return self.out_proj(self.out_norm(y.transpose(1, 2).reshape(B, T, H * dh)))

    def flops_per_token(self) -> float:
        proj = 2 * (self.qkv.weight.numel() + self.gates.weight.numel() + self.out_proj.weight.numel())
        conv = 2 * self.conv.conv.weight.numel()
        return proj + conv + self.n_heads * memory_flops_per_token(self.dims, self.chunk_size)


def chunk_key_scale(k, chunk_size: int):
    """λ_t per token: ‖K_{c,≤t} K_{c,≤t}ᵀ‖_F, the Frobenius norm of the Gram matrix of the (unit)
    keys of token t's chunk up to and including t, at least 1. Returns [B, H, T].

    Causal by construction (only keys ≤ t of the chunk enter), and an upper bound on the top
    eigenvalue of that prefix Gram: C-fold for C identical keys (rank one, where the bound is
    exact), √t for orthogonal keys. With θ_s ∝ 1/λ_s the chunk's summed rank-one steps
    Σ_s θ_s k_s k_sᵀ stay within max_lr · (1 + ln C) in operator norm. The prefix sums are
    S_t = S_{t−1} + 2 Σ_{j<t} (k_t·k_j)² + (k_t·k_t)², a cumsum. Detached: a step-size
    normaliser, not a path for the outer gradient. Chunks are the kernel's (from position 0).
    """
    B, H, T, d = k.shape
    pad = (-T) % chunk_size
    kc = F.pad(k.detach().float(), (0, 0, 0, pad)).view(B, H, -1, chunk_size, d)
    g2 = (kc @ kc.transpose(-1, -2)).square()
    strict = torch.tril(torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=k.device), -1)
    row = 2 * (g2 * strict).sum(-1) + torch.diagonal(g2, dim1=-2, dim2=-1)
    lam = row.cumsum(-1).sqrt().clamp_min(1.0).flatten(-2)
    return lam[..., :T].to(k.dtype)


def matched_mlp_hidden(d_model: int, mixer: nn.Module) -> int:
    """SwiGLU width that makes mixer + MLP hold the parameters of a Transformer block (4d² + 3d·h)."""
    extra = sum(p.numel() for p in mixer.parameters()) - 4 * d_model * d_model
    h = swiglu_hidden(d_model) - extra / (3 * d_model)
    return max(16, 16 * round(h / 16))


class LMMBlock(nn.Module):
    def __init__(self, d_model, n_heads, mem_kw):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.memory = NeuralMemory(d_model, n_heads, **mem_kw)
        self.mlp = SwiGLU(d_model, matched_mlp_hidden(d_model, self))

    def init_state(self, batch_size):
        return self.memory.init_state(batch_size)

    def forward(self, x, state):
        m, state = self.memory.memorize(self.norm1(x), state)
        x = x + m
        return x + self.mlp(self.norm2(x)), state

    def flops_per_token(self, seq_len):
        return self.memory.flops_per_token() + 2 * 3 * self.mlp.w_up.weight.numel()


class MAGBlock(nn.Module):
    """o = SWA([P ‖ x]) ⊗ σ(M(x)): sliding-window attention gated by the memory output."""

    def __init__(self, d_model, n_heads, mem_kw, window, n_persistent):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model) * 0.02)
        self.nlbench_no_input = ("persistent",)  # learned tokens, no layer input: AdamW under DGD
        self.attn = CausalSelfAttention(d_model, n_heads, window=window)
        self.memory = NeuralMemory(d_model, n_heads, **mem_kw)
        self.mlp = SwiGLU(d_model, matched_mlp_hidden(d_model, self))

    def init_state(self, batch_size):
        return self.memory.init_state(batch_size)

    def forward(self, x, state):
        h = self.norm1(x)
        P = self.persistent.unsqueeze(0).expand(h.shape[0], -1, -1)
        a = self.attn(torch.cat([P, h], dim=1), n_prefix=P.shape[1])[:, P.shape[1]:]
        m, state = self.memory.memorize(h, state)
        x = x + a * torch.sigmoid(m)
        return x + self.mlp(self.norm2(x)), state

    def flops_per_token(self, seq_len):
        d = self.attn.proj.in_features
        attn = 2 * (self.attn.qkv.weight.numel() + self.attn.proj.weight.numel())
        attn += attention_flops(seq_len, d, self.attn.window) + 2 * 2 * self.persistent.shape[0] * d
        return attn + self.memory.flops_per_token() + 2 * 3 * self.mlp.w_up.weight.numel()


class MALBlock(nn.Module):
    """Memory as a layer: x = x + M(norm(x)); x = x + SWA([P ‖ norm(x)]); x = x + SwiGLU(norm(x)).
    The memory compresses the past beyond the window; the attention reads the memory's output
    (and the persistent tokens) within its sliding window."""

    def __init__(self, d_model, n_heads, mem_kw, window, n_persistent):
        super().__init__()
        self.norm1, self.norm_attn, self.norm2 = RMSNorm(d_model), RMSNorm(d_model), RMSNorm(d_model)
        self.memory = NeuralMemory(d_model, n_heads, **mem_kw)
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model) * 0.02)
        self.nlbench_no_input = ("persistent",)  # learned tokens, no layer input: AdamW under DGD
        self.attn = CausalSelfAttention(d_model, n_heads, window=window)
        self.mlp = SwiGLU(d_model, matched_mlp_hidden(d_model, self))

    def init_state(self, batch_size):
        return self.memory.init_state(batch_size)

    def forward(self, x, state):
        m, state = self.memory.memorize(self.norm1(x), state)
        x = x + m
        h = self.norm_attn(x)
        P = self.persistent.unsqueeze(0).expand(h.shape[0], -1, -1)
        x = x + self.attn(torch.cat([P, h], dim=1), n_prefix=P.shape[1])[:, P.shape[1]:]
        return x + self.mlp(self.norm2(x)), state

    def flops_per_token(self, seq_len):
        d = self.attn.proj.in_features
        attn = 2 * (self.attn.qkv.weight.numel() + self.attn.proj.weight.numel())
        attn += attention_flops(seq_len, d, self.attn.window) + 2 * 2 * self.persistent.shape[0] * d
        return attn + self.memory.flops_per_token() + 2 * 3 * self.mlp.w_up.weight.numel()


class MACBlock(nn.Module):
    """Memory as context, one segment at a time.

    For a segment s with normalised input h:
      r = M_{s-1}(q(h))                    read at the segment-start memory (no learning)
      y = Attn([P ‖ r ‖ h])                persistent tokens, memory reads, segment
      m = M(norm(y)) learning from y       reads M_{t-1}, so each token sees only its past
      o = y ⊗ σ(m)
    Causality: r_j depends on h_j, so r and h are interleaved (r_1, h_1, r_2, h_2, ...) under
    a causal mask -- h_i attends to P, r_{≤i}, h_{≤i} and never to the read of a later token.
    The memory state handed to the next segment has learned the whole segment.
    """

    def __init__(self, d_model, n_heads, mem_kw, segment_len, n_persistent):
        super().__init__()
        self.segment_len = segment_len
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.read_norm, self.y_norm = RMSNorm(d_model), RMSNorm(d_model)
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model) * 0.02)
        self.nlbench_no_input = ("persistent",)  # learned tokens, no layer input: AdamW under DGD
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.memory = NeuralMemory(d_model, n_heads, **mem_kw)
        self.mlp = SwiGLU(d_model, matched_mlp_hidden(d_model, self))

    def init_state(self, batch_size):
        return self.memory.init_state(batch_size, conv_keys=("conv", "conv_y"))

    def forward(self, x, state):
        h = self.norm1(x)
        B, T, D = h.shape
        q_read, _, _, tail_x = self.memory.project(h, state["conv"])
        P = self.persistent.unsqueeze(0).expand(B, -1, -1)
        n_p, outs = P.shape[1], []
        # split once (a slice per segment would zero-fill a full-length gradient per segment)
        for seg, q_seg in zip(h.split(self.segment_len, dim=1), q_read.split(self.segment_len, dim=2)):
            L = seg.shape[1]
            r = self.read_norm(self.memory.read(q_seg, state))
            ctx = torch.stack([r, seg], dim=2).reshape(B, 2 * L, D)        # r_1, h_1, r_2, h_2, ...
            y = self.attn(torch.cat([P, ctx], dim=1), n_prefix=n_p)[:, n_p + 1 :: 2]
            m, state = self.memory.memorize(self.y_norm(y), state, conv_key="conv_y")
            outs.append(y * torch.sigmoid(m))
        x = x + torch.cat(outs, dim=1)
        return x + self.mlp(self.norm2(x)), {**state, "conv": tail_x}

    def flops_per_token(self, seq_len):
        d = self.attn.proj.in_features
        ctx = min(seq_len, self.segment_len)
        attn = 2 * 2 * (self.attn.qkv.weight.numel() + self.attn.proj.weight.numel())  # r and h tokens
        attn += 2 * (attention_flops(2 * ctx, d) + 2 * 2 * self.persistent.shape[0] * d)
        read = 2 * self.memory.qkv.weight.numel() + self.memory.n_heads * 2 * sum(o * i for o, i in self.memory.dims)
        return attn + read + self.memory.flops_per_token() + 2 * 3 * self.mlp.w_up.weight.numel()


class Titans(NLModel):
    """Token embedding, a stack of Titans blocks, final norm, tied LM head."""

    def __init__(self, variant: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 block_fn):
        super().__init__()
        self.family = f"titans-{variant}"
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(block_fn() for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        init_weights(self)
        scale_residual_init(self, n_layers)
        for block in self.blocks:
            block.memory.reset_gates()

    def init_state(self, batch_size: int):
        return [block.init_state(batch_size) for block in self.blocks]

    def compiled(self, mode: str = "default"):
        """Titans with each memory chunk compiled by `torch.compile` in `mode`, the chunk loop
        eager (`NLModel.compiled`: tracing the unrolled loop does not finish in useful time)."""
        mode = compile_mode(mode)
        for m in self.modules():
            if isinstance(m, NeuralMemory):
                m.compile_kernels = mode
        return self

    def forward(self, tokens, state=None, update_state: bool = True):
        check_tokens(tokens)
        layer_states = self.init_state(tokens.shape[0]) if state is None else state
        if len(layer_states) != len(self.blocks):
            raise ValueError(f"state has {len(layer_states)} layers, the model has {len(self.blocks)}.")
        x, new_states = self.tok_emb(tokens), []
        for block, s in zip(self.blocks, layer_states):
            x, s = block(x, s)
            new_states.append(s)
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits, new_states if update_state else state)

    def flops_per_token(self, seq_len: int) -> float:
        return float(sum(b.flops_per_token(seq_len) for b in self.blocks) + 2 * self.d_model * self.vocab_size)


# The stabilisers and their paper values (`paper_exact: true`); gate inits are hyper-parameters.
STABILISER_DEFAULTS = {"max_lr": 0.3, "momentum_coupling": True, "key_gram_norm": True}
PAPER_FORM = {"max_lr": 1.0, "momentum_coupling": False, "key_gram_norm": False}


class TitansOptions(ModelOptions):
    """Options of `titans-lmm` (the memory's options, shared by every Titans variant)."""

    chunk_size: int = Field(16, description="tokens per parallel memory chunk (1 = exact per-token Titans)")
    memory: Literal["mlp", "linear"] = Field("mlp", description="the memory's form")
    memory_layers: int = Field(2, description="layers of the MLP memory, >= 2")
    memory_hidden: int | None = Field(None, description="hidden width of the MLP memory per head (default 2 * head_dim)")
    max_lr: float = Field(STABILISER_DEFAULTS["max_lr"],
                          description="in (0, 1] (paper 1): θ_t = max_lr · sigmoid(·), times the factors below")
    momentum_coupling: bool = Field(True, description="true (paper false): θ_t carries a factor (1 − η_t)")
    key_gram_norm: bool = Field(True, description="true (paper false): θ_t divided by λ_t, the norm of the "
                                                  "chunk's prefix key Gram")
    eta_init: float = Field(GATE_INITS["eta_init"], description="momentum gate η at init, in (0, 1)")
    theta_init: float = Field(GATE_INITS["theta_init"], description="θ gate sigmoid at init, in (0, 1)")
    alpha_init: float = Field(GATE_INITS["alpha_init"], description="forgetting gate α at init, in (0, 1)")
    paper_exact: bool = Field(False, description="true: max_lr 1, momentum_coupling and key_gram_norm false "
                                                 "(spec §1 as written); options given beside it still win")

    @model_validator(mode="before")
    @classmethod
    def _paper_form(cls, data):
        # defaults, then paper_exact's paper values, then the options given explicitly (an
        # explicit stabiliser wins: one-at-a-time ablations)
        if isinstance(data, dict) and data.get("paper_exact") is True:
            data = {**PAPER_FORM, **data}
        return data

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _chunk(cls, v):
        return positive_int(v)

    @field_validator("memory_layers", mode="before")
    @classmethod
    def _layers(cls, v):
        return positive_int(v, minimum=2)

    @field_validator("memory_hidden", mode="before")
    @classmethod
    def _hidden(cls, v):
        return None if v is None else positive_int(v)

    @field_validator("max_lr", mode="before")
    @classmethod
    def _max_lr(cls, v):
        return in_unit(v, closed_high=True)

    @field_validator("eta_init", "theta_init", "alpha_init", mode="before")
    @classmethod
    def _gate(cls, v):
        return in_unit(v)

    def memory_kwargs(self) -> dict:
        """The NeuralMemory keyword arguments."""
        return {k: getattr(self, k) for k in ("chunk_size", "memory", "memory_layers", "memory_hidden",
                                              *STABILISER_DEFAULTS, *GATE_INITS)}


class TitansMACOptions(TitansOptions):
    """Options of `titans-mac`: the memory's, and its segments and persistent tokens."""

    segment_len: int = Field(32, description="tokens per MAC segment")
    n_persistent: int = Field(4, description="learned persistent-memory tokens")

    @field_validator("segment_len", mode="before")
    @classmethod
    def _segment(cls, v):
        return positive_int(v)

    @field_validator("n_persistent", mode="before")
    @classmethod
    def _persistent(cls, v):
        return positive_int(v, minimum=0)


# Sliding window of MAG / MAL: half the shipped 64-token sequences, so that it slides.
DEFAULT_WINDOW = 32


class TitansWindowOptions(TitansOptions):
    """Options of `titans-mag` and `titans-mal`: the memory's, the sliding window, persistent tokens."""

    window: int = Field(DEFAULT_WINDOW, description="sliding-window attention span in tokens, itself included")
    n_persistent: int = Field(4, description="learned persistent-memory tokens")

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v):
        return positive_int(v)

    @field_validator("n_persistent", mode="before")
    @classmethod
    def _persistent(cls, v):
        return positive_int(v, minimum=0)


def _titans(variant, vocab_size, d_model, n_layers, n_heads, options, block_fn) -> Titans:
    model = Titans(variant, vocab_size, d_model, n_layers, n_heads, block_fn)
    model.options = options.model_dump()
    return model


def _options(name: str, cls, d_model, n_layers, n_heads, overrides):
    opts = parse_options(name, cls, overrides)
    check_size(name, d_model, n_layers, n_heads)
    return opts


@with_options(TitansOptions)
def build_titans_lmm(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Titans:
    opts = _options("titans-lmm", TitansOptions, d_model, n_layers, n_heads, overrides)
    mem_kw = opts.memory_kwargs()
    return _titans("lmm", vocab_size, d_model, n_layers, n_heads, opts, lambda: LMMBlock(d_model, n_heads, mem_kw))


@with_options(TitansMACOptions)
def build_titans_mac(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Titans:
    opts = _options("titans-mac", TitansMACOptions, d_model, n_layers, n_heads, overrides)
    mem_kw, seg, n_p = opts.memory_kwargs(), opts.segment_len, opts.n_persistent
    return _titans("mac", vocab_size, d_model, n_layers, n_heads, opts,
                   lambda: MACBlock(d_model, n_heads, mem_kw, seg, n_p))


def _windowed(name, variant, block_cls, vocab_size, d_model, n_layers, n_heads, overrides) -> Titans:
    opts = _options(name, TitansWindowOptions, d_model, n_layers, n_heads, overrides)
    mem_kw, window, n_p = opts.memory_kwargs(), opts.window, opts.n_persistent
    return _titans(variant, vocab_size, d_model, n_layers, n_heads, opts,
                   lambda: block_cls(d_model, n_heads, mem_kw, window, n_p))


@with_options(TitansWindowOptions)
def build_titans_mag(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Titans:
    return _windowed("titans-mag", "mag", MAGBlock, vocab_size, d_model, n_layers, n_heads, overrides)


@with_options(TitansWindowOptions)
def build_titans_mal(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Titans:
    return _windowed("titans-mal", "mal", MALBlock, vocab_size, d_model, n_layers, n_heads, overrides)
