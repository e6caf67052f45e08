"""The traced closed form of sparse Jacobians (NOTE [Sampling lettered terms at the nonzeros]
in jacbatch.sparse.closed): values against the per-sample float64 autograd reference, the
route reported by explain and counted, the memory guard that sends selection-heavy functions
to the compressed passes, non-finite samples, and repeated calls after a global changes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

import jacbatch
from jacbatch.sparse import SparsityPattern, _hot, closed

DT = torch.float64
GEN = torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh() -> Iterator[None]:
    _hot.forget_all()
    yield
    _hot.forget_all()


def _rand(*shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=GEN, dtype=DT) + 0.5


def reference(
    f: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], dims: tuple[int | None, ...],
    a: int, B: int,
) -> torch.Tensor:  # fmt: skip
    """``(B, out_numel, in_numel)``: per-sample autograd Jacobians w.r.t. ``args[a]``."""
    out = []
    for b in range(B):
        xs = [x[b] if d is not None else x for x, d in zip(args, dims, strict=True)]

        def g(xa: torch.Tensor, xs: list[torch.Tensor] = xs) -> torch.Tensor:
            return f(*xs[:a], xa, *xs[a + 1 :])

        J = torch.autograd.functional.jacobian(g, xs[a], vectorize=True)
        out.append(J.reshape(g(xs[a]).numel(), xs[a].numel()))
    return torch.stack(out)


def _check(J: torch.Tensor, R: torch.Tensor, pattern: SparsityPattern | None = None) -> None:
    D = J.to_dense()
    assert D.shape == R.shape
    torch.testing.assert_close(D, R, rtol=1e-12, atol=1e-12)
    if pattern is not None:  # entries at the pattern, in CSR order
        rows, cols = pattern.row_indices(), pattern.col_indices
        torch.testing.assert_close(J.values(), R[:, rows, cols], rtol=1e-12, atol=1e-12)


def _uses_closed(
    f: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], **kw: object
) -> bool:
    text = str(jacbatch.explain(f, *args, **kw))
    return "closed form writes the nonzeros" in text


A_BAND = (
    torch.diag(torch.full((12,), 2.0, dtype=DT))
    + torch.diag(torch.full((11,), -1.0, dtype=DT), 1)
    + torch.diag(torch.full((11,), 0.5, dtype=DT), -1)
)
W_CONV = torch.tensor([[[0.25, -1.0, 0.5]]], dtype=DT)


def brusselator(u: torch.Tensor) -> torch.Tensor:
    a, b, alpha = 3.4, 1.0, 10.0
    U, V = u[0], u[1]

    def lap(z: torch.Tensor) -> torch.Tensor:
        return z.roll(1, 0) + z.roll(-1, 0) + z.roll(1, 1) + z.roll(-1, 1) - 4 * z

    return torch.stack(
        [alpha * lap(U) + b + U**2 * V - (a + 1) * U, alpha * lap(V) + a * U - U**2 * V]
    )


def brusselator_sliced(u: torch.Tensor) -> torch.Tensor:
    def lap(z: torch.Tensor) -> torch.Tensor:
        zp = torch.cat([z[-1:], z, z[:1]], 0)
        zp = torch.cat([zp[:, -1:], zp, zp[:, :1]], 1)
        return zp[:-2, 1:-1] + zp[2:, 1:-1] + zp[1:-1, :-2] + zp[1:-1, 2:] - 4 * z

    U, V = u[0], u[1]
    return torch.stack([10 * lap(U) + 1 + U**2 * V - 4.4 * U, 10 * lap(V) + 3.4 * U - U**2 * V])


def heat(x: torch.Tensor) -> torch.Tensor:
    lap = -2 * x + F.pad(x[:-1], (1, 0)) + F.pad(x[1:], (0, 1))
    return lap + 0.1 * x**3


# name -> (func, per-sample shapes of the arguments)
ONE_ARG: dict[str, tuple[Callable[..., torch.Tensor], tuple[int, ...]]] = {
    "elementwise": (lambda x: torch.tanh(x.exp() * x.sin()) + x**2, (3, 5)),
    "banded_matmul": (lambda x: torch.tanh(A_BAND @ x), (12,)),
    "brusselator_roll": (brusselator, (2, 32, 32)),
    "brusselator_slice": (brusselator_sliced, (2, 5, 5)),
    "heat": (heat, (64,)),
    "softmax": (lambda x: torch.softmax(x, -1), (6, 3)),
    "conv1d": (lambda x: F.conv1d(x[None], W_CONV)[0].sin(), (1, 20)),
    "cumsum": (lambda x: x.cumsum(0) * x, (10,)),
    "sum_of_terms": (lambda x: x.sin() * x.roll(1) + x.exp() / (1 + x.roll(-1) ** 2), (16,)),
}


@pytest.mark.parametrize("name", sorted(ONE_ARG))
def test_closed_form_equals_reference(name: str) -> None:
    f, shape = ONE_ARG[name]
    X = _rand(3, *shape)
    assert _uses_closed(f, (X,), sparse=True, method="closed_form")
    before = closed.STATS["calls"]
    J = jacbatch.jacobian(f, X, sparse=True, method="closed_form")
    assert closed.STATS["calls"] == before + 1  # the closed form wrote these values
    R = reference(f, (X,), (0,), 0, 3)
    _check(J, R)
    out_shape = tuple(f(X[0]).shape)
    P = SparsityPattern.from_mask(R.abs().sum(0) != 0, out_shape, tuple(shape))
    J2 = jacbatch.jacobian(f, X, sparse=P, method="closed_form")
    _check(J2, R, P)


def test_strided_slice_times_shared_and_batched() -> None:
    def f(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x[..., ::2] * y + w * x[..., 1::2] ** 2

    X, Y, W = _rand(4, 3, 8), _rand(4, 3, 4), _rand(3, 4)
    args = (X, Y, W)
    dims = (0, 0, None)
    assert _uses_closed(f, args, argnums=(0, 1, 2), in_dims=dims, sparse=True, method="closed_form")
    before = closed.STATS["calls"]
    Js = jacbatch.jacobian(
        f, *args, argnums=(0, 1, 2), in_dims=dims, sparse=True, method="closed_form"
    )
    assert closed.STATS["calls"] == before + 1
    for a, J in enumerate(Js):
        _check(J, reference(f, args, dims, a, 4))


def test_vec_col_and_out() -> None:
    f, shape = ONE_ARG["sum_of_terms"]
    X = _rand(3, *shape)
    R = reference(f, (X,), (0,), 0, 3)
    Jc = jacbatch.jacobian(f, X, sparse=True, method="closed_form", vec="col")
    # column-major vec: both flat indices reversed; 1-D shapes make that the same order
    _check(Jc, R)
    g, shape2 = ONE_ARG["elementwise"]
    X2 = _rand(3, *shape2)
    R2 = reference(g, (X2,), (0,), 0, 3)
    perm_o = torch.arange(15).reshape(3, 5).T.reshape(-1)
    Jc2 = jacbatch.jacobian(g, X2, sparse=True, method="closed_form", vec="col")
    _check(Jc2, R2[:, perm_o][:, :, perm_o])
    P = SparsityPattern.from_mask(R.abs().sum(0) != 0, (16,), (16,))
    buf = torch.full((3, P.nnz), float("nan"), dtype=DT)
    before = closed.STATS["calls"]
    J = jacbatch.jacobian(f, X, sparse=P, method="closed_form", out=buf)
    assert closed.STATS["calls"] == before + 1
    assert J.values().data_ptr() == buf.data_ptr() or torch.equal(J.values(), buf)
    _check(J, R, P)


def test_selection_heavy_function_takes_the_passes() -> None:
    def diff(x: torch.Tensor) -> torch.Tensor:
        return (x[1:] - x[:-1]) ** 2

    n = 10_000
    X = _rand(2, n)
    text = str(jacbatch.explain(diff, X, sparse=True))
    assert "compressed passes (they fit the budget in one pass" in text
    with pytest.raises(NotImplementedError, match=r"method='closed_form' with sparse=.*factors"):
        jacbatch.jacobian(diff, X, sparse=True, method="closed_form")
    before = closed.STATS["calls"]
    J = jacbatch.jacobian(diff, X, sparse=True)
    assert closed.STATS["calls"] == before
    vals = J.values().reshape(2, n - 1, 2)
    d = X[:, 1:] - X[:, :-1]
    torch.testing.assert_close(vals[:, :, 0], -2 * d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vals[:, :, 1], 2 * d, rtol=1e-12, atol=1e-12)
    assert torch.equal(J.crow_indices()[0], torch.arange(0, 2 * n - 1, 2))


def test_max_memory_chunks_and_iter_jacobian() -> None:
    f, shape = ONE_ARG["brusselator_roll"]
    X = _rand(6, *shape)
    R = reference(f, (X,), (0,), 0, 6)
    J = jacbatch.jacobian(f, X, sparse=True, method="closed_form", max_memory="40MB")
    _check(J, R)
    got = [
        Jc.to_dense()
        for _, Jc in jacbatch.iter_jacobian(f, X, sparse=True, method="closed_form", batch_chunk=4)
    ]
    torch.testing.assert_close(torch.cat(got), R, rtol=1e-12, atol=1e-12)


def test_method_jacfwd_takes_the_passes() -> None:
    f, shape = ONE_ARG["elementwise"]
    X = _rand(2, *shape)
    assert not _uses_closed(f, (X,), sparse=True, method="jacfwd")
    before = closed.STATS["calls"]
    J = jacbatch.jacobian(f, X, sparse=True, method="jacfwd")
    assert closed.STATS["calls"] == before
    _check(J, reference(f, (X,), (0,), 0, 2))


def test_non_finite_sample_follows_reverse_mode() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x**2) * x.roll(1) + x.log()

    X = _rand(3, 8)
    X[1, 2] = 0.0  # sqrt(0)' is inf, log(0) = -inf: reverse mode decides this sample
    X[2, 5] = float("nan")
    assert _uses_closed(f, (X,), sparse=True, method="closed_form")
    J = jacbatch.jacobian(f, X, sparse=True, method="closed_form")
    R = reference(f, (X,), (0,), 0, 3)
    torch.testing.assert_close(J.to_dense()[0], R[0], rtol=1e-12, atol=1e-12)
    crow, col = J.crow_indices()[0], J.col_indices()[0]
    rows = torch.repeat_interleave(torch.arange(8), crow.diff())
    assert rows.numel() == 16  # the diagonal and the roll's entries
    torch.testing.assert_close(J.values(), R[:, rows, col], rtol=1e-12, atol=1e-12, equal_nan=True)
    assert bool(J.values()[1].isinf().any() | J.values()[1].isnan().any())


def test_repeated_calls_after_a_global_changes() -> None:
    global SCALE
    f = _scaled
    X = _rand(4, 2, 8, 8)
    for _ in range(_hot.HOT_CALLS + 2):
        J = jacbatch.jacobian(f, X, sparse=True, method="closed_form")
        _check(J, reference(f, (X,), (0,), 0, 4))
    SCALE.mul_(3.0)  # in place
    J = jacbatch.jacobian(f, X, sparse=True, method="closed_form")
    _check(J, reference(f, (X,), (0,), 0, 4))
    SCALE = torch.full((8, 8), -0.5, dtype=DT)  # rebound
    for _ in range(2):
        J = jacbatch.jacobian(f, X, sparse=True, method="closed_form")
        _check(J, reference(f, (X,), (0,), 0, 4))


SCALE = torch.linspace(0.5, 2.0, 64, dtype=DT).reshape(8, 8)


def _scaled(u: torch.Tensor) -> torch.Tensor:
    return brusselator(u) * SCALE + SCALE * u[0] ** 2


def test_repeated_calls_run_the_program_checked_against_the_closed_form() -> None:
    f = _scaled
    X = _rand(3, 2, 8, 8)
    R = reference(f, (X,), (0,), 0, 3)
    before = closed.STATS["calls"]
    for _ in range(_hot.HOT_CALLS):
        _check(jacbatch.jacobian(f, X, sparse=True, method="closed_form"), R)
    assert before + _hot.HOT_CALLS == closed.STATS["calls"]
    (entry,) = _hot._SEEN[f.__code__].values()
    assert entry.prep is not None and entry.program is not None
    for _ in range(2):  # hits: the kept program, not the closed form
        _check(jacbatch.jacobian(f, X, sparse=True, method="closed_form"), R)
    assert before + _hot.HOT_CALLS == closed.STATS["calls"]


@pytest.mark.parametrize("kind", ["scalar_out", "unbatched", "create_graph"])
def test_edges(kind: str) -> None:
    if kind == "scalar_out":
        f: Callable[..., torch.Tensor] = lambda x: (x.sin() * x).sum()  # noqa: E731
        X = _rand(3, 7)
        assert _uses_closed(f, (X,), sparse=True, method="closed_form")
        _check(
            jacbatch.jacobian(f, X, sparse=True, method="closed_form"),
            reference(f, (X,), (0,), 0, 3),
        )
    elif kind == "unbatched":
        f = ONE_ARG["sum_of_terms"][0]
        x = _rand(16)
        J = jacbatch.jacobian(f, x, in_dims=None, sparse=True, method="closed_form")
        _check(J, reference(f, (x,), (None,), 0, 1)[0])
    else:
        f = ONE_ARG["elementwise"][0]
        X = _rand(2, 3, 5).requires_grad_()
        before = closed.STATS["calls"]
        J = jacbatch.jacobian(f, X, sparse=True, create_graph=True)
        assert before == closed.STATS["calls"]  # a differentiable result: the passes
        _check(J.detach(), reference(f, (X.detach(),), (0,), 0, 2))
        J.values().sum().backward()
        assert X.grad is not None and bool(torch.isfinite(X.grad).all())


class _Base:
    def act(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * x.roll(1)


def test_method_replaced_on_a_class_is_never_stale() -> None:
    """Dynamo does not guard a method replaced on a class; the value check (NOTE [The value
    check] in jacbatch.methods.traced) sees the stale graph and the passes answer."""
    base = type("Base", (_Base,), {})
    c = type("Child", (base,), {})()

    def f(x: torch.Tensor) -> torch.Tensor:
        return c.act(x)

    X = _rand(3, 9)
    _hot.ENABLED = False
    try:
        _check(
            jacbatch.jacobian(f, X, sparse=True, method="closed_form"),
            reference(f, (X,), (0,), 0, 3),
        )
        base.act = lambda self, x: torch.sin(x) * x.roll(1) ** 2  # type: ignore[attr-defined]
        _check(
            jacbatch.jacobian(f, X, sparse=True, method="closed_form"),
            reference(f, (X,), (0,), 0, 3),
        )
        _check(
            jacbatch.jacobian(f, X, sparse=True, method="closed_form"),
            reference(f, (X,), (0,), 0, 3),
        )
    finally:
        _hot.ENABLED = True


def test_auto_takes_the_closed_form_where_the_passes_do_not_fit() -> None:
    """NOTE [The closed form is chosen for memory] in jacbatch.sparse.engine: with a budget that
    the passes of the whole batch exceed but the closed form fits, auto writes the nonzeros
    from the traced rules; with room for the passes, it runs them."""
    X = _rand(8, 2, 16, 16)
    R = reference(brusselator, (X,), (0,), 0, 8)
    before = closed.STATS["calls"]
    _check(jacbatch.jacobian(brusselator, X, sparse=True, max_memory="16MB"), R)
    assert closed.STATS["calls"] == before  # the passes fit in one pass
    _check(jacbatch.jacobian(brusselator, X, sparse=True, max_memory="3MB"), R)
    assert closed.STATS["calls"] > before
