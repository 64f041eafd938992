"""DGD as an outer optimizer (spec §2): the decay term uses each Linear layer's own inputs."""

import gc

import pytest
import torch
from torch import nn

from nlbench.optim import DGD

torch.set_num_threads(1)


def _layer():
    lin = nn.Linear(3, 2, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2]))
    return lin


# two token inputs spanning e1, e2 only; the second row has norm 3 and is normalized to e2
X = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
C = torch.tensor([[1.0, -1.0], [2.0, 0.5]])   # loss = Σ_t c_t · y_t, so ∂L/∂y_t = c_t


def _step(opt_factory, lin):
    opt = opt_factory(lin)
    (lin(X) * C).sum().backward()
    opt.step()
    return opt


def test_dgd_hand_computed_one_layer():
    lin, eta = _layer(), 0.5
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    _step(lambda m: DGD(m, lr=eta), lin)
    eta_p = eta / (1 + eta)                                     # 1/3
    # normalized rows: e1, e2  ->  XᵀX / n = diag(1/2, 1/2, 0)
    decay = torch.diag(torch.tensor([0.5, 0.5, 0.0]))
    grad_W = C.T @ X                                            # Σ_t c_t ⊗ x_t (raw inputs)
    grad_b = C.sum(0)
    want_W = W0 @ (torch.eye(3) - eta_p * decay) - eta_p * grad_W
    # by hand: W0 @ (I - diag(1/6, 1/6, 0)) = [[5/6, 10/6, 3], [-5/6, 2.5/6, 4]]
    torch.testing.assert_close(W0 @ (torch.eye(3) - eta_p * decay),
                               torch.tensor([[5 / 6, 10 / 6, 3.0], [-5 / 6, 2.5 / 6, 4.0]]))
    torch.testing.assert_close(lin.weight.detach(), want_W)
    torch.testing.assert_close(lin.bias.detach(), b0 - eta_p * grad_b)   # bias: SGD fallback


def test_direction_orthogonal_to_inputs_is_not_decayed_sgd_part_matches():
    eta = 0.5
    lin_dgd, lin_sgd = _layer(), _layer()
    _step(lambda m: DGD(m, lr=eta), lin_dgd)
    _step(lambda m: torch.optim.SGD(m.parameters(), lr=eta / (1 + eta)), lin_sgd)
    diff = lin_dgd.weight.detach() - lin_sgd.weight.detach()
    # inputs live in span(e1, e2): the e3 column gets exactly the SGD step, the others decay
    assert torch.equal(diff[:, 2], torch.zeros(2))
    W0 = _layer().weight.detach()
    torch.testing.assert_close(diff[:, :2], -(eta / (1 + eta)) * 0.5 * W0[:, :2])
    torch.testing.assert_close(lin_dgd.bias, lin_sgd.bias)


def test_unnormalized_option_uses_raw_inputs():
    lin, eta = _layer(), 1.0
    W0 = lin.weight.detach().clone()
    _step(lambda m: DGD(m, lr=eta, normalize_inputs=False), lin)
    want = W0 @ (torch.eye(3) - 0.5 * (X.T @ X) / 2) - 0.5 * (C.T @ X)
    torch.testing.assert_close(lin.weight.detach(), want)


def test_no_grad_forwards_are_not_captured():
    a, b = _layer(), _layer()
    opt_a, opt_b = DGD(a, lr=0.5), DGD(b, lr=0.5)
    with torch.no_grad():
        a(torch.ones(4, 3))                       # an evaluation pass: must not leak into the step
    for m, o in ((a, opt_a), (b, opt_b)):
        (m(X) * C).sum().backward()
        o.step()
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)


def test_hooks_removed_on_close_and_on_delete():
    lin = _layer()
    opt = DGD(lin, lr=0.1)
    assert len(lin._forward_hooks) == 1
    opt.close()
    assert len(lin._forward_hooks) == 0
    opt2 = DGD(lin, lr=0.1)
    assert len(lin._forward_hooks) == 1
    del opt2
    gc.collect()
    assert len(lin._forward_hooks) == 0


def test_params_without_model_are_refused():
    lin = _layer()
    with pytest.raises(ValueError, match="needs the layer inputs"):
        DGD(lin.parameters(), lr=0.1)
    opt = DGD([lin.weight], lr=0.1, model=lin)      # params + model: only that weight is hooked
    assert opt.hooked_params == 1
    opt.close()
