"""Hope and Hope-Attention, docs/ALGORITHMS.md §5 (Eq. 94–97).

Hope block, pre-norm residual (nanoGPT-like):
    x = x + SelfModifyingTitans(norm(x))        (Eq. 94–95; self_modifying_titans.py)
    x = CMS(x)                                  (Eq. 96–97; cms.py: each level ℓ adds
                                                 MLP^(ℓ)(norm_ℓ(x)) to the stream, in a chain)
Model: token embedding -> n_layers blocks -> RMSNorm -> LM head tied to the embedding.
Hope-Attention replaces self-modifying Titans by causal softmax attention (RoPE) and keeps CMS.

Options (`build_hope(vocab_size, d_model, n_layers, n_heads, **options)`):
    cms_levels      K, number of CMS levels (default 3, or len(cms_periods))
    cms_periods     non-decreasing positive ints, one per level ([1, 1, 1]: the all-fast
                    control). Defaults: `optimizer`
                    mode (1, 4, 16) optimizer steps — the fastest level is an ordinary MLP, the
                    slow ones consolidate every 4 / 16 steps; `in_context` mode (4, 16, 64)
                    tokens — with T ≈ 64–256 the slowest level updates a few times per sequence
                    and carries the rest along a stream. K other than 3 without periods:
                    4^ℓ (optimizer) or 4^(ℓ+1) (in_context), ℓ = 0..K-1.
    cms_mode        "optimizer" (default) | "in_context"   (spec §4)
    cms_variant     "sequential" (default) | "independent" | "nested" (in-context only: a
                    faster level re-initializes from an initial state learned at the next
                    slower level's rate, every C^(ℓ+1) tokens; periods divide one another)
    cms_objective   in-context local objective: "next_input" (default: predict the level's
                    next input) | "teach" (the teach signal δ = ∂L/∂(level output) of the
                    model's next-token loss, run segment by segment; hope only)   (cms.py)
    cms_lr_mode     "period" (default: level ℓ steps every C^(ℓ) steps at lr) | "scaled" (every
                    level steps every step at lr / C^(ℓ): the frequency control; cms.py)
    cms_hidden      SwiGLU width of each level (default: sized to match the Transformer)
    cms_lr          in-context CMS: initial η^(ℓ) = cms_lr / (C^(ℓ)·d_model), a normalized-LMS
                    step on the block's summed gradients (default 0.5; cms.py); a number for
                    every level or a list with one per level (fastest first)
    memory          "mlp" (default, Eq. 89) | "linear" (Eq. 93)          [hope only]
    mem_hidden      hidden width of each residual-MLP memory (default: head dim)   [hope only]
    chunk_size      chunk of the projection memories k, v, η, α (default 16; 64 let
                    their W2 diverge on long carried streams)                     [hope only]
    mem_chunk_size  chunk of M_mem (default 16)                                   [hope only]
    eta_init, alpha_init  learning rate / retention gates at init (0.2, 0.999: chosen so that
                    Hope learns standard.yaml's passkey stream with its optimizer; why:
                    self_modifying_titans.py docstring)                           [hope only]
    memory_kernel   "chunked" (default: PyTorch matmuls, any device) | "triton" (the fused
                    Triton DGD kernel per chunk, CUDA; same results)              [hope only]
    recompute_chunks  true: the backward pass keeps only every 4th chunk-start state of the
                    memories and recomputes the chunk steps in between: the same outputs and
                    gradients with less training memory, for time (docs/decisions.md) [hope only]
    Stabilisers of the self-modifying memories (defaults on; self_modifying_titans.py says
    why, docs/ALGORITHMS.md shows where each enters the equations)                  [hope only]:
    curvature_guard  η ← min(η, 1/‖W1‖²_op) per chunk and MLP memory (default true)
    normalize_v      v_t = L2norm(M_v(z)) (default true; the paper normalizes q and k only)
    normalized_step  step η/max(1, ‖x‖²) per matrix (default true; paper: η)
    separate_convs   one causal conv per projection memory (default true; false: one conv
                     shared by the four, the same input x_t for every M_□ as Eq. 84 writes)
    normalize_inputs L2-normalize each projection memory's input z (default true)
    w2_init_std      init std of W2 (default 1.0; null: the fan-in init 1/sqrt(head dim))
    paper_exact     true: every stabiliser at its paper value (`PAPER_FORM`: all false / null
                    except normalize_inputs, whose scale the spec leaves open), Eq. 83–91 as
                    written; a stabiliser given explicitly still wins (ablations). Accepted
                    by hope-attention too, which has none of them (attention + CMS are the
                    spec's equations already).

`model.options` holds every option after defaults and `paper_exact` (the run record stores it).

Parameter matching: the Transformer has 4d² (attention) + 3·d·swiglu_hidden(d) (MLP) per layer;
unless `cms_hidden` is given, each CMS level gets width
(transformer layer − mixer − norms) / (3·d·K), rounded to a multiple of 8 (at least 8), so the
count stays within a few percent of the Transformer at every preset.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import nn

from nlbench.kernels.compiling import compile_mode
from nlbench.models.base import ModelOutput, NLModel, detach_state
from nlbench.models.cms import CMS, CMS_LR_MODES, CMS_MODES, CMS_OBJECTIVES, CMS_VARIANTS, check_nested
from nlbench.models.inputs import no_reports
from nlbench.models.layers import CausalSelfAttention, RMSNorm, attention_flops, init_weights, swiglu_hidden
from nlbench.models.options import ModelOptions, check_size, parse_options, positive_int, with_options
from nlbench.models.self_modifying_titans import (
    MEMORY_KERNELS, MEMORY_KINDS, PAPER_FORM, STABILISERS, SelfModifyingTitans,
)

__all__ = ["Hope", "HopeAttentionOptions", "HopeBlock", "HopeOptions", "build_hope", "build_hope_attention"]

# the options SelfModifyingTitans takes (HopeOptions has the defaults)
SMT_OPTIONS = ("memory", "mem_hidden", "chunk_size", "mem_chunk_size", "eta_init", "alpha_init", "memory_kernel",
               "recompute_chunks",
               *STABILISERS)


class HopeBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mixer: str, smt_kw: dict, cms_kw: dict):
        super().__init__()
        self.mixer_kind = mixer
        self.norm = RMSNorm(d_model)
        if mixer == "smt":
            self.mixer = SelfModifyingTitans(d_model, n_heads, **smt_kw)
        else:
            self.mixer = CausalSelfAttention(d_model, n_heads)
        self.cms = CMS(d_model, **cms_kw)

    def init_state(self, batch_size: int):
        smt = self.mixer.init_state(batch_size) if self.mixer_kind == "smt" else None
        return {"smt": smt, "cms": self.cms.init_state(batch_size)}

    def forward(self, x, state):
        if self.mixer_kind == "smt":
            m, smt = self.mixer(self.norm(x), state["smt"])
        else:
            m, smt = self.mixer(self.norm(x)), None
        x, cms = self.cms(x + m, state["cms"])
        return x, {"smt": smt, "cms": cms}

    def read(self, x, state):
        """Teach objective: as `forward`, CMS read without updating (pending for `CMS.teach`)."""
        if self.mixer_kind == "smt":
            m, smt = self.mixer(self.norm(x), state["smt"])
        else:
            m, smt = self.mixer(self.norm(x)), None
        x, pending = self.cms.read(x + m, state["cms"])
        return x, {"smt": smt, "cms": state["cms"]}, pending

    def flops_per_token(self, seq_len: int) -> float:
        if self.mixer_kind == "smt":
            f = self.mixer.flops_per_token()
        else:
            d = self.mixer.proj.in_features
            f = 2 * 4 * d * d + attention_flops(seq_len, d)
        return f + self.cms.flops_per_token()


class Hope(NLModel):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, mixer: str,
                 smt_kw: dict, cms_kw: dict):
        super().__init__()
        self.family = "hope" if mixer == "smt" else "hope-attention"
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(HopeBlock(d_model, n_heads, mixer, smt_kw, cms_kw) for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        init_weights(self)
        self.lm_head.weight = self.tok_emb.weight  # tied

    def init_state(self, batch_size: int):
        states = [b.init_state(batch_size) for b in self.blocks]
        if all(s["smt"] is None and s["cms"] is None for s in states):
            return None  # Hope-Attention with optimizer-mode CMS is stateless
        return states

    def forward(self, tokens, state=None, update_state: bool = True):
        layer_states = self.init_state(tokens.shape[0]) if state is None else state
        if layer_states is None:
            layer_states = [{"smt": None, "cms": None}] * len(self.blocks)
        if len(layer_states) != len(self.blocks):
            raise ValueError(f"state has {len(layer_states)} layers, the model has {len(self.blocks)}.")
        if self.blocks[0].cms.objective == "teach":
            logits, new = self._forward_teach(tokens, layer_states)
        else:
            x, new = self.tok_emb(tokens), []
            for block, s in zip(self.blocks, layer_states):
                x, s = block(x, s)
                new.append(s)
            logits = self.lm_head(self.norm_f(x))
        if not update_state:
            return ModelOutput(logits, state)
        stateless = all(s["smt"] is None and s["cms"] is None for s in new)
        return ModelOutput(logits, None if stateless else new)

    def _forward_teach(self, tokens, states):
        """In-context CMS with the teach signal (`cms_objective: teach`, docs/ALGORITHMS.md §4).

        The model reads the call in segments of S tokens (S = gcd of the CMS step periods, so no
        segment crosses a level's block boundary). Per segment: every layer reads it with the
        current fast state, CMS levels at their current fast weights; L = Σ next-token
        cross-entropy of the segment's tokens against the tokens that follow them (the last one
        against the next segment's first token, already part of the input, so causal; the
        call's last token has no label); δ = ∂L/∂(level output), detached (the target
        out − δ is a constant); every level folds Σ_t J_tᵀ δ_t into its block sum and updates at
        its period. Outputs of a segment never depend on tokens after it plus one. The outer
        gradient reaches the initial weights and η through J (first order in δ). Under no_grad
        (evaluation) δ is still computed, on a graph local to the segment."""
        grad_on = torch.is_grad_enabled()
        S = self.blocks[0].cms.teach_period
        level0 = states[0]["cms"][0]
        T, t, logits_all = tokens.shape[1], 0, []
        first = S - int(level0["count"]) % S  # the rest of the segment a previous call left open
        while t < T:
            n = min(first if t == 0 else S, T - t)
            xs, labels = tokens[:, t:t + n], tokens[:, t + 1:t + n + 1]
            with torch.enable_grad(), (nullcontext() if grad_on else no_reports()):
                x, mid, pend = self.tok_emb(xs), [], []
                for block, s in zip(self.blocks, states):
                    x, s, p = block.read(x, s)
                    mid.append(s)
                    pend.append(p)
                logits = self.lm_head(self.norm_f(x))
                probes = [pr for p in pend for _, pr in p]
                m = labels.shape[1]
                if m:
                    loss = F.cross_entropy(logits[:, :m].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           reduction="sum")
                    deltas = torch.autograd.grad(loss, probes, retain_graph=grad_on, allow_unused=True)
                    deltas = [torch.zeros_like(pr) if d is None else d for d, pr in zip(deltas, probes)]
                else:
                    deltas = [torch.zeros_like(pr) for pr in probes]
            it = iter(deltas)
            states = []
            for block, s, p in zip(self.blocks, mid, pend):
                states.append({"smt": s["smt"], "cms": block.cms.teach(s["cms"], p, [next(it) for _ in p])})
            if not grad_on:
                states, logits = detach_state(states), logits.detach()
            logits_all.append(logits)
            t += n
        return torch.cat(logits_all, dim=1), states

    def compiled(self, mode: str = "default"):
        """Hope with each chunk step of its self-modifying layers compiled by `torch.compile`
        (projections, gates, curvature guard and DGD chunk in one graph with one fused backward;
        `self_modifying_titans._compiled_stacked_chunk_step`, or the DGD kernel alone when the two
        chunk sizes differ); the chunk loop and everything else run eagerly. On CPU with the C++
        kernel (`kernels/dgd/cpu_step`) that kernel runs instead, compiled or not: it was faster
        than the compiled step (docs/decisions.md). Hope-Attention has no chunk loop and compiles
        whole."""
        if self.family != "hope":
            return super().compiled(mode)
        mode = compile_mode(mode)
        for b in self.blocks:
            b.mixer.compile_kernels = mode
        return self

    def set_memory_kernel(self, kernel: str):
        """"chunked" (default), "triton" (Hope's memories on the Triton kernel) or "reference"
        (per-token loops) for every in-context memory."""
        if kernel not in ("chunked", "triton", "reference"):
            raise ValueError(f"kernel must be 'chunked', 'triton' or 'reference', got {kernel!r}.")
        for b in self.blocks:
            if b.mixer_kind == "smt":
                b.mixer.memory_kernel = kernel
            b.cms.reference = kernel == "reference"

    def flops_per_token(self, seq_len: int) -> float:
        d, V = self.tok_emb.embedding_dim, self.tok_emb.num_embeddings
        return float(sum(b.flops_per_token(seq_len) for b in self.blocks) + 2 * d * V)


# --- factories and validation -------------------------------------------------------------------

def _one_of(values) -> str:
    return ", ".join(map(repr, values))


class HopeAttentionOptions(ModelOptions):
    """Options of `hope-attention`: the CMS's (module docstring), and paper_exact."""

    cms_levels: int | None = None
    cms_periods: list[int] | None = None
    cms_mode: Literal[CMS_MODES] = "optimizer"
    cms_variant: Literal[CMS_VARIANTS] = "sequential"
    cms_hidden: int | None = None
    cms_lr: float | list[float] = 0.5
    cms_lr_mode: Literal[CMS_LR_MODES] = "period"
    cms_objective: Literal[CMS_OBJECTIVES] = "next_input"
    paper_exact: bool = False
    # the teach signal runs the model segment by segment; attention keeps no cache across them
    teach_ok: ClassVar[bool] = False

    @model_validator(mode="before")
    @classmethod
    def _paper_form(cls, data):
        # defaults, then `paper_exact: true`'s paper values of the stabilisers this family has,
        # then the options given explicitly (an explicit stabiliser wins: one-at-a-time ablations)
        if isinstance(data, dict) and data.get("paper_exact") is True:
            data = {**{k: v for k, v in PAPER_FORM.items() if k in cls.model_fields}, **data}
        return data

    @field_validator("cms_levels", "cms_hidden", mode="before")
    @classmethod
    def _optional_positive(cls, v, info):
        if v is None:
            return v
        try:
            return positive_int(v)
        except ValueError:
            raise ValueError(f"must be a positive integer; got {v!r}") from None

    @field_validator("cms_periods", mode="before")
    @classmethod
    def _periods(cls, v):
        if v is None:
            return v
        if not isinstance(v, (list, tuple)) or not v or not all(
                isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in v):
            raise ValueError(f"must be a non-empty list of positive integers; got {v!r}")
        if any(b < a for a, b in zip(v, v[1:])):
            raise ValueError("must be non-decreasing (one period per level, fastest first; equal periods such as "
                             f"[1, 1, 1] are the all-fast control); got {v!r}")
        return list(v)

    @field_validator("cms_lr", mode="before")
    @classmethod
    def _lr(cls, v):
        def ok(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0

        if ok(v):
            return float(v)
        if isinstance(v, (list, tuple)) and v and all(ok(x) for x in v):
            return [float(x) for x in v]
        raise ValueError(f"must be a positive number, or a list of positive numbers (one per CMS level); got {v!r}")

    @model_validator(mode="after")
    def _cms(self):
        if self.cms_objective == "teach" and self.cms_mode != "in_context":
            raise ValueError("option 'cms_objective' must be 'next_input' unless cms_mode is 'in_context' (the "
                             f"teach signal is the local objective of in-context levels); got {self.cms_objective!r}")
        if self.cms_objective == "teach" and not self.teach_ok:
            raise ValueError("option 'cms_objective' must be 'next_input' for hope-attention (the teach signal runs "
                             "the model segment by segment, and its attention keeps no cache across segments); got "
                             f"{self.cms_objective!r}")
        periods, K = self.periods(), self.cms_levels
        if K is not None and self.cms_periods is not None and len(periods) != K:
            raise ValueError(f"option 'cms_periods' must have one period per level, i.e. len(cms_periods) == "
                             f"cms_levels = {K}; got {len(periods)} periods {periods!r}")
        if isinstance(self.cms_lr, list) and len(self.cms_lr) != len(periods):
            raise ValueError(f"option 'cms_lr' must be a positive number, or a list of {len(periods)} positive "
                             f"numbers (one per CMS level); got {self.cms_lr!r}")
        if self.cms_variant == "nested":
            try:
                check_nested(self.cms_mode, periods)
            except ValueError as e:
                raise ValueError(f"option 'cms_variant': {e}") from None
        return self

    def periods(self) -> list[int]:
        """The CMS periods: given, or K levels (default 3) at 4^ℓ (in-context: 4^(ℓ+1))."""
        if self.cms_periods is not None:
            return list(self.cms_periods)
        K = 3 if self.cms_levels is None else self.cms_levels
        return [4 ** (i + (self.cms_mode == "in_context")) for i in range(K)]

    def level_lrs(self) -> list[float]:
        """cms_lr for every level."""
        K = len(self.periods())
        return list(self.cms_lr) if isinstance(self.cms_lr, list) else [self.cms_lr] * K


class HopeOptions(HopeAttentionOptions):
    """Options of `hope`: the CMS's, the self-modifying memories' and their stabilisers."""

    teach_ok: ClassVar[bool] = True

    memory: Literal[MEMORY_KINDS] = "mlp"
    mem_hidden: int | None = None
    chunk_size: int = 16
    mem_chunk_size: int = 16
    eta_init: float = 0.2
    alpha_init: float = 0.999
    memory_kernel: Literal[MEMORY_KERNELS] = "chunked"
    recompute_chunks: bool = False
    curvature_guard: bool = STABILISERS["curvature_guard"]
    normalize_v: bool = STABILISERS["normalize_v"]
    normalized_step: bool = STABILISERS["normalized_step"]
    separate_convs: bool = STABILISERS["separate_convs"]
    normalize_inputs: bool = STABILISERS["normalize_inputs"]
    w2_init_std: float | None = STABILISERS["w2_init_std"]

    @field_validator("chunk_size", "mem_chunk_size", mode="before")
    @classmethod
    def _chunks(cls, v):
        try:
            return positive_int(v)
        except ValueError:
            raise ValueError(f"must be a positive integer; got {v!r}") from None

    @field_validator("mem_hidden", mode="before")
    @classmethod
    def _mem_hidden(cls, v):
        return cls._optional_positive(v, None)

    @field_validator("eta_init", "alpha_init", mode="before")
    @classmethod
    def _gates(cls, v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1:
            raise ValueError(f"must be a number strictly between 0 and 1; got {v!r}")
        return float(v)

    @field_validator("w2_init_std", mode="before")
    @classmethod
    def _w2_std(cls, v):
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
            raise ValueError(f"must be a positive number, or null for the fan-in init 1/sqrt(head dim); got {v!r}")
        return v


def _cms_hidden(d_model, n_heads, n_levels, mixer_params):
    """Per-level SwiGLU width matching the Transformer's layer (see module docstring)."""
    transformer_layer = 4 * d_model * d_model + 3 * d_model * swiglu_hidden(d_model) + 2 * d_model
    budget = transformer_layer - mixer_params - d_model * (1 + n_levels)
    return max(8, 8 * round(budget / (3 * d_model * n_levels) / 8))


def _build(model, mixer, vocab_size, d_model, n_layers, n_heads, overrides, cls):
    o = parse_options(model, cls, overrides)
    check_size(model, d_model, n_layers, n_heads)
    opts = o.model_dump()
    periods, lr = o.periods(), o.level_lrs()
    smt_kw = {}
    if mixer == "smt":
        smt_kw = {k: opts[k] for k in SMT_OPTIONS}
        mixer_params = sum(p.numel() for p in SelfModifyingTitans(d_model, n_heads, **smt_kw).parameters())
    else:
        mixer_params = 4 * d_model * d_model
    hidden = opts["cms_hidden"]
    if hidden is None:
        hidden = _cms_hidden(d_model, n_heads, len(periods), mixer_params)
    cms_kw = dict(hidden=hidden, periods=periods, mode=opts["cms_mode"], variant=opts["cms_variant"],
                  lr=lr, lr_mode=opts["cms_lr_mode"], objective=opts["cms_objective"])
    hope = Hope(vocab_size, d_model, n_layers, n_heads, mixer, smt_kw, cms_kw)
    hope.options = {**opts, "cms_periods": periods, "cms_levels": len(periods), "cms_lr": lr, "cms_hidden": hidden,
                    **({"mem_hidden": hope.blocks[0].mixer.mem_hidden} if mixer == "smt" else {})}
    return hope


@with_options(HopeOptions)
def build_hope(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Hope:
    """Hope: self-modifying Titans + CMS per block (options: module docstring)."""
    return _build("hope", "smt", vocab_size, d_model, n_layers, n_heads, overrides, HopeOptions)


@with_options(HopeAttentionOptions)
def build_hope_attention(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Hope:
    """Hope-Attention: causal softmax attention + CMS per block (cms_* options only)."""
    return _build("hope-attention", "attention", vocab_size, d_model, n_layers, n_heads, overrides,
                  HopeAttentionOptions)
