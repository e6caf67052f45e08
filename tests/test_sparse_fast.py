"""Repeated sparse calls (NOTE [Repeated sparse calls] in jacbatch.sparse._hot) and the one
gather: results against the per-sample float64 autograd reference, exactly, on the calls that
reuse the kept preparation, and fresh correct results (or the pattern refusal) after the
function changes between calls."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def test_functions_sharing_code_and_a_graph_that_reorders_its_inputs():
    """Functions that share one code object (closures made by one factory, as torch's OpInfo
    samples are) count towards one key; the one whose call makes the key hot reads closed-over
    tensors that its graph takes in another order than (arguments, lifted tensors). Keeping it
    must neither crash nor give wrong values, on any later call of either function."""
    torch.manual_seed(0)
    C = torch.randn(6, 6)
    Y = torch.randn(6, 6, dtype=torch.float64)

    def make(cond, other):
        def f(x, _c=cond, _o=other):
            return torch.where(_c, x, _o) * x.sum()

        return f

    X = torch.randn(3, 6, 6, dtype=torch.float64)
    fs = [make(C > 0, Y), make(C < 0, 2 * Y)]
    for k in range(2 * _hot.HOT_CALLS + 2):
        f = fs[k % 2]
        J = jacbatch.jacobian(f, X, sparse=True)
        torch.testing.assert_close(J.to_dense(), reference(f, X).reshape(3, 36, 36))


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return func(*args, **(kwargs or {}))


def test_call_under_a_dispatch_mode_keeps_the_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call that cannot capture (under a dispatch mode, a memory tracker say) takes the full
    path and leaves the kept entry alone (NOTE [Repeated sparse calls], point 5): not dropped,
    so the next plain call reuses it; nor kept or refused while the mode is on. (A given
    pattern: detection itself needs a capture, so ``sparse=True`` refuses under the mode.)"""
    from jacbatch.sparse import engine

    gen = torch.Generator().manual_seed(7)
    P = _diff_pattern(9)
    X = torch.randn(2, 9, generator=gen, dtype=DT)
    for _ in range(_hot.HOT_CALLS + 1):
        with _Passthrough():  # never counted: no entry is kept under the mode
            J = jacbatch.jacobian(diff, X, sparse=P)
        assert torch.equal(J.to_dense(), reference(diff, X))
    entry = _entry(diff)
    assert entry.count == 0 and entry.prep is None and not entry.refused
    for _ in range(_hot.HOT_CALLS):
        jacbatch.jacobian(diff, X, sparse=P)
    assert entry.prep is not None and entry.program is not None
    with _Passthrough():
        J = jacbatch.jacobian(diff, X, sparse=P)
    assert torch.equal(J.to_dense(), reference(diff, X))
    assert entry.prep is not None and entry.drops == 0  # still kept
    prepared = []
    prepare = engine.prepare
    monkeypatch.setattr(engine, "prepare", lambda *a, **k: prepared.append(1) or prepare(*a, **k))
    X2 = torch.randn(2, 9, generator=gen, dtype=DT)
    assert torch.equal(jacbatch.jacobian(diff, X2, sparse=P).to_dense(), reference(diff, X2))
    assert not prepared  # the kept entry ran


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="Inductor needs a C++ compiler",
)
@pytest.mark.parametrize("method", ["jacfwd", "jacrev"])
def test_compiled_program_equals_reference(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``COMPILE`` (NOTE [Compiling the kept program]) the kept program is Inductor's (not
    make_fx's GraphModule), it is what later calls run, and its values equal the reference."""
    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(_hot, "COMPILE", _hot.COMPILE)  # restored after the test
    assert jacbatch.sparse.compile_repeated(True) is False  # the public switch, off by default
    compiled = []
    compile_fx = cfx.compile_fx
    monkeypatch.setattr(
        cfx, "compile_fx", lambda *a, **k: compiled.append(1) or compile_fx(*a, **k)
    )
    gen = torch.Generator().manual_seed(8)
    for _ in range(CALLS):
        X = torch.randn(3, 5, 5, generator=gen, dtype=DT)
        J = jacbatch.jacobian(lap, X, sparse=True, method=method)
        torch.testing.assert_close(J.to_dense(), reference(lap, X), rtol=0, atol=1e-12)
    entry = _entry(lap)
    assert entry.compiled and entry.program is not None and len(compiled) == 1
    assert not isinstance(entry.program, torch.fx.GraphModule)
    ran = []
    program = entry.program
    entry.program = lambda *a: ran.append(1) or program(*a)
    X = torch.randn(3, 5, 5, generator=gen, dtype=DT)
    J = jacbatch.jacobian(lap, X, sparse=True, method=method)
    torch.testing.assert_close(J.to_dense(), reference(lap, X), rtol=0, atol=1e-12)
    assert ran == [1]  # the compiled program computed this call's values


def test_compiled_program_not_equal_is_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled program whose values differ from the full path's is dropped; the make_fx
    program stays."""
    import torch._inductor.compile_fx as cfx

    monkeypatch.setattr(_hot, "COMPILE", True)
    monkeypatch.setattr(
        cfx, "compile_fx", lambda gm, inputs: lambda *a: [v * (1 + 1e-15) + 1e-300 for v in gm(*a)]
    )
    gen = torch.Generator().manual_seed(9)
    for _ in range(CALLS):
        X = torch.randn(2, 7, generator=gen, dtype=DT)
        J = jacbatch.jacobian(diff, X, sparse=True)
        assert torch.equal(J.to_dense(), reference(diff, X))
    entry = _entry(diff)
    assert not entry.compiled and isinstance(entry.program, torch.fx.GraphModule)
