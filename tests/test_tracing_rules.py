"""Every op rule of the traced route against an independent float64 reference.

Each case is a one-op (or two-op) plain function. ``method="closed_form"`` makes
:func:`jacbatch.jacobian` use the traced rules or raise, so a passing case shows that the rule
matched and is right. The reference is a per-sample ``torch.autograd.functional.jacobian`` loop.
Shapes are drawn by hypothesis; batching is all batched, differentiated-only batched, everything
but the differentiated argument batched (per-sample Jacobians of a shared argument), and none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jacbatch
from jacbatch.testing import tolerance
from tests.conftest import reference_jacobian

F64 = torch.float64
SETTINGS = settings(max_examples=2, deadline=None, derandomize=True)


@dataclass(frozen=True)
class Case:
    """A function, its per-sample argument shapes (from drawn sizes m, p, q), and a domain."""

    name: str
    func: Callable[..., torch.Tensor]
    shapes: Callable[[int, int, int], list[tuple[int, ...]]]
    argnums: tuple[int, ...] = (0,)
    positive: bool = False  # inputs in (0.5, 1.5)
    well_conditioned: bool = False  # square inputs shifted by n·I


def _mat(m: int, p: int, q: int) -> list[tuple[int, ...]]:
    return [(m, p)]


CASES = [
    # matrix products
    Case("mm", lambda X, Y: X @ Y, lambda m, p, q: [(m, p), (p, q)], (0, 1)),
    Case("matmul_3d_2d", lambda X, Y: X @ Y, lambda m, p, q: [(2, m, p), (p, q)], (0, 1)),
    Case("bmm", lambda X, Y: X @ Y, lambda m, p, q: [(2, m, p), (2, p, q)], (0, 1)),
    Case("matmul_bcast", lambda X, Y: X @ Y, lambda m, p, q: [(2, 1, m, p), (3, p, q)], (0, 1)),
    Case("mv", lambda X, y: X @ y, lambda m, p, q: [(m, p), (p,)], (0, 1)),
    Case("dot", lambda x, y: x @ y, lambda m, p, q: [(p,), (p,)], (0, 1)),
    Case("AXB", lambda A, X, C: A @ X @ C, lambda m, p, q: [(m, p), (p, q), (q, m)], (0, 1, 2)),
    Case("linear", torch.nn.functional.linear, lambda m, p, q: [(m, p), (q, p), (q,)], (0, 1, 2)),
    # permutations and reshapes
    Case("T", lambda X: X.T, _mat),
    Case("transpose3d", lambda X: X.transpose(0, 2), lambda m, p, q: [(m, p, q)]),
    Case("permute", lambda X: X.permute(2, 0, 1), lambda m, p, q: [(m, p, q)]),
    Case("flatten", lambda X: X.flatten(), lambda m, p, q: [(m, p, q)]),
    Case("reshape_split", lambda X: X.reshape(-1).reshape(X.shape), lambda m, p, q: [(m, p)]),
    Case("reshape_swap", lambda X: X.reshape(X.shape[1], X.shape[0]).tanh(), _mat),
    Case("unsqueeze_squeeze", lambda X: X.unsqueeze(1).squeeze(1).unsqueeze(0), _mat),
    Case("expand", lambda x: x.expand(3, *x.shape), lambda m, p, q: [(p,)]),
    Case("select", lambda X: X[1] if X.shape[0] > 1 else X[0], _mat),
    Case("slice", lambda X: X[:, ::2], _mat),
    Case("cat", lambda X, Y: torch.cat([X, Y.T, X], -1), lambda m, p, q: [(m, p), (q, m)], (0, 1)),
    Case("stack", lambda X, Y: torch.stack([Y, X, X], 1), lambda m, p, q: [(m, p)] * 2, (0, 1)),
    # elementwise unary
    *(
        Case(f"unary_{n}", fn, _mat, positive=pos)
        for n, fn, pos in [
            ("tanh", torch.tanh, False),
            ("sigmoid", torch.sigmoid, False),
            ("relu", torch.relu, False),
            ("exp", torch.exp, False),
            ("expm1", torch.expm1, False),
            ("log", torch.log, True),
            ("log1p", torch.log1p, True),
            ("sin", torch.sin, False),
            ("cos", torch.cos, False),
            ("tan", torch.tan, False),
            ("sinh", torch.sinh, False),
            ("cosh", torch.cosh, False),
            ("atan", torch.atan, False),
            ("sqrt", torch.sqrt, True),
            ("rsqrt", torch.rsqrt, True),
            ("reciprocal", torch.reciprocal, True),
            ("neg", torch.neg, False),
            ("abs", torch.abs, False),
            ("erf", torch.erf, False),
            ("silu", torch.nn.functional.silu, False),
            ("square", torch.square, False),
            ("pow3", lambda x: x**3, False),
            ("pow_half", lambda x: x**0.5, True),
            ("pow0", lambda x: x**0 + x, False),
            ("pow_base", lambda x: 2.5**x, False),
            ("clone", lambda x: x.clone(), False),
            ("detach_plus", lambda x: x.detach() * x, False),
            ("clamp", lambda x: x.clamp(-0.5, 0.5), False),
            ("clamp_min", lambda x: x.clamp(min=0.1), False),
            ("leaky_relu", lambda x: torch.nn.functional.leaky_relu(x, 0.2), False),
            ("softplus", lambda x: torch.nn.functional.softplus(x, beta=2.0, threshold=1.0), False),
            ("gelu", torch.nn.functional.gelu, False),
            ("gelu_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh"), False),
        ]
    ),
    # elementwise binary, broadcasting, constants
    Case("add_bcast", lambda X, b: X + b, lambda m, p, q: [(m, p), (p,)], (0, 1)),
    Case("sub_bcast", lambda X, b: X - b, lambda m, p, q: [(m, p), (m, 1)], (0, 1)),
    Case(
        "add_alpha", lambda X, Y: torch.add(X, Y, alpha=2.5), lambda m, p, q: [(m, p)] * 2, (0, 1)
    ),
    Case("mul_hadamard", lambda X, Y: X * Y, lambda m, p, q: [(m, p), (m, p)], (0, 1)),
    Case("mul_bcast", lambda X, y: X * y, lambda m, p, q: [(m, p), (p,)], (0, 1)),
    Case("mul_self", lambda X: X * X, _mat),
    Case("maximum", torch.maximum, lambda m, p, q: [(m, p), (p,)], (0, 1)),
    Case(
        "minimum_ties",
        lambda X, Y: torch.minimum(X, X.detach() * 0 + Y),
        lambda m, p, q: [(m, p)] * 2,
        (0, 1),
    ),
    Case("max_self_tie", lambda X: torch.maximum(X, X), _mat),
    Case("div", lambda X, Y: X / Y, lambda m, p, q: [(m, p), (p,)], (0, 1), positive=True),
    Case("scale", lambda X: 3.0 * X / 2 - 1 + (1 - X), _mat),
    Case("where", lambda X: torch.where(X > 0, X, 0.5 * X), _mat),
    Case("pow_tensor", lambda X, Y: X**Y, lambda m, p, q: [(m, p), (p,)], (0, 1), positive=True),
    # reductions
    Case("sum", lambda X: X.sum(), _mat),
    Case("sum_dim", lambda X: X.sum(-1), lambda m, p, q: [(m, p, q)]),
    Case("sum_keepdim", lambda X: X.sum((0, 2), keepdim=True), lambda m, p, q: [(m, p, q)]),
    Case("mean", lambda X: X.mean(), _mat),
    Case("mean_dim", lambda X: X.mean(0), _mat),
    Case("trace", lambda X: torch.trace(X), lambda m, p, q: [(p, p)]),
    Case("frobenius_sq", lambda X: (X * X).sum(), _mat),
    Case("norm_sq", lambda X: torch.linalg.norm(X) ** 2, _mat),
    Case("vector_norm_dim", lambda X: torch.linalg.vector_norm(X, dim=1), _mat),
    Case("var", lambda X: X.var(-1), lambda m, p, q: [(m, p + 1)]),
    Case("var_all_biased", lambda X: torch.var(X, correction=0), _mat),
    Case("logsumexp", lambda X: torch.logsumexp(X, -1), _mat),
    Case("logsumexp_keep", lambda X: torch.logsumexp(X, (0, 1), keepdim=True), _mat),
    # softmax
    Case("softmax_last", lambda X: X.softmax(-1), _mat),
    Case("softmax_first", lambda X: torch.softmax(X, 0), lambda m, p, q: [(m, p, q)]),
    Case("log_softmax", lambda X: torch.log_softmax(X, -1), _mat),
    # linear algebra
    Case("inverse", torch.inverse, lambda m, p, q: [(p, p)], well_conditioned=True),
    Case("det", torch.det, lambda m, p, q: [(p, p)], well_conditioned=True),
    Case("logdet", torch.logdet, lambda m, p, q: [(p, p)], well_conditioned=True),
    Case("slogdet", lambda X: torch.linalg.slogdet(X)[1], lambda m, p, q: [(p, p)]),
    Case(
        "solve",
        lambda A, Bm: torch.linalg.solve(A, Bm),
        lambda m, p, q: [(p, p), (p, q)],
        (0, 1),
        well_conditioned=True,
    ),
    Case(
        "solve_vector",
        lambda A, b: torch.linalg.solve(A, b),
        lambda m, p, q: [(p, p), (p,)],
        (0, 1),
        well_conditioned=True,
    ),
    Case("inverse_stack", torch.inverse, lambda m, p, q: [(2, p, p)], well_conditioned=True),
    Case("det_stack", torch.det, lambda m, p, q: [(m, 2, p, p)], well_conditioned=True),
    Case("logdet_stack", torch.logdet, lambda m, p, q: [(2, p, p)], well_conditioned=True),
]


def _batchings(case: Case) -> list[str]:
    """Distinct batchings: for one argument, batched or not; for several, also mixed."""
    if len(case.shapes(2, 2, 2)) == 1:
        return ["all", "none"]
    return ["all", "diff_only", "others_only"]


PARAMS = [pytest.param(c, mode, id=f"{c.name}-{mode}") for c in CASES for mode in _batchings(c)]


def make_args(case: Case, m: int, p: int, q: int, B: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in case.shapes(m, p, q):
        x = torch.randn(B, *s, generator=g, dtype=F64)
        if case.positive:
            x = 0.5 + torch.rand(B, *s, generator=g, dtype=F64)
        if case.well_conditioned and len(s) >= 2 and s[-1] == s[-2]:
            x = x + s[-1] * torch.eye(s[-1], dtype=F64)
        out.append(x)
    return out


def in_dims_for(mode: str, n: int, argnum: int) -> tuple[int | None, ...]:
    if mode == "all":
        return (0,) * n
    if mode == "diff_only":
        return tuple(0 if i == argnum else None for i in range(n))
    if mode == "others_only":
        if n == 1:
            return (0,)
        return tuple(None if i == argnum else 0 for i in range(n))
    return (None,) * n


def run_case(case: Case, m: int, p: int, q: int, B: int, seed: int, mode: str) -> None:
    full = make_args(case, m, p, q, B, seed)
    for a in case.argnums:
        dims = in_dims_for(mode, len(full), a)
        args = [x if d is not None else x[0] for x, d in zip(full, dims, strict=True)]
        J = jacbatch.jacobian(case.func, *args, argnums=a, in_dims=dims, method="closed_form")
        R = reference_jacobian(case.func, args, a, dims)
        rtol, atol = tolerance(F64)
        torch.testing.assert_close(J, R, rtol=rtol, atol=atol * max(1.0, float(R.abs().max())))


@pytest.mark.parametrize(("case", "mode"), PARAMS)
@SETTINGS
@given(
    m=st.integers(1, 4),
    p=st.integers(1, 4),
    q=st.integers(1, 3),
    B=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_rule_matches_autograd(
    case: Case, mode: str, m: int, p: int, q: int, B: int, seed: int
) -> None:
    run_case(case, m, p, q, B, seed, mode)


@pytest.mark.parametrize("vec", ["row", "col"])
@pytest.mark.parametrize(
    "case", [c for c in CASES if c.name in ("AXB", "softmax_first", "permute")]
)
def test_vec_layouts(case: Case, vec: str) -> None:
    args = make_args(case, 3, 2, 4, 2, 0)
    for a in case.argnums:
        J = jacbatch.jacobian(case.func, *args, argnums=a, vec=vec, method="closed_form")
        R = reference_jacobian(case.func, args, a, [0] * len(args))
        o = math.prod(R.shape[1 : R.ndim - args[a].ndim + 1])
        Rf = reference_jacobian(case.func, args, a, [0] * len(args), vec=vec)
        assert J.shape == (2, o, args[a][0].numel())
        torch.testing.assert_close(J, Rf, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Matrix Cookbook identities, checked numerically on the traced closed forms
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_cookbook_det(n: int, seed: int) -> None:
    """d det(X) = det(X) tr(X⁻¹ dX) for random directions dX."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3, n, n, generator=g, dtype=F64) + n * torch.eye(n, dtype=F64)
    dX = torch.randn(3, n, n, generator=g, dtype=F64)
    J = jacbatch.jacobian(torch.det, X, method="closed_form")  # (3, n, n)
    lhs = (J * dX).sum((-2, -1))
    rhs = torch.linalg.det(X) * torch.einsum("bii->b", torch.linalg.solve(X, dX))
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(n=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_cookbook_inverse(n: int, seed: int) -> None:
    """d X⁻¹ = -X⁻¹ dX X⁻¹ for random directions dX."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3, n, n, generator=g, dtype=F64) + n * torch.eye(n, dtype=F64)
    dX = torch.randn(3, n, n, generator=g, dtype=F64)
    J = jacbatch.jacobian(torch.inverse, X, method="closed_form")  # (3, n, n, n, n)
    lhs = torch.einsum("bijkl,bkl->bij", J, dX)
    Xi = torch.linalg.inv(X)
    torch.testing.assert_close(lhs, -Xi @ dX @ Xi, rtol=1e-12, atol=1e-12)


def test_cookbook_logdet_gradient() -> None:
    """∂ log det(X) / ∂X = X⁻ᵀ (and the article's ∂ sum(A ⊙ A) / ∂A = 2A)."""
    # seeded, and symmetric positive definite (det > 0), so log det is finite for every sample
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(4, 3, 3, generator=g, dtype=F64)
    X = Q @ Q.transpose(-1, -2) + torch.eye(3, dtype=F64)
    assert bool((torch.linalg.det(X) > 0).all())
    J = jacbatch.jacobian(torch.logdet, X, method="closed_form")
    torch.testing.assert_close(J, torch.linalg.inv(X).transpose(-1, -2), rtol=1e-12, atol=1e-12)
    A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    G = jacbatch.jacobian(lambda A: (A * A).sum(), A, in_dims=None, method="closed_form")
    assert torch.equal(G, 2 * A)
