"""DGD memory, per-token reference: the update rule of docs/ALGORITHMS.md §2–§3 as a loop.

Per head, the memory is either
    linear  (Eq. 93):  M(z) = W z                       weights [W]
    MLP     (Eq. 89):  M(z) = z + W1 σ(W2 z), σ = SiLU  weights [W2, W1] (input side first)
and every token t of a chunk that starts at state M_b is written by (Eq. 86–88, 90–91)

    M_t = M_{t-1} (α_t I − η_t x_t x_tᵀ) − η_t ∇_W L(M_b; k_t, v̂_t),   L = ½‖M(k) − v̂‖²,

applied to each weight matrix W with that matrix's OWN input x_t: k_t for W (linear) and W2,
σ(W2_b k_t) for W1. DGD assumes ‖x_t‖ = 1 (spec §2); k is L2-normalized but σ(W2 k) is not,
and with ‖x‖² ≫ 1 the factor α − η‖x‖² leaves (−1, 1) and the memory explodes (seen in long
streams). So each matrix uses the step η_t / max(1, ‖x_t‖²): the literal η for unit inputs,
a normalized-LMS step otherwise (`normalized_step=True`, the default of every form;
`normalized_step=False` takes the literal η_t for every matrix, the paper's equation).
The inner loss is halved so that Eq. 93 reads literally
(∇_W L = (M_b k − v̂) kᵀ); the factor 2 of ‖·‖² is only a rescaling of η. Reads use the
per-token state inside the chunk: y_t = M_{t-1}(q_t). With `self_target=True` the memory
makes its own target v̂_t = M_b(v_t) (Eq. 88); otherwise v̂_t = v_t.

`dgd_memory_reference` reads like the equations; the chunked forms (`chunk`, `chunk_grad`,
`stacked`, `triton`) are tested against it, forward and backward. `memory_apply`,
`memory_gradients` and `step_size` are the definitions every form shares.

Shapes: q, k, v [B, H, T, d]; η, α [B, H, T] (α ∈ (0, 1]); weights: list of [B, H, out, in].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlbench.kernels.activations import silu_grad

__all__ = ["check_chunk_size", "check_weights", "dgd_memory_reference", "memory_apply", "memory_gradients",
           "step_size"]


def check_weights(weights):
    if len(weights) not in (1, 2):
        raise ValueError(
            f"weights: expected a list of 1 matrix (linear memory, Eq. 93) or 2 matrices [W2, W1] "
            f"(residual MLP memory, Eq. 89), got {len(weights)}."
        )


def memory_apply(weights, z):
    """M(z) for per-(batch, head) weights: z [B, H, N, d] -> [B, H, N, d] (Eq. 89 / Eq. 93)."""
    check_weights(weights)
    if len(weights) == 1:
        return z @ weights[0].transpose(-1, -2)
    w2, w1 = weights
    return z + F.silu(z @ w2.transpose(-1, -2)) @ w1.transpose(-1, -2)


def memory_gradients(weights, k, v_hat):
    """Per-token rank-one gradients of L = ½‖M(k) − v̂‖² at `weights`.

    Returns one (g, x) pair per matrix (same order as `weights`) with ∇_W L_t = g_t x_tᵀ; x is
    the matrix's own input (k for W and W2, σ(W2 k) for W1).
    """
    check_weights(weights)
    if len(weights) == 1:
        return [(k @ weights[0].transpose(-1, -2) - v_hat, k)]
    w2, w1 = weights
    a = k @ w2.transpose(-1, -2)
    s = F.silu(a)
    e = k + s @ w1.transpose(-1, -2) - v_hat
    g2 = (e @ w1) * silu_grad(a)  # not aten.silu_backward: the outer loop needs its derivative
    return [(g2, k), (e, s)]



def step_size(eta, x, normalized: bool = True):
    """η_t / max(1, ‖x_t‖²): the literal η for unit inputs (k), a bounded step otherwise;
    `normalized=False`: η_t itself (the paper's step, whatever ‖x_t‖)."""
    if not normalized:
        return eta
    return eta / x.pow(2).sum(-1).clamp_min(1.0)


def check_chunk_size(chunk_size):
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")



def dgd_memory_reference(weights, q, k, v, eta, alpha, chunk_size: int, self_target: bool = True,
                         normalized_step: bool = True):
    """Per-token loop, literally Eq. 86–91: read with M_{t-1}, then
    W ← W (α_t I − η_t x_t x_tᵀ) − η_t g_t x_tᵀ per matrix, gradients at the chunk-start M_b."""
    check_chunk_size(chunk_size)
    check_weights(weights)
    weights = list(weights)
    T, ys = k.shape[-2], []
    n_in = [w.shape[-1] for w in weights]
    # per-token views by one split each: a slice per token would make the backward pass zero-fill
    # a full-length gradient per token, O(T²), and overstate what the chunked form saves
    ks, vs = k.split(1, dim=-2), v.split(1, dim=-2)
    qs = None if q is None else q.split(1, dim=-2)
    etas, alphas = eta.split(1, dim=-1), alpha.split(1, dim=-1)
    for t in range(T):
        if t % chunk_size == 0:
            w_b = list(weights)
        k_t, v_t = ks[t], vs[t]
        v_hat = memory_apply(w_b, v_t) if self_target else v_t
        grads = memory_gradients(w_b, k_t, v_hat)
        if q is not None:
            ys.append(memory_apply(weights, qs[t]))
        a_t = alphas[t][..., None]
        new = []
        for w, (g, x), n in zip(weights, grads, n_in):
            e_t = step_size(etas[t], x, normalized_step)[..., None]
            eye = torch.eye(n, dtype=w.dtype, device=w.device)
            decay = a_t * eye - e_t * (x.transpose(-1, -2) @ x)  # α I − η x xᵀ
            new.append(w @ decay - e_t * (g.transpose(-1, -2) @ x))
        weights = new
    return (None if q is None else torch.cat(ys, dim=-2)), weights
