"""Sparse Jacobians in situations found to go wrong: results against the per-sample float64
autograd reference, on every call of a repeated sequence (so kept programs run)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import jacbatch
from jacbatch.sparse import _hot

DT = torch.float64
CALLS = _hot.HOT_CALLS + 3


def reference(f: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """``(B, out_numel, in_numel)``: per-sample autograd Jacobians."""
    out = []
    for x in X:
        J = torch.autograd.functional.jacobian(f, x)
        out.append(J.reshape(f(x).numel(), x.numel()))
    return torch.stack(out)


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    _hot.forget_all()
    yield
    _hot.forget_all()


@pytest.mark.parametrize("method", ["auto", "jacfwd", "jacrev"])
def test_pullback_independent_of_the_sample(method: str) -> None:
    """``A @ x``: the row passes' pull-back does not depend on the sample, which torch 2.13's
    vmap could not return at ``out_dims=1``."""
    n = 12
    A = torch.eye(n, dtype=DT) + torch.diag(torch.ones(n - 1, dtype=DT), 1)
    X = torch.randn(4, n, dtype=DT)

    def f(x: torch.Tensor) -> torch.Tensor:
        return A @ x

    for _ in range(CALLS):
        J = jacbatch.jacobian(f, X, sparse=True, method=method)
        torch.testing.assert_close(J.to_dense(), reference(f, X), rtol=0, atol=1e-12)
