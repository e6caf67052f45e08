"""Every route against the independent float64 reference, over op families and batch layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jacbatch
from tests.cases import BY_NAME, CASES, Case
from tests.conftest import DEVICES, assert_matches, reference_jacobian

#: every route a caller may ask for; AUTODIFF: those that need no closed form (auto falls back)
ALL_ROUTES = [*jacbatch.methods.names(), "auto"]
AUTODIFF = [r for r in ALL_ROUTES if r != "closed_form"]
DTYPES = [torch.float64, torch.float32]


def _layouts(n: int) -> dict[str, tuple[int | None, ...]]:
    """Batch layouts for ``n`` arguments: all batched first, mixed, batch dim last, no batch."""
    return {
        "all0": (0,) * n,
        "first_only": (0,) + (None,) * (n - 1),
        "last_only": (None,) * (n - 1) + (-1,),
        "unbatched": (None,) * n,
    }


def _methods(case: Case) -> list[str]:
    return (["closed_form"] if case.closed_form else []) + AUTODIFF


PARAMS = [
    pytest.param(case, method, layout, id=f"{case.name}-{method}-{layout}")
    for case in CASES
    for method in _methods(case)
    for layout in _layouts(len(case.shapes))
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize(("case", "method", "layout"), PARAMS)
def test_route_matches_reference(case, method, layout, dtype, device):
    gen = torch.Generator().manual_seed(0)
    in_dims = _layouts(len(case.shapes))[layout]
    args = case.sample_args(3, in_dims, dtype, device, gen)
    argnums = tuple(range(len(args)))
    J = jacbatch.jacobian(case.func, *args, argnums=argnums, in_dims=in_dims, method=method)
    assert isinstance(J, tuple) and len(J) == len(args)
    for a in argnums:
        assert J[a].device.type == device
        assert_matches(J[a], reference_jacobian(case.func, args, a, in_dims), dtype)


@pytest.mark.parametrize("case", [c for c in CASES if not c.closed_form], ids=lambda c: c.name)
def test_cases_without_closed_form_are_refused_cleanly(case):
    """method="closed_form" on a case marked without one refuses, naming the way out; a case that
    starts to trace belongs among the ``closed_form=True`` ones (tests/cases.py)."""
    in_dims = (0,) * len(case.shapes)
    args = case.sample_args(3, in_dims, torch.float64, "cpu", torch.Generator().manual_seed(0))
    with pytest.raises(NotImplementedError, match="method='auto'"):
        jacbatch.jacobian(case.func, *args, in_dims=in_dims, method="closed_form")


@pytest.mark.parametrize("order", ["row", "col"])
@pytest.mark.parametrize("method", ALL_ROUTES)
@pytest.mark.parametrize("argnum", [0, 1, 2])
@pytest.mark.parametrize("case_name", ["affine_qvec", "affine_mq"])
def test_vec_orders(case_name, argnum, method, order):
    case = BY_NAME[case_name]
    in_dims = (0, None, 0)
    args = case.sample_args(4, in_dims, torch.float64, "cpu", torch.Generator().manual_seed(1))
    J = jacbatch.jacobian(
        case.func, *args, argnums=argnum, in_dims=in_dims, method=method, vec=order
    )
    ref = reference_jacobian(case.func, args, argnum, in_dims, vec=order)
    assert_matches(J, ref, torch.float64)


def test_column_major_kronecker_forms():
    """Column-major closed forms are the textbook ones: I_q ⊗ A, Wᵀ ⊗ I_m, I_q ⊗ 1_m."""
    A = torch.randn(3, 4, dtype=torch.float64)
    W = torch.randn(4, 2, dtype=torch.float64)
    B = torch.randn(2, dtype=torch.float64)
    kw = {"in_dims": None, "method": "closed_form", "vec": "col"}
    I2, I3 = torch.eye(2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    ones3 = torch.ones(3, 1, dtype=torch.float64)
    assert torch.equal(
        jacbatch.jacobian(jacbatch.affine, A, W, B, argnums=1, **kw), torch.kron(I2, A)
    )
    assert torch.equal(
        jacbatch.jacobian(jacbatch.affine, A, W, B, argnums=0, **kw),
        torch.kron(W.T.contiguous(), I3),
    )
    assert torch.equal(
        jacbatch.jacobian(jacbatch.affine, A, W, B, argnums=2, **kw), torch.kron(I2, ones3)
    )
    kw["vec"] = "row"
    assert torch.equal(
        jacbatch.jacobian(jacbatch.affine, A, W, B, argnums=1, **kw), torch.kron(A, I2)
    )
    assert torch.equal(
        jacbatch.jacobian(jacbatch.affine, A, W, B, argnums=0, **kw),
        torch.kron(I3, W.T.contiguous()),
    )
    assert torch.equal(
        jacbatch.jacobian(jacbatch.affine, A, W, B, argnums=2, **kw), torch.kron(ones3, I2)
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1000])
@pytest.mark.parametrize("method", ALL_ROUTES)
def test_every_chunk_size_gives_the_same_result(method, chunk_size):
    case = BY_NAME["affine_qvec"] if method == "closed_form" else BY_NAME["tanh_affine"]
    in_dims = (0, None, 0)
    args = case.sample_args(3, in_dims, torch.float64, "cpu", torch.Generator().manual_seed(2))
    J = jacbatch.jacobian(
        case.func, *args, argnums=(0, 1), in_dims=in_dims, method=method, chunk_size=chunk_size
    )
    for a in (0, 1):
        assert_matches(J[a], reference_jacobian(case.func, args, a, in_dims), torch.float64)


@pytest.mark.parametrize("method", ALL_ROUTES)
def test_non_contiguous_inputs_and_batch_dim_not_first(method):
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen).transpose(
        0, 2
    )  # (5, 3, 4), batch dim 1
    W = torch.randn(2, 4, dtype=torch.float64, generator=gen).T  # (4, 2) non-contiguous
    B = torch.randn(2, 6, dtype=torch.float64, generator=gen)[:, ::2]  # (2, 3) strided, batch dim 1
    assert not A.is_contiguous() and not W.is_contiguous() and not B.is_contiguous()
    func = (
        jacbatch.affine
        if method == "closed_form"
        else (lambda a, w, b: torch.tanh(jacbatch.affine(a, w, b)))
    )
    in_dims = (1, None, 1)
    J = jacbatch.jacobian(func, A, W, B, argnums=(0, 1, 2), in_dims=in_dims, method=method)
    for a in range(3):
        assert_matches(J[a], reference_jacobian(func, (A, W, B), a, in_dims), torch.float64)


@pytest.mark.parametrize("method", ALL_ROUTES)
@pytest.mark.parametrize(
    ("B", "m", "p", "q"), [(0, 2, 3, 2), (3, 0, 3, 2), (3, 2, 0, 2), (3, 2, 3, 0), (0, 0, 0, 0)]
)
def test_empty_batches_and_zero_sized_dims(method, B, m, p, q):
    A = torch.randn(B, m, p, dtype=torch.float64)
    W = torch.randn(p, q, dtype=torch.float64)
    b = torch.randn(q, dtype=torch.float64)
    in_dims = (0, None, None)
    for vec in (None, "row", "col"):
        J = jacbatch.jacobian(
            jacbatch.affine, A, W, b, argnums=(0, 1, 2), in_dims=in_dims, method=method, vec=vec
        )
        shapes = [(B, m, q, m, p), (B, m, q, p, q), (B, m, q, q)]
        for Ja, shape, a in zip(J, shapes, range(3), strict=True):
            if vec is None:
                assert Ja.shape == shape
            else:
                assert Ja.shape == (B, int(np.prod(shape[1:3])), int(np.prod(shape[3:])))
            ref = reference_jacobian(jacbatch.affine, (A, W, b), a, in_dims, vec=vec)
            assert_matches(Ja, ref, torch.float64)


@pytest.mark.parametrize("method", ALL_ROUTES)
def test_inputs_untouched_and_result_has_no_graph(method):
    gen = torch.Generator().manual_seed(4)
    args = [torch.randn(s, dtype=torch.float64, generator=gen) for s in ((3, 2, 4), (4, 2), (2,))]
    args = [a.requires_grad_() for a in args]
    before = [a.detach().clone() for a in args]
    func = jacbatch.affine if method == "closed_form" else (lambda a, w, b: torch.sin(a @ w + b))
    with torch.no_grad():  # with grad mode on the result is differentiable (tests/test_compose.py)
        J = jacbatch.jacobian(
            func, *args, argnums=(0, 1, 2), in_dims=(0, None, None), method=method
        )
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a.detach(), b)
        assert a.grad is None
    for Ja in J:
        assert not Ja.requires_grad and Ja.grad_fn is None


def test_int_argnums_returns_a_tensor_and_negative_argnums_work():
    case = BY_NAME["tanh_affine"]
    args = case.sample_args(2, (0, 0, 0), torch.float64, "cpu", torch.Generator().manual_seed(5))
    J = jacbatch.jacobian(case.func, *args, argnums=-2)
    assert isinstance(J, torch.Tensor)
    assert_matches(J, reference_jacobian(case.func, args, 1, (0, 0, 0)), torch.float64)


@pytest.mark.parametrize("method", ALL_ROUTES)
def test_out_buffer_is_filled_and_returned(method):
    case = BY_NAME["affine_qvec"]
    args = case.sample_args(
        3, (0, None, None), torch.float64, "cpu", torch.Generator().manual_seed(6)
    )
    fresh = jacbatch.jacobian(
        case.func, *args, argnums=1, in_dims=(0, None, None), method=method, vec="row"
    )
    buf = torch.full_like(fresh, float("nan"))
    got = jacbatch.jacobian(
        case.func, *args, argnums=1, in_dims=(0, None, None), method=method, vec="row", out=buf
    )
    assert got is buf
    assert torch.equal(buf, fresh)
