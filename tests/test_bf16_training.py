"""bf16 training (autocast, as the protocols and the bench run it) works for every registered model.

Hope's chunk kernel has a hand-written backward pass: under autocast it once saw bf16 inputs next
to float32 states and failed on the first GPU bench. Checked here on the CPU's bf16 autocast.
"""

from __future__ import annotations

import pytest
import torch

from nlbench.models import MODELS, build_model


def _grads(name: str, autocast: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = build_model(name, "tiny", vocab_size=64)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x).logits
    loss = torch.nn.functional.cross_entropy(logits.float()[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_autocast_train_step_matches_float32(name):
    loss32, g32 = _grads(name, autocast=False)
    loss16, g16 = _grads(name, autocast=True)
    assert abs(loss16 - loss32) < 0.05 * abs(loss32)
    assert g16.keys() == g32.keys()
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    flat16 = torch.cat([g16[n].float().flatten() for n in g32])
    assert torch.isfinite(flat16).all()
    # bf16 rounds each matmul; the direction of the whole gradient must still agree
    assert torch.nn.functional.cosine_similarity(flat16, flat32, dim=0) > 0.98


def test_hope_memory_gradients_reach_bf16_projections():
    """The float32 memory kernel passes its gradients back through the casts to every memory's
    initial state and to the projections feeding it, each pointing where float32's does."""
    _, g32 = _grads("hope", autocast=False)
    _, g16 = _grads("hope", autocast=True)
    memory = [n for n in g32 if ".mem0." in n or "conv_x" in n]
    assert len(memory) >= 10
    for n in memory:
        cos = torch.nn.functional.cosine_similarity(g16[n].float().flatten(), g32[n].flatten(), dim=0)
        assert cos > 0.9, (n, float(cos))
