"""Repeated sparse calls (NOTE [Repeated sparse calls] in jacbatch.sparse._hot) and the one
gather: results against the per-sample float64 autograd reference, exactly, on the calls that
reuse the kept preparation, and fresh correct results (or the pattern refusal) after the
function changes between calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch

import jacbatch
from jacbatch.sparse import SparsityPattern, _hot

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


def _entry(f: Callable[..., torch.Tensor]) -> _hot._Entry:
    (entry,) = _hot._SEEN[f.__code__].values()
    return entry


def diff(x: torch.Tensor) -> torch.Tensor:
    return (x[1:] - x[:-1]) ** 2


def lap(u: torch.Tensor) -> torch.Tensor:
    return u.roll(1, 0) + u.roll(-1, 0) + u.roll(1, 1) + u.roll(-1, 1) - 4 * u + u**3


def _diff_pattern(n: int) -> SparsityPattern:
    r = torch.arange(n - 1)
    return SparsityPattern.from_coo(torch.cat([r, r]), torch.cat([r, r + 1]), (n - 1,), (n,))


@pytest.mark.parametrize("method", ["auto", "jacfwd", "jacrev"])
@pytest.mark.parametrize("sparse", ["given", "detect"])
def test_repeated_calls_equal_reference(
    method: str, sparse: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jacbatch.sparse import engine

    prepared, checked = [], []
    prepare, check = engine.prepare, engine.check_pattern
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    monkeypatch.setattr(engine, "check_pattern", lambda *a: checked.append(1) or check(*a))
    gen = torch.Generator().manual_seed(0)
    P = _diff_pattern(12) if sparse == "given" else True
    for _ in range(CALLS):
        X = torch.randn(3, 12, generator=gen, dtype=DT)
        J = jacbatch.jacobian(diff, X, sparse=P, method=method)
        assert torch.equal(J.to_dense(), reference(diff, X))
    entry = _entry(diff)
    assert entry.prep is not None and entry.skip_check and entry.program is not None
    assert len(prepared) == len(checked) == _hot.HOT_CALLS  # later calls reused the entry


def test_repeated_calls_2d_roll() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(CALLS):
        X = torch.randn(4, 5, 5, generator=gen, dtype=DT)
        J = jacbatch.jacobian(lap, X, sparse=True)
        torch.testing.assert_close(J.to_dense(), reference(lap, X), rtol=0, atol=1e-12)
    assert _entry(lap).prep is not None and _entry(lap).program is not None


SCALE = torch.ones(6, dtype=DT)


def scaled(x: torch.Tensor) -> torch.Tensor:
    return SCALE * x**2 + x.roll(1)


def test_global_rebound_and_written_in_place() -> None:
    global SCALE
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(2, 6, generator=gen, dtype=DT)
    for _ in range(CALLS):
        J = jacbatch.jacobian(scaled, X, sparse=True)
    assert _entry(scaled).prep is not None
    SCALE = torch.full((6,), 3.0, dtype=DT)  # rebound
    assert torch.equal(jacbatch.jacobian(scaled, X, sparse=True).to_dense(), reference(scaled, X))
    for _ in range(CALLS):
        jacbatch.jacobian(scaled, X, sparse=True)
    SCALE[2] = -5.0  # written in place
    J = jacbatch.jacobian(scaled, X, sparse=True)
    assert torch.equal(J.to_dense(), reference(scaled, X))
    SCALE = torch.ones(6, dtype=DT)


MASK = torch.zeros(6, dtype=DT)


def masked(x: torch.Tensor) -> torch.Tensor:
    return MASK * x.roll(1) + x**2


def test_constant_zero_written_in_place_refreshes_structure() -> None:
    """Detection reads the zeros of ``MASK``: an in-place write adds entries, which the kept
    preparation must not hide (detected and given patterns)."""
    global MASK
    MASK = torch.zeros(6, dtype=DT)
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(2, 6, generator=gen, dtype=DT)
    diag = SparsityPattern.from_mask(torch.eye(6, dtype=torch.bool), (6,), (6,))
    for _ in range(CALLS):
        J = jacbatch.jacobian(masked, X, sparse=True)
        assert torch.equal(J.to_dense(), reference(masked, X))
        Jg = jacbatch.jacobian(masked, X, sparse=diag)
        assert torch.equal(Jg.to_dense(), reference(masked, X))
    MASK[3] = 2.0
    J = jacbatch.jacobian(masked, X, sparse=True)
    assert torch.equal(J.to_dense(), reference(masked, X))
    with pytest.raises(ValueError, match="sparse= pattern"):
        jacbatch.jacobian(masked, X, sparse=diag)
    MASK = torch.zeros(6, dtype=DT)


def make(k: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x**2 * k + (x[0] * x if k > 1 else x)

    return f


def test_closure_change_gives_fresh_results() -> None:
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(3, 5, generator=gen, dtype=DT)
    f1, f2 = make(0.5), make(2.0)  # one code object; f2 also depends on x[0]
    for _ in range(CALLS):
        assert torch.equal(jacbatch.jacobian(f1, X, sparse=True).to_dense(), reference(f1, X))
    J2 = jacbatch.jacobian(f2, X, sparse=True)
    # the traced closed form may write these values: equal up to rounding, not bit for bit
    torch.testing.assert_close(J2.to_dense(), reference(f2, X), rtol=1e-13, atol=1e-13)
    diag = SparsityPattern.from_mask(torch.eye(5, dtype=torch.bool), (5,), (5,))
    for _ in range(CALLS):
        jacbatch.jacobian(f1, X, sparse=diag)
    with pytest.raises(ValueError, match="sparse= pattern"):
        jacbatch.jacobian(f2, X, sparse=diag)


def relu_shift(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) + x.roll(1) ** 2


def test_value_dependent_pattern_keeps_its_check() -> None:
    """A pattern smaller than the structural one (it omits relu's entry where the sample is
    negative) is checked on every call, kept preparation or not."""
    X = -torch.ones(1, 4, dtype=DT)
    mask = torch.eye(4, dtype=torch.bool).roll(-1, 1)  # the roll's entries only
    mask[1:, 1:] |= torch.eye(3, dtype=torch.bool)  # relu's, except entry 0
    P = SparsityPattern.from_mask(mask, (4,), (4,))
    X[0, 1:] = 2.0
    for _ in range(CALLS):
        J = jacbatch.jacobian(relu_shift, X, sparse=P)
        assert torch.equal(J.to_dense(), reference(relu_shift, X))
    entry = _entry(relu_shift)
    assert entry.prep is not None and not entry.skip_check
    with pytest.raises(ValueError, match="sparse= pattern"):
        jacbatch.jacobian(relu_shift, torch.ones(1, 4, dtype=DT), sparse=P)


def test_chunked_colors_and_out_buffer() -> None:
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(3, 5, 5, generator=gen, dtype=DT)
    ref = reference(lap, X)
    for method in ("jacfwd", "jacrev"):
        J = jacbatch.jacobian(lap, X, sparse=True, method=method, chunk_size=2)
        torch.testing.assert_close(J.to_dense(), ref, rtol=0, atol=1e-12)
        P = jacbatch.jacobian(lap, X, sparse=True, method=method)
        out = torch.empty_like(P.values().reshape(3, -1))
        J2 = jacbatch.jacobian(lap, X, sparse=True, method=method, out=out)
        torch.testing.assert_close(J2.to_dense(), ref, rtol=0, atol=1e-12)


def test_non_finite_sample_on_a_repeated_call() -> None:
    """The kept program's values go through the NaN policy like the full path's."""
    gen = torch.Generator().manual_seed(6)
    P = _diff_pattern(8)
    for _ in range(CALLS):
        jacbatch.jacobian(diff, torch.randn(3, 8, generator=gen, dtype=DT), sparse=P)
    assert _entry(diff).program is not None
    X = torch.randn(3, 8, generator=gen, dtype=DT)
    X[1, 3] = float("nan")
    X[2, 0] = float("inf")
    J = jacbatch.jacobian(diff, X, sparse=P).to_dense()
    assert torch.equal(J[:1], reference(diff, X[:1]))  # the finite sample, against autograd
    # the non-finite samples: as the full path's NaN policy gives them (the dense autograd
    # reference spreads a NaN over rows that do not depend on it, which the policy avoids)
    _hot.ENABLED = False
    try:
        full = jacbatch.jacobian(diff, X, sparse=P).to_dense()
    finally:
        _hot.ENABLED = True
    torch.testing.assert_close(J, full, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(J[1]).all() and not torch.isfinite(J[2]).all()


COUNTER = [0.0]


def drifting(x: torch.Tensor) -> torch.Tensor:
    return x**2 * COUNTER[0]


def test_a_function_that_keeps_changing_stays_on_the_full_path() -> None:
    X = torch.randn(2, 4, dtype=DT)
    for i in range(_hot.MAX_DROPS * (_hot.HOT_CALLS + 2)):
        COUNTER[0] = float(i // (_hot.HOT_CALLS + 1))  # a new constant every few calls
        J = jacbatch.jacobian(drifting, X, sparse=True)
        assert torch.equal(J.to_dense(), reference(drifting, X))
    assert _entry(drifting).refused
