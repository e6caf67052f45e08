"""Known torch bugs (jacbatch/_torch_bugs.py): one test each, every route against the reference.

Each test first shows the bug is real in this torch (the buggy transform, called directly,
disagrees with per-sample autograd), then that every jacbatch route gives the reference.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import jacfwd, vmap

import jacbatch
from jacbatch import _torch_bugs
from tests.conftest import reference_jacobian

#: a deliberate subset: "auto" and the autodiff routes, which differentiate any function
#: (closed_form, which needs a rule for every op, is not asked for here)
AUTODIFF_ROUTES = ["auto", "jacrev", "jacfwd", "vjp"]
F = torch.nn.functional


def _vmap_vjp(func, X):
    """What a vjp route without the workaround computes: backward through ``vmap(func)``."""
    X = X.clone().requires_grad_(True)
    Y = vmap(func)(X)
    rows = []
    for k in range(Y[0].numel()):
        ct = torch.zeros_like(Y).view(Y.shape[0], -1)
        ct[:, k] = 1
        (g,) = torch.autograd.grad(Y, X, ct.view(Y.shape), retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(X) if g is None else g)
    return torch.stack(rows, 1).view(*Y.shape, *X.shape[1:])


def _check_routes(func, X, bug: str, route: str = "vjp", routes=AUTODIFF_ROUTES):
    ref = reference_jacobian(func, (X,), 0, (0,))
    for r in routes:
        J = jacbatch.jacobian(func, X, method=r)
        torch.testing.assert_close(J, ref, rtol=1e-12, atol=1e-12, msg=r)
    notes = "\n".join(jacbatch.explain(func, X, method=route).notes)
    assert _torch_bugs.NOTE_PREFIX in notes and bug in notes


def test_chunked_linear_cross_entropy_none_gradient():
    """(a) no graph path under vmap: the vjp route would write zeros (None gradients)."""
    torch.manual_seed(0)
    W = torch.randn(6, 4, dtype=torch.float64)
    T = torch.tensor([2, 1])
    opts = torch.nn.LinearCrossEntropyOptions()

    def f(x):
        return F.linear_cross_entropy(x, W, T, reduction="sum", options=opts)

    X = torch.randn(3, 2, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_jacobian(f, (X,), 0, (0,))
        assert ref.abs().max() > 0.1
        assert (_vmap_vjp(f, X) == 0).all()  # the bug: zeros where the Jacobian is not zero
        _check_routes(f, X, "none_grad_chunked_lce")


def test_vjp_route_rechecks_a_none_gradient_without_the_list():
    """Even unlisted, a None through the vmapped forward is not written as zeros."""
    from jacbatch import _validation
    from jacbatch.methods import vjp

    torch.manual_seed(1)
    W = torch.randn(5, 3, dtype=torch.float64)
    T = torch.tensor([4, 0])
    opts = torch.nn.LinearCrossEntropyOptions()

    def f(x):
        return F.linear_cross_entropy(x, W, T, reduction="mean", options=opts)

    X = torch.randn(2, 2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference_jacobian(f, (X,), 0, (0,))
        call = _validation.normalize_call("jacobian", f, (X,), 0, 0)
        (J,) = vjp.compute(call, (0,), (), None, [None])
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(J, ref, rtol=1e-12, atol=1e-12)


def test_none_gradient_is_rechecked_per_sample():
    """A ``None`` from the vmapped forward means zeros only once per-sample autograd agrees."""
    X = torch.randn(3, 4, dtype=torch.float64)
    Y = torch.randn(3, 4, dtype=torch.float64)
    J = jacbatch.jacobian(lambda x, y: x.sin(), X, Y, argnums=(0, 1), method="vjp")
    assert (J[1] == 0).all()
    torch.testing.assert_close(J[0], torch.diag_embed(X.cos()))


def test_cdist_backward_vmap():
    """(f) the backward of cdist under vmap over cotangents repeats the first row."""
    torch.manual_seed(0)
    Y = torch.randn(5, 1, dtype=torch.float64)

    def f(x):
        return torch.cdist(x.reshape(5, 1), Y).sum(1) + torch.cdist(x[:, None], x[:, None]).sum(0)

    X = torch.randn(3, 5, dtype=torch.float64)
    ref = reference_jacobian(f, (X,), 0, (0,))
    assert not torch.allclose(vmap(torch.func.jacrev(f))(X), ref)  # the bug
    _check_routes(f, X, "cdist_backward_vmap", route="jacrev", routes=["auto", "jacrev", "vjp"])


def test_select_scatter_batched_src():
    """(b) vmap forward + backward scales the gradient of a batched ``src``."""
    torch.manual_seed(0)
    base = torch.randn(5, 3, dtype=torch.float64)

    def f(s):
        return torch.select_scatter(base, s, 0, 1).sin()

    X = torch.randn(4, 3, dtype=torch.float64)
    ref = reference_jacobian(f, (X,), 0, (0,))
    assert not torch.allclose(_vmap_vjp(f, X), ref)  # the bug
    _check_routes(f, X, "select_scatter_batched_src")


@pytest.mark.parametrize("reduce", ["max", "min", "median", "nanmedian"])
def test_full_reduction_ties(reduce):
    """(c) ties: autograd splits the derivative evenly; vjp/jacfwd through vmap pick one."""

    def f(x):
        return getattr(x, reduce)() * 2

    X = torch.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0], [4.0, 4.0, 4.0]], dtype=torch.float64)
    if reduce in ("min",):
        X = -X
    ref = reference_jacobian(f, (X,), 0, (0,))
    assert (ref[0] == torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)).all()  # split evenly
    assert not torch.allclose(_vmap_vjp(f, X), ref)  # the bug
    _check_routes(f, X, "max_min_ties")


def _forward_columns(func, x):
    """``torch.func.jacfwd`` of one sample: what forward mode gives without the workaround."""
    return jacfwd(func)(x)


@pytest.mark.parametrize(
    ("bug", "func", "X"),
    [
        pytest.param(
            "logcumsumexp_forward_mode",
            lambda x: torch.logcumsumexp(x, 0),
            torch.tensor([[-30.0, 5.0, 8.7, -3.7, 9.0], [0.1, 0.2, 0.3, 0.4, 0.5]]),
            id="logcumsumexp",
        ),
        pytest.param(
            "symmetric_input_forward_mode",
            torch.linalg.cholesky,
            torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[2.0, 0.5], [0.5, 1.0]]]),
            id="cholesky",
        ),
        pytest.param(
            "symmetric_input_forward_mode",
            lambda a: torch.linalg.eigh(a).eigenvectors.abs(),
            torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[2.0, 0.5], [0.5, 1.0]]]),
            id="eigh",
        ),
        pytest.param(
            "scatter_reduce_forward_mode",
            lambda x: torch.zeros(3, dtype=x.dtype).scatter_reduce(
                0, torch.tensor([0, 0, 1, 1]), x, "prod", include_self=False
            ),
            torch.tensor([[0.0, 2.0, 3.0, 0.0], [1.0, 0.0, 2.0, 5.0]]),
            id="scatter_reduce_prod",
        ),
    ],
)
def test_forward_mode_bugs(bug, func, X):
    """Forward-mode formulas that disagree with reverse mode: ``jacrev`` instead."""
    X = X.to(torch.float64)
    ref = reference_jacobian(func, (X,), 0, (0,))
    fwd = torch.stack([_forward_columns(func, x) for x in X])
    assert not torch.allclose(fwd, ref, rtol=1e-9, atol=1e-9)  # the bug
    # scatter_reduce reads .item() under vmap: an explicit jacrev refuses it (torch's error)
    routes = [r for r in AUTODIFF_ROUTES if not (bug.startswith("scatter") and r == "jacrev")]
    _check_routes(func, X, bug, route="jacfwd", routes=routes)


def test_lu_ops_forward_mode_nesting():
    """``vmap(jacfwd(f))`` is wrong for det/solve; jacbatch's forward route avoids the nesting."""
    torch.manual_seed(0)
    A = torch.randn(4, 3, 3, dtype=torch.float64) + 3 * torch.eye(3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    for f in (torch.linalg.det, lambda a: torch.linalg.solve(a, b)):
        ref = reference_jacobian(f, (A,), 0, (0,))
        for route in AUTODIFF_ROUTES:
            torch.testing.assert_close(jacbatch.jacobian(f, A, method=route), ref)


def test_every_bug_is_listed_once_with_a_replacement_that_it_spares():
    names = [b.name for b in _torch_bugs.KNOWN_BUGS]
    assert len(names) == len(set(names))
    for bug in _torch_bugs.KNOWN_BUGS:
        for route in bug.routes:
            instead, bugs = _torch_bugs.replacement(bug.ops, route)
            assert bugs and instead not in bug.routes


def _lu_cases():
    torch.manual_seed(0)
    A = torch.randn(4, 5, 5, dtype=torch.float64) + 5 * torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    return A, {
        "solve": lambda a: torch.linalg.solve(a, b),
        "slogdet": lambda a: torch.linalg.slogdet(a)[1] * a.sum(),
        "det": lambda a: torch.linalg.det(a) * a[0],
    }


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_lu_ops_reverse_mode_without_grad(context):
    """``vmap(jacrev(f))`` under no_grad / inference_mode is wrong for LU-based ops (every
    sample but the first); every jacbatch entry point that runs a reverse-mode transform under
    the batch vmap gives the reference there, and no result carries a graph."""
    A, funcs = _lu_cases()
    for name, f in funcs.items():
        ref = reference_jacobian(f, (A,), 0, (0,))
        with context():
            bad = vmap(torch.func.jacrev(f))(A)
        assert not torch.allclose(bad, ref), f"{name}: torch's bug is fixed; update the note"
        with context():
            got = {
                route: jacbatch.jacobian(f, A, method=route)
                for route in [*AUTODIFF_ROUTES, "closed_form"]
            }
            got["prepare jacrev"] = jacbatch.prepare(f, A, method="jacrev")(A)
            got["iter_jacobian"] = torch.cat(
                [J for _, J in jacbatch.iter_jacobian(f, A, method="jacrev", batch_chunk=2)]
            )
            for method in ("jacrev", "jacfwd"):
                for _ in range(4):  # the fourth call runs the kept program of the hot key
                    J = jacbatch.jacobian(f, A, sparse=True, method=method)
                got[f"sparse {method}"] = J.to_dense().reshape(ref.shape)
        for where, J in got.items():
            assert not J.requires_grad, where
            torch.testing.assert_close(J, ref, rtol=1e-9, atol=1e-9, msg=f"{name}, {where}")


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_lu_ops_hessian_without_grad(context):
    """The same bug in ``vmap(jacfwd(jacrev(f)))``: jacbatch's Hessians of logdet are right
    under no_grad and inference_mode."""
    A, _ = _lu_cases()

    def g(a):
        return torch.linalg.slogdet(a)[1]

    ref = torch.stack([torch.autograd.functional.hessian(g, a) for a in A])
    with context():
        assert not torch.allclose(vmap(torch.func.hessian(g))(A), ref)
        got = {m: jacbatch.hessian(g, A, method=m) for m in ("auto", "jacfwd", "jacrev")}
    for m, H in got.items():
        assert not H.requires_grad, m
        torch.testing.assert_close(H, ref, rtol=1e-9, atol=1e-9, msg=m)
