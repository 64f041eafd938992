"""`model.compiled()`: Hope's chunk steps and Titans' memory chunks through torch.compile, the
chunk loops eager — same logits and parameter gradients as the eager model; the compiled
chunked DGD kernel equals the eager one."""

import pytest
import torch

from nlbench.models import build_model


def _compiled_matches_eager(name, mode="default"):
    """Compile `name` with `model.compiled(mode)` after one eager step; the compiled step gives
    the same logits and parameter gradients. Returns the model. Hope runs without its C++ CPU
    kernel here, so that inductor compiles its chunk steps (the path of CUDA and of machines
    without a compiler; with the kernel, compiling leaves it in place: the test below)."""
    torch.manual_seed(0)
    model = build_model(name, size="tiny", vocab_size=64)
    if name == "hope":
        for b in model.blocks:
            b.mixer.cpu_kernel = False
    tokens = torch.randint(0, 64, (2, 32))

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens).logits
        logits.square().mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logits_e, grads_e = run()
    assert model.compiled(mode) is model  # the chunk kernels are compiled, not the chunk loop
    logits_c, grads_c = run()
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys()
    for n in grads_e:
        torch.testing.assert_close(grads_c[n], grads_e[n], rtol=1e-3, atol=1e-5, msg=n)
    return model


def test_hope_compiled_kernels_match_eager():
    model = _compiled_matches_eager("hope")
    assert all(b.mixer.compile_kernels for b in model.blocks)


def test_compiled_hope_on_cpu_keeps_its_cpp_step(monkeypatch):
    """With the C++ kernel, `Hope.compiled()` on CPU runs every layer's chunks on it (inductor's
    chunk step is never built) and gives what the eager model gives."""
    import nlbench.models.self_modifying_titans as smt
    from nlbench.kernels.dgd import cpu_step

    if not cpu_step.available()[0]:
        pytest.skip(f"no C++ kernel: {cpu_step.available()[1]}")
    calls = []
    real = cpu_step.hope_layer_cpu
    monkeypatch.setattr(cpu_step, "hope_layer_cpu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(smt, "_compiled_stacked_chunk_step", lambda *a: pytest.fail("inductor's chunk step built"))
    torch.manual_seed(0)
    model = build_model("hope", size="tiny", vocab_size=64)
    tokens = torch.randint(0, 64, (2, 32))
    eager = model(tokens).logits.detach()
    compiled = model.compiled()(tokens).logits.detach()
    assert len(calls) == 2 * 2  # eager and compiled, 2 layers (2 chunks of 16 each: one C++ call per layer)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.slow  # ~2.5 min on 2 cores: inductor benchmarks every distinct matmul while compiling
def test_hope_max_autotune_kernels_match_eager():
    """`compile: max-autotune`: inductor's own matmul kernels (C++ micro-GEMMs on CPU) where
    they beat ATen in its autotuning; the layers carry the mode to every chunk step."""
    from nlbench.kernels.compiling import compile_options

    model = _compiled_matches_eager("hope", "max-autotune")
    assert all(b.mixer.compile_kernels == "max-autotune" for b in model.blocks)
    assert compile_options("cpu", "max-autotune")["max_autotune"]
    assert "max_autotune" not in compile_options("cpu", "default")


def test_compile_mode_is_validated():
    from nlbench.kernels.compiling import compile_mode

    assert (compile_mode(False), compile_mode(True), compile_mode("max-autotune")) == (None, "default", "max-autotune")
    with pytest.raises(ValueError, match=r"'default', 'max-autotune'.*got 'fast'"):
        build_model("hope", size="tiny", vocab_size=64).compiled("fast")


def test_titans_compiled_kernels_match_eager():
    _compiled_matches_eager("titans-lmm")


def test_attention_models_compile_whole():
    model = build_model("transformer", size="tiny", vocab_size=64)
    assert model.compiled() is not model


def test_compiled_chunked_memory_matches_eager_and_is_benchmarked():
    """The chunked DGD kernel through torch.compile (`dgd_memory(..., compiled=True)`, the
    kernel bench's `compiled` lines): same values and gradients as eager, linear memory."""
    import re

    import torch.nn.functional as F

    from nlbench.bench.kernels import bench_memory_kernels
    from nlbench.kernels.dgd import dgd_memory

    g = torch.Generator().manual_seed(0)
    w = torch.eye(4).expand(1, 2, 4, 4) + 0.1 * torch.randn(1, 2, 4, 4, generator=g)
    q, k, v = (F.normalize(torch.randn(1, 2, 8, 4, generator=g), dim=-1) for _ in range(3))
    eta, alpha = 0.5 * torch.rand(1, 2, 8, generator=g), 0.9 + 0.1 * torch.rand(1, 2, 8, generator=g)
    results = []
    for compiled in (False, True):
        leaves = [x.clone().requires_grad_() for x in (w, q, k, v, eta, alpha)]
        y, (w_end,) = dgd_memory([leaves[0]], *leaves[1:], 4, memory_kernel="chunked", compiled=compiled)
        (y.sum() + w_end.square().sum()).backward()
        results.append([y.detach(), w_end.detach(), *(x.grad for x in leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)

    text = "\n".join(bench_memory_kernels("cpu", seq_len=8, B=1, H=2, d=4, chunk_sizes=(4,), repeats=1, compiled=True))
    for kind in ("linear", "mlp"):
        assert re.search(rf"{kind} +compiled C=4 +[0-9.]+ ms +[0-9.]+x vs reference .*first call [0-9.]+ s", text), text
