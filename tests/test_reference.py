"""The reference Jacobian itself (tests/_reference.py), checked against closed forms written out
by hand, so that every test comparing with it compares with the right thing."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import reference_jacobian

F64 = torch.float64


def _affine(A: torch.Tensor, W: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return A @ W + bias


def test_vec_orders_are_the_textbook_kronecker_forms():
    """``Z = A W + b``: row-major ``dZ/dW = A ⊗ I_q``, column-major ``I_q ⊗ A``; ``dZ/dA`` is
    ``I_m ⊗ Wᵀ`` and ``Wᵀ ⊗ I_m``."""
    g = torch.Generator().manual_seed(0)
    A, W, bias = (torch.randn(s, dtype=F64, generator=g) for s in ((3, 4), (4, 2), (2,)))
    I2, I3 = torch.eye(2, dtype=F64), torch.eye(3, dtype=F64)
    dW_row, dA_row = reference_jacobian(_affine, (A, W, bias), (1, 0), None, vec="row")
    dW_col, dA_col = reference_jacobian(_affine, (A, W, bias), (1, 0), None, vec="col")
    assert torch.equal(dW_row, torch.kron(A, I2))
    assert torch.equal(dW_col, torch.kron(I2, A))
    assert torch.equal(dA_row, torch.kron(I3, W.T.contiguous()))
    assert torch.equal(dA_col, torch.kron(W.T.contiguous(), I3))
    assert reference_jacobian(_affine, (A, W, bias), 1, None).shape == (3, 2, 4, 2)


@pytest.mark.parametrize("in_dims", [(0, None, None), (1, None, 0), (-1, None, None)])
def test_batched_and_shared_arguments(in_dims):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(5, 3, 4, dtype=F64, generator=g).movedim(0, in_dims[0])
    W = torch.randn(4, 2, dtype=F64, generator=g)
    bias = torch.randn(5, 2, dtype=F64, generator=g) if in_dims[2] is not None else W[0]
    J = reference_jacobian(_affine, (A, W, bias), 1, in_dims)
    for b in range(5):
        a = A.select(in_dims[0], b)
        assert torch.equal(J[b], torch.kron(a, torch.eye(2, dtype=F64)).reshape(3, 2, 4, 2))


def test_float64_on_the_cpu_and_no_graph():
    x = torch.randn(4, 3).requires_grad_()
    J = reference_jacobian(torch.sin, (x,))
    assert J.dtype == F64 and J.device.type == "cpu" and J.grad_fn is None
    torch.testing.assert_close(J, torch.diag_embed(torch.cos(x.detach().double())))


def test_create_graph_gives_second_derivatives():
    """``f = sum(x**3)``: the Jacobian of the Jacobian is ``diag(6 x)``."""
    X = torch.randn(4, 3, dtype=F64)

    def jac(y: torch.Tensor) -> torch.Tensor:
        return reference_jacobian(lambda u: (u**3).sum(), (y,), in_dims=None, create_graph=True)

    H = reference_jacobian(jac, (X,))
    torch.testing.assert_close(H, torch.diag_embed(6 * X), rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="float64 CPU"):
        reference_jacobian(torch.sin, (X.float(),), create_graph=True)


def test_one_call_per_sample_and_empty_shapes():
    calls = []

    def f(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x * 2

    reference_jacobian(f, (torch.randn(3, 2, dtype=F64),))
    assert len(calls) == 3  # a function with state sees what a fresh per-sample call sees
    assert reference_jacobian(f, (torch.randn(0, 2, dtype=F64),)).shape == (0, 2, 2)
    assert reference_jacobian(lambda x: x[:0], (torch.randn(3, 2, dtype=F64),)).shape == (
        3,
        0,
        2,
    )
    assert reference_jacobian(f, (torch.randn(3, 0, dtype=F64),), vec="col").shape == (3, 0, 0)
