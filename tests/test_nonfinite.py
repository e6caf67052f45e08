"""NaN and Inf: every route gives per-sample reverse-mode autograd's Jacobian.

NOTE [Non-finite values: one policy] (jacbatch/_nonfinite.py). The reference here is the
float64 per-sample ``torch.autograd.functional.jacobian`` loop of ``conftest``; NaN must sit
where the reference has NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

import jacbatch
from jacbatch import _nonfinite
from tests.conftest import reference_jacobian

ROUTES = ["auto", *jacbatch.methods.names()]  # every route a caller may ask for
inf, nan = math.inf, math.nan

W = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.5]], dtype=torch.float64)


def _x(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# (id, func, args, argnums, in_dims, has a traced closed form)
CASES = [
    # tanh(x @ W) with an infinite input: the reference is finite (tanh' = 0 there)
    ("tanh_mm_inf_x", lambda x: torch.tanh(x @ W), (_x([[inf, 1.0], [0.3, -0.2]]),), 0, 0, True),
    (
        "tanh_mm_inf_wrt_W",
        lambda x, w: torch.tanh(x @ w),
        (_x([[inf, 1.0], [0.3, -0.2]]), W),
        1,
        (0, None),
        True,
    ),
    ("relu_nan", torch.relu, (_x([[nan, 1.0, -1.0], [0.0, 2.0, -3.0]]),), 0, 0, True),
    ("relu_of_log_neg", lambda x: torch.relu(torch.log(x)), (_x([[-1.0, 2.0]]),), 0, 0, True),
    (
        "sqrt_square_zero",
        lambda x: torch.sqrt(x**2),
        (_x([[0.0, 1.0, -2.0], [3.0, 0.0, 0.0]]),),
        0,
        0,
        True,
    ),
    ("log_zero", torch.log, (_x([[0.0, 1.0], [2.0, 3.0]]),), 0, 0, True),
    (
        "div_by_zero",
        lambda x, y: x / y,
        (_x([[1.0, 2.0], [3.0, 4.0]]), _x([[0.0, 1.0], [2.0, 0.0]])),
        1,
        0,
        True,
    ),
    (
        "exp_inf",
        lambda x: torch.exp(x).sum(),
        (_x([[inf, 0.0], [-inf, 1.0], [0.5, 0.25]]),),
        0,
        0,
        True,
    ),
    (
        "softmax_inf",
        lambda x: torch.softmax(x, -1),
        (_x([[inf, 0.0, 1.0], [0.1, 0.2, 0.3]]),),
        0,
        0,
        True,
    ),
    (
        "where_masked_nan",
        lambda x: torch.where(x > 0, torch.sqrt(x), x * 0),
        (_x([[-1.0, 4.0], [1.0, 9.0]]),),
        0,
        0,
        True,
    ),
    (
        "maximum_nan_and_tie",
        torch.maximum,
        (_x([[nan, 1.0, 2.0], [1.0, 1.0, 3.0]]), _x([[0.0, nan, 2.0], [1.0, 0.0, 4.0]])),
        0,
        0,
        True,
    ),
    (
        "affine_inf_A_wrt_W",  # registered closed form A ⊗ I vs reverse mode's inf · 0 = NaN
        jacbatch.affine,
        (
            torch.tensor([[[inf, 1.0], [0.5, 2.0]], [[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64),
            W,
            torch.zeros(3, dtype=torch.float64),
        ),
        1,
        (0, None, None),
        True,
    ),
    (
        "shared_nan_weight",
        lambda x, w: torch.tanh(x @ w),
        (_x([[1.0, 2.0], [0.3, -0.2]]), _x([[nan, 1.0, 0.0], [1.0, 2.0, 3.0]])),
        0,
        (0, None),
        True,
    ),
]


def _compare(J: torch.Tensor, ref: torch.Tensor) -> None:
    assert J.shape == ref.shape
    torch.testing.assert_close(J, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("func", "args", "argnum", "in_dims", "traced"),
    [pytest.param(*c[1:], id=c[0]) for c in CASES],
)
def test_every_route_follows_reverse_mode(func, args, argnum, in_dims, traced, route):
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
    ref = reference_jacobian(func, args, argnum, dims)
    if route == "closed_form" and not traced:
        pytest.skip("no closed form for this function")
    J = jacbatch.jacobian(func, *args, argnums=argnum, in_dims=in_dims, method=route)
    _compare(J, ref)


def test_reference_has_the_issue_shapes_of_nan():
    """The three disagreements of the issue, pinned: what every route now returns."""
    x = _x([[0.0, 1.0]])
    J = jacbatch.jacobian(lambda x: torch.sqrt(x**2), x, method="jacfwd")[0]
    # reverse mode: NaN down the input column of the zero, not across its output row
    assert torch.isnan(J[:, 0]).all() and not torch.isnan(J[1, 1])
    J = jacbatch.jacobian(torch.relu, _x([[nan]]), method="closed_form")
    assert J.item() == 1.0  # autograd passes the gradient at NaN
    J = jacbatch.jacobian(lambda x: torch.tanh(x @ W), _x([[inf, 1.0]]), method="jacfwd")
    assert torch.isfinite(J).all() and (J == 0).all()


def test_finite_points_are_not_recomputed():
    x = torch.randn(4, 3, dtype=torch.float64)
    J = torch.randn(4, 3, 3, dtype=torch.float64)
    call = jacbatch._validation.normalize_call("jacobian", torch.tanh, (x,), 0, 0)
    assert not _nonfinite.affected(call, [J], "jacfwd", False).any()
    J[2, 0, 1] = nan
    assert _nonfinite.affected(call, [J], "vjp", False).tolist() == [False, False, True, False]


def test_hidden_intermediate_is_found_for_forward_mode():
    """``where`` hides a NaN tangent from forward mode; the forward check sees the intermediate."""
    f = lambda x: torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x))  # noqa: E731
    x = _x([[1.0, 4.0], [-1.0, 9.0], [2.0, 3.0]])
    call = jacbatch._validation.normalize_call("jacobian", f, (x,), 0, 0)
    J = torch.zeros(3, 2, 2, dtype=torch.float64)
    assert _nonfinite.affected(call, [J], "jacfwd", False).tolist() == [False, True, False]
    assert _nonfinite.affected(call, [J], "jacrev", False).tolist() == [False, False, False]


@pytest.mark.parametrize("route", ["auto", "jacfwd", "vjp"])
def test_streaming_follows_the_policy(route):
    """``iter_jacobian`` runs the same steps chunk by chunk: the same answer at NaN and Inf."""
    f = lambda x: torch.sqrt(x**2) * torch.tanh(x @ W.T @ W)  # noqa: E731
    X = _x([[0.0, 1.0, 2.0], [inf, 1.0, -1.0], [nan, 0.5, 0.0], [1.0, 2.0, 3.0]])
    ref = reference_jacobian(f, (X,), 0, (0,))
    parts = [J for _, J in jacbatch.iter_jacobian(f, X, method=route, batch_chunk=2)]
    _compare(torch.cat(parts), ref)
