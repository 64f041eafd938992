"""`Hope.compiled()`: the DGD chunk kernels through torch.compile (forward and hand-written
backward), the rest eager — same logits and parameter gradients as the eager model."""

import torch

from nlbench.models import build_model


def test_hope_compiled_kernels_match_eager():
    torch.manual_seed(0)
    model = build_model("hope", size="tiny", vocab_size=64)
    tokens = torch.randint(0, 64, (2, 32))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits_e, grads_e = run()
    assert model.compiled() is model  # the kernels are compiled, not the chunk loop
    assert all(b.mixer.compile_kernels for b in model.blocks)
    logits_c, grads_c = run()
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)


def test_attention_models_compile_whole():
    model = build_model("transformer", size="tiny", vocab_size=64)
    assert model.compiled() is not model


def test_titans_compiled_kernels_match_eager():
    torch.manual_seed(0)
    model = build_model("titans-lmm", size="tiny", vocab_size=64)
    tokens = torch.randint(0, 64, (2, 32))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits_e, grads_e = run()
    assert model.compiled() is model
    logits_c, grads_c = run()
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-5)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-3, atol=1e-5, msg=name)
