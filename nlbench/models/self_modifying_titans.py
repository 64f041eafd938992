"""Self-modifying Titans, docs/ALGORITHMS.md §3 (Eq. 83–91), the sequence mixer of Hope.

Per head h (head dim d_h = d_model / n_heads), read top to bottom:

    q_t = L2norm(conv4_q(x W_q))                     the only static projection (Eq. 83)
    z_{□,t} = L2norm(conv4_□(x))  for □ ∈ {k, v, η, α}: one depthwise conv per projection
    k_t = L2norm(M_{k,t-1}(z_k)),  v_t = L2norm(M_{v,t-1}(z_v))                 (Eq. 84)
    η_t = sigmoid(mean(M_{η,t-1}(z_η)) + b_η),  α_t = sigmoid(mean(M_{α,t-1}(z_α)) + b_α) (Eq. 85)
    y_t = M_{mem,t-1}(q_t)                                                      (Eq. 86)
    v̂_{□,t} = M_{□,t-1}(v_t)   for □ ∈ {k, v, η, α, mem}                       (Eq. 88)
    M_{□,t} = M_{□,t-1}(α_t I − η_t k_t k_tᵀ) − η_t ∇L(M_{□,t-1}; k_t, v̂_{□,t})   (Eq. 87, DGD)
    out_t = concat_h(y_t) W_o

Every memory is a residual MLP M(z) = z + W1 σ(W2 z) (Eq. 89) or, with `memory="linear"`, one
matrix (Eq. 93); the DGD rule applies per weight matrix with its own input
(`nlbench.kernels.dgd`). Initial states M_{□,0} are nn.Parameters (per head), so the
outer optimizer meta-learns them through the in-context updates.

Chunked training (Eq. 90–91) with two chunk sizes: `chunk_size` for the projection memories
{k, v, η, α} — inside one such chunk k, v, η, α and their targets come from the chunk-start
memories — and `mem_chunk_size` for M_mem, whose reads use the per-token state inside its
chunks. η ∈ (0, 1) and α ∈ (0, 1) are squashed by a sigmoid whose bias sets their value at
init (`eta_init` = 0.2, `alpha_init` = 0.999: the memory keeps 99.9% per token; 0.5 would halve
it every token, spec §7). The mean over the head's channels is the scalar read-out of the η/α
memories.

Choices the spec leaves open, and deviations, with the reason (each was measured on the shared
copy test, tests/test_models_common.py, and on carried streams of 8 × 512 tokens). Each
deviation is a constructor option (a model option of `hope`), named in brackets; `PAPER_FORM`
(the model option `paper_exact: true`) gives Eq. 83–91 as written: one conv shared by the
four projection memories (the same x_t for every M_□), unnormalized v, the literal step η_t on
every matrix, no guard, and the fan-in init of W2. It keeps unit-norm memory inputs z: the
spec leaves their scale open and DGD assumes unit inputs; `normalize_inputs=False` is the
ablation (it diverges within the first 128-token sequence from init).

* Inputs [`separate_convs`, `normalize_inputs`]. Each projection memory gets its own causal conv (Titans puts one conv after each
  projection; here the projections ARE the memories, so the conv sits before them) and its
  input is L2-normalized per head. One shared conv, as before, made k_t ≈ v_t at init (both
  memories start near the identity map of the same z), so every write (k, v̂ ≈ k) was a no-op
  and the outer loop had no signal to break the symmetry; separate convs keep k ≠ v in the
  static parameters, where in-context decay cannot erase it. Unit inputs are what DGD assumes
  (spec §2), for every memory, not only M_mem.
* [`normalize_v`] v is L2-normalized as well (the paper normalizes q, k): the targets v̂ = M(v) then stay at
  the scale of k; unnormalized v (|v| ≈ 40 after a few thousand tokens) made M_mem explode.
* [`w2_init_std`] Init of the residual MLP for UNIT inputs: W2 ~ N(0, 1), so the pre-activations W2 z are
  O(1) and ‖σ(W2 z)‖² ≈ 0.35·hidden ≥ 1 — the kernel's step η/max(1, ‖x‖²) then makes the W1
  write a full normalized-LMS step [`normalized_step`, `nlbench.kernels.dgd.naive.step_size`]. (The fan-in init N(0, 1/hidden) assumes unit-variance
  ENTRIES; for a unit-NORM input it gives ‖σ(W2 k)‖² ≈ 0.3, and one write moved M(k) only 2.6%
  of the way to v̂, vs 17% now at η = 0.7.) W1 ~ N(0, 0.1²/(hidden·d_h)) (‖W1‖_F ≈ 0.1): each
  memory starts near the identity map, and W2 still receives gradients. Linear memories start
  at the identity.
* `eta_init` 0.2, `alpha_init` 0.999 (hyper-parameters, chosen by measurement,
  docs/decisions.md): with the MLP's own DGD decay W2(I − η k kᵀ) the read-back of a single
  write peaks around η ≈ 0.5–0.7, which finds the copy circuit fastest, but every write also
  erases along its key, and a passkey must survive ~120 tokens of filler writes: under
  configs/standard.yaml's passkey stream (Muon on every matrix) Hope's mean diagonal accuracy
  was 0.242 at 0.3 / 0.999 and 0.359 at 0.2 / 0.999 (3 seeds; the Transformer 0.314).
* chunk_size 16 (was 64): with 64 chunk-start gradients summed, the projection memories'
  W2 diverged within ~1500 tokens of a carried stream, even untrained (without the guard
  below), and with the guard a model trained 300 copy steps still diverged (W2 of M_k → inf
  within 4096 stream tokens); with 16 both stay bounded (W2 ≈ 1, W1 ≈ 1.7–2.4 after 4096).
  Copy-task sequences (17 tokens) are unaffected; throughput is (small, T = 256) ~20% lower.
* [`curvature_guard`] Curvature guard: the Gauss–Newton curvature of L wrt W2 along a unit key is
  ‖W1 diag σ′‖² ≤ 1.21 ‖W1‖²_op, so a large W1 (the outer loop grows the meta-learned W1 to
  amplify writes) makes the W2 step overshoot (η·λ > 2): after 300 copy-task steps a model
  without the guard went to NaN within 200 tokens of a carried random stream. Each chunk of
  each MLP memory therefore uses η_t ← min(η_t, GUARD / λ_b), λ_b ≈ ‖W1_b‖²_op of the
  chunk-start state, GUARD = 1, so η·curvature ≤ 1.21 < 2. Inactive at init
  (λ ≈ 1e-3) and whenever η·λ ≤ 1; it only caps the step in the regime that diverges. It is
  differentiable, so the outer loop sees that growing W1 shrinks the step (detached, the outer
  loop fought the cap and the copy accuracy dropped to 0.31–0.61). Looser caps were not
  stable: GUARD 1.5, 2 and 4 all let a trained model diverge within 160–2900 stream tokens.
  λ_b comes from power iteration carried along the stream, as `torch.nn.utils.spectral_norm`
  carries its vector across steps: the state holds each memory's estimate u of W1's top right
  singular vector, and every chunk takes one power step from it on the chunk-start W1 and
  reads λ_b = ‖W1_b u‖² (`tracked_curvature`); a fresh state starts from nine cold steps
  (`top_direction`). W1 moves by a decay and a rank-C write per chunk, so the carried vector
  stays converged; the guard first did the nine cold steps (a Gram matrix and three squarings,
  h³ matmuls) in every chunk, 16% of the layer's matmul FLOPs and 8% of its compiled chunk
  loop (median 117.6 vs 107.8 ms without any guard, one in-process A/B). Carried, a Hope
  `medium` train step (T=512, batch 4, 2 threads; medians of 8 alternating steps in one
  process, two runs each) went 1268 → 1234 and 1256 → 1191 ms eager, 720 → 682 ms compiled
  (a second compiled run: 805 → 816 median, 706 → 675 ms fastest).
  The guard uses only the chunk-start state, so chunked == reference still holds, and with
  `memory_kernel="triton"` the capped η is computed here and handed to the Triton kernel one
  chunk at a time (`nlbench.kernels.dgd.dgd_chunk_triton`).

State: {"k"|"v"|"eta"|"alpha"|"mem": list of [B, H, out, in] weights, "guard" (MLP memories
only): the carried singular-vector estimates u [5, B, H, hidden] in the order k, v, η, α, mem,
"conv_x", "conv_q": the last 3 inputs of each causal conv [B, 3, d]} so a stream split at chunk
boundaries gives the same result as one call on the concatenation.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nlbench.kernels.compiling import compile_kernel, compile_mode
from nlbench.kernels.dgd import cpu_step
from nlbench.kernels.dgd import (
    dgd_chunk, dgd_chunk_stacked, dgd_chunk_triton, dgd_flops_per_token, dgd_memory_reference, memory_apply,
    resolve_memory_kernel,
)
from nlbench.models.inputs import collecting, report_chain_inputs, report_conv_input, report_input
from nlbench.models.layers import ShortConv, causal_conv
from nlbench.models.smt_step import fused_chunk_step, power_step

__all__ = ["SelfModifyingTitans", "MEMORY_KERNELS", "MEMORY_KINDS", "PAPER_FORM", "PROJECTION_MEMORIES", "STABILISERS"]

MEMORY_KINDS = ("mlp", "linear")
MEMORY_KERNELS = ("chunked", "triton")
PROJECTION_MEMORIES = ("k", "v", "eta", "alpha")
W2_STD = 1.0    # init std of W2: O(1) pre-activations for unit-norm inputs (module docstring)
W1_GAIN = 0.1   # ‖W1‖_F at init: near-identity memories that still pass gradients to W2
# recompute_chunks: chunk steps per checkpoint; the backward pass keeps one chunk-start state
# ([5, B, H, out, in] per matrix) per group and recomputes at most one group's intermediates at a time
RECOMPUTE_GROUP = 4
GUARD = 1.0     # η·‖W1‖²_op ≤ GUARD per chunk: the W2 step never overshoots (module docstring)
# The stabilisers (module docstring, "Choices ... and deviations"): their defaults, and the
# paper's form that the model option `paper_exact: true` selects (Eq. 84–91 as written).
# normalize_inputs stays on in the paper form: the spec does not state the memories' input
# scale, and DGD's derivation assumes unit inputs (spec §2); off, the memories diverge within
# the first sequence (docs/decisions.md).
STABILISERS = dict(curvature_guard=True, normalize_v=True, normalized_step=True, separate_convs=True,
                   normalize_inputs=True, w2_init_std=W2_STD)
PAPER_FORM = dict(curvature_guard=False, normalize_v=False, normalized_step=False, separate_convs=False,
                  normalize_inputs=True, w2_init_std=None)


def top_direction(w1, squarings: int = 3):
    """Cold start of the guard's power iteration: the top right singular vector u [.., hidden] of
    W1 [.., out, hidden] by 2^squarings + 1 power steps on G = W1ᵀW1 from the all-ones vector,
    done as repeated squaring of G/‖G‖_F (eigenvalues ≤ 1: no overflow), without autograd."""
    with torch.no_grad():
        gram = w1.transpose(-1, -2) @ w1
        p = gram / gram.flatten(-2).norm(dim=-1).clamp_min(1e-30)[..., None, None]
        for _ in range(squarings):
            p = p @ p
        return F.normalize(p.sum(-1), dim=-1)  # P @ 1


def tracked_curvature(w1, u):
    """λ ≈ ‖W1‖²_op per (batch, head) from the carried estimate u [.., hidden]: one power step
    u ← G u / ‖G u‖ on the chunk-start W1 (no autograd), then λ = ‖W1 u‖², a lower bound of
    ‖W1‖²_op, exact at convergence. The Gauss–Newton curvature of L wrt W2 along a unit key is
    ‖W1 diag σ′(W2 k)‖² ≤ 1.21 λ (SiLU′ ≤ 1.1). λ's gradient 2 (W1 u) uᵀ is the exact gradient of
    the top eigenvalue (u is stationary for the Rayleigh quotient), so the outer loop sees that
    growing W1 shrinks the step (module docstring). A 1e-4 share of the all-ones vector enters
    each step so that an estimate that reached zero (W1 = 0) recovers once W1 grows.
    Returns (λ, the new u)."""
    u = power_step(w1, u)
    # λ as a broadcast product and sum, whose backward is elementwise
    return (w1 * u.unsqueeze(-2)).sum(-1).square().sum(-1), u


def curvature(weights, u=None):
    """The guard's (λ, new u) for one memory's weights ((None, None) for a linear memory); u is
    the carried estimate, or None to cold-start it (`top_direction`)."""
    if len(weights) == 1:
        return None, None
    return tracked_curvature(weights[1], top_direction(weights[1]) if u is None else u)


def projection_inputs(x, tail, conv_weight, n_heads, normalize: bool = True, cpu_kernel: bool = False):
    """z_□ = L2norm(conv_□(x)) per head for □ ∈ {k, v, η, α} (Eq. 84's inputs), stacked
    [4, B, H, T, dh], and the new conv tail. A conv weight with one output per channel
    (`separate_convs=False`) gives the four memories the same z; `normalize=False` leaves z
    unnormalized. One copy into the stacked layout first: normalizing the conv's interleaved
    output in place of it (stride 4) was ~15% of Hope's step on CPU. `cpu_kernel=True`: on CPU
    the convs, the layout change and the norms run as one C++ pass (`cpu_step.hope_inputs_cpu`;
    these ops are its reference)."""
    B, T, D = x.shape
    if cpu_kernel and normalize and cpu_step.inputs_fit(x, conv_weight):
        xx = torch.cat([tail, x], dim=1)
        return cpu_step.hope_inputs_cpu(xx, conv_weight, n_heads, T), xx[:, xx.shape[1] - tail.shape[1]:]
    z, tail = causal_conv(x, tail, conv_weight)
    n = len(PROJECTION_MEMORIES)
    if conv_weight.shape[0] == D:  # one shared conv
        z = z.view(B, T, n_heads, D // n_heads).transpose(1, 2)
        z = F.normalize(z, dim=-1) if normalize else z
        return z.unsqueeze(0).expand(n, *z.shape), tail
    z = z.view(B, T, n_heads, D // n_heads, n).permute(4, 0, 2, 1, 3).contiguous()
    return (F.normalize(z, dim=-1) if normalize else z), tail


def layer_inputs(x, conv_x_tail, conv_q_tail, conv_x_weight, w_q, conv_q_weight, n_heads, normalize_inputs=True,
                 cpu_kernel=False):
    """Everything before the memories: z (`projection_inputs`) and q_t = L2norm(conv_q(x W_q))
    per head [B, H, T, dh] (Eq. 83), with both convs' new tails."""
    B, T, D = x.shape
    z, conv_x_tail = projection_inputs(x, conv_x_tail, conv_x_weight, n_heads, normalize_inputs, cpu_kernel)
    q, conv_q_tail = causal_conv(F.linear(x, w_q), conv_q_tail, conv_q_weight)
    q = F.normalize(q.view(B, T, n_heads, D // n_heads), dim=-1).transpose(1, 2)
    return z, q, conv_x_tail, conv_q_tail


def layer_output(y, w_o):
    """concat_h(y_t) W_o: [B, H, T, dh] -> [B, T, D]."""
    B, H, T, dh = y.shape
    return F.linear(y.transpose(1, 2).reshape(B, T, H * dh), w_o)


@functools.cache
def _compiled_layer_io(device_type: str, mode: str = "default"):
    """(`layer_inputs`, `layer_output`) through `torch.compile` for `compile_kernels`: one Hope
    `medium` train step, three A/B pairs on 2 CPU threads: 745/758/901 → 720/722/865 ms."""
    return compile_kernel(layer_inputs, device_type, mode), compile_kernel(layer_output, device_type, mode)


def gates(p, b_eta, b_alpha, normalize_v: bool = True):
    """k, v, η, α of Eq. 84–85 from the projection memories' outputs p = (M_k(z_k), M_v(z_v),
    M_η(z_η), M_α(z_α)) (a sequence of four [B, H, L, dh] tensors) and the gate biases [H];
    v is L2-normalized only with `normalize_v` (the paper normalizes q and k)."""
    k, v = F.normalize(p[0], dim=-1), (F.normalize(p[1], dim=-1) if normalize_v else p[1])
    eta = torch.sigmoid(p[2].mean(-1) + b_eta[:, None])
    alpha = torch.sigmoid(p[3].mean(-1) + b_alpha[:, None])
    return k, v, eta, alpha


def stacked_chunk_step(weights, u, zc, qc, b_eta, b_alpha, chunk_fn=dgd_chunk, normalize_v=True, normalized_step=True):
    """One chunk of Eq. 84–91 for the five memories stacked [k, v, η, α, mem] (weights: list of
    [5, B, H, out, in]; u: the guard's carried vectors [5, B, H, hidden], None for linear
    memories or without the guard): the chunk-start projection memories give k, v, η, α
    (Eq. 84–85), the curvature guard caps η per memory, and one DGD chunk updates all five and
    reads M_mem. Returns (y [B, H, L, dh], chunk-end weights, the new u)."""
    n_proj = len(PROJECTION_MEMORIES)
    k, v, eta, alpha = gates(memory_apply([w[:n_proj] for w in weights], zc).unbind(0), b_eta, b_alpha, normalize_v)
    eta = eta.expand(n_proj + 1, *eta.shape)
    if u is not None:
        lam, u = tracked_curvature(weights[1], u)
        eta = torch.minimum(eta, (GUARD / lam).unsqueeze(-1))
    y, new = chunk_fn(weights, qc, k, v, eta, alpha, read_index=n_proj, normalized_step=normalized_step)
    return y, new, u


@functools.cache
def _compiled_stacked_chunk_step(device_type: str, mode: str = "default"):
    """`stacked_chunk_step` through `torch.compile`, with the chunk in plain autograd ops
    (`dgd_chunk_stacked`: `dgd_chunk_autograd` in fewer, larger matmuls) so that AOTAutograd
    derives one fused backward for the whole step; made once per process and shared by every
    layer of the same shape. One Hope `medium` train step on 2 CPU threads (T=512, batch 4; one
    run each): eager 1357 ms, the DGD kernel alone compiled 1067 ms, the whole chunk step
    compiled 838 ms."""
    return compile_kernel(functools.partial(stacked_chunk_step, chunk_fn=dgd_chunk_stacked), device_type, mode)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


class SelfModifyingTitans(nn.Module):
    def __init__(self, d_model: int, n_heads: int, memory: str = "mlp", mem_hidden: int | None = None,
                 chunk_size: int = 16, mem_chunk_size: int = 16, eta_init: float = 0.2,
                 alpha_init: float = 0.999, conv_size: int = 4, memory_kernel: str = "chunked",
                 curvature_guard: bool = True, normalize_v: bool = True, normalized_step: bool = True,
                 separate_convs: bool = True, normalize_inputs: bool = True, w2_init_std: float | None = W2_STD,
                 recompute_chunks: bool = False):
        super().__init__()
        assert d_model % n_heads == 0
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.memory, self.chunk_size, self.mem_chunk_size = memory, chunk_size, mem_chunk_size
        # the stabilisers (module docstring); all False / None is the paper's form
        self.curvature_guard = curvature_guard and memory == "mlp"
        self.normalize_v, self.normalized_step, self.normalize_inputs = normalize_v, normalized_step, normalize_inputs
        if memory_kernel == "triton" and not normalized_step:
            raise ValueError("memory_kernel 'triton' has only the normalized step; normalized_step=False needs "
                             "memory_kernel 'chunked'.")
        self.mem_hidden = (mem_hidden or self.head_dim) if memory == "mlp" else None
        self.memory_kernel = memory_kernel  # "chunked" | "triton" (CUDA) | "reference": per-token loops (tests)
        self.stack = True  # stack the five memories when both chunk sizes agree (`_memories_stacked`)
        # eager fp32/fp64 MLP memories: each stacked chunk step as one Function with a hand-written
        # backward (`smt_step.fused_chunk_step`); False: `stacked_chunk_step` in autograd ops (the reference)
        self.fused_step = True
        # ... and on CPU, that step fused per (batch, head) in C++ (`kernels/dgd/cpu_step`), when a
        # compiler is there; False: `fused_chunk_step`'s PyTorch ops (its reference)
        self.cpu_kernel = True
        self.compile_kernels = False  # or a compile mode: torch.compile each chunk step (`Hope.compiled`)
        # memory, not math: keep only each group's chunk-start state for the backward pass and
        # recompute the rest there (`_memories_stacked`, `dgd_chunk_manual`); same outputs and gradients
        self.recompute_chunks = recompute_chunks
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.conv_q = ShortConv(d_model, conv_size)
        # one depthwise causal conv per projection memory (input channel c -> outputs 4c..4c+3),
        # or one shared by the four (separate_convs=False)
        n_conv = len(PROJECTION_MEMORIES) if separate_convs else 1
        self.conv_x = nn.Conv1d(d_model, n_conv * d_model, conv_size, groups=d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)
        H, dh, h = n_heads, self.head_dim, self.mem_hidden
        w2_std = 1 / math.sqrt(dh) if w2_init_std is None else w2_init_std  # None: fan-in init
        self.mem0 = nn.ParameterDict()
        for name in (*PROJECTION_MEMORIES, "mem"):
            if memory == "mlp":
                self.mem0[f"{name}_w2"] = nn.Parameter(torch.randn(H, h, dh) * w2_std)
                self.mem0[f"{name}_w1"] = nn.Parameter(torch.randn(H, dh, h) * (W1_GAIN / math.sqrt(h * dh)))
            else:
                self.mem0[f"{name}_w"] = nn.Parameter(torch.eye(dh).repeat(H, 1, 1))
        self.b_eta = nn.Parameter(torch.full((H,), _logit(eta_init)))
        self.b_alpha = nn.Parameter(torch.full((H,), _logit(alpha_init)))

    # --- state -------------------------------------------------------------------------------
    def _weights0(self, name):
        keys = [f"{name}_w2", f"{name}_w1"] if self.memory == "mlp" else [f"{name}_w"]
        return [self.mem0[k] for k in keys]

    def init_state(self, batch_size: int) -> dict:
        names = (*PROJECTION_MEMORIES, "mem")
        state = {name: [w.unsqueeze(0).expand(batch_size, *w.shape) for w in self._weights0(name)] for name in names}
        if self.curvature_guard:  # per head, then shared by the batch
            u = top_direction(torch.stack([self.mem0[f"{n}_w1"] for n in names]))  # [5, H, hidden]
            state["guard"] = u.unsqueeze(1).expand(len(names), batch_size, *u.shape[1:])
        ref, tail = self.w_q.weight, self.conv_q.kernel_size - 1
        state["conv_x"] = ref.new_zeros(batch_size, tail, self.d_model)
        state["conv_q"] = ref.new_zeros(batch_size, tail, self.d_model)
        return state

    # --- helpers -----------------------------------------------------------------------------
    def memory_inputs(self, x, tail):
        """z_□ = L2norm(conv_□(x)) per head for □ ∈ {k, v, η, α}, stacked: [4, B, H, T, dh], and
        the new conv tail (`projection_inputs`)."""
        return projection_inputs(x, tail, self.conv_x.weight, self.n_heads, self.normalize_inputs)

    def _gates(self, p):
        return gates(p, self.b_eta, self.b_alpha, self.normalize_v)

    def projections(self, mems, z):
        """k, v, η, α from the (chunk-start) projection memories {name: weights} and their
        stacked inputs z [4, B, H, L, dh]."""
        return self._gates([memory_apply(mems[n], zz) for n, zz in zip(PROJECTION_MEMORIES, z)])

    def _write(self, weights, q, k, v, eta, alpha, u=None):
        """One chunk of Eq. 86–91 for one memory (reads when q is given), with the curvature
        guard η ← min(η, GUARD / λ) from the carried vector u (cold-started when None; no guard
        without `curvature_guard`). Returns (y or None, chunk-end weights, the new u)."""
        lam, u = curvature(weights, u) if self.curvature_guard else (None, None)
        if lam is not None:
            eta = torch.minimum(eta, (GUARD / lam).unsqueeze(-1))
        ns = self.normalized_step
        if self.memory_kernel == "reference":
            y, new = dgd_memory_reference(weights, q, k, v, eta, alpha, k.shape[-2], normalized_step=ns)
        elif self.memory_kernel == "triton":
            y, new = dgd_chunk_triton(weights, q, k, v, eta, alpha, normalized_step=ns)
        else:
            y, new = dgd_chunk(weights, q, k, v, eta, alpha, compiled=self.compile_kernels, normalized_step=ns,
                               recompute=self.recompute_chunks)
        return y, new, u

    # --- forward -----------------------------------------------------------------------------
    def _on_cpu_kernel(self, x) -> bool:
        """Whether this call runs the C++ kernels (`kernels/dgd/cpu_step`): CPU, float32 / float64,
        MLP memories with the fused step, not under autocast, the library built. Then
        `compile_kernels` compiles nothing: the C++ step and inputs replace what it would compile
        (a compiled Hope `medium` step took 1.15 s with inductor's chunk step, 0.80 s with the C++
        one; docs/decisions.md)."""
        return (self.cpu_kernel and self.fused_step and self.memory == "mlp" and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and self.memory_kernel == "chunked" and cpu_step.available()[0])

    def forward(self, x, state):
        mode = compile_mode(self.compile_kernels)
        if mode and not self._on_cpu_kernel(x):
            inputs, output = _compiled_layer_io(x.device.type, mode)
        else:
            inputs, output = layer_inputs, layer_output
        z, q, conv_x, conv_q = inputs(x, state["conv_x"], state["conv_q"], self.conv_x.weight, self.w_q.weight,
                                      self.conv_q.conv.weight, self.n_heads, self.normalize_inputs, self.cpu_kernel)
        self._report_inputs(x, z, q, state)
        if self.memory_kernel == "triton":
            try:
                resolve_memory_kernel("triton", x.device)
            except RuntimeError as e:
                raise RuntimeError(f"model option memory_kernel='triton': {e} (the model option: "
                                   f"memory_kernel: chunked)") from e
        if self.stack and self.memory_kernel != "reference" and self.chunk_size == self.mem_chunk_size:
            y, mems = self._memories_stacked(z, q, state)
        else:
            y, mems = self._memories(z, q, state)
        report_input(self.w_o.weight, lambda: y.transpose(1, 2).flatten(-2))
        return output(y, self.w_o.weight), {**mems, "conv_x": conv_x, "conv_q": conv_q}

    def _report_inputs(self, x, z, q, state):
        """Every static weight's layer inputs for DGD (nlbench/models/inputs.py): W_q, both convs,
        and each memory's initial state per head at its read inputs (z_□, or q for M_mem)."""
        if not collecting():
            return
        report_input(self.w_q.weight, x)
        report_conv_input(self.conv_x.weight, x, state["conv_x"])
        report_conv_input(self.conv_q.conv.weight, lambda: F.linear(x, self.w_q.weight), state["conv_q"])
        for name, zz in zip((*PROJECTION_MEMORIES, "mem"), (*z.unbind(0), q)):
            report_chain_inputs(self._weights0(name), zz)

    def _memories(self, z, q, state):
        """Eq. 84–91 as written: the projection memories chunk by chunk, then M_mem over its own
        chunks. Any pair of chunk sizes; the per-token reference kernel runs here."""
        # projection memories: chunk by chunk, everything from the chunk-start memories
        mems = {name: state[name] for name in PROJECTION_MEMORIES}
        us = dict(zip((*PROJECTION_MEMORIES, "mem"), self._guard_vectors(state)))
        ks, vs, etas, alphas = [], [], [], []
        # split once: slicing per chunk would make autograd scatter each chunk's gradient into a
        # zero-filled full-length tensor, O(T²) work in the backward pass
        for zc in z.split(self.chunk_size, dim=-2):
            k, v, eta, alpha = self.projections(mems, zc)
            for name in PROJECTION_MEMORIES:
                _, mems[name], us[name] = self._write(mems[name], None, k, v, eta, alpha, us[name])
            ks.append(k), vs.append(v), etas.append(eta), alphas.append(alpha)
        k, v, eta, alpha = (torch.cat(t, dim=-2 if t[0].dim() == 4 else -1) for t in (ks, vs, etas, alphas))

        # the memory proper: per-token reads y_t = M_{mem,t-1}(q_t) inside its chunks
        mem, ys, C = state["mem"], [], self.mem_chunk_size
        chunks = zip(*(t.split(C, dim=-2) for t in (q, k, v)), *(t.split(C, dim=-1) for t in (eta, alpha)))
        for qc, kc, vc, ec, ac in chunks:
            y, mem, us["mem"] = self._write(mem, qc, kc, vc, ec, ac, us["mem"])
            ys.append(y)
        return torch.cat(ys, dim=-2), {**mems, "mem": mem, **self._guard_state(list(us.values()))}

    def _guard_vectors(self, state):
        """The carried guard vectors, one [B, H, hidden] per memory (k, v, η, α, mem): None for
        linear memories, and None to cold-start them for a state that has none."""
        u = state.get("guard")
        return [None] * (len(PROJECTION_MEMORIES) + 1) if u is None else list(u.unbind(0))

    def _guard_state(self, us):
        return {"guard": torch.stack(us)} if self.curvature_guard else {}

    def _memories_stacked(self, z, q, state):
        """The same computation as `_memories` when both chunk sizes agree, with the five memories
        stacked on a leading axis [k, v, η, α, mem]: one projection, one guard and one DGD chunk
        per chunk for all of them instead of five (on CPU these small matmuls cost mostly per-op
        overhead); only M_mem is read. Tests check it equals `_memories`. With `compile_kernels`
        each chunk step runs through `torch.compile` (`_compiled_stacked_chunk_step`). On the C++
        kernel a sequence of whole chunks is one call per layer (`cpu_step.hope_layer_cpu`)."""
        names = (*PROJECTION_MEMORIES, "mem")
        weights = [torch.stack(ws) for ws in zip(*(state[n] for n in names))]  # each [5, B, H, out, in]
        u = state.get("guard")
        if u is None and self.curvature_guard:
            u = top_direction(weights[1])
        fused = self.fused_step and self.memory == "mlp" and z.dtype in (torch.float32, torch.float64) \
            and not torch.is_autocast_enabled(z.device.type)
        cpp = fused and self._on_cpu_kernel(z) and cpu_step.fits(z[..., :self.chunk_size, :], weights[0])
        if self.memory_kernel == "triton":
            step = functools.partial(stacked_chunk_step, chunk_fn=dgd_chunk_triton)
        elif self.compile_kernels and not cpp:
            step = _compiled_stacked_chunk_step(z.device.type, compile_mode(self.compile_kernels))
        elif fused:
            # the same step, hand-written backward (in C++ on CPU)
            step = functools.partial(fused_chunk_step, guard=GUARD, cpu_kernel=self.cpu_kernel)
        else:
            step = stacked_chunk_step
        step = functools.partial(step, normalize_v=self.normalize_v, normalized_step=self.normalized_step)
        chunks = list(zip(z.split(self.chunk_size, dim=-2), q.split(self.chunk_size, dim=-2)))
        if self.recompute_chunks and self.memory_kernel == "chunked" and (cpp or not self.compile_kernels):
            return self._memories_recomputed(chunks, weights, u, names, step if cpp else None)
        if cpp and cpu_step.layer_fits(z, weights[0], self.chunk_size):
            # the same steps chunk after chunk in one C++ call (kernels/dgd/cpu_step.hope_layer_cpu)
            y, w2, w1, u = cpu_step.hope_layer_cpu(GUARD, self.normalize_v, self.normalized_step, self.chunk_size, u,
                                                   z, q, self.b_eta, self.b_alpha, *weights)
            return y, self._stacked_state(names, [w2, w1], u)
        ys = []
        for zc, qc in chunks:
            y, weights, u = step(weights, u, zc, qc, self.b_eta, self.b_alpha)
            ys.append(y)
        return torch.cat(ys, dim=-2), self._stacked_state(names, weights, u)

    @staticmethod
    def _stacked_state(names, weights, u):
        """The state dict from the stacked weights [5, B, H, out, in] and the guard vectors."""
        mems = {n: list(ws) for n, ws in zip(names, zip(*(w.unbind(0) for w in weights)))}
        return {**mems, **({"guard": u} if u is not None else {})}

    def _memories_recomputed(self, chunks, weights, u, names, step=None):
        """`_memories_stacked`'s eager loop with `recompute_chunks`: every RECOMPUTE_GROUP chunk
        steps run under `torch.utils.checkpoint`, so the backward pass keeps only each group's
        chunk-start weights and guard vectors and runs the group's forward again; inside, the DGD
        chunk keeps only its inputs (`dgd_chunk_manual(recompute=True)`: the checkpoint cannot drop
        the intermediates the hand-written backward holds), or `step` (the C++ step, which keeps
        only its inputs anyway) runs. Same values: the recomputation runs the same ops on the same
        inputs."""
        if step is None:
            step = functools.partial(stacked_chunk_step, chunk_fn=functools.partial(dgd_chunk, recompute=True),
                                     normalize_v=self.normalize_v, normalized_step=self.normalized_step)

        def run(weights, u, group):
            ys = []
            for zc, qc in group:
                y, weights, u = step(weights, u, zc, qc, self.b_eta, self.b_alpha)
                ys.append(y)
            return ys, weights, u

        ys = []
        for i in range(0, len(chunks), RECOMPUTE_GROUP):
            group_ys, weights, u = checkpoint(run, weights, u, chunks[i:i + RECOMPUTE_GROUP], use_reentrant=False)
            ys += group_ys
        return torch.cat(ys, dim=-2), self._stacked_state(names, weights, u)

    def flops_per_token(self) -> float:
        d, H, dh, h = self.d_model, self.n_heads, self.head_dim, self.mem_hidden
        f = 2 * 2 * d * d  # W_q, W_o
        per_read = 2 * dh * dh if h is None else 2 * 2 * dh * h
        f += H * 4 * per_read  # projections k, v, η, α
        f += H * 4 * dgd_flops_per_token(dh, h, self.chunk_size, reads=False)
        f += H * dgd_flops_per_token(dh, h, self.mem_chunk_size, reads=True)
        if self.curvature_guard:  # curvature guard once per chunk and memory: W1ᵀ(W1 u), then W1 u
            f += H * 3 * 2 * dh * h * (4 / self.chunk_size + 1 / self.mem_chunk_size)
        return float(f)
