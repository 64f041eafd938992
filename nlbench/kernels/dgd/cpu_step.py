"""Hope's stacked chunk step fused per (batch, head) in C++ for CPU (`hope_step.cpp`).

`models/smt_step._FusedStep` writes the step (projection memories, gates, curvature guard, DGD
chunk of the five stacked memories) as ~150 batched PyTorch ops per chunk, forward and backward,
each over all 160 (memory, batch, head) problems of 16 × 32 × 32: at these sizes the step is
bound by per-op cost and by memory traffic between ops, not by FLOPs. Here one C++ call runs the
whole step for one (batch, head) at a time with every intermediate in cache, the problems
spread over torch's threads by OpenMP, and the backward pass recomputes the forward for its
(batch, head), so only the inputs are kept between the passes. `_FusedStep` is the reference
(tests/test_cpu_step.py: outputs and every input's gradient, float64). `hope_layer_cpu` runs
every chunk of a layer in one call (the chunk loop, the guard's power step and the carried
weights in C++; its reference is the chunk loop on `_FusedStep`); `hope_step_cpu` one chunk.

The library is compiled on first use with the system C++ compiler (the one `torch.compile`
uses on CPU) into a per-user cache (`NLBENCH_KERNEL_CACHE`, default ~/.cache/nlbench/kernels,
mode 0700), named by the hash of the source, the compiler flags and the machine, written
under a temporary name and renamed, so concurrent workers never load a partial file. No
compiler, a failed build or `NLBENCH_CPU_KERNEL=0`: `available()` says why and Hope runs
`_FusedStep`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["available", "fits", "hope_inputs_cpu", "hope_layer_cpu", "hope_step_cpu", "layer_fits"]

SOURCE = Path(__file__).with_name("hope_step.cpp")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared", "-std=c++17"]


def _cache_dir() -> Path:
    return Path(os.environ.get("NLBENCH_KERNEL_CACHE") or Path.home() / ".cache" / "nlbench" / "kernels")


def _machine() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return platform.machine() + "|" + "|".join(lines)
    except OSError:
        return platform.machine() + "|" + platform.processor()


@functools.cache
def _library():
    """(ctypes library, None) or (None, the reason it is not available)."""
    if os.environ.get("NLBENCH_CPU_KERNEL", "1") == "0":
        return None, "NLBENCH_CPU_KERNEL=0"
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None, "no C++ compiler (g++ or c++) on PATH"
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join([cxx, *FLAGS, _machine(), torch.__version__]).encode()).hexdigest()[:20]
    cache = _cache_dir()
    target = cache / f"hope_step-{key}.so"
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        return None, f"cannot create the kernel cache {cache}: {e}"
    unsafe = _unsafe(cache)
    if unsafe:
        return None, unsafe
    if not target.exists():
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".build-", suffix=".so")
        os.close(fd)
        try:
            done = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                return None, f"{cxx} failed: {done.stderr.strip()[-400:]}"
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"building the C++ kernel with {cxx} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        return None, f"loading {target} failed: {e}"
    p, i, dbl = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for suffix in ("f32", "f64"):
        fwd, bwd = getattr(lib, f"hope_step_forward_{suffix}"), getattr(lib, f"hope_step_backward_{suffix}")
        fwd.argtypes = [p] * 10 + [i] * 6 + [dbl, i]
        bwd.argtypes = [p] * 16 + [i] * 6 + [dbl, i]
        fwd.restype = bwd.restype = None
        fwd, bwd = getattr(lib, f"hope_layer_forward_{suffix}"), getattr(lib, f"hope_layer_backward_{suffix}")
        fwd.argtypes = [p] * 14 + [i] * 7 + [dbl, i]
        bwd.argtypes = [p] * 18 + [i] * 7 + [dbl, i]
        fwd.restype = bwd.restype = None
        fwd, bwd = getattr(lib, f"hope_inputs_forward_{suffix}"), getattr(lib, f"hope_inputs_backward_{suffix}")
        fwd.argtypes = [p] * 3 + [i] * 6
        bwd.argtypes = [p] * 5 + [i] * 6
        fwd.restype = bwd.restype = None
    return lib, None


def _unsafe(cache: Path) -> str | None:
    """A reason not to load libraries from `cache`: a library there runs as this process, so
    the folder must be this user's and writable by nobody else."""
    st = cache.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"the kernel cache {cache} belongs to another user"
    if st.st_mode & 0o022:
        return f"the kernel cache {cache} is writable by group or others (chmod 700 it)"
    return None


def available() -> tuple[bool, str]:
    """(True, "") when the C++ step can run, else (False, why); the first time it cannot (and was
    not switched off), one RuntimeWarning says why and that Hope runs the slower PyTorch step."""
    lib, why = _library()
    if lib is None and why != "NLBENCH_CPU_KERNEL=0":
        _warn_once(why)
    return lib is not None, why or ""


@functools.cache
def _warn_once(why: str) -> None:
    warnings.warn(f"Hope's C++ CPU kernel is not available ({why}); Hope runs its chunk steps as PyTorch ops, "
                  f"~1.5x slower per train step (NLBENCH_CPU_KERNEL=0 silences this).", RuntimeWarning, stacklevel=3)


MAX_DIM = 128  # hope_step.cpp's MAXDIM: chunk length, head dim and hidden width


def fits(zc, w2) -> bool:
    """Whether the C++ step runs these inputs: available, float32 / float64, five stacked
    memories, sizes within MAX_DIM."""
    return (zc.dtype in (torch.float32, torch.float64) and zc.dim() == 5 and zc.shape[0] == 4 and w2.shape[0] == 5
            and max(zc.shape[-2], zc.shape[-1], w2.shape[-2]) <= MAX_DIM and available()[0])


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _suffix(dtype):
    return {torch.float32: "f32", torch.float64: "f64"}[dtype]


class _HopeStepCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, guard, normalize_v, normalized, u, zc, qc, b_eta, b_alpha, w2, w1):
        lib, _ = _library()
        zc, qc, w2, w1 = (t.contiguous() for t in (zc, qc, w2, w1))
        b_eta, b_alpha = b_eta.contiguous(), b_alpha.contiguous()
        u = None if u is None else u.contiguous()
        n, B, H, L, d = zc.shape
        hid = w2.shape[-2]
        y, n2, n1 = torch.empty_like(qc), torch.empty_like(w2), torch.empty_like(w1)
        flags = int(normalize_v) | int(normalized) << 1 | int(u is not None) << 2
        getattr(lib, f"hope_step_forward_{_suffix(zc.dtype)}")(
            _ptr(zc), _ptr(qc), _ptr(b_eta), _ptr(b_alpha), _ptr(w2), _ptr(w1), _ptr(u), _ptr(y), _ptr(n2), _ptr(n1),
            B, H, L, d, hid, flags, float(guard), torch.get_num_threads())
        ctx.save_for_backward(u, zc, qc, b_eta, b_alpha, w2, w1)
        ctx.args = (B, H, L, d, hid, flags, float(guard))
        return y, n2, n1

    @staticmethod
    def backward(ctx, gy, g_n2, g_n1):
        lib, _ = _library()
        u, zc, qc, b_eta, b_alpha, w2, w1 = ctx.saved_tensors
        B, H, L, d, hid, flags, guard = ctx.args
        gy, g_n2, g_n1 = (g.contiguous() for g in (gy, g_n2, g_n1))
        g_z, g_q, g_w2, g_w1 = (torch.empty_like(t) for t in (zc, qc, w2, w1))
        g_be, g_ba = zc.new_empty(B, H), zc.new_empty(B, H)
        getattr(lib, f"hope_step_backward_{_suffix(zc.dtype)}")(
            _ptr(zc), _ptr(qc), _ptr(b_eta), _ptr(b_alpha), _ptr(w2), _ptr(w1), _ptr(u), _ptr(gy), _ptr(g_n2),
            _ptr(g_n1), _ptr(g_z), _ptr(g_q), _ptr(g_be), _ptr(g_ba), _ptr(g_w2), _ptr(g_w1),
            B, H, L, d, hid, flags, guard, torch.get_num_threads())
        return None, None, None, None, g_z, g_q, g_be.sum(0), g_ba.sum(0), g_w2, g_w1


def hope_step_cpu(guard, normalize_v, normalized_step, u, zc, qc, b_eta, b_alpha, w2, w1):
    """`smt_step._FusedStep.apply` with the same arguments and returns (y, chunk-end W2, W1),
    on the C++ kernel: CPU, float32 / float64, five stacked MLP memories, u already stepped."""
    return _HopeStepCPU.apply(guard, normalize_v, normalized_step, u, zc, qc, b_eta, b_alpha, w2, w1)


class _HopeLayerCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, keep, guard, normalize_v, normalized, chunk, u, z, q, b_eta, b_alpha, w2, w1):
        lib, _ = _library()
        z, q, w2, w1 = (t.contiguous() for t in (z, q, w2, w1))
        b_eta, b_alpha = b_eta.contiguous(), b_alpha.contiguous()
        u = None if u is None else u.contiguous()
        _, B, H, T, d = z.shape
        hid, n_chunks = w2.shape[-2], T // chunk
        y, w2_end, w1_end = torch.empty_like(q), torch.empty_like(w2), torch.empty_like(w1)
        # the start weights of chunks 1 .. n - 1 and the guard vector each chunk used, for the
        # backward pass; without one, two slots in turn
        w_slots, u_slots = (max(n_chunks - 1, 1), n_chunks) if keep else (2, 2)
        w2s, w1s = w2.new_empty(w_slots, *w2.shape), w1.new_empty(w_slots, *w1.shape)
        us = None if u is None else u.new_empty(u_slots, *u.shape)
        u_end = None if u is None else torch.empty_like(u)
        flags = int(normalize_v) | int(normalized) << 1 | int(u is not None) << 2 | int(keep) << 3
        getattr(lib, f"hope_layer_forward_{_suffix(z.dtype)}")(
            _ptr(z), _ptr(q), _ptr(b_eta), _ptr(b_alpha), _ptr(w2), _ptr(w1), _ptr(u), _ptr(y), _ptr(w2s), _ptr(w1s),
            _ptr(us), _ptr(w2_end), _ptr(w1_end), _ptr(u_end), B, H, T, chunk, d, hid, flags, float(guard),
            torch.get_num_threads())
        if keep:
            ctx.save_for_backward(z, q, b_eta, b_alpha, w2, w1, w2s, w1s, us)
        ctx.args = (B, H, T, chunk, d, hid, flags, float(guard))
        if u_end is None:
            return y, w2_end, w1_end
        ctx.mark_non_differentiable(u_end)
        return y, w2_end, w1_end, u_end

    @staticmethod
    def backward(ctx, gy, g_w2, g_w1, g_u=None):
        lib, _ = _library()
        z, q, b_eta, b_alpha, w2, w1, w2s, w1s, us = ctx.saved_tensors
        B, H, T, chunk, d, hid, flags, guard = ctx.args
        gy, g_w2, g_w1 = (g.contiguous() for g in (gy, g_w2, g_w1))
        g_z, g_q, g_w2_0, g_w1_0 = (torch.empty_like(t) for t in (z, q, w2, w1))
        g_be, g_ba = z.new_empty(B, H), z.new_empty(B, H)
        getattr(lib, f"hope_layer_backward_{_suffix(z.dtype)}")(
            _ptr(z), _ptr(q), _ptr(b_eta), _ptr(b_alpha), _ptr(w2), _ptr(w1), _ptr(w2s), _ptr(w1s), _ptr(us),
            _ptr(gy), _ptr(g_w2), _ptr(g_w1), _ptr(g_z), _ptr(g_q), _ptr(g_be), _ptr(g_ba), _ptr(g_w2_0),
            _ptr(g_w1_0), B, H, T, chunk, d, hid, flags, guard, torch.get_num_threads())
        return None, None, None, None, None, None, g_z, g_q, g_be.sum(0), g_ba.sum(0), g_w2_0, g_w1_0


def layer_fits(z, w2, chunk: int) -> bool:
    """Whether `hope_layer_cpu` runs these: `fits`, and the sequence is whole chunks (two or more)."""
    T = z.shape[-2]
    return fits(z[..., :chunk, :], w2) and T % chunk == 0 and T // chunk >= 2


def hope_layer_cpu(guard, normalize_v, normalized_step, chunk, u, z, q, b_eta, b_alpha, w2, w1):
    """Every chunk of a layer in one C++ call: the same as `smt_step.fused_chunk_step(cpu_kernel=True)`
    chunk after chunk (power step of the guard vector `u` first, when given) over z [4, B, H, T, dh]
    and q [B, H, T, dh] split in chunks of `chunk` tokens. Returns (y [B, H, T, dh], the last
    chunk-end W2 and W1, the last guard vector or None). Autograd keeps the inputs and every
    chunk's start weights, as the chunk-by-chunk loop does; without gradients (no_grad, or no
    input that needs one) nothing is kept. `layer_fits` says when it runs."""
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (z, q, b_eta, b_alpha, w2, w1))
    out = _HopeLayerCPU.apply(keep, guard, normalize_v, normalized_step, chunk, u, z, q, b_eta, b_alpha, w2, w1)
    return out if u is not None else (*out, None)


class _HopeInputsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xx, weight, n_heads, seq_len):
        lib, _ = _library()
        xx, weight = xx.contiguous(), weight.contiguous()
        B, TK, D = xx.shape
        K = TK - seq_len + 1
        z = xx.new_empty(4, B, n_heads, seq_len, D // n_heads)
        getattr(lib, f"hope_inputs_forward_{_suffix(xx.dtype)}")(
            _ptr(xx), _ptr(weight), _ptr(z), B, seq_len, K, D, n_heads, torch.get_num_threads())
        ctx.save_for_backward(xx, weight)
        ctx.args = (B, seq_len, K, D, n_heads)
        return z

    @staticmethod
    def backward(ctx, g_z):
        lib, _ = _library()
        xx, weight = ctx.saved_tensors
        B, T, K, D, H = ctx.args
        g_xx, g_w = torch.empty_like(xx), torch.empty_like(weight)
        getattr(lib, f"hope_inputs_backward_{_suffix(xx.dtype)}")(
            _ptr(xx), _ptr(weight), _ptr(g_z.contiguous()), _ptr(g_xx), _ptr(g_w), B, T, K, D, H,
            torch.get_num_threads())
        return g_xx, g_w, None, None


def hope_inputs_cpu(xx, weight, n_heads: int, seq_len: int):
    """z [4, B, H, T, dh] of `self_modifying_titans.projection_inputs` (four separate depthwise
    causal convs, then L2norm per head) from xx = [tail; x] [B, T + K − 1, D] and the conv weight
    [4·D, 1, K], on the C++ kernel; the backward pass recomputes the convs."""
    return _HopeInputsCPU.apply(xx, weight, n_heads, seq_len)


def inputs_fit(x, conv_weight) -> bool:
    """Whether `hope_inputs_cpu` runs these: CPU, float32 / float64, four separate convs, available."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dtype == conv_weight.dtype
            and conv_weight.shape[0] == 4 * x.shape[-1] and not torch.compiler.is_compiling() and available()[0])
