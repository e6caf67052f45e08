"""Structured operators at the edges: empty batches, zero-sized dims, copies, 3-D permutations."""

from __future__ import annotations

import pytest
import torch

import jacbatch
from jacbatch.structured import DenseJacobian, DiagonalJacobian, IdentityJacobian, PermuteJacobian
from tests.conftest import reference_jacobian


@pytest.mark.parametrize(
    ("B", "m", "p", "q"), [(0, 2, 4, 5), (3, 0, 4, 5), (3, 2, 0, 5), (3, 2, 4, 0)]
)
def test_zero_sized_products_match_dense(B, m, p, q):
    A = torch.randn(B, m, p, dtype=torch.float64)
    W, b = torch.randn(p, q, dtype=torch.float64), torch.randn(q, dtype=torch.float64)
    J = jacbatch.structured_jacobian(jacbatch.affine, A, W, b, argnums=1, in_dims=(0, None, None))
    dense = jacbatch.jacobian(
        jacbatch.affine, A, W, b, argnums=1, in_dims=(0, None, None), vec="row"
    )
    assert torch.equal(J.to_dense(vec="row"), dense)
    x = torch.randn(p * q, dtype=torch.float64)
    assert torch.equal(J @ x, dense @ x)
    c = torch.randn(m * q, dtype=torch.float64)
    assert torch.equal(c @ J, (c @ dense).reshape(B, p * q))
    X = torch.randn(p * q, 2, dtype=torch.float64)
    torch.testing.assert_close(J @ X, dense @ X)
    d = DiagonalJacobian(torch.randn(B, m, q, dtype=torch.float64), batched=True)
    expected = d.to_dense(vec="row") @ dense
    torch.testing.assert_close((d @ J).to_dense(vec="row"), expected)


def test_to_dense_and_identity_products_return_new_memory():
    J0 = torch.randn(2, 3)
    D = DenseJacobian(J0, (2,), (3,))
    before = J0.clone()
    D.to_dense().zero_()
    D.to_dense(vec="row").zero_()
    assert torch.equal(J0, before)
    t = torch.randn(2, 3)
    ident = IdentityJacobian((2, 3), out_shape=(6,))
    out = ident.jvp(t)
    out.zero_()
    assert t.abs().sum() > 0


def test_three_d_permutation_is_not_its_own_inverse():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    P = PermuteJacobian((2, 3, 4), (1, 2, 0), dtype=torch.float64)
    y = P.jvp(x)
    assert torch.equal(y, x.permute(1, 2, 0))
    ref = reference_jacobian(lambda v: v.permute(1, 2, 0), (x,), 0, None)
    assert torch.equal(P.to_dense(), ref)
    c = torch.randn(3, 4, 2, dtype=torch.float64)
    assert torch.equal(P.vjp(c), c.permute(2, 0, 1))
    assert torch.equal(
        (PermuteJacobian((3, 4, 2), (1, 2, 0), dtype=torch.float64) @ P).to_dense(),
        reference_jacobian(lambda v: v.permute(1, 2, 0).permute(1, 2, 0), (x,), 0, None),
    )
    assert torch.equal(P.T.to_dense().reshape(24, 24), P.to_dense().reshape(24, 24).T)
