"""Hope's stacked chunk: the five memories of a self-modifying Titans layer in one chunk step
(`dgd_chunk_stacked` in batched PyTorch ops, `dgd_chunk_triton` on the fused Triton kernel)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nlbench.kernels.activations import silu_grad
from nlbench.kernels.dgd.chunk import decay_terms, dgd_chunk_autograd, read_chunk
from nlbench.kernels.dgd.naive import step_size
from nlbench.kernels.dgd.solve import unit_lower_solve

__all__ = ["dgd_chunk_stacked", "dgd_chunk_triton"]


def dgd_chunk_stacked(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None,
                      normalized_step: bool = True):
    """`dgd_chunk_autograd` in fewer, larger batched matmuls: the form Hope's compiled chunk step
    takes (`self_modifying_titans._compiled_stacked_chunk_step`). For a residual-MLP memory whose
    hidden width equals its input width (Hope's default), W2's and W1's triangular systems and
    chunk-end updates are solved as one batch stacked on a new leading axis, and k and v go
    through M_b as one block of rows [k; v]: at Hope's sizes the chunk's matmuls are small and
    cost per call as much as per FLOP, so fewer calls win (73 → 51 per compiled chunk step;
    docs/decisions.md). Same values and gradients as `dgd_chunk_autograd` (tests); any other
    memory takes `dgd_chunk_autograd` itself."""
    if len(weights) != 2 or weights[0].shape[-1] != weights[0].shape[-2]:
        return dgd_chunk_autograd(weights, q, k, v, eta, alpha, self_target, read_index, normalized_step)
    w2, w1 = weights
    L = k.shape[-2]
    g_prev, gamma, tail, g_last = decay_terms(alpha)
    # gradients at M_b (memory_gradients) and the self-target v̂ = M_b(v), rows [k; v] at once
    a_kv = (torch.cat([k, v], dim=-2) if self_target else k) @ w2.transpose(-1, -2)
    s_kv = F.silu(a_kv)
    p_kv = s_kv @ w1.transpose(-1, -2)
    a, s, p = a_kv[..., :L, :], s_kv[..., :L, :], p_kv[..., :L, :]
    e = k + p - (v + p_kv[..., L:, :] if self_target else v)
    g2 = (e @ w1) * silu_grad(a)
    # `_solve_matrix` for (W2, x = k, g = g2, x W2ᵀ = a) and (W1, x = s, g = e, x W1ᵀ = p), stacked
    eta2 = step_size(eta, k, normalized_step).unsqueeze(-1)
    eta1 = step_size(eta, s, normalized_step).unsqueeze(-1)
    strict = torch.stack(torch.broadcast_tensors(eta2 * (gamma * (k @ k.transpose(-1, -2))),
                                                 eta1 * (gamma * (s @ s.transpose(-1, -2)))))
    gp = g_prev.unsqueeze(-1)
    d = unit_lower_solve(strict, torch.stack([-eta2 * (g2 + gp * a), -eta1 * (e + gp * p)]))
    y = None
    if q is not None:
        def pick(t, rank):  # the read memory's slice of a stacked tensor
            return t[read_index] if read_index is not None and t.dim() > rank else t

        r, gp_r, gamma_r = q.dim(), pick(g_prev, q.dim() - 1), pick(gamma, q.dim())
        hid = F.silu(read_chunk(pick(w2, r), pick(k, r), pick(d[0], r), q, gp_r, gamma_r))
        y = q + read_chunk(pick(w1, r), pick(s, r), pick(d[1], r), hid, gp_r, gamma_r)
    x = torch.stack([k.expand_as(s), s])
    update = (d * tail.unsqueeze(-1)).transpose(-1, -2) @ x
    g_last = g_last[..., None, None]
    return y, [g_last * w2 + update[0], g_last * w1 + update[1]]


def dgd_chunk_triton(weights, q, k, v, eta, alpha, self_target: bool = True, read_index: int | None = None,
                     normalized_step: bool = True):
    """`chunk.dgd_chunk` on the fused Triton kernel: one chunk (the whole sequence given is
    one chunk). Stacked memories (a leading axis on the weights, η and α maybe, k / v / q shared)
    are flattened into the kernel's batch; with `read_index` the read memory runs in a call of
    its own with q and the others without reads, so no read is computed that nobody uses.
    The kernel has the normalized step built in: `normalized_step=False` is refused."""
    if not normalized_step:
        raise ValueError("the Triton DGD kernel only has the normalized step η/max(1, ‖x‖²); the paper's step "
                         "(model option normalized_step: false) runs on memory_kernel: chunked.")
    from nlbench.kernels.dgd.triton import dgd_memory_triton  # imports triton: only when asked for

    L = k.shape[-2]
    if weights[0].dim() == k.dim():  # one memory, no stack
        return dgd_memory_triton(weights, q, k, v, eta, alpha, L, self_target)
    S = weights[0].shape[0]

    def take(t, idx, rank):  # the memories `idx` of a stacked (or shared) tensor, flattened into the batch
        t = t[idx] if t.dim() > rank else t.expand(len(idx), *t.shape)
        return t.reshape(-1, *t.shape[2:]).contiguous()

    def run(idx, reads):
        ws = [take(w, idx, k.dim()) for w in weights]
        y, new = dgd_memory_triton(ws, take(q, idx, q.dim()) if reads else None, take(k, idx, k.dim()),
                                   take(v, idx, v.dim()), take(eta, idx, k.dim() - 1), take(alpha, idx, k.dim() - 1),
                                   L, self_target)
        return y, [w.unflatten(0, (len(idx), -1)) for w in new]

    read = read_index if q is not None else None
    others = [i for i in range(S) if i != read]
    y, new_o = run(others, False)
    if read is None:
        return None, new_o
    y, new_r = run([read], True)
    y = y.unflatten(0, (1, -1))[0]
    order = others + [read]
    new = [torch.cat([a, b]) for a, b in zip(new_o, new_r)]
    if order != list(range(S)):  # back to the stack's order
        inverse = torch.argsort(torch.tensor(order, device=k.device))
        new = [w[inverse] for w in new]
    return y, new
