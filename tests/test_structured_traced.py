"""structured_jacobian on traced plain torch code: TermJacobian against independent references.

Every case: the operator's dense form equals ``jacbatch.jacobian`` and the shared per-sample
``torch.autograd.functional.jacobian`` loop (float64, ``tests/_reference.py``) in both vec orders; ``jvp`` / ``vjp`` equal
products with the dense reference; ``T`` and ``@`` agree with the dense algebra; where the
structure exists (a diagonal times a Kronecker product, a factored MLP layer) the operator holds
far fewer bytes than the dense Jacobian.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import pytest
import torch

import jacbatch
from jacbatch import jacobian, structured_jacobian
from jacbatch.structured import DenseJacobian, JacobianOperator, TermJacobian
from tests.conftest import reference_jacobian

F64 = torch.float64
TOL = {"rtol": 1e-12, "atol": 1e-12}
Bn, m, p, q, h = 3, 4, 5, 6, 7


def rnd(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64)


def mlp(x, W1, W2):
    return torch.tanh(x @ W1) @ W2


def affine_tanh(A, W, b):
    return torch.tanh(A @ W + b)


# name, func, args, in_dims, argnum, compact (nbytes < dense / 4 expected)
CASES: list[tuple[str, Callable[..., torch.Tensor], tuple, tuple, int, bool]] = [
    (
        "tanh-affine-dW",
        affine_tanh,
        (rnd(Bn, m, p, seed=1), rnd(Bn, p, q, seed=2), rnd(q, seed=3)),
        (0, 0, None),
        1,
        True,
    ),
    (
        "tanh-affine-dW-shared-A",
        affine_tanh,
        (rnd(m, p, seed=1), rnd(Bn, p, q, seed=2), rnd(q, seed=3)),
        (None, 0, None),
        1,
        True,
    ),
    (
        "tanh-affine-dA",
        affine_tanh,
        (rnd(Bn, m, p, seed=4), rnd(p, q, seed=5), rnd(q, seed=6)),
        (0, None, None),
        0,
        True,
    ),
    (
        "tanh-affine-dB",
        affine_tanh,
        (rnd(Bn, m, p, seed=7), rnd(p, q, seed=8), rnd(Bn, q, seed=9)),
        (0, None, 0),
        2,
        False,
    ),
    (
        "mlp-dW1",
        mlp,
        (rnd(Bn, p, seed=10), rnd(Bn, p, h, seed=11), rnd(Bn, h, q, seed=12)),
        (0, 0, 0),
        1,
        True,
    ),
    (
        "mlp-dW1-shared-weights",
        mlp,
        (rnd(Bn, p, seed=13), rnd(p, h, seed=14), rnd(h, q, seed=15)),
        (0, None, None),
        1,
        True,
    ),
    (
        "mlp-dW2",
        mlp,
        (rnd(Bn, p, seed=16), rnd(Bn, p, h, seed=17), rnd(Bn, h, q, seed=18)),
        (0, 0, 0),
        2,
        True,
    ),
    (
        "softmax-xW-dW",
        lambda x, W: torch.softmax(x @ W, -1),
        (rnd(Bn, p, seed=19), rnd(Bn, p, q, seed=20)),
        (0, 0),
        1,
        False,
    ),
    (
        "x*y-dx",
        lambda x, y: x * y,
        (rnd(Bn, m, q, seed=21), rnd(Bn, m, q, seed=22)),
        (0, 0),
        0,
        True,
    ),
    (
        "sandwich-AXC-dX",
        lambda A, X, C: A @ X @ C,
        (rnd(Bn, m, p, seed=23), rnd(Bn, p, q, seed=24), rnd(Bn, q, h, seed=25)),
        (0, 0, 0),
        1,
        True,
    ),
    (
        "sum-dW",
        lambda A, W: (A @ W).sum(),
        (rnd(Bn, m, p, seed=26), rnd(Bn, p, q, seed=27)),
        (0, 0),
        1,
        False,
    ),
    ("mean-tanh-dx", lambda x: torch.tanh(x).mean(-1), (rnd(Bn, m, q, seed=28),), (0,), 0, False),
    (
        "reshape-permute-dx",
        lambda x: (2 * x.reshape(m * q).reshape(m, 2, 3).permute(2, 0, 1)).sin(),
        (rnd(Bn, m, q, seed=29),),
        (0,),
        0,
        True,
    ),
    (
        "residual-dx",
        lambda x, W: x + torch.tanh(x @ W),
        (rnd(Bn, m, p, seed=30), rnd(p, p, seed=31)),
        (0, None),
        0,
        False,
    ),
    (
        "logsumexp-dW",
        lambda x, W: torch.logsumexp(x @ W, -1),
        (rnd(Bn, m, p, seed=32), rnd(Bn, p, q, seed=33)),
        (0, 0),
        1,
        False,
    ),
    (
        "unbatched-tanh-affine-dW",
        affine_tanh,
        (rnd(m, p, seed=34), rnd(p, q, seed=35), rnd(q, seed=36)),
        (None, None, None),
        1,
        True,
    ),
]


@pytest.fixture(params=CASES, ids=[c[0] for c in CASES])
def case(request):
    return request.param


def test_dense_equals_jacobian_and_reference(case) -> None:
    _, func, args, dims, argnum, _ = case
    op = structured_jacobian(func, *args, argnums=argnum, in_dims=dims)
    assert isinstance(op, TermJacobian), op
    for vec in (None, "row", "col"):
        want = reference_jacobian(func, args, argnum, dims, vec=vec)
        D = op.to_dense(vec=vec)
        assert D.shape == want.shape
        torch.testing.assert_close(D, want, **TOL)
        J = jacobian(func, *args, argnums=argnum, in_dims=dims, vec=vec)
        torch.testing.assert_close(D, J, **TOL)


def test_jvp_vjp_match_dense_products(case) -> None:
    _, func, args, dims, argnum, _ = case
    op = structured_jacobian(func, *args, argnums=argnum, in_dims=dims)
    Jr = reference_jacobian(func, args, argnum, dims, vec="row")  # (B, o, i) or (o, i)
    lead = () if op.batch_size is None else (op.batch_size,)
    t = rnd(*lead, *op.in_shape, seed=40)
    c = rnd(*lead, *op.out_shape, seed=41)
    want_jvp = (Jr @ t.reshape(*lead, -1, 1)).reshape(*lead, *op.out_shape)
    want_vjp = (c.reshape(*lead, 1, -1) @ Jr).reshape(*lead, *op.in_shape)
    torch.testing.assert_close(op.jvp(t), want_jvp, **TOL)
    torch.testing.assert_close(op.vjp(c), want_vjp, **TOL)
    # the transpose's jvp is the vjp
    torch.testing.assert_close(op.T.jvp(c), want_vjp, **TOL)


def test_transpose_and_chain_rule_agree_with_dense_algebra(case) -> None:
    _, func, args, dims, argnum, _ = case
    op = structured_jacobian(func, *args, argnums=argnum, in_dims=dims)
    Jr = op.to_dense(vec="row")
    torch.testing.assert_close(op.T.to_dense(vec="row"), Jr.mT, **TOL)
    gram = op.T @ op  # (J^T J): the terms' chain rule
    assert isinstance(gram, JacobianOperator)
    torch.testing.assert_close(gram.to_dense(vec="row"), Jr.mT @ Jr, **TOL)
    X = rnd(op.in_numel, 2, seed=42)  # @ with a dense tensor (row-major vec)
    torch.testing.assert_close(op @ X, Jr @ X, **TOL)


def test_structure_is_compact(case) -> None:
    name, func, args, dims, argnum, compact = case
    op = structured_jacobian(func, *args, argnums=argnum, in_dims=dims)
    assert op.nbytes <= op.dense_nbytes
    if compact:
        assert op.nbytes < op.dense_nbytes / 4, (name, op)


def test_tanh_affine_is_diagonal_times_kronecker() -> None:
    """d tanh(A @ W + B) / dW holds the (B, m, q) derivative of tanh and A, not a dense tensor."""
    A, W, b = rnd(8, 16, 16, seed=50), rnd(8, 16, 16, seed=51), rnd(16, seed=52)
    op = structured_jacobian(affine_tanh, A, W, b, argnums=1, in_dims=(0, 0, None))
    assert isinstance(op, TermJacobian)
    (term,) = op.terms
    shapes = sorted(tuple(T.shape) for T, _ in term.factors)
    assert shapes == [(8, 16, 16), (8, 16, 16)]
    assert any(T.data_ptr() == A.data_ptr() for T, _ in term.factors)  # A itself, no copy
    assert op.nbytes == 2 * A.nbytes
    assert op.nbytes * (16 * 16 // 2) == op.dense_nbytes  # 2·B·m·p numbers for B·m·q·p·q
    assert "δ" in repr(op)


def test_mlp_first_weight_stays_factored() -> None:
    """A 2-layer MLP's per-sample Jacobian w.r.t. its first weight keeps x, tanh' and W2."""
    x, W1, W2 = rnd(16, 20, seed=53), rnd(20, 64, seed=54), rnd(64, 10, seed=55)
    op = structured_jacobian(mlp, x, W1, W2, argnums=1, in_dims=(0, None, None))
    (term,) = op.terms
    assert len(term.factors) >= 2
    assert op.nbytes < op.dense_nbytes / 50


def test_chain_of_traced_operators_stays_terms() -> None:
    """TermJacobian @ TermJacobian composes the terms (the chain rule), not a dense product."""
    A, W, b = rnd(Bn, m, p, seed=60), rnd(Bn, p, q, seed=61), rnd(q, seed=62)
    inner = structured_jacobian(lambda A, W, b: A @ W + b, A, W, b, argnums=1, in_dims=(0, 0, None))
    Z = A @ W + b
    outer = structured_jacobian(torch.tanh, Z)
    both = outer @ inner
    assert isinstance(both, TermJacobian)
    want = reference_jacobian(affine_tanh, (A, W, b), 1, (0, 0, None))
    torch.testing.assert_close(both.to_dense(), want, **TOL)


def test_tuple_argnums_and_untraceable_fallback() -> None:
    A, W, b = rnd(Bn, m, p, seed=63), rnd(Bn, p, q, seed=64), rnd(q, seed=65)
    dW, dA = structured_jacobian(affine_tanh, A, W, b, argnums=(1, 0), in_dims=(0, 0, None))
    torch.testing.assert_close(
        dW.to_dense(), reference_jacobian(affine_tanh, (A, W, b), 1, (0, 0, None)), **TOL
    )
    torch.testing.assert_close(
        dA.to_dense(), reference_jacobian(affine_tanh, (A, W, b), 0, (0, 0, None)), **TOL
    )
    # erfcx has no rule: held densely, still right
    f = lambda x: torch.special.erfcx(x).tanh()  # noqa: E731
    x = rnd(Bn, m, seed=66)
    op = structured_jacobian(f, x)
    assert isinstance(op, DenseJacobian)
    torch.testing.assert_close(op.to_dense(), reference_jacobian(f, (x,), 0, (0,)), **TOL)


def test_no_autograd_graph_and_default_dtype_float32() -> None:
    A = torch.randn(Bn, m, p, requires_grad=True)
    W, b = torch.randn(Bn, p, q), torch.randn(q)
    op = structured_jacobian(affine_tanh, A, W, b, argnums=1, in_dims=(0, 0, None))
    assert op.dtype == torch.float32
    assert not op.to_dense().requires_grad
    assert math.prod(op.shape) == Bn * m * q * p * q
    assert "structured_jacobian" in jacbatch.__all__


def _named_operators():
    from jacbatch.structured import (
        DiagonalJacobian,
        IdentityJacobian,
        KroneckerJacobian,
        PermuteJacobian,
        sum_jacobian,
    )

    A = rnd(Bn, m, p, seed=70)
    K = KroneckerJacobian(A, q, in_shape=(p, q), labels=("A", None))
    return [
        K,
        KroneckerJacobian(m, rnd(q, p, seed=71), out_shape=(m * q,), in_shape=(m, p)),
        DiagonalJacobian(rnd(Bn, m, q, seed=72), batched=True),
        IdentityJacobian((m, q), out_shape=(q * m,), dtype=F64),
        PermuteJacobian((m, q, 2), (2, 0, 1), dtype=F64),
        DenseJacobian(rnd(Bn, 3, m, q, seed=73), (3,), (m, q)),
        sum_jacobian((m, q), dtype=F64),
        DiagonalJacobian(rnd(Bn, m, q, seed=74), batched=True) @ K,  # composed
        K + KroneckerJacobian(rnd(Bn, m, p, seed=75), q),  # a sum
    ]


@pytest.mark.parametrize("k", range(9))
def test_named_operators_are_term_lists(k) -> None:
    """Every named operator is a list of terms with the same dense form."""
    op = _named_operators()[k]
    ts = op.to_terms()
    assert ts is not None
    view = TermJacobian(
        ts, op.out_shape, op.in_shape, batch_size=op.batch_size, dtype=op.dtype, device=op.device
    )
    torch.testing.assert_close(view.to_dense(), op.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(view.to_dense(vec="col"), op.to_dense(vec="col"), rtol=0, atol=0)


def test_traced_operator_composes_with_named_operators() -> None:
    """TermJacobian @ (named operator) and back: the terms' chain rule, equal to dense products."""
    from jacbatch.structured import DiagonalJacobian, KroneckerJacobian

    A, W, b = rnd(Bn, m, p, seed=80), rnd(Bn, p, q, seed=81), rnd(q, seed=82)
    T = structured_jacobian(affine_tanh, A, W, b, argnums=1, in_dims=(0, 0, None))  # (m,q) <- (p,q)
    K = KroneckerJacobian(rnd(Bn, p, m, seed=83), q)  # (p, q) <- (m, q)
    D = DiagonalJacobian(rnd(Bn, m, q, seed=84), batched=True)
    for outer, inner in ((T, K), (D, T), (K, T)):
        both = outer @ inner
        assert isinstance(both, TermJacobian), both
        want = outer.to_dense(vec="row") @ inner.to_dense(vec="row")
        torch.testing.assert_close(both.to_dense(vec="row"), want, **TOL)


@pytest.mark.parametrize("search", ["opt_einsum", "greedy"])
def test_contraction_order_with_and_without_opt_einsum(
    search: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contractions of several factors agree with the reference whichever order is used: opt_einsum's
    path search, or the greedy order used when opt_einsum is not installed."""
    from jacbatch.rules import terms

    if search == "greedy":
        monkeypatch.setitem(sys.modules, "opt_einsum", None)  # import fails: greedy order
    else:
        pytest.importorskip("opt_einsum")
    used = []
    real = terms._greedy_path
    monkeypatch.setattr(terms, "_greedy_path", lambda *a: used.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    S = torch.randn(5, 4, 6, generator=g, dtype=torch.float64)
    A = torch.randn(5, 4, 7, generator=g, dtype=torch.float64)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    # s·A·x: three factors sharing summed letters, the case where the order matters
    got = terms.contract([(S, (1, 2)), (A, (1, 3)), (x, (3,))], [1, 2])
    want = torch.einsum("bij,bik,bk->bij", S, A, x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert bool(used) == (search == "greedy")
