"""Structure that implies speed: what each route does and does not call."""

from __future__ import annotations

import pytest
import torch

import jacbatch
from tests.conftest import assert_matches, reference_jacobian


def _affine_args(B=5, m=3, p=4, q=2):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(B, m, p, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(p, q, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(q, generator=g, dtype=torch.float64, requires_grad=True),
    )


def test_closed_form_calls_no_autograd(monkeypatch):
    """No autograd call and no graph: nothing is even saved for backward, though inputs require
    grad (under no_grad: with grad mode on they would ask for a differentiable result)."""
    import torch._dynamo  # torch imports it lazily: it must not see the patches below

    def forbidden(*args, **kwargs):
        raise AssertionError("the closed form must not call autograd")

    for name in ("grad", "backward"):
        monkeypatch.setattr(torch.autograd, name, forbidden)
    # the torch.func entry points, as the autodiff routes bind them
    from jacbatch.methods import functorch, vjp

    for module, names in ((functorch, ("jacrev", "jvp", "vmap")), (vjp, ("vmap",))):
        for name in names:
            monkeypatch.setattr(module, name, forbidden)
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks, torch.no_grad():
        J = jacbatch.jacobian(
            jacbatch.affine,
            *_affine_args(),
            argnums=(0, 1, 2),
            in_dims=(0, None, None),
            method="closed_form",
        )
    assert saved == []
    assert all(j.grad_fn is None and not j.requires_grad for j in J)
    # and auto picks the closed form for a registered function
    plan = jacbatch.explain(
        jacbatch.affine, *_affine_args(), argnums=(0, 1, 2), in_dims=(0, None, None)
    )
    assert [s.route for s in plan.steps] == ["closed_form"]


def _count_grad_calls(monkeypatch):
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    return calls


@pytest.mark.parametrize("in_dims", [(0, None, None), (0, 0, 0), (None, 0, None)])
def test_vjp_runs_one_backward_per_output_element(monkeypatch, in_dims):
    g = torch.Generator().manual_seed(1)
    shapes = ((3, 4), (4, 2), (2,))  # A (m, p), W (p, q), B (q,)
    args = [
        torch.randn(s if d is None else (6, *s), generator=g, dtype=torch.float64)
        for s, d in zip(shapes, in_dims, strict=True)
    ]
    calls = _count_grad_calls(monkeypatch)

    def f(a, w, b):
        return torch.tanh(a @ w + b)

    J = jacbatch.jacobian(f, *args, argnums=(0, 1), in_dims=in_dims, method="vjp")
    assert len(calls) == 3 * 2  # out_numel = m*q, for all 6 samples at once (not 36)
    for k, a in enumerate((0, 1)):
        assert_matches(J[k], reference_jacobian(f, args, a, in_dims), torch.float64)


def _item_branch(x):
    """vmap rejects this: Python control flow on a value."""
    if x.sum().item() > 0:
        return torch.sin(x) * 2
    return x**3


def _data_dependent(x):
    return x * torch.nonzero(x > 0).shape[0]


@pytest.mark.parametrize("func", [_item_branch, _data_dependent], ids=["item_if", "nonzero"])
def test_functions_vmap_rejects_work_through_vjp_and_auto(monkeypatch, func):
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[0] = -x[0].abs()  # both branches taken
    x[1] = x[1].abs()
    with pytest.raises(RuntimeError):
        jacbatch.jacobian(func, x, method="jacrev")
    ref = reference_jacobian(func, (x,), 0, (0,))
    calls = _count_grad_calls(monkeypatch)
    assert_matches(jacbatch.jacobian(func, x, method="vjp"), ref, torch.float64)
    assert len(calls) == 3  # still one backward per output element for the whole batch
    assert_matches(jacbatch.jacobian(func, x, method="auto"), ref, torch.float64)
    # auto remembers the fallback and says so
    assert jacbatch.explain(func, x).steps[0].route == "vjp"


def test_auto_chooses_by_shape():
    # erfcx has no closed-form rule, so auto picks an autodiff route by size
    wide_in = torch.randn(2, 50, dtype=torch.float64)
    plan = jacbatch.explain(lambda x: torch.special.erfcx(x)[:3].sin(), wide_in)
    assert plan.steps[0].route == "jacrev"
    plan = jacbatch.explain(
        lambda x: torch.special.erfcx(torch.outer(x, x)).reshape(-1),
        torch.randn(2, 3, dtype=torch.float64),
    )
    assert plan.steps[0].route == "jacfwd"
    assert "forward mode" in str(plan)
