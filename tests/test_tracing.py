"""The traced route end to end: realistic expressions, fallbacks, explain, caching, structure.

The reference is the shared per-sample ``torch.autograd.functional.jacobian`` loop in float64
(``tests/_reference.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch

import jacbatch
import jacbatch.methods.functorch as functorch_route
from jacbatch import capture, tracing
from jacbatch.rules import terms
from tests.conftest import DEVICES, reference_jacobian

F64 = torch.float64


def assert_matches(J: torch.Tensor, R: torch.Tensor) -> None:
    torch.testing.assert_close(
        J, R.to(J.dtype), rtol=1e-12, atol=1e-12 * max(1.0, float(R.abs().max()))
    )


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


B, m, p, q = 3, 4, 5, 3
X_ = rnd(B, m, p, seed=1)
W1_ = rnd(p, q, seed=2)
W2_ = rnd(q, 2, seed=3)
b1_ = rnd(q, seed=4)
SPD = rnd(B, 4, 4, seed=5)
C_CLOSED = rnd(q, q, seed=6)

# (name, func, args, in_dims, argnums)
EXPRESSIONS: list[
    tuple[
        str,
        Callable[..., torch.Tensor],
        tuple[torch.Tensor, ...],
        tuple[int | None, ...],
        tuple[int, ...],
    ]
] = [
    (
        "mlp_2layer_wrt_W1",
        lambda X, W1, b1, W2: torch.tanh(X @ W1 + b1) @ W2,
        (X_, W1_, b1_, W2_),
        (0, None, None, None),
        (1, 0, 2, 3),
    ),
    (
        "tanh_affine",
        lambda A, W, b: torch.tanh(A @ W + b),
        (X_, W1_, b1_),
        (0, None, None),
        (0, 1, 2),
    ),
    ("softmax_XW", lambda X, W: (X @ W).softmax(-1), (X_, W1_), (0, None), (0, 1)),
    (
        "logdet_gram",
        lambda X: torch.logdet(X.T @ X + 0.1 * torch.eye(X.shape[1], dtype=X.dtype)),
        (X_,),
        (0,),
        (0,),
    ),
    (
        "attention",
        lambda Q, K, V: torch.softmax(Q @ K.T / math.sqrt(Q.shape[-1]), -1) @ V,
        (X_, rnd(6, p, seed=7), rnd(6, 2, seed=8)),
        (0, None, None),
        (0, 1, 2),
    ),
    (
        "layer_norm",
        lambda X: (
            (X - X.mean(-1, keepdim=True))
            / torch.sqrt(((X - X.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True) + 1e-5)
        ),
        (X_,),
        (0,),
        (0,),
    ),
    (
        "mse_loss",
        lambda X, W, Y: ((X @ W - Y) ** 2).mean(),
        (X_, W1_, rnd(B, m, q, seed=9)),
        (0, None, 0),
        (1,),
    ),
    (
        "cross_entropy",
        lambda X, W, T: -(T * torch.log_softmax(X @ W, -1)).sum(),
        (X_, W1_, torch.softmax(rnd(B, m, q, seed=10), -1)),
        (0, None, 0),
        (1, 0),
    ),
    (
        "AXB",
        lambda A, X, Bm: A @ X @ Bm,
        (rnd(m, p, seed=11), rnd(B, p, q, seed=12), rnd(q, 2, seed=13)),
        (None, 0, None),
        (1, 0, 2),
    ),
    (
        "solve_by_inverse",
        lambda M, b: torch.inverse(M + 4 * torch.eye(4, dtype=M.dtype)) @ b,
        (SPD, rnd(4, seed=14)),
        (0, None),
        (0, 1),
    ),
    (
        "frobenius_residual",
        lambda A, Xm, Bm: torch.linalg.norm(A @ Xm - Bm) ** 2,
        (X_, W1_, rnd(B, m, q, seed=15)),
        (0, None, 0),
        (1, 0, 2),
    ),
    ("det_gram", lambda X: torch.det(X.T @ X), (rnd(B, 6, 3, seed=16),), (0,), (0,)),
    ("closure_relu_layer", lambda X: torch.relu(X @ W1_ + b1_) @ C_CLOSED, (X_,), (0,), (0,)),
    (
        "flatten_then_linear",
        lambda X, M: torch.sigmoid(X.flatten() @ M).reshape(2, 3),
        (X_, rnd(m * p, 6, seed=17)),
        (0, None),
        (0, 1),
    ),
    (
        "batch_dim_1",
        lambda X, W: torch.exp(X @ W).sum(0),
        (X_.transpose(0, 1).contiguous(), W1_),
        (1, None),
        (0, 1),
    ),
]


@pytest.mark.parametrize(
    ("name", "func", "args", "in_dims", "argnums"), EXPRESSIONS, ids=[e[0] for e in EXPRESSIONS]
)
def test_expression_traced_and_correct(
    name: str,
    func: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    in_dims: tuple[int | None, ...],
    argnums: tuple[int, ...],
) -> None:
    plan = jacbatch.explain(func, *args, argnums=argnums, in_dims=in_dims)
    assert [s.route for s in plan.steps] == ["traced"], str(plan)
    Js = jacbatch.jacobian(func, *args, argnums=argnums, in_dims=in_dims)
    for a, J in zip(argnums, Js, strict=True):
        assert_matches(J, reference_jacobian(func, args, a, in_dims))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_devices_dtypes_and_layouts(device: str, dtype: torch.dtype) -> None:
    from jacbatch.testing import tolerance

    f = EXPRESSIONS[0][1]
    args = tuple(a.to(device=device, dtype=dtype) for a in EXPRESSIONS[0][2])
    dims = (0, None, None, None)
    rtol, atol = tolerance(dtype)
    for vec in (None, "row", "col"):
        J = jacbatch.jacobian(f, *args, argnums=1, in_dims=dims, vec=vec)
        assert J.device.type == device and J.dtype == dtype
        want = reference_jacobian(f, args, 1, dims, vec=vec)
        torch.testing.assert_close(J.cpu(), want.to(dtype).cpu(), rtol=rtol, atol=atol)


def test_unbatched_and_out_buffer() -> None:
    f = EXPRESSIONS[1][1]
    A, W, b = X_[0], W1_, b1_
    J = jacbatch.jacobian(f, A, W, b, argnums=1, in_dims=None)
    assert_matches(J, reference_jacobian(f, (A, W, b), 1, (None, None, None)))
    out = torch.empty(B, m * q, p * q, dtype=F64)
    res = jacbatch.jacobian(f, X_, W, b, argnums=1, in_dims=(0, None, None), vec="col", out=out)
    assert res.data_ptr() == out.data_ptr()
    assert_matches(out, reference_jacobian(f, (X_, W, b), 1, (0, None, None), vec="col"))


# ---------------------------------------------------------------------------------------------
# Fallbacks: never a wrong answer
# ---------------------------------------------------------------------------------------------


def branchy(X: torch.Tensor) -> torch.Tensor:
    if X.sum() > 0:  # Python control flow on a value
        return torch.tanh(X) * 2
    return X**3


FALLBACKS = [
    ("erfcx", lambda X: torch.special.erfcx(X).tanh(), "special_erfcx"),
    ("i1", lambda X: torch.special.i1(X) * X, "special_i1"),
    ("masked_index", lambda X: X[X > 0].sum() * X, "index"),
    ("control_flow", branchy, "control flow"),
    ("item", lambda X: X * X.sum().item(), ""),
    ("dtype_cast", lambda X: X.float().double().exp(), ""),
]


@pytest.mark.parametrize(("name", "func", "why"), FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_fallback_is_correct_and_explained(
    name: str, func: Callable[..., torch.Tensor], why: str
) -> None:
    X = torch.cat([X_[:1].abs(), -X_[1:2].abs(), X_[2:]])  # the branch differs between samples
    plan = jacbatch.explain(func, X)
    assert plan.steps[0].route in ("jacrev", "jacfwd", "vjp"), str(plan)
    assert why in str(plan)
    J = jacbatch.jacobian(func, X)
    assert_matches(J, reference_jacobian(func, (X,), 0, (0,)))
    with pytest.raises(NotImplementedError, match="closed-form"):
        jacbatch.jacobian(func, X, method="closed_form")


def test_singular_matrix_falls_back_at_run_time() -> None:
    X = torch.ones(2, 3, 3, dtype=F64)  # singular: the inverse-based det rule does not apply
    J = jacbatch.jacobian(torch.det, X)
    assert_matches(J, reference_jacobian(torch.det, (X,), 0, (0,)))
    with pytest.raises(NotImplementedError, match="singular"):
        jacbatch.jacobian(torch.det, X, method="closed_form")


def test_no_rule_overhead_path_is_cached() -> None:
    f = lambda X: torch.special.erfcx(X)  # noqa: E731
    before = capture.capture_count()
    for _ in range(3):
        jacbatch.jacobian(f, X_)
    assert capture.capture_count() == before + 1


# ---------------------------------------------------------------------------------------------
# explain, caching, structure
# ---------------------------------------------------------------------------------------------


def test_explain_names_nodes_and_rules() -> None:
    f = lambda X, W: torch.special.erfcx(X @ W).softmax(-1)  # noqa: E731
    text = str(jacbatch.explain(f, X_, W1_, argnums=(0, 1), in_dims=(0, None)))
    assert "mm = aten.mm.default -> rule mm" in text
    assert "special_erfcx = aten.special_erfcx.default: no closed-form rule" in text
    assert "rule softmax" in text
    g = lambda X: torch.tanh(X).sum()  # noqa: E731
    text = str(jacbatch.explain(g, X_))
    assert "traced" in text and "rule elementwise_tanh" in text and "rule sum_" in text


def test_trace_is_cached_and_closures_are_tracked() -> None:
    W = rnd(p, q, seed=20)

    def f(X: torch.Tensor) -> torch.Tensor:
        return torch.tanh(X @ W)

    n0 = capture.capture_count()
    J1 = jacbatch.jacobian(f, X_)
    jacbatch.jacobian(f, X_)
    assert capture.capture_count() == n0 + 1  # second call: no re-trace
    jacbatch.jacobian(f, X_[:, :2])  # new shapes: a new trace
    assert capture.capture_count() == n0 + 2
    W.mul_(2)  # in place: the graph reads the same tensor, no re-trace needed
    J2 = jacbatch.jacobian(f, X_)
    assert capture.capture_count() == n0 + 2
    assert_matches(J2, reference_jacobian(f, (X_,), 0, (0,)))
    assert not torch.allclose(J1, J2)
    W = rnd(p, q, seed=21)  # rebinding: a lifted graph input, its new value is read
    J3 = jacbatch.jacobian(f, X_)
    assert capture.capture_count() == n0 + 2
    assert_matches(J3, reference_jacobian(f, (X_,), 0, (0,)))


def test_modules_are_traced_and_parameter_swaps_retrace() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(p, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model = model.double()
    plan = jacbatch.explain(model, X_)
    assert [s.route for s in plan.steps] == ["traced"], str(plan)
    assert_matches(jacbatch.jacobian(model, X_), reference_jacobian(model, (X_,), 0, (0,)))
    with torch.no_grad():
        model[0].weight.mul_(3)  # in place: same graph, new values
    assert_matches(jacbatch.jacobian(model, X_), reference_jacobian(model, (X_,), 0, (0,)))
    model[2].weight = torch.nn.Parameter(rnd(2, 6, seed=40))  # swapped: re-traced
    assert_matches(jacbatch.jacobian(model, X_), reference_jacobian(model, (X_,), 0, (0,)))


def test_traced_route_calls_no_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("autograd was called")

    for mod, name in [
        (torch.autograd, "grad"),
        (torch.autograd, "backward"),
        (torch.Tensor, "backward"),
        (torch.func, "jacrev"),
        (torch.func, "jacfwd"),
        (torch.func, "vjp"),
        (torch.func, "jvp"),
        (functorch_route, "jacrev"),
        (functorch_route, "jacfwd"),
        (functorch_route, "jvp"),
    ]:
        monkeypatch.setattr(mod, name, forbidden, raising=False)
    for name, f, args, dims, argnums in [*EXPRESSIONS[:4], EXPRESSIONS[12]]:
        leaves = tuple(a.clone().requires_grad_(True) for a in args)
        with torch.no_grad():  # with grad mode on the result would be differentiable
            Js = jacbatch.jacobian(f, *leaves, argnums=argnums, in_dims=dims)
        assert all(not J.requires_grad and J.grad_fn is None for J in Js), name
        assert all(a.grad is None for a in leaves)


def test_identity_and_independent_outputs() -> None:
    J = jacbatch.jacobian(lambda X, Y: X, X_, W1_, in_dims=(0, None), method="closed_form")
    assert_matches(J, reference_jacobian(lambda X, Y: X, (X_, W1_), 0, (0, None)))
    J = jacbatch.jacobian(lambda X, Y: 2 * Y, X_, W1_, in_dims=(0, None), method="closed_form")
    assert J.shape == (B, p, q, m, p) and not J.any()


def test_random_ops_fall_back() -> None:
    f = lambda X: X * torch.rand_like(X).round()  # noqa: E731  (vmap rejects randomness)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="randomness="):  # default: refused, not guessed
        jacbatch.jacobian(f, X_)
    J = jacbatch.jacobian(f, X_, randomness="different").reshape(B, m * p, m * p)
    diag = torch.diagonal(J, dim1=1, dim2=2)
    assert torch.equal(J, torch.diag_embed(diag))  # a 0/1 mask on the diagonal, nothing else
    assert bool(((diag == 0) | (diag == 1)).all())


def test_registered_rule_still_wins() -> None:
    A, W, b = X_, W1_, b1_
    plan = jacbatch.explain(jacbatch.affine, A, W, b, argnums=1, in_dims=(0, None, None))
    assert [s.route for s in plan.steps] == ["closed_form"]


def _inplace(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    y = X @ W
    y.mul_(2)  # functionalized away when tracing
    return y.tanh()


def test_inplace_user_code_is_functionalized() -> None:
    plan = jacbatch.explain(_inplace, X_, W1_, argnums=(0, 1), in_dims=(0, None))
    assert [s.route for s in plan.steps] == ["traced"], str(plan)
    J0, J1 = jacbatch.jacobian(_inplace, X_, W1_, argnums=(0, 1), in_dims=(0, None))
    assert_matches(J0, reference_jacobian(_inplace, (X_, W1_), 0, (0, None)))
    assert_matches(J1, reference_jacobian(_inplace, (X_, W1_), 1, (0, None)))


def test_reshape_without_common_refinement_is_dense_but_correct() -> None:
    f = lambda X: torch.tanh(X.reshape(3, 2) @ X.reshape(2, 3))  # noqa: E731
    X = rnd(2, 2, 3, seed=30)
    J = jacbatch.jacobian(f, X, method="closed_form")
    assert_matches(J, reference_jacobian(f, (X,), 0, (0,)))


def _terms(func: Callable[..., torch.Tensor], args: Sequence[torch.Tensor], dims, argnum: int):
    from jacbatch._validation import normalize_call
    from jacbatch.methods import batched_args, traced

    call = normalize_call("t", func, tuple(args), argnum, dims)
    bargs, _, Bn = batched_args(call)
    bargs = [*bargs, *traced.lifted_inputs(call)]
    return tracing.jacobian_terms(traced.traced_graph(call), [argnum], bargs, Bn)[0]


def test_structure_stays_factored_until_the_write() -> None:
    """tanh(A @ W + b) w.r.t. W keeps two factors, s (B, m, q) and A (B, m, p), and a delta:
    neither their (B, m, q, p) product nor the (B, m, q, p, q) Jacobian is formed."""
    (term,) = _terms(EXPRESSIONS[1][1], (X_, W1_, b1_), (0, None, None), 1)
    assert sorted(tuple(T.shape) for T, _ in term.factors) == sorted([(B, m, q), (B, m, p)])
    assert len(set(term.out + term.inp)) == 3  # i, j, k: the output column j is the input column
    s = 1 - torch.tanh(X_ @ W1_ + b1_) ** 2
    want = s[:, :, :, None] * X_[:, :, None, :]  # s[b,i,j] A[b,i,k]
    T, t = terms.collapse(term)
    got = T.permute(0, *sorted(range(1, 4), key=lambda k: (term.out + term.inp).index(t[k - 1])))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_equal_patterns_merge_into_one_term() -> None:
    """x * x has two contributions with the same (diagonal) pattern: one term, factor 2x."""
    (term,) = _terms(lambda x: x * x, (X_,), (0,), 0)
    T, _ = terms.collapse(term)
    assert tuple(T.shape) == (B, m, p) and term.out == term.inp
    torch.testing.assert_close(T, 2 * X_, rtol=0, atol=0)


def test_shared_factors_keep_no_batch_axis() -> None:
    """X @ W w.r.t. X with W shared: the factor is W itself, broadcast over the batch."""
    (term,) = _terms(lambda X, W: X @ W, (X_, W1_), (0, None), 0)
    assert term.batch == 1 and len(term.factors) == 1


def test_mixed_plan_traces_one_argument_and_differentiates_the_other() -> None:
    """The path from X has erfcx (no rule), the path from W does not: two steps, both right."""
    f = lambda X, W: torch.tanh(torch.special.erfcx(X) @ W)  # noqa: E731
    plan = jacbatch.explain(f, X_, W1_, argnums=(0, 1), in_dims=(0, None))
    assert (plan.steps[0].route, plan.steps[0].argnums) == ("traced", (1,)), str(plan)
    assert plan.steps[1].argnums == (0,) and plan.steps[1].route != "traced"
    J0, J1 = jacbatch.jacobian(f, X_, W1_, argnums=(0, 1), in_dims=(0, None))
    assert_matches(J0, reference_jacobian(f, (X_, W1_), 0, (0, None)))
    assert_matches(J1, reference_jacobian(f, (X_, W1_), 1, (0, None)))
