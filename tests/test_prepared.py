"""Prepared Jacobians (:func:`jacbatch.prepare`): the same results as the reference on every
route and signature, the program path where it may run, the interpreted path where it must."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jacbatch
from jacbatch import prepared as P
from tests.conftest import DEVICES, assert_matches, reference_jacobian

ROUTES = ["auto", *jacbatch.api.ROUTES]


def _mlp_func(device: str, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(1)
    W1 = torch.randn(16, 3, generator=g, dtype=dtype).to(device)
    b1 = torch.randn(16, generator=g, dtype=dtype).to(device)
    W2 = torch.randn(4, 16, generator=g, dtype=dtype).to(device)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ W1.T + b1) @ W2.T

    return f, W1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ROUTES)
def test_every_route_matches_reference(device: str, method: str) -> None:
    f, _ = _mlp_func(device)
    X = torch.randn(6, 3, dtype=torch.float64, device=device)
    J = jacbatch.prepare(f, X, method=method)
    for Xn in (X, torch.randn(6, 3, dtype=torch.float64, device=device)):
        assert_matches(J(Xn), reference_jacobian(f, (Xn,)), torch.float64)


def test_programs_are_made_for_plain_routes() -> None:
    f, _ = _mlp_func("cpu")
    X = torch.randn(5, 3, dtype=torch.float64)
    for method in ("auto", "closed_form", "jacrev", "jacfwd", "vjp"):
        J = jacbatch.prepare(f, X, method=method)
        assert J.program.startswith("aten program"), (method, J.program)
    # the traced closed form's program holds no autodiff op: it is the composed closed form
    gm = jacbatch.prepare(f, X, method="closed_form")._first.program
    names = {str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function"}
    assert not any("backward" in n for n in names), names


@pytest.mark.parametrize("vec", [None, "row", "col"])
def test_vec_tuple_argnums_and_shared_args(vec: str | None) -> None:
    def g(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.sin(W @ x + b) * x.sum()

    X = torch.randn(4, 3, dtype=torch.float64)
    W = torch.randn(2, 3, dtype=torch.float64)
    b = torch.randn(2, dtype=torch.float64)
    dims = (0, None, None)
    J = jacbatch.prepare(g, X, W, b, argnums=(0, 1, 2), in_dims=dims, vec=vec)
    got = J(X, W, b)
    ref = reference_jacobian(g, (X, W, b), (0, 1, 2), dims, vec=vec)
    assert isinstance(got, tuple) and len(got) == 3
    for a, r in zip(got, ref, strict=True):
        assert_matches(a, r, torch.float64)


def test_unbatched_call() -> None:
    f, _ = _mlp_func("cpu")
    x = torch.randn(3, dtype=torch.float64)
    J = jacbatch.prepare(f, x, in_dims=None)
    assert_matches(J(x), reference_jacobian(f, (x,), in_dims=None), torch.float64)


def test_in_place_updates_are_seen_and_new_shapes_prepared() -> None:
    f, W1 = _mlp_func("cpu")
    X = torch.randn(5, 3, dtype=torch.float64)
    J = jacbatch.prepare(f, X)
    J(X)
    with torch.no_grad():
        W1.mul_(-0.5)  # an optimizer step: same tensor, new values
    assert_matches(J(X), reference_jacobian(f, (X,)), torch.float64)
    X7 = torch.randn(7, 3, dtype=torch.float64)  # a new batch size: a second signature
    assert_matches(J(X7), reference_jacobian(f, (X7,)), torch.float64)
    assert len(J._entries) == 2
    assert "2 signature(s)" in repr(J)


def test_module_parameters_and_differentiable_results() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    J = jacbatch.prepare(net, X)
    # grad on and the parameters require grad: the result stays differentiable (interpreted)
    got = J(X)
    assert got.requires_grad
    params = list(net.parameters())
    grads = torch.autograd.grad(got.square().sum(), params, allow_unused=True)
    want = torch.autograd.grad(jacbatch.jacobian(net, X).square().sum(), params, allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    for g, w in zip(grads, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)
    # under no_grad the program runs, and the parameters' in-place updates are seen
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
        got = J(X)
    assert not got.requires_grad
    assert_matches(got, reference_jacobian(net, (X,)), torch.float64)
    # a parameter that stops requiring grad lets the program run with grad on
    for p in net.parameters():
        p.requires_grad_(False)
    assert not J(X).requires_grad
    assert_matches(J(X), reference_jacobian(net, (X,)), torch.float64)


def test_argument_requiring_grad_gives_a_graph() -> None:
    f, _ = _mlp_func("cpu")
    X = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    J = jacbatch.prepare(f, X.detach())
    got = J(X)
    assert got.requires_grad
    (g,) = torch.autograd.grad(got.sum(), X)
    ref = reference_jacobian(f, (X.detach(),), create_graph=False)
    assert_matches(got, ref, torch.float64)
    want = torch.autograd.grad(jacbatch.jacobian(f, X).sum(), X)[0]
    torch.testing.assert_close(g, want)


def test_inside_torch_func_transform() -> None:
    f, _ = _mlp_func("cpu")
    X = torch.randn(3, 3, dtype=torch.float64)
    J = jacbatch.prepare(f, X)
    g = torch.func.grad(lambda x: J(x).sum())(X)
    want = torch.func.grad(lambda x: jacbatch.jacobian(f, x).sum())(X)
    torch.testing.assert_close(g, want)
    assert g.abs().sum() > 0


def test_non_finite_samples_follow_the_policy() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x**2).sum(0, keepdim=True) * x

    X = torch.randn(4, 3, dtype=torch.float64)
    J = jacbatch.prepare(f, X)
    Xn = X.clone()
    Xn[1, 0] = 0.0
    Xn[2, 1] = float("nan")
    got = J(Xn)
    ref = reference_jacobian(f, (Xn,))
    torch.testing.assert_close(got, ref, equal_nan=True)


def test_value_dependent_code_runs_interpreted() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.sum()) > 0 else x * 3

    X = torch.randn(6, 2, dtype=torch.float64)
    J = jacbatch.prepare(f, X)
    assert J.program.startswith("interpreted"), J.program
    X2 = torch.randn(6, 2, dtype=torch.float64)
    assert_matches(J(X2), reference_jacobian(f, (X2,)), torch.float64)


def test_random_and_state_writing_functions_run_interpreted() -> None:
    bn = nn.BatchNorm1d(3).double().train()

    def f(x: torch.Tensor) -> torch.Tensor:
        return bn(x.unsqueeze(0).expand(2, 3) * torch.tensor([[1.0], [2.0]], dtype=x.dtype))[0]

    X = torch.randn(4, 3, dtype=torch.float64)
    before = bn.running_mean.clone()
    J = jacbatch.prepare(f, X)
    assert J.program.startswith("interpreted"), J.program
    got = J(X)
    torch.testing.assert_close(bn.running_mean, before)  # restored (the reference is not)
    assert_matches(got, reference_jacobian(f, (X,)), torch.float64)

    R = jacbatch.prepare(lambda x: x * torch.rand_like(x), X, randomness="different")
    assert R.program.startswith("interpreted"), R.program
    assert R(X).shape == (4, 3, 3)


def test_budget_chunked_plans_run_interpreted() -> None:
    f, _ = _mlp_func("cpu")
    X = torch.randn(64, 3, dtype=torch.float64)
    J = jacbatch.prepare(f, X, max_memory="8KiB")
    assert J.program.startswith("interpreted"), J.program
    assert_matches(J(X), reference_jacobian(f, (X,)), torch.float64)


def test_out_buffer() -> None:
    f, _ = _mlp_func("cpu")
    X = torch.randn(5, 3, dtype=torch.float64)
    J = jacbatch.prepare(f, X)
    buf = torch.empty(5, 4, 3, dtype=torch.float64)
    assert J(X, out=buf) is buf
    assert_matches(buf, reference_jacobian(f, (X,)), torch.float64)


def test_a_program_that_disagrees_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    f, _ = _mlp_func("cpu")
    X = torch.randn(5, 3, dtype=torch.float64)
    real = P.make_fx

    def skewed(fn, **kw):  # a program whose first result is off by a little
        traced = real(fn, **kw)

        def build(*xs):
            gm = traced(*xs)
            out = next(nd for nd in gm.graph.nodes if nd.op == "output")
            first = out.args[0][0]
            with gm.graph.inserting_before(out):
                off = gm.graph.call_function(torch.ops.aten.mul.Tensor, (first, 1 + 1e-9))
            out.args = ((off, *out.args[0][1:]),)
            gm.recompile()
            return gm

        return build

    monkeypatch.setattr(P, "make_fx", skewed)
    J = jacbatch.prepare(f, X, method="jacrev")
    assert J.program == "interpreted: the program disagreed with the plan"
    assert_matches(J(X), reference_jacobian(f, (X,)), torch.float64)


def test_bad_input_is_refused_before_work() -> None:
    f, _ = _mlp_func("cpu")
    with pytest.raises(TypeError, match="prepare"):
        jacbatch.prepare(f, [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="compile"):
        jacbatch.prepare(f, torch.randn(2, 3), compile="yes")
    J = jacbatch.prepare(f, torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError):
        J(torch.randn(2, 3, dtype=torch.float64), torch.randn(2))


@pytest.mark.parametrize("faster", ["compiled", "plain"])
def test_compiled_program_matches_reference_and_must_be_faster(
    faster: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile=True keeps the compiled program only when it is the faster one (the clock is
    replaced here: the compiled program is an OptimizedModule)."""
    pytest.importorskip("torch._inductor")

    def clock(program: object, examples: object) -> float:
        compiled = type(program).__name__ == "OptimizedModule"
        return 1.0 if compiled == (faster == "compiled") else 2.0

    monkeypatch.setattr(P, "_seconds_of", clock)
    f, _ = _mlp_func("cpu")
    X = torch.randn(4, 3, dtype=torch.float64)
    J = jacbatch.prepare(f, X, compile=True)
    if faster == "compiled":
        assert J.program.startswith("compiled program"), J.program
    else:
        assert J.program.startswith("aten program") and "kept over the compiled" in J.program
    assert J.compile_seconds > 0
    X2 = torch.randn(4, 3, dtype=torch.float64)
    assert_matches(J(X2), reference_jacobian(f, (X2,)), torch.float64)


def test_autotune_times_every_applicable_route_and_keeps_the_fastest() -> None:
    f, _ = _mlp_func("cpu")
    X = torch.randn(6, 3, dtype=torch.float64)
    J = jacbatch.prepare(f, X, autotune=True)
    t = J.timings
    assert {"auto", "closed_form", "jacrev", "jacfwd", "vjp"} <= set(t)
    best = min(t, key=lambda k: t[k])
    assert J.program.endswith(f"autotuned: method={best!r}")
    assert_matches(J(X), reference_jacobian(f, (X,)), torch.float64)

    # a function without a closed form is tuned among the autodiff routes only
    def h(x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfcx(x) * x

    assert not jacbatch.plan.traced_analyses(  # erfcx has no rule (if it gets one, pick another)
        jacbatch.plan.normalize("t", h, (X,), 0, 0), (0,)
    )[0].ok
    g = jacbatch.prepare(h, X, autotune=True)
    assert "closed_form" not in g.timings and {"jacrev", "jacfwd", "vjp"} <= set(g.timings)
    assert_matches(g(X), reference_jacobian(h, (X,)), torch.float64)


def test_module_prepared_with_grad_on_runs_its_program_under_no_grad() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    J = jacbatch.prepare(net, X)  # grad mode on, parameters require grad
    assert J.program.startswith("aten program"), J.program
    calls = []
    real = J._interpreted
    J._interpreted = lambda *a, **k: calls.append(1) or real(*a, **k)  # type: ignore[method-assign]
    with torch.no_grad():
        assert_matches(J(X), reference_jacobian(net, (X,)), torch.float64)
    assert not calls  # the program ran
    assert J(X).requires_grad and calls  # with grad on, interpreted: a differentiable result


def _no_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make validating, probing and planning again an error."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the request was built again")

    monkeypatch.setattr(jacbatch.api, "build_request", refuse)
    monkeypatch.setattr(P, "build_request", refuse)


def test_interpreted_signatures_run_their_plan_without_rebuilding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.sum()) > 0 else x * 3

    X = torch.randn(6, 2, dtype=torch.float64)
    J = jacbatch.prepare(f, X)
    assert J.program.startswith("interpreted"), J.program
    g, _ = _mlp_func("cpu")
    C = jacbatch.prepare(g, torch.randn(64, 3, dtype=torch.float64), max_memory="8KiB")
    assert C.program.startswith("interpreted"), C.program
    _no_rebuild(monkeypatch)
    X2 = torch.randn(6, 2, dtype=torch.float64)
    assert_matches(J(X2), reference_jacobian(f, (X2,)), torch.float64)
    X3 = torch.randn(64, 3, dtype=torch.float64)
    buf = torch.full((64, 4, 3), float("nan"), dtype=torch.float64)
    assert C(X3, out=buf) is buf
    assert_matches(buf, reference_jacobian(g, (X3,)), torch.float64)
    # a differentiable result is still the full path's: it needs a plan with a graph
    with pytest.raises(AssertionError, match="built again"):
        J(X2.clone().requires_grad_())


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd"])
def test_batched_functions(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(4, 3, generator=g, dtype=torch.float64)

    def per_sample(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(W @ x).cumprod(0)

    def batch(X: torch.Tensor) -> torch.Tensor:
        return torch.tanh(X @ W.T).cumprod(1)

    X = torch.randn(7, 3, dtype=torch.float64)
    J = jacbatch.prepare(batch, X, batched=True, method=method)
    _no_rebuild(monkeypatch)
    for Xn in (X, torch.randn(7, 3, dtype=torch.float64)):
        assert_matches(J(Xn), reference_jacobian(per_sample, (Xn,)), torch.float64)
