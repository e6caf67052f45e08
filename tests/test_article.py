"""The reference article's worked examples come out of jacbatch exactly."""

from __future__ import annotations

import pytest
import torch

import jacbatch

A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
W = torch.tensor([[7.0, 8.0], [10.0, 11.0], [12.0, 13.0]])
B = torch.tensor([13.0, 14.0])
DZ_DW = torch.tensor(
    [
        [1.0, 0, 2, 0, 3, 0],
        [0, 1, 0, 2, 0, 3],
        [4, 0, 5, 0, 6, 0],
        [0, 4, 0, 5, 0, 6],
    ]
)
METHODS = ["auto", *jacbatch.methods.names()]  # every route a caller may ask for


def test_forward_values():
    Z = jacbatch.affine(A, W, B)
    assert torch.equal(Z, torch.tensor([[76.0, 83.0], [163.0, 179.0]]))
    assert Z.sum().item() == 501.0


@pytest.mark.parametrize("method", [m for m in METHODS if m != "closed_form"])
def test_gradient_of_two_sum(method):
    grad = jacbatch.jacobian(lambda a: 2 * a.sum(), A, in_dims=None, method=method)
    assert torch.equal(grad, torch.full((2, 3), 2.0))


@pytest.mark.parametrize("method", METHODS)
def test_four_by_six_jacobian(method):
    J = jacbatch.jacobian(
        jacbatch.affine, A, W, B, argnums=1, in_dims=None, method=method, vec="row"
    )
    assert torch.equal(J, DZ_DW)


def test_the_four_by_six_jacobian_does_not_depend_on_w():
    J = jacbatch.jacobian(
        jacbatch.affine,
        A,
        torch.randn(3, 2),
        B,
        argnums=1,
        in_dims=None,
        method="closed_form",
        vec="row",
    )
    assert torch.equal(J, DZ_DW)


@pytest.mark.parametrize("method", METHODS)
def test_chain_rule(method):
    dS_dZ = jacbatch.jacobian(
        lambda z: z.sum(), jacbatch.affine(A, W, B), in_dims=None, method="jacrev"
    )
    assert torch.equal(dS_dZ, torch.ones(2, 2))
    dZ_dW = jacbatch.jacobian(
        jacbatch.affine, A, W, B, argnums=1, in_dims=None, method=method, vec="row"
    )
    dS_dW = jacbatch.unvec(jacbatch.chain(jacbatch.vec(dS_dZ), dZ_dW), (3, 2))
    assert torch.equal(dS_dW, torch.tensor([[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]]))


def test_chain_rule_matches_autograd_backward():
    Wg = W.clone().requires_grad_()
    (A @ Wg + B).sum().backward()
    dZ_dW = jacbatch.jacobian(jacbatch.affine, A, W, B, argnums=1, in_dims=None, vec="row")
    assert torch.equal(jacbatch.chain(torch.ones(4), dZ_dW).reshape(3, 2), Wg.grad)


def test_vec_orders_of_the_article():
    M = torch.arange(1, 10).reshape(3, 3)
    assert jacbatch.vec(M).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert jacbatch.vec(M, order="col").tolist() == [1, 4, 7, 2, 5, 8, 3, 6, 9]
