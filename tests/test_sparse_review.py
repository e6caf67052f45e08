"""Sparse Jacobians in situations found to go wrong: results against the per-sample float64
autograd reference, on every call of a repeated sequence (so kept programs run)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import jacbatch
from jacbatch.sparse import SparsityPattern, _hot
from tests._sparse_reference import one_arg_reference

DT = torch.float64
CALLS = _hot.HOT_CALLS + 3


reference = one_arg_reference


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


def _index(x: torch.Tensor) -> torch.Tensor:
    return x[IDX] * 2


def _mask(x: torch.Tensor) -> torch.Tensor:
    return torch.where(MASK, x * 2, x.roll(1) * 3)


def _factor(x: torch.Tensor) -> torch.Tensor:
    return x * W + (x * (1 - W)).roll(1)


IDX = torch.tensor([0, 3, 3, 5, 11])
MASK = torch.arange(12) % 2 == 0
W = torch.ones(12, dtype=DT)


@pytest.mark.parametrize("method", ["auto", "jacfwd", "jacrev"])
@pytest.mark.parametrize(
    ("f", "write"),
    [
        (_index, lambda: IDX.data.__setitem__(0, 7)),
        (_mask, lambda: MASK.data.logical_not_()),
        (_factor, lambda: W.data.fill_(0.5)),
    ],
    ids=["index", "mask", "factor-zeros"],
)
def test_data_write_between_calls(
    f: Callable[[torch.Tensor], torch.Tensor], write: Callable[[], object], method: str
) -> None:
    """A write through ``.data`` bumps no version counter; the pattern detected from the
    tensor's old values must not be reused (NOTE [Writes the version counter does not see])."""
    saved = IDX.clone(), MASK.clone(), W.clone()
    try:
        X = torch.randn(4, 12, dtype=DT)
        for i in range(CALLS):
            if i == _hot.HOT_CALLS + 1:
                write()
            J = jacbatch.jacobian(f, X, sparse=True, method=method)
            torch.testing.assert_close(J.to_dense(), reference(f, X), rtol=0, atol=1e-12)
    finally:
        IDX.data.copy_(saved[0])
        MASK.data.copy_(saved[1])
        W.data.copy_(saved[2])


@pytest.mark.parametrize("method", ["auto", "jacfwd", "jacrev"])
def test_a_pattern_missing_entries_that_vanish_on_the_first_sample_is_refused(method):
    """NOTE [The pattern check covers every sample]: ``x * x.roll(1)`` with a pattern of the
    diagonal only misses ``(i, i - 1)``, whose derivative ``x[i]`` is zero on a zero first
    sample; the other samples give the miss away."""
    n = 12

    def f(x):
        return x * x.roll(1)

    P = SparsityPattern.from_coo(torch.arange(n), torch.arange(n), (n,), (n,))
    X = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X[0] = 0
    with pytest.raises(ValueError, match=r"outside the pattern in .* of sample 1's Jacobian"):
        jacbatch.jacobian(f, X, sparse=P, method=method)
    # the full pattern gives the reference on every sample, the zero one included
    full = SparsityPattern.from_coo(
        torch.cat([torch.arange(n), torch.arange(n)]),
        torch.cat([torch.arange(n), (torch.arange(n) - 1) % n]),
        (n,),
        (n,),
    )
    J = jacbatch.jacobian(f, X, sparse=full, method=method)
    ref = torch.stack([torch.autograd.functional.jacobian(f, x) for x in X])
    torch.testing.assert_close(J.to_dense(), ref, rtol=1e-12, atol=1e-12)
