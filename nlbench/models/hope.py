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
    cms_variant     "sequential" (default) | "independent"
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
    eta_init, alpha_init  learning rate / retention gates at init (0.7, 0.99; why:
                    self_modifying_titans.py docstring)                           [hope only]
    memory_kernel   "chunked" (default: PyTorch matmuls, any device) | "triton" (the fused
                    Triton DGD kernel per chunk, CUDA; same results)              [hope only]
    recompute_chunks  true: each DGD chunk keeps only its inputs for the backward pass and
                    recomputes its intermediates there: the same outputs and gradients with
                    less training memory, for some time (docs/decisions.md) [hope only]
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

from torch import nn

from nlbench.kernels.compiling import compile_mode
from nlbench.models import ModelConfigError, check_overrides
from nlbench.models.base import ModelOutput, NLModel
from nlbench.models.cms import CMS, CMS_LR_MODES, CMS_MODES, CMS_VARIANTS
from nlbench.models.layers import CausalSelfAttention, RMSNorm, attention_flops, init_weights, swiglu_hidden
from nlbench.models.self_modifying_titans import (
    MEMORY_KERNELS, MEMORY_KINDS, PAPER_FORM, STABILISERS, SelfModifyingTitans,
)

__all__ = ["Hope", "HopeBlock", "build_hope", "build_hope_attention"]

CMS_DEFAULTS = dict(cms_levels=None, cms_periods=None, cms_mode="optimizer", cms_variant="sequential",
                    cms_hidden=None, cms_lr=0.5, cms_lr_mode="period")
SMT_DEFAULTS = dict(memory="mlp", mem_hidden=None, chunk_size=16, mem_chunk_size=16, eta_init=0.7,
                    alpha_init=0.99, memory_kernel="chunked", recompute_chunks=False, **STABILISERS)


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
        x, new = self.tok_emb(tokens), []
        for block, s in zip(self.blocks, layer_states):
            x, s = block(x, s)
            new.append(s)
        logits = self.lm_head(self.norm_f(x))
        if not update_state:
            return ModelOutput(logits, state)
        stateless = all(s["smt"] is None and s["cms"] is None for s in new)
        return ModelOutput(logits, None if stateless else new)

    def compiled(self, mode: str = "default"):
        """Hope with each chunk step of its self-modifying layers compiled by `torch.compile`
        (projections, gates, curvature guard and DGD chunk in one graph with one fused backward;
        `self_modifying_titans._compiled_fused_chunk_step`, or the DGD kernel alone when the two
        chunk sizes differ); the chunk loop and everything else run eagerly. Hope-Attention has
        no chunk loop and compiles whole."""
        if self.family != "hope":
            return super().compiled(mode)
        mode = compile_mode(mode)
        for b in self.blocks:
            b.mixer.compile_kernels = mode
        return self

    def set_kernel(self, kernel: str):
        """"chunked" (default), "triton" (Hope's memories on the Triton kernel) or "reference"
        (per-token loops) for every in-context memory."""
        if kernel not in ("chunked", "triton", "reference"):
            raise ValueError(f"kernel must be 'chunked', 'triton' or 'reference', got {kernel!r}.")
        for b in self.blocks:
            if b.mixer_kind == "smt":
                b.mixer.kernel = kernel
            b.cms.reference = kernel == "reference"

    def flops_per_token(self, seq_len: int) -> float:
        d, V = self.tok_emb.embedding_dim, self.tok_emb.num_embeddings
        return float(sum(b.flops_per_token(seq_len) for b in self.blocks) + 2 * d * V)


# --- factories and validation -------------------------------------------------------------------

def _err(model: str, field: str, allowed: str, got) -> ModelConfigError:
    return ModelConfigError(f"model '{model}': option '{field}' must be {allowed}; got {got!r}.")


def _pos_int(model, field, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _err(model, field, "a positive integer", value)
    return value


def _open_unit(model, field, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
        raise _err(model, field, "a number strictly between 0 and 1", value)
    return float(value)


def _cms_periods(model, opts):
    mode = opts["cms_mode"]
    if mode not in CMS_MODES:
        raise _err(model, "cms_mode", f"one of {', '.join(map(repr, CMS_MODES))}", mode)
    if opts["cms_variant"] not in CMS_VARIANTS:
        raise _err(model, "cms_variant", f"one of {', '.join(map(repr, CMS_VARIANTS))}", opts["cms_variant"])
    if opts["cms_lr_mode"] not in CMS_LR_MODES:
        raise _err(model, "cms_lr_mode", f"one of {', '.join(map(repr, CMS_LR_MODES))}", opts["cms_lr_mode"])
    K, periods = opts["cms_levels"], opts["cms_periods"]
    if K is not None:
        _pos_int(model, "cms_levels", K)
    if periods is None:
        K = 3 if K is None else K
        periods = [4 ** (i + (mode == "in_context")) for i in range(K)]
    else:
        if not isinstance(periods, (list, tuple)) or not periods or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in periods
        ):
            raise _err(model, "cms_periods", "a non-empty list of positive integers", periods)
        if any(b < a for a, b in zip(periods, periods[1:])):
            raise _err(model, "cms_periods", "non-decreasing (one period per level, fastest first; equal "
                       "periods such as [1, 1, 1] are the all-fast control)", periods)
        if K is not None and len(periods) != K:
            raise ModelConfigError(
                f"model '{model}': option 'cms_periods' must have one period per level, i.e. "
                f"len(cms_periods) == cms_levels = {K}; got {len(periods)} periods {list(periods)!r}."
            )
    return list(periods)


def _cms_hidden(d_model, n_heads, n_levels, mixer_params):
    """Per-level SwiGLU width matching the Transformer's layer (see module docstring)."""
    transformer_layer = 4 * d_model * d_model + 3 * d_model * swiglu_hidden(d_model) + 2 * d_model
    budget = transformer_layer - mixer_params - d_model * (1 + n_levels)
    return max(8, 8 * round(budget / (3 * d_model * n_levels) / 8))


def _bool(model, field, value):
    if not isinstance(value, bool):
        raise _err(model, field, "true or false", value)
    return value


def _resolve(model, overrides, allowed):
    """Defaults, then `paper_exact: true`'s paper values of the stabilisers, then the options
    given explicitly (an explicit stabiliser wins over paper_exact: one-at-a-time ablations)."""
    check_overrides(model, overrides, {**allowed, "paper_exact": False})
    paper = _bool(model, "paper_exact", overrides.get("paper_exact", False))
    opts = {**allowed, "paper_exact": paper}
    if paper:
        opts.update({k: v for k, v in PAPER_FORM.items() if k in allowed})
    opts.update(overrides)
    for field in STABILISERS:
        if field in allowed and field != "w2_init_std":
            _bool(model, field, opts[field])
    std = opts.get("w2_init_std")
    if "w2_init_std" in allowed and std is not None and (
            not isinstance(std, (int, float)) or isinstance(std, bool) or not std > 0):
        raise _err(model, "w2_init_std", "a positive number, or null for the fan-in init 1/sqrt(head dim)", std)
    return opts


def _build(model, mixer, vocab_size, d_model, n_layers, n_heads, overrides, allowed):
    opts = _resolve(model, overrides, allowed)
    for field, value in (("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
        _pos_int(model, field, value)
    if d_model % n_heads:
        raise _err(model, "n_heads", f"a divisor of d_model={d_model}", n_heads)
    periods = _cms_periods(model, opts)
    lr = _cms_lr(model, opts["cms_lr"], len(periods))
    smt_kw = {}
    if mixer == "smt":
        if opts["memory"] not in MEMORY_KINDS:
            raise _err(model, "memory", f"one of {', '.join(map(repr, MEMORY_KINDS))}", opts["memory"])
        if opts["memory_kernel"] not in MEMORY_KERNELS:
            raise _err(model, "memory_kernel", f"one of {', '.join(map(repr, MEMORY_KERNELS))}", opts["memory_kernel"])
        _bool(model, "recompute_chunks", opts["recompute_chunks"])
        for field in ("chunk_size", "mem_chunk_size"):
            _pos_int(model, field, opts[field])
        if opts["mem_hidden"] is not None:
            _pos_int(model, "mem_hidden", opts["mem_hidden"])
        smt_kw = {k: opts[k] for k in SMT_DEFAULTS}
        smt_kw["eta_init"] = _open_unit(model, "eta_init", opts["eta_init"])
        smt_kw["alpha_init"] = _open_unit(model, "alpha_init", opts["alpha_init"])
        mixer_params = sum(p.numel() for p in SelfModifyingTitans(d_model, n_heads, **smt_kw).parameters())
    else:
        mixer_params = 4 * d_model * d_model
    hidden = opts["cms_hidden"]
    if hidden is None:
        hidden = _cms_hidden(d_model, n_heads, len(periods), mixer_params)
    else:
        _pos_int(model, "cms_hidden", hidden)
    cms_kw = dict(hidden=hidden, periods=periods, mode=opts["cms_mode"], variant=opts["cms_variant"],
                  lr=lr, lr_mode=opts["cms_lr_mode"])
    hope = Hope(vocab_size, d_model, n_layers, n_heads, mixer, smt_kw, cms_kw)
    hope.options = {**opts, "cms_periods": periods, "cms_levels": len(periods), "cms_lr": lr, "cms_hidden": hidden,
                    **({"mem_hidden": hope.blocks[0].mixer.mem_hidden} if mixer == "smt" else {})}
    return hope


def _cms_lr(model, lr, K):
    """A positive number for every level, or a list of K positive numbers (one per level)."""
    def ok(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0

    if ok(lr):
        return [float(lr)] * K
    if isinstance(lr, (list, tuple)) and len(lr) == K and all(ok(x) for x in lr):
        return [float(x) for x in lr]
    raise _err(model, "cms_lr", f"a positive number, or a list of {K} positive numbers (one per CMS level)", lr)


def build_hope(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Hope:
    """Hope: self-modifying Titans + CMS per block (options: module docstring)."""
    return _build("hope", "smt", vocab_size, d_model, n_layers, n_heads, overrides,
                  {**CMS_DEFAULTS, **SMT_DEFAULTS})


def build_hope_attention(vocab_size: int, d_model: int, n_layers: int, n_heads: int, **overrides) -> Hope:
    """Hope-Attention: causal softmax attention + CMS per block (cms_* options only)."""
    return _build("hope-attention", "attention", vocab_size, d_model, n_layers, n_heads, overrides,
                  dict(CMS_DEFAULTS))
