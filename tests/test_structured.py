"""Structured Jacobians (jacbatch.structured_jacobian, jacbatch.structured) against independent
float64 references: per-sample ``torch.autograd.functional.jacobian`` loops and explicit dense
products written here."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jacbatch
from jacbatch import affine, chain, jacobian, structured_jacobian
from jacbatch.structured import (
    ComposedJacobian,
    DenseJacobian,
    DiagonalJacobian,
    IdentityJacobian,
    JacobianOperator,
    KroneckerJacobian,
    PermuteJacobian,
    SumJacobian,
    compose,
    sum_jacobian,
)
from jacbatch.testing import tolerance
from tests.conftest import DEVICES, reference_jacobian

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Helpers (the reference Jacobian is the shared tests/_reference.py)
# ---------------------------------------------------------------------------------------------


def dense_flat(op_dense, batched, out_ndim, in_ndim):
    """Natural dense Jacobian -> (B, o, i) with a batch of 1 for unbatched."""
    J = op_dense if batched else op_dense.unsqueeze(0)
    return J.reshape(J.shape[0], math.prod(J.shape[1 : 1 + out_ndim]), -1)


def plain_affine(A, W, B):
    return A @ W + B


# Sharing patterns: in_dims for (A, W, B); the batch sits at in_dims[i] of each batched argument.
SHARING = {
    "all-batched": (0, 0, 0),
    "A-shared": (None, 0, 0),
    "W,B-shared": (0, None, None),
    "no-batch": None,
    "A-batch-dim-1": (1, 0, None),
}


def make_args(sharing, bias2d, *, Bn=3, m=2, p=3, q=4, dtype=F64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = SHARING[sharing]
    per = [(m, p), (p, q), (m, q) if bias2d else (q,)]
    args = []
    for i, shape in enumerate(per):
        d = None if dims is None else dims[i]
        full = list(shape)
        if d is not None:
            full.insert(d, Bn)
        args.append(torch.randn(*full, generator=g, dtype=F64).to(dtype=dtype, device=device))
    return args, dims


# ---------------------------------------------------------------------------------------------
# to_dense, jvp, vjp, T against the references
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vec", [None, "row", "col"], ids=["natural", "row", "col"])
@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["dA", "dW", "dB"])
@pytest.mark.parametrize("bias2d", [False, True], ids=["B(q)", "B(m,q)"])
@pytest.mark.parametrize("sharing", list(SHARING))
def test_to_dense_equals_closed_form_and_reference(sharing, bias2d, argnum, vec):
    args, dims = make_args(sharing, bias2d)
    before = [a.clone() for a in args]
    op = structured_jacobian(affine, *args, argnums=argnum, in_dims=dims)
    assert isinstance(op, JacobianOperator)
    dense = op.to_dense(vec=vec)
    closed = jacobian(affine, *args, argnums=argnum, in_dims=dims, method="closed_form", vec=vec)
    assert dense.shape == closed.shape
    assert torch.equal(dense, closed)
    ref = reference_jacobian(plain_affine, args, argnum, dims, vec=vec)
    torch.testing.assert_close(dense, ref, rtol=0, atol=1e-12)
    assert op.shape == tuple(reference_jacobian(plain_affine, args, argnum, dims).shape)
    assert dense.is_contiguous() and dense.grad_fn is None
    for a, b in zip(args, before, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["dA", "dW", "dB"])
@pytest.mark.parametrize("bias2d", [False, True], ids=["B(q)", "B(m,q)"])
@pytest.mark.parametrize("sharing", list(SHARING))
def test_jvp_vjp_transpose_equal_dense_products(sharing, bias2d, argnum, device):
    args, dims = make_args(sharing, bias2d, device=device)
    op = structured_jacobian(affine, *args, argnums=argnum, in_dims=dims)
    batched = dims is not None
    ref = reference_jacobian(plain_affine, [a.cpu() for a in args], argnum, dims)
    in_shape = tuple(ref.shape[(3 if batched else 2) :])
    out_shape = tuple(ref.shape[(1 if batched else 0) : (3 if batched else 2)])
    Jf = dense_flat(ref, batched, 2, len(in_shape))  # (B|1, o, i)
    Bn = Jf.shape[0]
    g = torch.Generator().manual_seed(1)

    # batched tangent / cotangent (a stack of N for an operator without a batch)
    t = torch.randn(Bn, *in_shape, generator=g, dtype=F64)
    c = torch.randn(Bn, *out_shape, generator=g, dtype=F64)
    want_jvp = torch.einsum("boi,bi->bo", Jf, t.reshape(Bn, -1)).reshape(Bn, *out_shape)
    want_vjp = torch.einsum("boi,bo->bi", Jf, c.reshape(Bn, -1)).reshape(Bn, *in_shape)
    if not batched:  # one shared Jacobian applied to a stack of vectors
        want_jvp = (t.reshape(Bn, -1) @ Jf[0].T).reshape(Bn, *out_shape)
        want_vjp = (c.reshape(Bn, -1) @ Jf[0]).reshape(Bn, *in_shape)
    got_jvp, got_vjp = op.jvp(t.to(device)), op.vjp(c.to(device))
    torch.testing.assert_close(got_jvp.cpu(), want_jvp, rtol=0, atol=1e-12)
    torch.testing.assert_close(got_vjp.cpu(), want_vjp, rtol=0, atol=1e-12)

    # one vector shared by the whole batch
    t1, c1 = t[0], c[0]
    want_jvp1 = torch.einsum("boi,i->bo", Jf, t1.reshape(-1)).reshape(Bn, *out_shape)
    want_vjp1 = torch.einsum("boi,o->bi", Jf, c1.reshape(-1)).reshape(Bn, *in_shape)
    if not batched:
        want_jvp1, want_vjp1 = want_jvp1[0], want_vjp1[0]
    torch.testing.assert_close(op.jvp(t1.to(device)).cpu(), want_jvp1, rtol=0, atol=1e-12)
    torch.testing.assert_close(op.vjp(c1.to(device)).cpu(), want_vjp1, rtol=0, atol=1e-12)

    # transpose: dense transpose, jvp of T is vjp, T.T is the operator
    T = op.T
    assert T.shape == (*ref.shape[: (1 if batched else 0)], *in_shape, *out_shape)
    Tf = T.to_dense(vec="row").cpu()
    torch.testing.assert_close(Tf, Jf.mT if batched else Jf[0].T, rtol=0, atol=1e-12)
    torch.testing.assert_close(T.jvp(c.to(device)), got_vjp, rtol=0, atol=1e-12)
    assert torch.equal(T.T.to_dense(), op.to_dense())


# ---------------------------------------------------------------------------------------------
# Composition: structured where the algebra allows, always equal to the dense product
# ---------------------------------------------------------------------------------------------


def dense_product(outer, inner):
    """Dense product of the dense factors, batches broadcast: (B|1, o, i)."""
    O = outer.to_dense(vec="row")
    I_ = inner.to_dense(vec="row")
    return torch.matmul(O, I_)


def check_composition(outer, inner, want_type):
    J = outer @ inner
    assert isinstance(J, want_type), type(J)
    want = dense_product(outer, inner)
    got = J.to_dense(vec="row")
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # jvp / vjp through the composition equal the dense products
    g = torch.Generator().manual_seed(2)
    lead = () if J.batch_size is None else (J.batch_size,)
    t = torch.randn(*lead, *J.in_shape, generator=g, dtype=J.dtype)
    c = torch.randn(*lead, *J.out_shape, generator=g, dtype=J.dtype)
    Wf = want if lead else want.unsqueeze(0)
    tf = t.reshape(1 if not lead else lead[0], -1)
    cf = c.reshape(1 if not lead else lead[0], -1)
    torch.testing.assert_close(
        J.jvp(t).reshape(tf.shape[0], -1), torch.einsum("boi,bi->bo", Wf, tf), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        J.vjp(c).reshape(cf.shape[0], -1), torch.einsum("boi,bo->bi", Wf, cf), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(J.T.to_dense(vec="row"), want.mT, rtol=0, atol=1e-12)
    return J


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_kronecker_at_kronecker_stays_kronecker_and_matches_reference():
    # Z = A2 @ (X @ W): d/dX = (A2 ⊗ I_q)(I_m ⊗ Wᵀ) = A2 ⊗ Wᵀ
    Bn, m, p, q, r = 3, 2, 3, 4, 5
    A2, X, W = randn(Bn, r, m, seed=1), randn(Bn, m, p, seed=2), randn(p, q, seed=3)
    inner = structured_jacobian(affine, X, W, torch.zeros(q, dtype=F64), in_dims=(0, None, None))
    outer = structured_jacobian(
        affine, A2, X @ W, torch.zeros(q, dtype=F64), argnums=1, in_dims=(0, 0, None)
    )
    J = check_composition(outer, inner, KroneckerJacobian)
    assert "A·R" not in repr(J) and "Wᵀ" in repr(J)
    ref = reference_jacobian(lambda X_, A_: A_ @ X_ @ W, [X, A2], 0, (0, 0))
    torch.testing.assert_close(J.to_dense(), ref, rtol=0, atol=1e-12)
    assert J.nbytes <= (A2.numel() + W.numel()) * 8


def test_shared_at_batched_broadcasts():
    Bn, m, p, q = 4, 2, 3, 2
    A_shared, A_batched = randn(m, m, seed=4), randn(Bn, m, p, seed=5)
    outer = KroneckerJacobian(A_shared, q)  # no batch
    inner = KroneckerJacobian(A_batched, q)  # batch 4
    J = check_composition(outer, inner, KroneckerJacobian)
    assert J.batch_size == Bn
    # the other way round: batched outer with a shared inner
    outer_b = KroneckerJacobian(randn(Bn, p, m, seed=6), q)
    J2 = check_composition(outer_b, KroneckerJacobian(randn(m, p, seed=7), q), KroneckerJacobian)
    assert J2.batch_size == Bn
    # shared factors with a batch size: held once, dense repeated per sample
    shared_b = KroneckerJacobian(A_shared, q, batch_size=Bn)
    assert shared_b.nbytes == A_shared.numel() * 8
    D = shared_b.to_dense()
    assert D.shape == (Bn, m, q, m, q) and all(torch.equal(D[0], D[b]) for b in range(Bn))


def test_diagonal_compositions():
    # tanh(A @ W + b) w.r.t. W: diag(1 - tanh²) @ (A ⊗ I)
    Bn, m, p, q = 3, 2, 3, 4
    A, W, b = randn(Bn, m, p, seed=8), randn(Bn, p, q, seed=9), randn(q, seed=10)
    Z = A @ W + b
    D = DiagonalJacobian(1 - torch.tanh(Z) ** 2, batched=True)
    K = structured_jacobian(affine, A, W, b, argnums=1, in_dims=(0, 0, None))
    J = check_composition(D, K, ComposedJacobian)
    ref = reference_jacobian(lambda A_, W_: torch.tanh(A_ @ W_ + b), [A, W], 1, 0)
    torch.testing.assert_close(J.to_dense(), ref, rtol=0, atol=1e-12)
    assert J.nbytes == D.nbytes + K.nbytes
    assert "Diagonal[" in repr(J) and "Kronecker[" in repr(J)
    # Kronecker @ diagonal, diagonal @ diagonal, shared diagonal
    D_in = DiagonalJacobian(randn(p, q, seed=11), batch_size=Bn)
    check_composition(K, D_in, ComposedJacobian)
    D2 = DiagonalJacobian(randn(m, q, seed=12))
    check_composition(D, D2, DiagonalJacobian)


def test_identity_dense_sum_and_mismatched_splits():
    Bn, m, p, q = 2, 2, 3, 4
    A, W = randn(Bn, m, p, seed=13), randn(Bn, p, q, seed=14)
    bias = randn(Bn, m, q, seed=15)
    K = structured_jacobian(affine, A, W, bias, argnums=1)
    Id = structured_jacobian(affine, A, W, bias, argnums=2)
    assert isinstance(Id, IdentityJacobian) and Id.nbytes == 0
    assert check_composition(Id, K, KroneckerJacobian).nbytes == K.nbytes
    check_composition(K.T, Id, KroneckerJacobian)
    # dense outer absorbs a structured inner when that is no larger: (5, m*q) @ (A ⊗ I)
    G = DenseJacobian(randn(Bn, 5, m, q, seed=16), (5,), (m, q))
    check_composition(G, Id, DenseJacobian)
    check_composition(G, K, ComposedJacobian)  # 12 inputs > 8 outputs: stays lazy
    check_composition(K, DenseJacobian(randn(p, q, 7, seed=17), (p, q), (7,)), DenseJacobian)
    check_composition(K.T, DenseJacobian(randn(m, q, 7, seed=17), (m, q), (7,)), ComposedJacobian)
    # Kronecker factors that split the shared space differently: composed, not fused
    outer = KroneckerJacobian(randn(2, 4, seed=18), randn(3, 2, seed=19), in_shape=(8,))
    inner = KroneckerJacobian(randn(2, 3, seed=20), randn(4, 5, seed=21), out_shape=(8,))
    check_composition(outer, inner, ComposedJacobian)
    # sums (a variable used twice), and a sum inside a composition
    S = K + KroneckerJacobian(randn(m, p, seed=22), q, batch_size=Bn)
    assert isinstance(S, SumJacobian)
    torch.testing.assert_close(
        S.to_dense(),
        K.to_dense() + KroneckerJacobian(randn(m, p, seed=22), q).to_dense(),
        rtol=0,
        atol=1e-12,
    )
    check_composition(DiagonalJacobian(randn(Bn, m, q, seed=23), batched=True), S, ComposedJacobian)
    # three factors, merged where possible: D @ (K1 @ K2) keeps K1 @ K2 as one Kronecker
    K1 = KroneckerJacobian(randn(Bn, m, m, seed=24), q)
    J3 = DiagonalJacobian(randn(Bn, m, q, seed=25), batched=True) @ (K1 @ K)
    assert isinstance(J3, ComposedJacobian) and len(J3.factors) == 2
    J3b = (DiagonalJacobian(randn(Bn, m, q, seed=25), batched=True) @ K1) @ K
    assert isinstance(J3b, ComposedJacobian) and len(J3b.factors) == 2
    torch.testing.assert_close(J3.to_dense(), J3b.to_dense(), rtol=0, atol=1e-12)


def test_permute_and_reshape_operators():
    Bn, m, p, q = 2, 2, 3, 4
    A, W, b = randn(Bn, m, p, seed=50), randn(Bn, p, q, seed=51), randn(q, seed=52)
    K = structured_jacobian(affine, A, W, b, argnums=1, in_dims=(0, 0, None))
    P = PermuteJacobian((m, q), (1, 0), dtype=F64)  # d Zᵀ / dZ
    torch.testing.assert_close(
        P.to_dense(vec="row"), jacbatch.commutation_matrix(m, q, dtype=F64), rtol=0, atol=0
    )
    assert P.nbytes == 0 and isinstance(P @ P.T, IdentityJacobian)
    assert isinstance(P @ PermuteJacobian((q, m), (1, 0), dtype=F64), IdentityJacobian)
    R = IdentityJacobian((q, m), out_shape=(q * m,), dtype=F64)  # d x.reshape(-1) / dx
    assert R.T.out_shape == (q, m) and torch.equal(R.to_dense(vec="row"), torch.eye(8, dtype=F64))
    J = check_composition(P, K, ComposedJacobian)
    ref = reference_jacobian(lambda W_, A_: (A_ @ W_ + b).T, [W, A], 0, (0, 0))
    torch.testing.assert_close(J.to_dense(), ref, rtol=0, atol=1e-12)
    # a reshape next to a Kronecker or dense operator is absorbed into its shapes
    RK = check_composition(
        IdentityJacobian((m, q), out_shape=(m * q,), dtype=F64), K, KroneckerJacobian
    )
    assert RK.out_shape == (m * q,) and RK.nbytes == K.nbytes
    check_composition(K, IdentityJacobian((p * q,), out_shape=(p, q), dtype=F64), KroneckerJacobian)
    check_composition(R, DenseJacobian(randn(Bn, q, m, 5, seed=53), (q, m), (5,)), DenseJacobian)
    with pytest.raises(ValueError, match=r"PermuteJacobian: expected dims to be a permutation"):
        PermuteJacobian((2, 3), (0, 0))
    with pytest.raises(ValueError, match=r"IdentityJacobian: expected out_shape with 6"):
        IdentityJacobian((2, 3), out_shape=(5,))


def test_mixed_chain_of_structured_and_dense_factors():
    # h(W) = softmax(vec(tanh(A @ W + b)ᵀ)): Kronecker, diagonal, permutation, reshape, and a
    # dense factor (softmax's Jacobian from jacrev), composed by the chain rule
    Bn, m, p, q = 3, 2, 3, 4
    A, W, b = randn(Bn, m, p, seed=54), randn(Bn, p, q, seed=55), randn(q, seed=56)
    Z = A @ W + b
    Y = torch.tanh(Z)
    K = structured_jacobian(affine, A, W, b, argnums=1, in_dims=(0, 0, None))
    D = DiagonalJacobian(1 - Y**2, batched=True)
    P = PermuteJacobian((m, q), (1, 0), dtype=F64)
    R = IdentityJacobian((q, m), out_shape=(q * m,), dtype=F64)
    flat = Y.mT.reshape(Bn, -1)
    S = DenseJacobian(jacobian(lambda v: torch.softmax(v, -1), flat, method="jacrev"), (8,), (8,))
    J = S @ R @ P @ D @ K
    assert isinstance(J, ComposedJacobian)
    ref = reference_jacobian(
        lambda W_, A_: torch.softmax((torch.tanh(A_ @ W_ + b)).T.reshape(-1), -1), [W, A], 0, (0, 0)
    )
    torch.testing.assert_close(J.to_dense(), ref, rtol=0, atol=1e-12)
    t, c = randn(Bn, p, q, seed=57), randn(Bn, 8, seed=58)
    Rf = ref.reshape(Bn, 8, p * q)
    torch.testing.assert_close(
        J.jvp(t).reshape(Bn, -1),
        torch.einsum("boi,bi->bo", Rf, t.reshape(Bn, -1)),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        J.vjp(c).reshape(Bn, -1), torch.einsum("boi,bo->bi", Rf, c), rtol=0, atol=1e-12
    )
    assert J.nbytes < J.dense_nbytes


# ---------------------------------------------------------------------------------------------
# @ with dense tensors, and jacbatch.chain
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batched_op", [True, False], ids=["batched-op", "unbatched-op"])
def test_matmul_with_dense_tensors(batched_op):
    Bn, m, p, q = 3, 2, 3, 4
    A = randn(Bn, m, p, seed=26) if batched_op else randn(m, p, seed=26)
    op = KroneckerJacobian(A, q)
    Jf = op.to_dense(vec="row")  # ([B,] 8, 12)
    o, i = m * q, p * q
    for X in (randn(i, seed=27), randn(i, 5, seed=28), randn(Bn, i, 5, seed=29)):
        torch.testing.assert_close(op @ X, Jf @ X, rtol=0, atol=1e-12)
    for Y in (randn(o, seed=30), randn(5, o, seed=31), randn(Bn, 5, o, seed=32)):
        want = Y @ Jf
        torch.testing.assert_close(Y @ op, want, rtol=0, atol=1e-12)


def test_chain_article_example_structured():
    A = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    W = torch.randn(3, 2)
    B = torch.tensor([13.0, 14])
    dZ_dW = structured_jacobian(affine, A, W, B, argnums=1, in_dims=None)
    want = torch.tensor([[5.0, 5], [7, 7], [9, 9]])
    # dense dS/dZ (a row of ones) times the structured dZ/dW
    assert torch.equal(chain(torch.ones(4), dZ_dW).reshape(3, 2), want)
    # fully structured: S = sum(Z) has the Jacobian 1ᵀ ⊗ 1ᵀ, the product stays Kronecker
    dS_dW = chain(sum_jacobian((2, 2)), dZ_dW)
    assert isinstance(dS_dW, KroneckerJacobian)
    assert torch.equal(dS_dW.to_dense(), want)
    assert torch.equal(dZ_dW.vjp(torch.ones(2, 2)), want)
    # the dense chain gives the same
    dense = jacobian(affine, A, W, B, argnums=1, in_dims=None, vec="row")
    assert torch.equal(chain(torch.ones(4), dense).reshape(3, 2), want)


def test_chain_mixed_operands_batched():
    Bn, m, p, q = 3, 2, 3, 4
    A, W, b = randn(Bn, m, p, seed=33), randn(Bn, p, q, seed=34), randn(q, seed=35)
    op = structured_jacobian(affine, A, W, b, argnums=1, in_dims=(0, 0, None))
    dense = jacobian(affine, A, W, b, argnums=1, in_dims=(0, 0, None), vec="row")
    outer = randn(Bn, 5, m * q, seed=36)
    torch.testing.assert_close(chain(outer, op), chain(outer, dense), rtol=0, atol=1e-12)
    inner = randn(Bn, p * q, 6, seed=37)
    opT = op.T
    torch.testing.assert_close(
        chain(opT, randn(Bn, m * q, 6, seed=38)),
        dense.mT @ randn(Bn, m * q, 6, seed=38),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(chain(op, inner), dense @ inner, rtol=0, atol=1e-12)
    assert isinstance(chain(op.T, op), JacobianOperator)


# ---------------------------------------------------------------------------------------------
# Memory, repr, tuple argnums, no autograd
# ---------------------------------------------------------------------------------------------


def test_repr_and_nbytes_at_issue_size():
    A = torch.zeros(8, 64, 64)
    op = structured_jacobian(affine, A, torch.zeros(8, 64, 64), torch.zeros(8, 64), argnums=1)
    assert repr(op) == (
        "KroneckerJacobian(batch=8, A: (64, 64) ⊗ I_64, dense (8, 64, 64, 64, 64), "
        "128 KiB vs 512 MiB)"
    )
    assert op.nbytes == A.numel() * 4 and op.dense_nbytes == 8 * 64**4 * 4


def test_large_operator_is_never_materialized():
    # dense would be 256**4 * 8 bytes = 32 GiB, more than this machine has; the operator holds A
    Bn, n = 1, 256
    A, W, b = randn(Bn, n, n, seed=39), randn(Bn, n, n, seed=40), randn(Bn, n, seed=41)
    dW, dA = structured_jacobian(affine, A, W, b, argnums=(1, 0))
    assert dW.nbytes == A.numel() * 8 and dA.nbytes == W.numel() * 8
    assert dW.dense_nbytes == Bn * n**4 * 8
    T, C = randn(Bn, n, n, seed=42), randn(Bn, n, n, seed=43)
    torch.testing.assert_close(dW.jvp(T), A @ T, rtol=1e-12, atol=1e-12)  # d(AW) = A dW
    torch.testing.assert_close(dW.vjp(C), A.mT @ C, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dA.jvp(T), T @ W, rtol=1e-12, atol=1e-12)  # d(AW) = dA W
    torch.testing.assert_close(dA.vjp(C), C @ W.mT, rtol=1e-12, atol=1e-12)


def test_tuple_argnums_and_requires_grad_inputs():
    args, dims = make_args("all-batched", False)
    args = [a.requires_grad_() for a in args]
    ops = structured_jacobian(affine, *args, argnums=(2, 0), in_dims=dims)
    assert isinstance(ops, tuple) and len(ops) == 2
    dense = jacobian(affine, *args, argnums=(2, 0), in_dims=dims, method="closed_form")
    for op, D in zip(ops, dense, strict=True):
        assert torch.equal(op.to_dense(), D)
        assert op.to_dense().grad_fn is None
        assert op.jvp(torch.ones(op.in_shape, dtype=F64)).grad_fn is None
    assert "structured_jacobian" in jacbatch.__all__


def test_no_autodiff_and_no_dense_work(monkeypatch):
    """The structured route calls no autograd and never builds an (o, i) matrix for jvp/vjp."""

    def forbidden(*args, **kwargs):
        raise AssertionError("autodiff called")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.func, "vjp", forbidden)
    monkeypatch.setattr(torch.func, "jvp", forbidden)
    args, dims = make_args("all-batched", False)
    ops = structured_jacobian(affine, *args, argnums=(0, 1, 2), in_dims=dims)
    for op in ops:
        lead = (op.batch_size,)
        op.jvp(torch.ones(*lead, *op.in_shape, dtype=F64))
        op.vjp(torch.ones(*lead, *op.out_shape, dtype=F64))
        op.to_dense(vec="col")
    assert sum(op.nbytes for op in ops) <= sum(a.numel() * 8 for a in args)


def test_float32_within_tolerance():
    args, dims = make_args("all-batched", False, dtype=torch.float32)
    op = structured_jacobian(affine, *args, argnums=0, in_dims=dims)
    rtol, atol = tolerance(torch.float32)
    ref = reference_jacobian(plain_affine, args, 0, dims)
    torch.testing.assert_close(op.to_dense().double(), ref, rtol=rtol, atol=atol)
    assert op.dtype == torch.float32 and op.device == torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_bad_operands_raise_clear_errors():
    Bn, m, p, q = 3, 2, 3, 4
    A, W, b = randn(Bn, m, p, seed=44), randn(Bn, p, q, seed=45), randn(q, seed=46)
    op = structured_jacobian(affine, A, W, b, argnums=1, in_dims=(0, 0, None))  # in (3, 4)
    with pytest.raises(ValueError, match=r"KroneckerJacobian.jvp: expected tangent shaped like"):
        op.jvp(randn(Bn, q, p))
    with pytest.raises(ValueError, match=r"expected tangent with batch size 3"):
        op.jvp(randn(5, p, q))
    with pytest.raises(ValueError, match=r"KroneckerJacobian.vjp: expected cotangent shaped"):
        op.vjp(randn(Bn, p, q))
    with pytest.raises(ValueError, match=r"expected cotangent with batch size 3"):
        op.vjp(randn(2, m, q))
    with pytest.raises(TypeError, match=r"expected tangent of dtype torch.float64"):
        op.jvp(torch.ones(p, q))
    with pytest.raises(TypeError, match=r"expected tangent to be a torch.Tensor"):
        op.jvp([[1.0]])
    # composition: shapes, then batches
    with pytest.raises(ValueError, match=r"compose: expected the outer Jacobian's input shape"):
        op @ op
    other = KroneckerJacobian(randn(5, p, m, seed=47), q)
    with pytest.raises(ValueError, match=r"compose: expected equal batch sizes, got batch 5"):
        other @ op
    with pytest.raises(TypeError, match=r"compose: expected inner of dtype"):
        KroneckerJacobian(randn(p, m).float(), q) @ op
    # dense operands of @ and chain
    with pytest.raises(ValueError, match=r"with i = 12 \(the operator's in_numel\)"):
        op @ randn(11, 2)
    with pytest.raises(ValueError, match=r"expected a dense operand with batch size 3"):
        op @ randn(2, 12, 2)
    with pytest.raises(ValueError, match=r"with o = 8 \(the operator's out_numel\)"):
        randn(2, 9) @ op
    with pytest.raises(ValueError, match=r"chain: expected inner of shape"):
        chain(op, randn(12))
    with pytest.raises(ValueError, match=r"SumJacobian: expected Jacobians with the same"):
        op + op.T
    with pytest.raises(ValueError, match=r"to_dense: expected vec to be one of"):
        op.to_dense(vec="fortran")
    # construction
    with pytest.raises(ValueError, match=r"KroneckerJacobian: expected left to be a matrix"):
        KroneckerJacobian(randn(2), 3)
    with pytest.raises(ValueError, match=r"KroneckerJacobian: expected in_shape with 6"):
        KroneckerJacobian(randn(2, 3), 2, in_shape=(7,))
    with pytest.raises(ValueError, match=r"KroneckerJacobian: expected right with batch size 3"):
        KroneckerJacobian(randn(3, 2, 2), randn(4, 2, 2))
    with pytest.raises(ValueError, match=r"DenseJacobian: expected jacobian of shape"):
        DenseJacobian(randn(2, 3), (3,), (3,))
    with pytest.raises(TypeError, match=r"compose: expected inner to be a JacobianOperator"):
        compose(op, randn(3))


def test_structured_jacobian_validation():
    # any traced function has a structured Jacobian now (it used to be affine only)
    x = randn(3)
    op = structured_jacobian(torch.sin, x, in_dims=None)
    assert op.nbytes == x.nbytes  # the diagonal cos(x)
    torch.testing.assert_close(op.to_dense(), torch.diag(torch.cos(x)), rtol=0, atol=0)
    A, W = randn(2, 3), randn(4, 2)
    with pytest.raises(ValueError, match=r"affine: expected A \(m, p\) and W \(p, q\)"):
        structured_jacobian(affine, A, W, randn(2), argnums=1, in_dims=None)
    with pytest.raises(ValueError, match=r"structured_jacobian: expected one batch size"):
        structured_jacobian(affine, randn(2, 2, 3), randn(3, 3, 2), randn(2), in_dims=(0, 0, None))


# ---------------------------------------------------------------------------------------------
# Property test: random shapes and sharing
# ---------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 4),
    p=st.integers(1, 4),
    q=st.integers(1, 4),
    Bn=st.integers(1, 3),
    shared=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    bias2d=st.booleans(),
    argnum=st.integers(0, 2),
    vec=st.sampled_from([None, "row", "col"]),
)
def test_property_random_shapes(m, p, q, Bn, shared, bias2d, argnum, vec):
    g = torch.Generator().manual_seed(m * 100 + p * 10 + q)
    shapes = [(m, p), (p, q), (m, q) if bias2d else (q,)]
    args = [
        torch.randn(*(s if sh else (Bn, *s)), generator=g, dtype=F64)
        for s, sh in zip(shapes, shared, strict=True)
    ]
    dims = tuple(None if sh else 0 for sh in shared)
    op = structured_jacobian(affine, *args, argnums=argnum, in_dims=dims)
    batched = not all(shared)
    ref = reference_jacobian(plain_affine, args, argnum, dims)
    in_ndim = ref.ndim - (1 if batched else 0) - 2
    torch.testing.assert_close(
        op.to_dense(vec=vec),
        reference_jacobian(plain_affine, args, argnum, dims, vec=vec),
        rtol=0,
        atol=1e-12,
    )
    Jf = dense_flat(ref, batched, 2, in_ndim)
    lead = (Bn,) if batched else ()
    t = torch.randn(*lead, *op.in_shape, generator=g, dtype=F64)
    c = torch.randn(*lead, *op.out_shape, generator=g, dtype=F64)
    n = Bn if batched else 1
    torch.testing.assert_close(
        op.jvp(t).reshape(n, -1),
        torch.einsum("boi,bi->bo", Jf, t.reshape(n, -1)),
        rtol=0,
        atol=1e-12,
    )
    torch.testing.assert_close(
        op.vjp(c).reshape(n, -1),
        torch.einsum("boi,bo->bi", Jf, c.reshape(n, -1)),
        rtol=0,
        atol=1e-12,
    )
    # composing with its transpose equals the dense Gram matrix J Jᵀ
    G = (op @ op.T).to_dense(vec="row")
    torch.testing.assert_close(G.reshape(n, *G.shape[-2:]), Jf @ Jf.mT, rtol=0, atol=1e-12)
