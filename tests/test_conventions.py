"""vec / unvec / commutation matrix / chain, against index arithmetic written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jacbatch

shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)


@given(shape=shapes, order=st.sampled_from(["row", "col"]))
def test_vec_unvec_roundtrip_and_order(shape, order):
    X = torch.arange(int(np.prod(shape, dtype=np.int64))).reshape(shape)
    v = jacbatch.vec(X, order)
    assert v.shape == (X.numel(),)
    expected = X.numpy().ravel(order="C" if order == "row" else "F")
    assert v.tolist() == expected.tolist()
    assert torch.equal(jacbatch.unvec(v, shape, order), X)


@given(m=st.integers(0, 5), n=st.integers(0, 5), order=st.sampled_from(["row", "col"]))
def test_commutation_matrix(m, n, order):
    X = torch.randn(m, n, dtype=torch.float64)
    K = jacbatch.commutation_matrix(m, n, order, dtype=torch.float64)
    assert K.shape == (m * n, m * n)
    assert torch.equal(K @ jacbatch.vec(X, order), jacbatch.vec(X.T, order))
    # a permutation matrix: its inverse is its transpose, the commutation matrix for (n, m)
    assert torch.equal(K.T, jacbatch.commutation_matrix(n, m, order, dtype=torch.float64))


def test_kronecker_identities_for_both_orders():
    g = torch.Generator().manual_seed(0)
    A, X, C = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((2, 3), (3, 4), (4, 5)))
    lhs = A @ X @ C
    torch.testing.assert_close(jacbatch.vec(lhs), torch.kron(A, C.T.contiguous()) @ jacbatch.vec(X))
    torch.testing.assert_close(
        jacbatch.vec(lhs, "col"), torch.kron(C.T.contiguous(), A) @ jacbatch.vec(X, "col")
    )


def test_chain_batched_shared_and_gradient():
    g = torch.Generator().manual_seed(1)
    outer = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    inner = torch.randn(4, 5, generator=g, dtype=torch.float64)
    got = jacbatch.chain(outer, inner)
    assert got.shape == (3, 2, 5)
    for b in range(3):
        torch.testing.assert_close(got[b], outer[b] @ inner)
    grad = torch.randn(4, generator=g, dtype=torch.float64)
    inner_b = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    got = jacbatch.chain(grad, inner_b)
    for b in range(3):
        torch.testing.assert_close(got[b], grad @ inner_b[b])


@pytest.mark.parametrize(
    ("outer", "inner", "exc", "match"),
    [
        (torch.ones(2, 3), torch.ones(4, 5), ValueError, "same k"),
        (torch.ones(2, 2, 3), torch.ones(3, 3, 5), ValueError, "batch sizes"),
        (torch.ones(2, 3), torch.ones(3), ValueError, "inner of shape"),
        (torch.ones(2, 3), torch.ones(3, 4, dtype=torch.float64), TypeError, "one dtype"),
        ([1.0], torch.ones(1, 4), TypeError, "outer to be a torch.Tensor"),
    ],
)
def test_chain_errors(outer, inner, exc, match):
    with pytest.raises(exc, match=match):
        jacbatch.chain(outer, inner)


def test_vec_errors():
    with pytest.raises(ValueError, match="one of 'row', 'col'"):
        jacbatch.vec(torch.ones(2), order="F")
    with pytest.raises(ValueError, match="6 elements"):
        jacbatch.unvec(torch.ones(6), (4, 2))
    with pytest.raises(ValueError, match="non-negative int"):
        jacbatch.commutation_matrix(-1, 2)
