"""Repeated plain calls (NOTE [Repeated plain calls] in :mod:`jacbatch.repeated`): after
``HOT_CALLS`` full calls a key runs its program, and every change the full path would see
between calls is still seen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jacbatch
from jacbatch import repeated
from jacbatch import request as request_module
from tests.conftest import assert_matches, reference_jacobian

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh() -> None:
    repeated.forget_all()


class _Counter:
    """Counts full calls (requests built by jacobian)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = request_module.build_request

        def counting(*a, **k):
            self.n += 1
            return real(*a, **k)

        monkeypatch.setattr(jacbatch.api, "build_request", counting)


def _hot(f, *args, **kw):
    for _ in range(repeated.HOT_CALLS):
        jacbatch.jacobian(f, *args, **kw)


@pytest.mark.parametrize("method", ["auto", "closed_form", "jacrev", "jacfwd", "vjp"])
def test_hot_key_runs_its_program(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    W = torch.randn(5, 3, dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x) * x.sum()

    X = torch.randn(6, 3, dtype=F64)
    _hot(f, X, method=method)
    seen = next(iter(repeated._SEEN[repeated._owner(f)].values()))
    assert seen.entry is not None, seen.refused
    counter = _Counter(monkeypatch)
    X2 = torch.randn(6, 3, dtype=F64)
    got = jacbatch.jacobian(f, X2, method=method)
    assert counter.n == 0  # no request built: the program ran
    assert_matches(got, reference_jacobian(f, (X2,)), F64)


G = torch.randn(4, 3, dtype=F64)


def _uses_global(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(G @ x)


def test_rebinding_a_global_is_seen() -> None:
    global G
    X = torch.randn(5, 3, dtype=F64)
    _hot(_uses_global, X)
    G = torch.randn(4, 3, dtype=F64)  # same shape, new tensor
    assert_matches(jacbatch.jacobian(_uses_global, X), reference_jacobian(_uses_global, (X,)), F64)
    with torch.no_grad():
        G.mul_(3.0)  # in place
    assert_matches(jacbatch.jacobian(_uses_global, X), reference_jacobian(_uses_global, (X,)), F64)


def test_closure_attribute_module_surgery_and_train_eval() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.0), nn.Linear(6, 2)).double()
    X = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        _hot(net, X)
        net[1] = nn.Sigmoid()  # module surgery
        assert_matches(jacbatch.jacobian(net, X), reference_jacobian(net, (X,)), F64)
        net[0].weight = nn.Parameter(torch.randn(6, 3, dtype=F64))  # attribute rebinding
        assert_matches(jacbatch.jacobian(net, X), reference_jacobian(net, (X,)), F64)
        net.eval()
        assert_matches(jacbatch.jacobian(net, X), reference_jacobian(net, (X,)), F64)

    scale = [2.0]

    def f(x: torch.Tensor) -> torch.Tensor:
        return x**2 * scale[0]

    _hot(f, X)
    scale[0] = -5.0  # a container the function reads
    assert_matches(jacbatch.jacobian(f, X), reference_jacobian(f, (X,)), F64)


def test_method_replaced_on_the_class_is_caught_by_the_value_check() -> None:
    class Act(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x)

    act = Act()
    net = nn.Sequential(nn.Linear(3, 3).double(), act)
    X = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        _hot(net, X)
        Act.forward = lambda self, x: torch.sin(x) * 2  # type: ignore[method-assign]
        assert_matches(jacbatch.jacobian(net, X), reference_jacobian(net, (X,)), F64)


def test_code_replaced() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x.exp()

    def g(x: torch.Tensor) -> torch.Tensor:
        return x.cos()

    X = torch.randn(4, 3, dtype=F64)
    _hot(f, X)
    f.__code__ = g.__code__
    assert_matches(jacbatch.jacobian(f, X), reference_jacobian(g, (X,)), F64)


def test_contexts_on_a_hot_key() -> None:
    W = torch.randn(3, 3, dtype=F64, requires_grad=True)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x)

    X = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        _hot(f, X)
        assert not jacbatch.jacobian(f, X).requires_grad
    with torch.inference_mode():
        got = jacbatch.jacobian(f, X)
    assert_matches(got, reference_jacobian(f, (X,)), F64)
    # grad on and W requires grad: a differentiable result, as the full path gives
    J = jacbatch.jacobian(f, X)
    assert J.requires_grad
    (gW,) = torch.autograd.grad(J.sum(), W)
    assert gW.abs().sum() > 0
    # inside torch.func.grad: the transform sees through
    g = torch.func.grad(lambda x: jacbatch.jacobian(f, x).sum())(X)
    Xg = X.clone().requires_grad_()
    ref = torch.autograd.grad(reference_jacobian(f, (Xg,), create_graph=True).sum(), Xg)[0]
    torch.testing.assert_close(g, ref)


def test_non_finite_values_on_a_hot_key() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, torch.sqrt(x), torch.zeros_like(x)) * x.sum()

    X = torch.rand(5, 3, dtype=F64) + 0.1
    for method in ("auto", "jacfwd"):
        _hot(f, X, method=method)
        Xn = X.clone()
        Xn[2, 0] = -1.0  # sqrt of a negative: NaN intermediate masked by where
        Xn[3, 1] = float("nan")
        got = jacbatch.jacobian(f, Xn, method=method)
        torch.testing.assert_close(got, reference_jacobian(f, (Xn,)), equal_nan=True)


def test_custom_autograd_function_is_never_differentiated_through_its_graph() -> None:
    class Clip(torch.autograd.Function):
        @staticmethod
        def forward(x):  # type: ignore[override]
            return x.clamp(-1, 1)

        @staticmethod
        def setup_context(ctx, inputs, output):  # type: ignore[override]
            pass

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return g  # straight-through

        @staticmethod
        def vmap(info, in_dims, x):  # type: ignore[override]
            return Clip.apply(x), in_dims[0]

    def f(x: torch.Tensor) -> torch.Tensor:
        return Clip.apply(x * 3)

    X = torch.randn(4, 3, dtype=F64)
    ref = reference_jacobian(f, (X,))
    assert ref.abs().sum() > 0 and (ref == 3.0).sum() == 12  # the straight-through gradient
    for method in ("auto", "jacrev"):
        for _ in range(repeated.HOT_CALLS + 2):
            J = jacbatch.jacobian(f, X, method=method)
        assert_matches(J, ref, F64)


def test_old_style_custom_function_through_auto() -> None:
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[override]
            return x * 2

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return g * 5  # not the forward's derivative, on purpose

    def f(x: torch.Tensor) -> torch.Tensor:
        return Scale.apply(x).sin()

    X = torch.randn(3, 2, dtype=F64)
    ref = reference_jacobian(f, (X,))
    for _ in range(repeated.HOT_CALLS + 1):
        assert_matches(jacbatch.jacobian(f, X), ref, F64)
    assert "custom torch.autograd.Function" in str(jacbatch.explain(f, X))


def test_batched_is_part_of_the_key() -> None:
    """A hot per-sample key must not answer a ``batched=True`` call of the same function: the
    two read ``func`` differently (per sample ``3 x``, on the batch of 4 ``12 X``)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * x.numel()

    X = torch.randn(4, 3, dtype=F64)
    _hot(f, X)
    want = torch.diag_embed(torch.cos(X)) * 12
    for _ in range(repeated.HOT_CALLS + 1):
        assert_matches(jacbatch.jacobian(f, X, batched=True), want, F64)
    assert_matches(jacbatch.jacobian(f, X), want / 4, F64)


@pytest.mark.parametrize("winner", ["auto", "jacrev", "jacfwd"])
def test_auto_keeps_the_fastest_hot_program(winner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto times its plan's program against the plain routes' programs when a key gets hot
    and keeps the fastest (the clock is replaced here so that ``winner`` is fastest)."""
    W = torch.randn(5, 3, dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x) * x.sum()

    timed: list[str] = []

    def clock(entry, args, lifted, give_up=None) -> float:
        name = entry.request.method
        timed.append(name)
        return 1.0 if name == winner else 2.0

    monkeypatch.setattr(repeated, "_seconds", clock)
    X = torch.randn(6, 3, dtype=F64)
    _hot(f, X)
    seen = next(iter(repeated._SEEN[repeated._owner(f)].values()))
    assert seen.entry is not None, seen.refused
    assert sorted(timed) == ["auto", "jacfwd", "jacrev"]
    assert seen.entry.request.method == winner and set(seen.entry.timings) == set(timed)
    routes = {s.route for s in seen.entry.request.plan.steps}
    assert routes == ({"traced"} if winner == "auto" else {winner}), routes
    X2 = torch.randn(6, 3, dtype=F64)
    assert_matches(jacbatch.jacobian(f, X2), reference_jacobian(f, (X2,)), F64)


def test_measuring_can_be_switched_off_and_pinned_methods_are_not_measured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def clock(*a: object) -> float:
        raise AssertionError("timed")

    monkeypatch.setattr(repeated, "_seconds", clock)
    W = torch.randn(5, 3, dtype=F64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x)

    X = torch.randn(6, 3, dtype=F64)
    _hot(f, X, method="jacfwd")  # a pinned route is never timed
    monkeypatch.setattr(repeated, "MEASURE", False)
    _hot(f, X)
    entries = [s.entry for s in repeated._SEEN[repeated._owner(f)].values()]
    assert all(e is not None and not e.timings for e in entries)
    assert {e.request.method for e in entries if e is not None} == {"jacfwd", "auto"}


def test_inline_lambdas_get_hot_and_see_their_closures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lambda written in the loop is a new function per call with the same code: it runs the
    program once hot, with the tensors and numbers its closure holds on that call."""

    def make(W: torch.Tensor, k: float):
        return lambda x: torch.tanh(W @ x) * k

    X = torch.randn(6, 3, dtype=F64)
    Ws = [torch.randn(4, 3, dtype=F64) for _ in range(2)]
    for _ in range(repeated.HOT_CALLS):
        jacbatch.jacobian(make(Ws[0], 2.0), X)
    counter = _Counter(monkeypatch)
    for W in (Ws[1], Ws[0], Ws[1]):  # other tensors in the closure: the same program
        f = make(W, 2.0)
        assert_matches(jacbatch.jacobian(f, X), reference_jacobian(f, (X,)), F64)
    assert counter.n == 0
    f = make(Ws[0], 3.0)  # another number in the closure: Dynamo's guard sends it to the full path
    assert_matches(jacbatch.jacobian(f, X), reference_jacobian(f, (X,)), F64)
    assert counter.n == 1
    for i in range(3):
        X2 = torch.randn(6, 3, dtype=F64)
        W = Ws[i % 2]
        got = jacbatch.jacobian(lambda x: torch.sin(W @ x), X2)  # noqa: B023
        assert_matches(got, reference_jacobian(lambda x: torch.sin(W @ x), (X2,)), F64)  # noqa: B023


def _batched_global(X: torch.Tensor) -> torch.Tensor:  # (B, 3) -> (B, 4)
    return torch.tanh(X @ G.T)


def test_hot_batched_function_runs_its_plan_and_sees_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    global G
    X = torch.randn(6, 3, dtype=F64)
    per_sample = lambda x: torch.tanh(G @ x)  # noqa: E731
    for method in ("auto", "jacrev", "jacfwd"):
        _hot(_batched_global, X, batched=True, method=method)
    counter = _Counter(monkeypatch)
    for method in ("auto", "jacrev", "jacfwd"):
        X2 = torch.randn(6, 3, dtype=F64)
        got = jacbatch.jacobian(_batched_global, X2, batched=True, method=method)
        assert_matches(got, reference_jacobian(per_sample, (X2,)), F64)
    assert counter.n == 0  # no request built: the hot keys ran their plans
    old = G
    try:
        G = torch.randn(4, 3, dtype=F64)  # rebinding the global: the same plan, new values
        got = jacbatch.jacobian(_batched_global, X, batched=True)
        assert_matches(got, reference_jacobian(per_sample, (X,)), F64)
        G = torch.randn(5, 3, dtype=F64)  # another shape: a guard fails, the full path runs
        got = jacbatch.jacobian(_batched_global, X, batched=True)
        assert got.shape == (6, 5, 3) and counter.n == 1
        assert_matches(got, reference_jacobian(per_sample, (X,)), F64)
    finally:
        G = old


def test_hopeless_rivals_are_not_made(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reverse mode with many times more output than input elements is not even built."""
    timed: list[str] = []

    def clock(entry, args, lifted, give_up=None) -> float:
        timed.append(entry.request.method)
        return 1.0

    monkeypatch.setattr(repeated, "_seconds", clock)
    t = torch.linspace(0, 1, 40, dtype=F64)

    def residual(p: torch.Tensor) -> torch.Tensor:  # 2 inputs -> 40 outputs
        return p[0] * torch.exp(-p[1] * t)

    _hot(residual, torch.rand(5, 2, dtype=F64))
    assert "jacrev" not in timed and "auto" in timed, timed


def test_code_writing_in_place_gets_a_program_over_its_graph(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``vmap`` refuses to write a batched value into a fresh unbatched tensor; the captured
    graph holds the functional ``copy`` and ``fill`` instead, which the programs over it
    replace by what they compute (NOTE [Functional writes in a captured graph])."""

    def f(x: torch.Tensor) -> torch.Tensor:
        m = torch.zeros(5, dtype=x.dtype)
        m[:3] = torch.sin(x)
        m[3:].fill_(2.0)
        m[4:].copy_(x[:1] * 3)
        return m * x.sum()

    X = torch.randn(6, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(torch.func.jacrev(f))(X)
    _hot(f, X)
    seen = next(iter(repeated._SEEN[repeated._owner(f)].values()))
    assert seen.entry is not None and seen.entry.program is not None, seen.refused
    counter = _Counter(monkeypatch)
    for _ in range(2):
        X2 = torch.randn(6, 3, dtype=F64)
        assert_matches(jacbatch.jacobian(f, X2), reference_jacobian(f, (X2,)), F64)
    assert counter.n == 0
