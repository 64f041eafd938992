"""M3 (Algorithm 1, spec §6) against a separate literal loop; slow-memory cadence; O(params) state."""

import pytest
import torch

from nlbench.optim import M3

torch.set_num_threads(1)


def _ns(G, steps):
    # written out again on purpose: the reference must not share code with the optimizer
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G / (torch.sqrt((G * G).sum()) + 1e-7)
    t = X.shape[0] > X.shape[1]
    if t:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if t else X


def _literal_m3(theta, grads, lr, b1, b2, b3, alpha, f, T, eps, variant, rms=False):
    """Algorithm 1, one statement per line of the spec; returns θ and O2 after every step."""
    M1, M2, V, G, O2 = (torch.zeros_like(theta) for _ in range(5))
    thetas, o2s = [], []
    for t, g in enumerate(grads, start=1):
        if variant == "paper":
            M1 = M1 + b1 * g
            V = V + b2 * g * g
        else:
            M1 = b1 * M1 + (1 - b1) * g
            V = b2 * V + (1 - b2) * g * g
        G = G + g
        O1 = _ns(M1, T)
        u = (O1 + alpha * O2) / (torch.sqrt(V) + eps)
        if rms:
            u = u / torch.sqrt((u * u).mean())
        theta = theta - lr * u
        if t % f == 0:
            M2 = M2 + b3 * G if variant == "paper" else b3 * M2 + (1 - b3) * G / f
            G = torch.zeros_like(G)
            O2 = _ns(M2, T)
        thetas.append(theta.clone())
        o2s.append(O2.clone())
    return thetas, o2s


def _run(variant, f=3, steps=11, shape=(6, 10), T=5, rms=False):
    gen = torch.Generator().manual_seed(7)
    theta0 = torch.randn(*shape, generator=gen)
    grads = [torch.randn(*shape, generator=gen) for _ in range(steps)]
    hp = dict(lr=0.01, b1=0.9, b2=0.5, b3=0.8, alpha=0.7, f=f, T=T, eps=1e-8)
    p = torch.nn.Parameter(theta0.clone())
    opt = M3([p], lr=hp["lr"], betas=(hp["b1"], hp["b2"], hp["b3"]), alpha=hp["alpha"],
             slow_every=f, ns_steps=T, eps=hp["eps"], variant=variant, rms_normalize=rms)
    got, o2 = [], []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        got.append(p.detach().clone())
        o2.append(opt.state[p]["O2"].clone())
    want, want_o2 = _literal_m3(theta0.clone(), grads, variant=variant, rms=rms, **hp)
    return got, o2, want, want_o2, opt, p


@pytest.mark.parametrize("variant,rms", [("paper", False), ("ema", False), ("paper", True)])
def test_m3_matches_literal_algorithm_1_over_three_slow_periods(variant, rms):
    got, o2, want, want_o2, _, _ = _run(variant, f=3, steps=11, rms=rms)   # periods end at 3, 6, 9
    if rms:   # each step moves θ by exactly lr in RMS
        steps = [a - b for a, b in zip(got[1:], got[:-1])]
        assert all(abs(d.square().mean().sqrt().item() - 0.01) < 1e-6 for d in steps)
    for t, (a, b) in enumerate(zip(got, want), start=1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"theta after step {t}")
    for t, (a, b) in enumerate(zip(o2, want_o2), start=1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"O2 after step {t}")


def test_o2_zero_in_first_period_and_changes_only_after_multiples_of_f():
    f = 4
    _, o2, _, _, _, _ = _run("paper", f=f, steps=13, shape=(5, 7))
    for t in range(1, f):
        assert torch.count_nonzero(o2[t - 1]) == 0, f"O2 must be 0 during the first period (step {t})"
    prev = torch.zeros_like(o2[0])
    for t, cur in enumerate(o2, start=1):
        changed = not torch.equal(cur, prev)
        assert changed == (t % f == 0), f"step {t}: O2 changed={changed}, f={f}"
        prev = cur


def test_o2_is_applied_from_the_next_step_on():
    # Step f uses the old O2 (zero): with alpha large, steps 1..f equal the alpha = 0 run and
    # step f + 1 does not.
    a = _run_alpha(alpha=5.0)
    b = _run_alpha(alpha=0.0)
    for t in range(3):
        torch.testing.assert_close(a[t], b[t], rtol=0, atol=0)
    assert not torch.allclose(a[3], b[3])


def _run_alpha(alpha, f=3):
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4, 6, generator=gen))
    opt = M3([p], lr=0.01, alpha=alpha, slow_every=f)
    out = []
    for _ in range(f + 1):
        p.grad = torch.randn(4, 6, generator=gen)
        opt.step()
        out.append(p.detach().clone())
    return out


def test_state_is_o_params_independent_of_slow_period():
    sizes = {}
    for f in (2, 1000):
        _, _, _, _, opt, p = _run("paper", f=f, steps=6, shape=(6, 10))
        sizes[f] = sum(v.numel() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert sizes[2] == sizes[1000] == 5 * 60   # M1, M2, V, G, O2 — no gradient buffer


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(betas=(0.9, 0.99)), r"betas must be a tuple \(beta1, beta2, beta3\)"),
    (dict(betas=(0.9, 0.0, 0.9)), r"betas\[1\] \(beta2\) must be a float in \(0, 1\] for variant='paper'"),
    (dict(betas=(1.0, 0.9, 0.9), variant="ema"), r"betas\[0\] \(beta1\) must be a float in \[0, 1\) for variant='ema'"),
    (dict(alpha=-1.0), r"alpha must be a finite float >= 0"),
    (dict(slow_every=0), r"slow_every must be an integer >= 1"),
    (dict(slow_every=2.5), r"slow_every must be an integer >= 1"),
    (dict(variant="adam"), r"variant must be one of 'paper', 'ema'"),
    (dict(ns_steps=0), r"ns_steps must be an integer >= 1"),
])
def test_m3_validation_names_field_and_range(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        M3([torch.nn.Parameter(torch.zeros(3, 3))], lr=0.01, **kwargs)


def test_m3_rejects_non_matrix_params():
    with pytest.raises(ValueError, match=r"M3 only updates weight matrices or batches of them"):
        M3([torch.nn.Parameter(torch.zeros(3))], lr=0.01)
