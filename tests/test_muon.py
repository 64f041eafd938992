"""Newton–Schulz (quintic, spec §6) and Muon against literal hand-written steps."""

import math

import pytest
import torch

from nlbench.optim import NS_COEFFS, Muon, newton_schulz

torch.set_num_threads(1)


def _with_spectrum(rows, cols, svals, seed):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    k = min(rows, cols)
    S = torch.zeros(rows, cols, dtype=torch.float64)
    S[range(k), range(k)] = torch.as_tensor(svals, dtype=torch.float64)
    return (U @ S @ V.T).float()


def _matrices():
    g = torch.Generator().manual_seed(0)
    yield "gaussian wide", torch.randn(32, 64, generator=g)
    yield "gaussian tall", torch.randn(96, 24, generator=g)
    yield "gaussian square", torch.randn(48, 48, generator=g)[:, :47]  # avoid exact near-singularity
    # ill-conditioned, log-spaced spectra. The quintic grows a tiny singular value by a = 3.4445
    # per step (≈ 486× in 5 steps), so NS_5 reaches the band when σ_min / ‖G‖_F ≳ 1e-3; a
    # condition number of 1e3 over 16 values (σ_min / ‖G‖_F ≈ 8e-4) lands at ≈ 0.37.
    yield "cond 1e2", _with_spectrum(32, 48, torch.logspace(0, -2, 32), 1)
    yield "cond 3e2 tall", _with_spectrum(64, 16, torch.logspace(0, -2.5, 16), 2)
    yield "huge scale", 1e4 * torch.randn(16, 40, generator=g)


def _cubic(G, steps=5):
    X = G / (G.norm() + 1e-7)
    for _ in range(steps):
        X = 0.5 * X @ (3 * torch.eye(X.shape[1]) - X.T @ X)
    return X


def test_coefficients_are_the_public_muon_quintic():
    assert NS_COEFFS == (3.4445, -4.7750, 2.0315)


@pytest.mark.parametrize("label,G", list(_matrices()), ids=[m[0] for m in _matrices()])
def test_ns5_singular_values_in_band(label, G):
    s = torch.linalg.svdvals(newton_schulz(G, steps=5))
    assert s.min() > 0.5 and s.max() < 1.5, (label, s.min().item(), s.max().item())


def test_cubic_iteration_fails_the_band_so_the_test_distinguishes():
    G = next(_matrices())[1]
    s_cubic = torch.linalg.svdvals(_cubic(G))
    assert s_cubic.min() < 0.5           # the spec §7 failure: small singular values stay small
    s = torch.linalg.svdvals(newton_schulz(G))
    assert s.min() > 0.5


def test_ns_batched_and_transpose_consistent():
    g = torch.Generator().manual_seed(3)
    G = torch.randn(3, 12, 20, generator=g)
    out = newton_schulz(G)
    for i in range(3):
        torch.testing.assert_close(out[i], newton_schulz(G[i]), rtol=1e-5, atol=1e-6)
    # tall input runs on its transpose: NS(Gᵀ) = NS(G)ᵀ
    torch.testing.assert_close(newton_schulz(G[0].T), newton_schulz(G[0]).T, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 dims"):
        newton_schulz(torch.randn(5))


def _literal_ns(G, steps=5):
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (torch.sqrt((G * G).sum()) + 1e-7)
    t = X.shape[0] > X.shape[1]
    if t:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if t else X


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_literal_steps(nesterov):
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(12, 4, generator=g)          # tall: scale √(12/4)
    grads = [torch.randn(12, 4, generator=g) for _ in range(3)]
    lr, mu, wd = 0.05, 0.9, 0.1
    p = torch.nn.Parameter(W0.clone())
    opt = Muon([p], lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    W, m = W0.clone(), torch.zeros_like(W0)
    for gr in grads:
        p.grad = gr.clone()
        opt.step()
        m = mu * m + gr
        u = gr + mu * m if nesterov else m
        W = (1 - lr * wd) * W - lr * math.sqrt(12 / 4) * _literal_ns(u)
        torch.testing.assert_close(p.detach(), W, rtol=1e-5, atol=1e-6)


def test_muon_rejects_non_matrices_and_bad_hp():
    with pytest.raises(ValueError, match=r"shape \(5,\).*ndim >= 2.*AdamW"):
        Muon([torch.nn.Parameter(torch.zeros(5))], lr=0.02)
    with pytest.raises(ValueError, match=r"momentum must be a float in \[0, 1\)"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.02, momentum=1.0)


def test_newton_schulz_many_equals_one_by_one():
    """Stacking same-shape matrices into one batched call changes nothing per matrix."""
    from nlbench.optim.newton_schulz import newton_schulz_many

    gen = torch.Generator().manual_seed(3)
    mats = [torch.randn(*s, generator=gen) for s in [(5, 3), (2, 4, 4), (5, 3), (2, 4, 4), (7, 2), (5, 3)]]
    for got, m in zip(newton_schulz_many(mats, steps=5), mats):
        torch.testing.assert_close(got, newton_schulz(m, steps=5), rtol=1e-5, atol=1e-6)
