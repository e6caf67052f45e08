"""Sound trace caching (Dynamo's guards), complex intermediates, stop-gradients in traced code.

Every Jacobian is compared with the per-sample float64 reference (``tests/_reference.py``),
computed AFTER any mutation.
"""

from __future__ import annotations

import functools
import logging
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import jacbatch
from jacbatch import capture
from tests.conftest import reference_jacobian

F64 = torch.float64
B, N = 3, 4


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


X = rnd(B, N, seed=1)
W1, W2 = rnd(N, N, seed=2), rnd(N, N, seed=3)


def reference(func: Callable[..., torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """``(B, *out, *in)`` in float64: the reference Jacobian (tests/_reference.py) of ``func``
    over the batch ``X``."""
    return reference_jacobian(func, (X,))


def assert_matches(J: torch.Tensor, R: torch.Tensor) -> None:
    torch.testing.assert_close(
        J, R.to(J.dtype), rtol=1e-12, atol=1e-12 * max(1.0, float(R.abs().max()))
    )


def linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(N, N).double()


# ---------------------------------------------------------------------------------------------
# The catalogue: a function, a mutation that changes its Jacobian, whether it traces
# ---------------------------------------------------------------------------------------------

# Module globals that patterns read and rebind (each pattern resets the ones it uses).
_SCALE = 2.0
_FLAG = True
_W = W1
_POW = 2
_MOD: torch.nn.Module = torch.nn.Tanh()


def _helper(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


@dataclass
class Pattern:
    """``make()`` returns (get the current function, mutate); ``traces``: whether the function
    has a traced closed form (else ``method="closed_form"`` must refuse clearly)."""

    name: str
    make: Callable[[], tuple[Callable[[], Callable[..., torch.Tensor]], Callable[[], None]]]
    traces: bool = True


def _same(
    f: Callable[..., torch.Tensor], mutate: Callable[[], None]
) -> tuple[Callable[[], Callable[..., torch.Tensor]], Callable[[], None]]:
    return (lambda: f), mutate


def p_global_float():  # type: ignore[no-untyped-def]
    global _SCALE
    _SCALE = 2.0

    def mutate() -> None:
        global _SCALE
        _SCALE = 5.0

    return _same(lambda x: torch.tanh(x * _SCALE), mutate)


def p_global_flag():  # type: ignore[no-untyped-def]
    global _FLAG
    _FLAG = True

    def mutate() -> None:
        global _FLAG
        _FLAG = False

    return _same(lambda x: torch.tanh(x) if _FLAG else torch.sin(x), mutate)


def p_helper_redefined():  # type: ignore[no-untyped-def]
    global _helper

    def _helper(x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-redef]
        return torch.tanh(x)

    def mutate() -> None:
        global _helper

        def _helper(x: torch.Tensor) -> torch.Tensor:  # notebook style: the cell is re-run
            return torch.sin(x) * 3

    return _same(lambda x: _helper(x) * 2, mutate)


def p_list_tensor():  # type: ignore[no-untyped-def]
    lst = [W1]
    return _same(lambda x: torch.tanh(x @ lst[0]), lambda: lst.__setitem__(0, W2))


def p_dict_tensor():  # type: ignore[no-untyped-def]
    d = {"w": W1}
    return _same(lambda x: torch.tanh(x @ d["w"]), lambda: d.__setitem__("w", W2))


def p_namespace_tensor():  # type: ignore[no-untyped-def]
    ns = types.SimpleNamespace(w=W1)
    return _same(lambda x: torch.tanh(x @ ns.w), lambda: setattr(ns, "w", W2))


class _Holder:
    def __init__(self, w: torch.Tensor, s: float = 2.0) -> None:
        self.w = w
        self.s = s

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w) * self.s


def p_object_attribute():  # type: ignore[no-untyped-def]
    h = _Holder(W1)
    return _same(lambda x: torch.tanh(x @ h.w), lambda: setattr(h, "w", W2))


def _scaled(x: torch.Tensor, w: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return torch.tanh(x @ w) * scale


def p_partial_keywords():  # type: ignore[no-untyped-def]
    f = functools.partial(_scaled, w=W1, scale=2.0)
    return _same(f, lambda: f.keywords.__setitem__("scale", 5.0))


def p_partial_recreated():  # type: ignore[no-untyped-def]
    box = [functools.partial(_scaled, w=W1, scale=2.0)]

    def mutate() -> None:
        box[0] = functools.partial(_scaled, w=W2, scale=5.0)

    return (lambda: box[0]), mutate


def p_sequential_swap():  # type: ignore[no-untyped-def]
    m = torch.nn.Sequential(linear(0), torch.nn.Tanh())
    return _same(m, lambda: m.__setitem__(1, torch.nn.Sigmoid()))


def p_leaky_slope():  # type: ignore[no-untyped-def]
    m = torch.nn.Sequential(linear(1), torch.nn.LeakyReLU(0.1))
    return _same(m, lambda: setattr(m[1], "negative_slope", 0.5))


def p_float_of_tensor():  # type: ignore[no-untyped-def]
    t = torch.tensor(2.0, dtype=F64)
    return _same(lambda x: torch.tanh(x * float(t)), lambda: t.fill_(5.0))


def p_closure_cell():  # type: ignore[no-untyped-def]
    s = 2.0

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * s)

    def mutate() -> None:
        nonlocal s
        s = 5.0

    return _same(f, mutate)


def p_closure_tensor_rebound():  # type: ignore[no-untyped-def]
    w = W1

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w)

    def mutate() -> None:
        nonlocal w
        w = W2

    return _same(f, mutate)


def p_defaults():  # type: ignore[no-untyped-def]
    def f(x: torch.Tensor, s: float = 2.0) -> torch.Tensor:
        return torch.tanh(x * s)

    def mutate() -> None:
        f.__defaults__ = (5.0,)

    return _same(f, mutate)


def p_param_inplace():  # type: ignore[no-untyped-def]
    m = torch.nn.Sequential(linear(2), torch.nn.Tanh())

    def mutate() -> None:
        with torch.no_grad():
            m[0].weight.mul_(3)

    return _same(m, mutate)


def p_param_replaced():  # type: ignore[no-untyped-def]
    m = torch.nn.Sequential(linear(3), torch.nn.Tanh())
    return _same(m, lambda: setattr(m[0], "weight", torch.nn.Parameter(W2.clone())))


def p_forward_hook():  # type: ignore[no-untyped-def]
    m = torch.nn.Sequential(linear(4), torch.nn.Tanh())
    return _same(m, lambda: m[0].register_forward_hook(lambda mod, i, o: o * 3))


class _ModeDependent(torch.nn.Module):
    """Deterministic in both modes, different in each."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2 if self.training else torch.sin(x)


def p_train_eval():  # type: ignore[no-untyped-def]
    m = _ModeDependent()
    return _same(m, lambda: m.eval())


class _Const:
    k = 2.0


def p_class_attribute():  # type: ignore[no-untyped-def]
    _Const.k = 2.0

    def mutate() -> None:
        _Const.k = 5.0

    return _same(lambda x: torch.tanh(x * _Const.k), mutate)


def p_global_module():  # type: ignore[no-untyped-def]
    global _MOD
    _MOD = torch.nn.Tanh()

    def mutate() -> None:
        global _MOD
        _MOD = torch.nn.Sigmoid()

    return _same(lambda x: _MOD(x * 2), mutate)


def p_nonlocal_counter():  # type: ignore[no-untyped-def]
    count = 0

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * (count + 1)

    def mutate() -> None:
        nonlocal count
        count += 1

    return _same(f, mutate)


def p_lambda_recreated():  # type: ignore[no-untyped-def]
    def make(s: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.tanh(x * s)

    box = [make(2.0)]

    def mutate() -> None:
        box[0] = make(5.0)

    return (lambda: box[0]), mutate


def p_global_tensor_rebound():  # type: ignore[no-untyped-def]
    global _W
    _W = W1

    def mutate() -> None:
        global _W
        _W = W2

    return _same(lambda x: torch.tanh(x @ _W), mutate)


def p_global_tensor_inplace():  # type: ignore[no-untyped-def]
    global _W
    _W = W1.clone()
    return _same(lambda x: torch.tanh(x @ _W), lambda: _W.mul_(3))


def p_dict_float():  # type: ignore[no-untyped-def]
    cfg = {"s": 2.0}
    return _same(lambda x: torch.tanh(x * cfg["s"]), lambda: cfg.__setitem__("s", 5.0))


def p_global_int_power():  # type: ignore[no-untyped-def]
    global _POW
    _POW = 2

    def mutate() -> None:
        global _POW
        _POW = 3

    return _same(lambda x: x**_POW, mutate)


def p_buffer_replaced():  # type: ignore[no-untyped-def]
    m = linear(5)
    m.register_buffer("s", torch.full((N,), 2.0, dtype=F64))
    return _same(lambda x: m(x) * m.s, lambda: setattr(m, "s", torch.full((N,), 5.0, dtype=F64)))


def p_module_float_attribute():  # type: ignore[no-untyped-def]
    m = torch.nn.Softplus(beta=1.0)
    return _same(m, lambda: setattr(m, "beta", 3.0))


def p_clamp_bounds():  # type: ignore[no-untyped-def]
    bounds = types.SimpleNamespace(lo=-0.1, hi=0.1)
    return _same(
        lambda x: torch.clamp(x * 2, bounds.lo, bounds.hi), lambda: setattr(bounds, "hi", 5.0)
    )


def p_code_replaced():  # type: ignore[no-untyped-def]
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2

    def g(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * 3

    def mutate() -> None:
        f.__code__ = g.__code__

    return _same(f, mutate)


def p_method_attribute():  # type: ignore[no-untyped-def]
    h = _Holder(W1, s=2.0)
    return _same(h.apply, lambda: setattr(h, "s", 5.0))


PATTERNS = [
    Pattern("global-float", p_global_float),
    Pattern("global-flag", p_global_flag),
    Pattern("helper-redefined", p_helper_redefined),
    Pattern("list-tensor-swapped", p_list_tensor),
    Pattern("dict-tensor-swapped", p_dict_tensor),
    Pattern("namespace-tensor-swapped", p_namespace_tensor),
    Pattern("object-attribute-swapped", p_object_attribute),
    Pattern("partial-keywords-changed", p_partial_keywords),
    Pattern("partial-recreated", p_partial_recreated),
    Pattern("sequential-item-replaced", p_sequential_swap),
    Pattern("leaky-relu-slope", p_leaky_slope),
    Pattern("float-of-tensor-updated-in-place", p_float_of_tensor, traces=False),
    Pattern("closure-cell-rebound", p_closure_cell),
    Pattern("closure-tensor-rebound", p_closure_tensor_rebound),
    Pattern("defaults-changed", p_defaults),
    Pattern("parameter-updated-in-place", p_param_inplace),
    Pattern("parameter-replaced", p_param_replaced),
    Pattern("forward-hook-added", p_forward_hook),
    Pattern("train-eval-switch", p_train_eval),
    Pattern("class-attribute", p_class_attribute),
    Pattern("global-module-swapped", p_global_module),
    Pattern("nonlocal-counter", p_nonlocal_counter),
    Pattern("lambda-recreated-new-closure", p_lambda_recreated),
    Pattern("global-tensor-rebound", p_global_tensor_rebound),
    Pattern("global-tensor-in-place", p_global_tensor_inplace),
    Pattern("dict-float", p_dict_float),
    Pattern("global-int-exponent", p_global_int_power),
    Pattern("buffer-replaced", p_buffer_replaced),
    Pattern("module-float-attribute", p_module_float_attribute),
    Pattern("clamp-bounds-attribute", p_clamp_bounds),
    Pattern("code-replaced", p_code_replaced),
    Pattern("bound-method-attribute", p_method_attribute),
]


@pytest.mark.parametrize("method", ["auto", "closed_form"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_mutation_is_never_stale(pattern: Pattern, method: str) -> None:
    get, mutate = pattern.make()
    f = get()
    if method == "closed_form" and not pattern.traces:
        with pytest.raises(NotImplementedError, match="closed-form"):
            jacbatch.jacobian(f, X, method=method)
    else:
        assert_matches(jacbatch.jacobian(f, X, method=method), reference(f, X))
    before = reference(f, X)
    mutate()
    f = get()
    after = reference(f, X)  # the reference is computed after the mutation
    assert not torch.allclose(before, after), "the mutation must change the Jacobian"
    if method == "closed_form" and not pattern.traces:
        with pytest.raises(NotImplementedError, match="closed-form"):
            jacbatch.jacobian(f, X, method=method)
        assert_matches(jacbatch.jacobian(f, X), after)
    else:
        assert_matches(jacbatch.jacobian(f, X, method=method), after)


def test_catalogue_traces_where_it_says() -> None:
    """The closed_form runs above do use the traced route (auto picks it too)."""
    for pattern in PATTERNS:
        f = pattern.make()[0]()
        method = jacbatch.explain(f, X).steps[0].route
        assert (method == "traced") == pattern.traces, (pattern.name, method)


def test_bound_methods_recreated_in_a_loop() -> None:
    """Ids of short-lived objects are reused; each object's own value must be used."""
    for k in range(10):
        h = _Holder(W1 * (k + 1), s=float(k + 1))
        f = h.apply
        assert_matches(jacbatch.jacobian(f, X), reference(f, X))
        assert_matches(jacbatch.jacobian(f, X, method="closed_form"), reference(f, X))
        del h, f


# ---------------------------------------------------------------------------------------------
# Capturing once
# ---------------------------------------------------------------------------------------------


def test_inline_lambda_is_captured_once_and_again_when_a_global_changes() -> None:
    global _SCALE
    _SCALE = 2.0
    n0 = capture.capture_count()
    for _ in range(5):
        J = jacbatch.jacobian(lambda x: torch.tanh(x * _SCALE), X)
    assert capture.capture_count() == n0 + 1
    assert_matches(J, reference(lambda x: torch.tanh(x * 2.0), X))
    _SCALE = 7.0
    for _ in range(5):
        J = jacbatch.jacobian(lambda x: torch.tanh(x * _SCALE), X)
    assert capture.capture_count() == n0 + 2
    assert_matches(J, reference(lambda x: torch.tanh(x * 7.0), X))
    _SCALE = 2.0


def test_one_capture_call_per_jacobian(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning and computing share one run of the compiled function (one guard check)."""
    calls = []
    real = capture._capture

    def counting(*a: object, **k: object) -> capture.Captured:
        calls.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(capture, "_capture", counting)
    f = lambda x: torch.tanh(x @ W1)  # noqa: E731
    for _ in range(3):
        jacbatch.jacobian(f, X)
    assert len(calls) == 3


def test_lifted_tensors_are_read_at_every_call() -> None:
    """A global tensor is a graph input: swapping it needs no new capture and is never stale."""
    global _W
    _W = W1
    f = lambda x: torch.tanh(x @ _W)  # noqa: E731
    jacbatch.jacobian(f, X)
    n0 = capture.capture_count()
    for w in (W2, W1 * 3, W2 - 1):
        _W = w
        assert_matches(jacbatch.jacobian(f, X, method="closed_form"), reference(f, X))
    assert capture.capture_count() == n0


def test_in_dims_change_reuses_the_capture_with_new_batching() -> None:
    f = lambda x, w: torch.tanh(x @ w)  # noqa: E731
    Ws = torch.stack([W1, W2, W1 + W2])
    J1 = jacbatch.jacobian(f, X, W1, argnums=(0, 1), in_dims=(0, None))
    J2 = jacbatch.jacobian(f, X, Ws, argnums=(0, 1), in_dims=(0, 0))
    for J, w, w_dim in ((J1, W1, None), (J2, Ws, 0)):
        R = reference_jacobian(f, (X, w), (0, 1), (0, w_dim))
        assert_matches(J[0], R[0])
        assert_matches(J[1], R[1])


# ---------------------------------------------------------------------------------------------
# Fallbacks: correct by autodiff, and silent
# ---------------------------------------------------------------------------------------------


def _branchy(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # a graph break: Dynamo cannot capture this
        return torch.tanh(x)
    return torch.sin(x)


def _builtin_it_cannot_trace(x: torch.Tensor) -> torch.Tensor:
    import sys

    sys._getframe()  # Dynamo warns about this builtin and gives up
    return torch.tanh(x) * 2


def _silent(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    "func", [_branchy, _builtin_it_cannot_trace], ids=["graph-break", "builtin"]
)
def test_uncapturable_falls_back_silently(
    func: Callable[..., torch.Tensor],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.WARNING)
    Xs = torch.cat([X[:1].abs(), -X[1:2].abs(), X[2:]])
    for _ in range(2):
        assert_matches(jacbatch.jacobian(func, Xs), reference(func, Xs))
    assert "Dynamo could not capture" in str(jacbatch.explain(func, Xs))
    with pytest.raises(NotImplementedError, match="closed-form"):
        jacbatch.jacobian(func, Xs, method="closed_form")
    _silent(caplog, capfd)


def test_many_shapes_keep_the_closed_form(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """More shapes than Dynamo keeps graphs for: the cache is emptied, the closed form stays."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(capture, "RECOMPILE_LIMIT", 8)  # Dynamo's default
    f = lambda x: torch.tanh(x * 3)  # noqa: E731
    for n in [*range(1, 12), 1, 2, 11]:  # one graph per shape (dynamic=False): over the limit
        Xn = rnd(2, n, seed=n)
        assert jacbatch.explain(f, Xn).steps[0].route == "traced"
        assert_matches(jacbatch.jacobian(f, Xn, method="closed_form"), reference(f, Xn))
    _silent(caplog, capfd)


def test_recapture_on_every_call_falls_back_silently(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A function Dynamo must capture again on every call with the same shapes (a float it
    closes over changes): after the limit, autodiff answers (every answer right)."""
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(capture, "RECOMPILE_LIMIT", 8)  # Dynamo's default
    Xn = rnd(2, 3, seed=1)
    methods = []
    for k in range(12):
        scale = 1.0 + k / 7
        f = lambda x, s=scale: torch.tanh(x * s)  # noqa: E731  one code object, new constant
        methods.append(jacbatch.explain(f, Xn).steps[0].route)
        assert_matches(jacbatch.jacobian(f, Xn), reference(f, Xn))
    assert methods[:8] == ["traced"] * 8
    assert "traced" not in methods[8:]
    _silent(caplog, capfd)


def test_no_graph_is_traced_fresh() -> None:
    """Functions whose result Dynamo builds outside its graph (views of an argument)."""
    f = lambda x: x.T  # noqa: E731
    Xm = rnd(B, 2, 3, seed=9)
    assert_matches(jacbatch.jacobian(f, Xm, method="closed_form"), reference(f, Xm))
    g = lambda x, y: x  # noqa: E731
    J = jacbatch.jacobian(g, X, W1, in_dims=(0, None), method="closed_form")
    assert_matches(J, reference(lambda x: x, X))


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_callers_grad_mode_does_not_matter(context: str) -> None:
    f = lambda x: torch.tanh(x @ W1)  # noqa: E731
    jacbatch.jacobian(f, X)
    n0 = capture.capture_count()
    ctx = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with ctx:
        Xc = X.clone()
        J = jacbatch.jacobian(f, Xc, method="closed_form")
    assert capture.capture_count() == n0  # the same capture: grad mode is fixed for our calls
    assert_matches(J, reference(f, X))


# ---------------------------------------------------------------------------------------------
# Complex intermediates: never zeros
# ---------------------------------------------------------------------------------------------

COMPLEX = [
    ("fft-abs", lambda x: torch.fft.fft(x).abs()),
    ("rfft-real", lambda x: torch.fft.rfft(x).real),
    ("rfft-imag", lambda x: torch.fft.rfft(x).imag),
    ("complex-mul-real", lambda x: (x.to(torch.complex128) * (1 + 2j)).real),
    ("irfft", lambda x: torch.fft.irfft(torch.fft.rfft(x) * 2j, n=N)),
    ("hfft", lambda x: torch.fft.hfft(x.to(torch.complex128) * (1 - 1j), n=N)),
    ("view-as-real", lambda x: torch.view_as_real(torch.fft.fft(x)).sum(-1)),
]


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp", "closed_form"])
@pytest.mark.parametrize(("name", "func"), COMPLEX, ids=[c[0] for c in COMPLEX])
def test_complex_intermediates(name: str, func: Callable[..., torch.Tensor], method: str) -> None:
    R = reference(func, X)
    assert R.abs().max() > 0.1
    if method == "closed_form":
        with pytest.raises(NotImplementedError, match="complex"):
            jacbatch.jacobian(func, X, method=method)
        return
    assert_matches(jacbatch.jacobian(func, X, method=method), R)


def test_integer_results_are_constant_as_in_autograd() -> None:
    """Integer values have no derivative in autograd either: zeros are the right answer."""
    f = lambda x: x * (x * 10).long().to(F64)  # noqa: E731
    assert_matches(jacbatch.jacobian(f, X, method="closed_form"), reference(f, X))


# ---------------------------------------------------------------------------------------------
# Stop-gradients inside func
# ---------------------------------------------------------------------------------------------


def _no_grad(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = torch.tanh(x * 2)
    return y * x + x


def _set_grad(x: torch.Tensor) -> torch.Tensor:
    torch.set_grad_enabled(False)
    y = x.exp()
    torch.set_grad_enabled(True)
    return torch.tanh(y * x)


def _inference(x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        y = x * 3
    return y.clone() * x


def _detach(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x.detach() ** 2 + x) * x.detach()


def _nested(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        y = x.sin()
        with torch.enable_grad():
            z = y * x  # grad on again, but y is already a constant
    return z + y * x


STOPS = [("no-grad", _no_grad), ("set-grad-enabled", _set_grad), ("inference-mode", _inference)]
STOPS += [("detach", _detach), ("nested-enable-grad", _nested)]


@pytest.mark.parametrize("method", ["auto", "closed_form"])
@pytest.mark.parametrize(("name", "func"), STOPS, ids=[s[0] for s in STOPS])
def test_stop_gradients_inside_func(
    name: str, func: Callable[..., torch.Tensor], method: str
) -> None:
    """Values computed with grad off are constants, as in autograd; the traced route keeps them."""
    assert [st.route for st in jacbatch.explain(func, X, method=method).steps] == ["traced"]
    assert_matches(jacbatch.jacobian(func, X, method=method), reference(func, X))


def test_in_place_write_under_no_grad_is_not_traced() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        with torch.no_grad():
            y.mul_(3)  # autograd: y's graph is x * 2, its value 6x
        return y * x

    assert_matches(jacbatch.jacobian(f, X), reference(f, X))


# ---------------------------------------------------------------------------------------------
# Threads, memory estimates
# ---------------------------------------------------------------------------------------------


def test_threads_capture_safely() -> None:
    """One code object, four closures, four threads: each thread gets its own function's graph."""

    def make(k: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.tanh(x * k) @ W1

    funcs = [make(float(k)) for k in range(1, 5)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = jacbatch.jacobian(funcs[i], X, method="closed_form")
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, f in enumerate(funcs):
        assert_matches(results[i], reference(f, X))


def test_memory_estimate_reuses_the_call_capture() -> None:
    f = lambda x: torch.tanh(x @ W1)  # noqa: E731
    n0 = capture.capture_count()
    est = jacbatch.estimate_memory(f, X, method="closed_form")
    assert est.exact and est.output_bytes == B * N * N * 8
    assert capture.capture_count() <= n0 + 1  # the meta run captures nothing of its own


class _Scale:
    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * self.k


def test_builtins_modules_and_callable_objects_are_captured_once() -> None:
    n0 = capture.capture_count()
    for _ in range(3):
        assert_matches(jacbatch.jacobian(torch.tanh, X), reference(torch.tanh, X))
    assert capture.capture_count() == n0 + 1
    m = torch.nn.Sequential(linear(6), torch.nn.Tanh())
    for _ in range(3):
        assert_matches(jacbatch.jacobian(m, X), reference(m, X))
    assert capture.capture_count() == n0 + 2
    for _ in range(3):  # new objects, same values: the code of __call__ is guarded, reused
        c = _Scale(2.0)
        assert_matches(jacbatch.jacobian(c, X), reference(c, X))
    assert capture.capture_count() == n0 + 3
    c = _Scale(5.0)
    assert_matches(jacbatch.jacobian(c, X), reference(c, X))


def test_captured_modules_can_be_freed() -> None:
    import gc
    import weakref

    m = torch.nn.Sequential(linear(7), torch.nn.Tanh())
    jacbatch.jacobian(m, X)
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


# Methods replaced on a class and reached through an instance are not guarded by Dynamo itself
# (torch.compile keeps running the old code); the value check (NOTE [The value check] in
# jacbatch.methods.traced) notices and captures again.


class _Act(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class _Scaler:
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


class _Base:
    def act(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


def _class_method_cases() -> list[
    tuple[str, Callable[[], tuple[Callable[..., torch.Tensor], Callable[[], None]]]]
]:
    def module() -> tuple[Callable[..., torch.Tensor], Callable[[], None]]:
        act = type("Act", (_Act,), {})
        model = torch.nn.Sequential(linear(3), act()).double().requires_grad_(False)

        def patch() -> None:
            act.forward = lambda self, x: torch.sin(x)  # type: ignore[method-assign]

        return model, patch

    def plain_class() -> tuple[Callable[..., torch.Tensor], Callable[[], None]]:
        cls = type("Scaler", (_Scaler,), {})
        s = cls()

        def patch() -> None:
            cls.apply = lambda self, x: torch.sin(x)  # type: ignore[method-assign]

        return (lambda x: s.apply(x) * 2), patch

    def base_class() -> tuple[Callable[..., torch.Tensor], Callable[[], None]]:
        base = type("Base", (_Base,), {})
        c = type("Child", (base,), {})()

        def patch() -> None:
            base.act = lambda self, x: torch.sin(x)  # type: ignore[method-assign]

        return (lambda x: c.act(x)), patch

    return [
        ("module-class-forward", module),
        ("class-method", plain_class),
        ("base-class-method", base_class),
    ]


@pytest.mark.parametrize("method", ["auto", "closed_form"])
@pytest.mark.parametrize(
    ("name", "make"), _class_method_cases(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_method_replaced_on_a_class_is_never_stale(
    name: str, make: Callable[..., Any], method: str
) -> None:
    f, patch = make()
    assert_matches(jacbatch.jacobian(f, X, method=method), reference(f, X))
    patch()
    assert_matches(jacbatch.jacobian(f, X, method=method), reference(f, X))
    # and the next call is traced again, with the new code
    assert "elementwise_sin" in str(jacbatch.explain(f, X))
