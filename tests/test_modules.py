"""jacbatch.module_jacobian and the torch.func ``functional_call`` idiom with jacbatch
substituted, against ``vmap(jacrev(...))`` and a per-sample torch.autograd.functional loop
(float64; NOTE [Module Jacobians] in jacbatch.modules)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

import jacbatch

DT = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}


class Tied(torch.nn.Module):
    """A tied weight (``head.weight is enc.weight``), a frozen bias, eval-mode BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = torch.nn.Linear(4, 3)
        self.mid = torch.nn.BatchNorm1d(3)
        self.dec = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 3, bias=False)
        self.head.weight = self.enc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dec(torch.tanh(self.mid(self.enc(x)))))


def tied() -> Tied:
    torch.manual_seed(2)
    model = Tied().to(DT)
    with torch.no_grad():
        model.mid.running_mean.uniform_(-1, 1)
        model.mid.running_var.uniform_(0.5, 2)
    model.dec.bias.requires_grad_(False)
    return model.eval()


def loop_reference(model: torch.nn.Module, X: torch.Tensor, names: list[str]) -> dict:
    """Per sample, ``torch.autograd.functional.jacobian`` of the output w.r.t. each named
    parameter (a tied weight once: every use of it counts), stacked over the batch."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:

        def g(w: torch.Tensor, x: torch.Tensor, name: str = name) -> torch.Tensor:
            return functional_call(model, {name: w}, (x.unsqueeze(0),)).squeeze(0)

        out[name] = torch.stack(
            [torch.autograd.functional.jacobian(lambda w, x=x: g(w, x), params[name].detach())
             for x in X]
        )  # fmt: skip
    return out


@pytest.mark.parametrize("method", ["auto", "jacrev", "vjp"])
def test_module_jacobian_tied_and_frozen(method: str) -> None:
    model = tied()
    X = torch.randn(5, 4, dtype=DT)
    J = jacbatch.module_jacobian(model, X, method=method)
    # frozen dec.bias excluded; the tied weight once, under its first name
    assert list(J) == ["enc.weight", "enc.bias", "mid.weight", "mid.bias", "dec.weight"]
    want = loop_reference(model, X, list(J))
    for k in J:
        assert J[k].shape == (5, 3, *model.get_parameter(k).shape)
        torch.testing.assert_close(J[k], want[k], **TOL)
    assert not any(j.requires_grad for j in J.values())  # the fast path: no graph
    sub = jacbatch.module_jacobian(model, X, params=["dec.weight"], vec="row")
    assert list(sub) == ["dec.weight"]
    torch.testing.assert_close(sub["dec.weight"], want["dec.weight"].reshape(5, 3, 12), **TOL)


def test_module_jacobian_conv_net_and_modes() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Flatten(0),
        torch.nn.Linear(2 * 4 * 4, 3),
    ).to(DT).eval()  # fmt: skip
    X = torch.randn(4, 1, 6, 6, dtype=DT)
    J = jacbatch.module_jacobian(net, X)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def f(p: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, p, (x.unsqueeze(0),)).squeeze(0)

    want = vmap(jacrev(f), in_dims=(None, 0))(params, X)
    for k in want:
        torch.testing.assert_close(J[k], want[k], **TOL)
    assert J["0.weight"].shape == (4, 3, 2, 1, 3, 3)
    net.train()  # dropout draws random numbers in train mode: refused unless asked for
    with pytest.raises(ValueError, match="deterministic"):
        jacbatch.module_jacobian(net, X)
    Jt = jacbatch.module_jacobian(net, X, randomness="different")
    assert Jt["4.weight"].shape == (4, 3, 3, 32)


def test_module_jacobian_refuses_unknown_names_and_all_frozen() -> None:
    model = tied()
    with pytest.raises(ValueError, match=r"names of the model's parameters, got \['nope'\]"):
        jacbatch.module_jacobian(model, torch.randn(2, 4, dtype=DT), params=["nope"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="at least one parameter"):
        jacbatch.module_jacobian(model, torch.randn(2, 4, dtype=DT))


@pytest.mark.parametrize("method", ["auto", "vjp"])
def test_torch_func_idiom_verbatim(method: str) -> None:
    """``vmap(jacrev(f), in_dims=(None, None, 0))`` with jacbatch.jacobian substituted: tied
    weights, a frozen parameter (closed over), buffers (an int64 one among them)."""
    model = tied()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    X = torch.randn(5, 4, dtype=DT)

    def f(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (p, b), (x.unsqueeze(0),)).squeeze(0)

    J = jacbatch.jacobian(f, params, buffers, X, in_dims=(None, None, 0), method=method)
    want = vmap(jacrev(f), in_dims=(None, None, 0))(params, buffers, X)
    assert list(J) == list(want) == list(params)
    for k in J:
        torch.testing.assert_close(J[k], want[k], **TOL)
    torch.testing.assert_close(J, jacbatch.module_jacobian(model, X, method=method), **TOL)
