"""The affine closed forms against the shared per-sample autograd reference (of plain
``A @ W + B``, nothing of jacbatch), in both vec orders, for batched and shared arguments,
through both kernel formulations (narrow and wide inner factor): ``jacbatch.affine`` (its
registered terms) and the same code traced (``A @ W + B`` as a lambda), both written by the one
writer (:mod:`jacbatch.rules.write`).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jacbatch import affine, jacobian
from tests.conftest import reference_jacobian

F64 = torch.float64


def make(b, m, p, q, shared, bias_full=False, dtype=F64):
    g = torch.Generator().manual_seed(b * 1000 + m * 100 + p * 10 + q)
    A = torch.randn(b, m, p, generator=g, dtype=dtype)
    W = torch.randn(b, p, q, generator=g, dtype=dtype)
    Bb = torch.randn(b, *((m, q) if bias_full else (q,)), generator=g, dtype=dtype)
    args, dims = [A, W, Bb], [0, 0, 0]
    if shared is not None:
        args[shared], dims[shared] = args[shared][0], None
    return args, tuple(dims)


# q = 4 / 5 takes the narrow formulation for dZ/dW (row), q = 20 the broadcast one; m and p
# likewise select them for the other Kronecker factors.
SHAPES = [(3, 2, 3, 4), (5, 3, 2, 20), (1, 4, 5, 2), (4, 17, 3, 5), (2, 16, 17, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}m{}p{}q{}".format(*s))
@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["dA", "dW", "dB"])
@pytest.mark.parametrize("vec", [None, "row", "col"], ids=["natural", "row", "col"])
@pytest.mark.parametrize("shared", [None, 0, 1], ids=["all-batched", "A-shared", "W-shared"])
def test_closed_form_matches_reference(shape, argnum, vec, shared):
    args, dims = make(*shape, shared)
    want = reference_jacobian(_plain, args, argnum, dims, vec=vec)
    J = jacobian(affine, *args, argnums=argnum, in_dims=dims, method="closed_form", vec=vec)
    torch.testing.assert_close(J, want, rtol=0, atol=0)
    Jt = jacobian(_plain, *args, argnums=argnum, in_dims=dims, method="closed_form", vec=vec)
    torch.testing.assert_close(Jt, want, rtol=0, atol=0)


def _plain(A, W, B):
    """``affine`` as plain code: the traced closed form."""
    return A @ W + B


@pytest.mark.parametrize("vec", ["row", "col"])
def test_full_bias_is_identity(vec):
    args, dims = make(3, 4, 2, 3, None, bias_full=True)
    for f in (affine, _plain):
        J = jacobian(f, *args, argnums=2, in_dims=dims, method="closed_form", vec=vec)
        torch.testing.assert_close(
            J, reference_jacobian(_plain, args, 2, dims, vec=vec), rtol=0, atol=0
        )


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 5),
    m=st.integers(1, 6),
    p=st.integers(1, 6),
    q=st.sampled_from([1, 3, 8, 16, 17]),
    argnum=st.sampled_from([0, 1]),
    vec=st.sampled_from([None, "row", "col"]),
    shared=st.sampled_from([None, 0, 1]),
)
def test_closed_form_property(b, m, p, q, argnum, vec, shared):
    args, dims = make(b, m, p, q, shared)
    J = jacobian(affine, *args, argnums=argnum, in_dims=dims, method="closed_form", vec=vec)
    torch.testing.assert_close(
        J, reference_jacobian(_plain, args, argnum, dims, vec=vec), rtol=0, atol=0
    )


@pytest.mark.parametrize("func", [affine, _plain], ids=["affine", "traced"])
@pytest.mark.parametrize("vec", [None, "row", "col"])
@pytest.mark.parametrize("argnum", [0, 1])
def test_kronecker_jacobians_take_the_writer_fast_path(monkeypatch, func, vec, argnum):
    """dZ/dW and dZ/dA are written by the writer's batched Kronecker product (one write of the
    output, NOTE [Writing a batched Kronecker product at the memory-write limit]), in every
    layout, for the registered and the traced affine alike."""
    import jacbatch.rules.write as R

    calls = []
    real = R.kron

    def spy(X, Y, b, out):
        calls.append((tuple(X.shape), tuple(Y.shape)))
        return real(X, Y, b, out)

    monkeypatch.setattr(R, "kron", spy)
    args, dims = make(4, 3, 5, 6, None)
    J = jacobian(func, *args, argnums=argnum, in_dims=dims, method="closed_form", vec=vec)
    torch.testing.assert_close(
        J, reference_jacobian(_plain, args, argnum, dims, vec=vec), rtol=0, atol=0
    )
    assert len(calls) == 1
    # the factors handed over are A (or Wᵀ) and an identity: nothing of the output's size
    assert max(math.prod(s) for s in calls[0]) <= 4 * 6 * 5


def test_narrow_path_bounds_temporaries(monkeypatch):
    """The narrow formulation builds its repeated factor per batch chunk, never for the whole batch."""
    import jacbatch.rules.write as R

    sizes = []
    real = R._repeat_flat

    def spy(F, reps, inner):
        out = real(F, reps, inner)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(R, "_repeat_flat", spy)
    b, m, p, q = 64, 8, 8, 8
    args, dims = make(b, m, p, q, None, dtype=torch.float32)
    J = jacobian(affine, *args, argnums=1, in_dims=dims, method="closed_form")
    assert max(sizes) * R._TEMP_FRACTION <= J.numel()
    assert len(sizes) > 2  # several chunks


def test_closed_form_float32_against_float64_reference():
    for shared in (None, 0):
        args, dims = make(6, 8, 8, 8, shared, dtype=torch.float32)
        J = jacobian(affine, *args, argnums=1, in_dims=dims, method="closed_form")
        assert J.dtype == torch.float32
        torch.testing.assert_close(
            J.double(), reference_jacobian(_plain, args, 1, dims), rtol=0, atol=0
        )


def test_shape_table_covers_both_formulations():
    import jacbatch.rules.write as R

    qs = {s[3] for s in SHAPES}
    assert any(q < R._NARROW for q in qs)
    assert any(q >= R._NARROW for q in qs)
