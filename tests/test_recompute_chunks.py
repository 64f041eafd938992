"""`recompute_chunks` (Hope's training memory, docs/decisions.md): each DGD chunk keeps only its
inputs for the backward pass and recomputes its intermediates there. The kernel with it still
matches autograd of the plain chunk, it really drops the intermediates, and a Hope model with it
gives the same logits and the same gradient for every parameter as the plain path."""

import functools

import pytest
import torch

from nlbench.kernels.dgd import dgd_chunk_manual
from nlbench.models import build_model
from tests.test_dgd_chunk_grad import CASES, _assert_matches_autograd, _leaves

RECOMPUTE = functools.partial(dgd_chunk_manual, recompute=True)


@pytest.mark.parametrize("mlp,stack,eta_stacked,alpha_stacked,read,self_target", CASES[::3])
def test_recomputing_kernel_matches_autograd(mlp, stack, eta_stacked, alpha_stacked, read, self_target):
    leaves = _leaves(mlp, stack, eta_stacked, alpha_stacked)
    _assert_matches_autograd(RECOMPUTE, leaves, read, self_target, 1 if stack else None)


def test_recompute_keeps_only_the_inputs():
    """Without recompute the backward node holds the forward's intermediates; with it, none."""
    leaves = [x.requires_grad_() for x in _leaves(True, 5, True, False)]
    ws, (q, k, v, eta, alpha) = leaves[:2], leaves[2:]
    y_plain, _ = dgd_chunk_manual(ws, q, k, v, eta, alpha, True, 4)
    y_rec, _ = RECOMPUTE(ws, q, k, v, eta, alpha, True, 4)
    assert isinstance(y_plain.grad_fn.saved, dict) and y_plain.grad_fn.saved["per"]
    assert y_rec.grad_fn.saved is None


def _logits_and_grads(recompute: bool, **opts):
    torch.manual_seed(0)
    model = build_model("hope", size="tiny", vocab_size=64, recompute_chunks=recompute, **opts).double()
    for b in model.blocks:  # the recompute path replays `stacked_chunk_step`'s ops: compare with those
        b.mixer.fused_step = False  # (the fused step equals them to rounding: tests/test_smt_step.py)
    tokens = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    logits = model(tokens).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("opts", [{}, {"chunk_size": 8, "mem_chunk_size": 8}, {"mem_chunk_size": 8},
                                  {"memory": "linear"}],
                         ids=["stacked-one-group", "stacked-two-groups", "two-chunk-sizes", "linear"])
def test_hope_with_recompute_has_the_same_outputs_and_gradients(opts):
    logits, grads = _logits_and_grads(False, **opts)
    logits_r, grads_r = _logits_and_grads(True, **opts)
    torch.testing.assert_close(logits_r, logits, rtol=0, atol=0)
    assert grads.keys() == grads_r.keys()
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads_r[name], g, rtol=1e-12, atol=1e-12, msg=lambda s, n=name: f"{n}: {s}")


def test_recompute_keeps_less_for_the_backward_pass():
    """What autograd saves outside the checkpointed chunk groups (everything, without the option):
    with it, the memories' per-chunk states and intermediates are gone. Against the PyTorch
    fused step, which keeps every intermediate (the C++ step keeps only each chunk's inputs:
    tests/test_cpu_step.py)."""
    def saved_bytes(recompute):
        torch.manual_seed(0)
        model = build_model("hope", size="tiny", vocab_size=64, recompute_chunks=recompute)
        for b in model.blocks:
            b.mixer.cpu_kernel = False
        tokens = torch.randint(0, 64, (2, 128))
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.shape, t.stride())] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tokens).logits.sum().backward()
        return sum(seen.values())

    plain, recomputed = saved_bytes(False), saved_bytes(True)
    assert recomputed < 0.5 * plain, (plain, recomputed)


def test_recompute_chunks_must_be_a_bool():
    from nlbench.models import ModelConfigError

    with pytest.raises(ModelConfigError, match="recompute_chunks"):
        build_model("hope", size="tiny", vocab_size=64, recompute_chunks="yes")
