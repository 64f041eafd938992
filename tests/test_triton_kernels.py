"""Triton DGD memory kernels (spec §2–§3) against the per-token reference, values and gradients.

On CPU the kernels run under the Triton interpreter, which must be switched on before triton is
first imported; so the checks run in ONE subprocess (TRITON_INTERPRET=1 in its environment only,
never in this pytest process) that prints a JSON verdict per case, and each test reads its case.
Shapes are tiny (the interpreter is ~1000× slower than a GPU). CUDA cases (bf16, larger shapes)
run in-process and skip without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

_ENV_AT_IMPORT = os.environ.get("TRITON_INTERPRET")

SCRIPT = textwrap.dedent(r'''
    import json, os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(1)
    from nlbench.kernels.dgd import dgd_memory, dgd_memory_chunked, dgd_memory_reference, resolve_memory_kernel
    from nlbench.kernels.dgd.triton import dgd_forward_triton, dgd_memory_triton

    def inputs(mlp, B=1, H=2, T=10, d=8, h=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        ws = [torch.randn(B, H, h, d, generator=g) * 0.5, torch.randn(B, H, d, h, generator=g) * 0.5] if mlp \
            else [torch.randn(B, H, d, d, generator=g) * 0.5]
        q = torch.randn(B, H, T, d, generator=g)
        # ‖k‖² ∈ {0.64, 1.56}: both branches of η/max(1, ‖k‖²), away from its kink at 1
        scale = torch.where(torch.rand(B, H, T, 1, generator=g) < 0.5, 0.8, 1.25)
        k = F.normalize(torch.randn(B, H, T, d, generator=g), dim=-1) * scale
        v = torch.randn(B, H, T, d, generator=g)
        eta = torch.rand(B, H, T, generator=g) * 0.5
        alpha = 0.5 + 0.5 * torch.rand(B, H, T, generator=g)
        return ws, q, k, v, eta, alpha

    def run(fn, mlp, C, self_target, reads=True, **shape):
        ws, q, k, v, eta, alpha = inputs(mlp, **shape)
        leaves = [*ws, q, k, v, eta, alpha] if reads else [*ws, k, v, eta, alpha]
        for x in leaves:
            x.requires_grad_(True)
        y, w_end = fn(ws, q if reads else None, k, v, eta, alpha, C, self_target=self_target)
        g = torch.Generator().manual_seed(1)
        loss = sum((w * torch.randn(w.shape, generator=g)).sum() for w in w_end)
        if reads:
            loss = loss + (y * torch.randn(y.shape, generator=g)).sum()
        grads = torch.autograd.grad(loss, leaves)
        return ([] if y is None else [y.detach()]) + [w.detach() for w in w_end] + list(grads)

    def compare(a, b, tol=1e-4):
        try:
            assert len(a) == len(b), (len(a), len(b))
            for i, (x, y) in enumerate(zip(a, b)):
                torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=lambda m: f"output {i}: {m}")
            return None
        except AssertionError as e:
            return str(e)

    out = {}
    for mlp in (False, True):
        for st in (True, False):
            name = f"{'mlp' if mlp else 'linear'}-self{int(st)}"
            out[name] = compare(run(dgd_memory_triton, mlp, 4, st), run(dgd_memory_reference, mlp, 4, st))
    for mlp in (False, True):
        kind = "mlp" if mlp else "linear"
        for C in (1, 16):  # one token per chunk; one chunk longer than the sequence
            shape = dict(B=2, T=9, d=16, h=8)
            out[f"{kind}-C{C}"] = compare(run(dgd_memory_triton, mlp, C, True, **shape),
                                          run(dgd_memory_reference, mlp, C, True, **shape))
        out[f"{kind}-noreads"] = compare(run(dgd_memory_triton, mlp, 4, True, reads=False),
                                         run(dgd_memory_reference, mlp, 4, True, reads=False))

    # Eq. 93 by hand: W = [[1,2],[3,4]], k = e1, v̂ = v = [1,1], α = 0.9, η = 0.5
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    one = lambda *x: torch.tensor(x)[None, None, None]
    y, (W1,) = dgd_memory_triton([W], one(1.0, 1.0), one(1.0, 0.0), one(1.0, 1.0), torch.tensor([[[0.5]]]),
                                 torch.tensor([[[0.9]]]), 1, self_target=False)
    out["by-hand"] = compare([W1[0, 0], y[0, 0, 0]], [torch.tensor([[0.4, 1.8], [0.2, 3.6]]), torch.tensor([3.0, 7.0])],
                             tol=1e-6)

    # the saved chunk-start states (what the backward recomputes from) are the chunked path's
    for mlp in (False, True):
        ws, q, k, v, eta, alpha = inputs(mlp, T=10)
        _, _, states = dgd_forward_triton(ws, q, k, v, eta, alpha, 4, save_states=True)
        want = [[w] for w in ws]
        for s in (4, 8):
            _, w_s = dgd_memory_chunked(ws, None, k[..., :s, :], v[..., :s, :], eta[..., :s], alpha[..., :s], 4)
            for lst, w in zip(want, w_s):
                lst.append(w)
        out[f"states-{'mlp' if mlp else 'linear'}"] = compare(states, [torch.stack(l, dim=2) for l in want], tol=1e-5)

    # dispatch under the interpreter: backend "triton" runs the kernel on CPU tensors
    ws, q, k, v, eta, alpha = inputs(False)
    try:
        assert resolve_memory_kernel("triton", k.device) == "triton"
        assert resolve_memory_kernel("auto", k.device) == "chunked"
        a = dgd_memory(ws, q, k, v, eta, alpha, 4, memory_kernel="triton")
        b = dgd_memory_triton(ws, q, k, v, eta, alpha, 4)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])
        out["dispatch"] = None
    except Exception as e:
        out["dispatch"] = f"{type(e).__name__}: {e}"
    # Hope's memories on the kernel (memory_kernel="triton"): the stacked five-memory chunk step
    # and the per-memory path (two chunk sizes) equal the chunked kernel, values and gradients
    from nlbench.models.self_modifying_titans import SelfModifyingTitans

    def smt(kernel, mem_chunk):
        torch.manual_seed(0)
        m = SelfModifyingTitans(8, 2, chunk_size=4, mem_chunk_size=mem_chunk, memory_kernel=kernel)
        x = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y, st = m(x, m.init_state(1))
        ends = [w for n in ("k", "v", "eta", "alpha", "mem") for w in st[n]]
        g = torch.Generator().manual_seed(2)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in [y, *ends])
        loss.backward()
        return [y.detach(), *[w.detach() for w in ends], x.grad, *[p.grad for p in m.parameters()]]

    out["hope-fused"] = compare(smt("triton", 4), smt("chunked", 4))
    out["hope-two-chunk-sizes"] = compare(smt("triton", 2), smt("chunked", 2))

    # a stack read in the middle (memory 1 of 3): the others' order is restored
    from nlbench.kernels.dgd import dgd_chunk, dgd_chunk_triton

    def stacked(fn):
        ws, q, k, v, eta, alpha = inputs(True, T=6)
        g = torch.Generator().manual_seed(3)
        ws = [w.unsqueeze(0) + 0.1 * torch.randn(3, *w.shape, generator=g) for w in ws]
        eta = eta.expand(3, *eta.shape) * torch.tensor([1.0, 0.5, 0.25])[:, None, None, None]
        leaves = [*ws, q, k, v, eta, alpha]
        leaves = [x.detach().requires_grad_(True) for x in leaves]
        y, new = fn(leaves[:2], *leaves[2:], read_index=1)
        loss = sum((t * torch.randn(t.shape, generator=g)).sum() for t in [y, *new])
        return [y.detach(), *[w.detach() for w in new], *torch.autograd.grad(loss, leaves)]

    out["stack-read-middle"] = compare(stacked(dgd_chunk_triton), stacked(dgd_chunk))
    print("RESULT " + json.dumps(out))
''')

CASES = [f"{kind}-self{s}" for kind in ("linear", "mlp") for s in (1, 0)] + [
    f"{kind}-{what}" for kind in ("linear", "mlp") for what in ("C1", "C16", "noreads")
]


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"interpreter script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference_values_and_grads(interpreted, case):
    # forward reads, final state and every input gradient within 1e-4 of the per-token loop
    assert interpreted[case] is None, interpreted[case]


def test_triton_linear_single_token_by_hand(interpreted):
    assert interpreted["by-hand"] is None, interpreted["by-hand"]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_triton_saves_the_chunk_start_states(interpreted, kind):
    assert interpreted[f"states-{kind}"] is None, interpreted[f"states-{kind}"]


def test_dispatch_runs_triton_under_the_interpreter(interpreted):
    assert interpreted["dispatch"] is None, interpreted["dispatch"]


@pytest.mark.parametrize("case", ["hope-fused", "hope-two-chunk-sizes", "stack-read-middle"])
def test_hope_memories_on_the_triton_kernel(interpreted, case):
    # memory_kernel="triton" equals the chunked kernel: the stacked chunk step, the per-memory
    # path, and a stack read in the middle
    assert interpreted[case] is None, interpreted[case]


def test_interpreter_flag_did_not_leak_into_this_process(interpreted):
    assert os.environ.get("TRITON_INTERPRET") == _ENV_AT_IMPORT  # set in the child's env only


COMPILE_SCRIPT = textwrap.dedent(r"""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from nlbench.kernels.dgd import triton as m

    base = dict(C=16, BC=16, BD=16, HAS_Q=True, SELF_TARGET=True, PREC="ieee")
    specs = [
        (m._dgd_linear_fwd_kernel, 9, ("T", "D", "NT"), dict(base, SAVE_STATES=True)),
        (m._dgd_mlp_fwd_kernel, 12, ("T", "D", "HID", "NT"), dict(base, BH=16, SAVE_STATES=True)),
        (m._dgd_linear_bwd_kernel, 14, ("T", "D", "NT"), base),
        (m._dgd_mlp_bwd_kernel, 17, ("T", "D", "HID", "NT"), dict(base, BH=16)),
    ]
    for fn, n_ptr, ints, consts in specs:
        sig = {a: "*fp32" for a in fn.arg_names[:n_ptr]}
        sig.update({a: "i32" for a in ints})
        sig.update({a: "constexpr" for a in consts})
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
        assert kernel.asm.get("cubin"), fn.__name__
        print("COMPILED", fn.__name__)
""")


def test_kernels_compile_for_an_h100_without_a_gpu():
    # the interpreter runs the kernels as numpy and misses what only the compiler checks (tl.dot
    # tile shapes, loop-carried types, shared memory): lower all four to sm_90 cubin, ptxas included
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # a triton build without the NVIDIA backend
        pytest.skip(f"triton has no NVIDIA backend: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", COMPILE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("COMPILED") == 4, proc.stdout


# --- CUDA (skipped without a GPU) ---------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cuda_inputs(mlp, dtype, B=2, H=4, T=200, d=64, seed=0):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(B, H, d, d, generator=g) / d ** 0.5, 0.02 * torch.randn(B, H, d, d, generator=g)] if mlp \
        else [torch.eye(d).expand(B, H, d, d) + 0.01 * torch.randn(B, H, d, d, generator=g)]
    q, k, v = (F.normalize(torch.randn(B, H, T, d, generator=g), dim=-1) for _ in range(3))
    eta = 0.5 * torch.rand(B, H, T, generator=g)
    alpha = 0.9 + 0.1 * torch.rand(B, H, T, generator=g)
    return [x.cuda().to(dtype).contiguous().requires_grad_(True) for x in (*ws, q, k, v, eta, alpha)]


@cuda
@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_cuda_triton_matches_chunked(mlp, dtype, tol):
    from nlbench.kernels.dgd import dgd_memory_chunked
    from nlbench.kernels.dgd.triton import dgd_memory_triton

    results = []
    for fn, dt in ((dgd_memory_triton, dtype), (dgd_memory_chunked, torch.float32)):
        leaves = _cuda_inputs(mlp, dt)
        n_w = 2 if mlp else 1
        y, w_end = fn(leaves[:n_w], *leaves[n_w:], 64)
        g = torch.Generator().manual_seed(1)
        loss = (y.float() * torch.randn(y.shape, generator=g).cuda()).sum()
        loss = loss + sum((w.float() * torch.randn(w.shape, generator=g).cuda()).sum() for w in w_end)
        grads = torch.autograd.grad(loss, leaves)
        results.append([y.float(), *(w.float() for w in w_end), *(x.float() for x in grads)])
    for a, b in zip(*results):
        scale = b.abs().max().clamp_min(1.0)
        assert (a - b).abs().max() <= tol * scale
