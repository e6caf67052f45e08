"""``jacobian(..., out=)``: validation, and the same result as a fresh call for every route."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jacbatch
from jacbatch import affine, jacobian
from tests.conftest import DEVICES

ROUTES = ["auto", *jacbatch.methods.names()]  # every route a caller may ask for


def tanh_affine(A, W, B):
    return torch.tanh(A @ W + B)


def inputs(b=3, m=2, p=4, q=3, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=g, dtype=dtype).to(device) for s in ((b, m, p), (b, p, q), (b, q))
    ]


def nan_like(J):
    """A contiguous buffer of J's shape full of NaN: every element must be overwritten."""
    return torch.full(J.shape, float("nan"), dtype=J.dtype, device=J.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ROUTES)
@pytest.mark.parametrize("vec", [None, "row", "col"], ids=["natural", "row", "col"])
@pytest.mark.parametrize("argnum", [0, 1, 2], ids=["dA", "dW", "dB"])
def test_out_matches_fresh_result(device, method, vec, argnum):
    args = inputs(device=device)
    fresh = jacobian(affine, *args, argnums=argnum, method=method, vec=vec)
    buf = nan_like(fresh)
    got = jacobian(affine, *args, argnums=argnum, method=method, vec=vec, out=buf)
    assert got is buf  # batched call: the caller's tensor itself comes back
    assert torch.equal(buf, fresh)


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_out_non_affine_function(method):
    args = inputs()
    fresh = jacobian(tanh_affine, *args, argnums=1, method=method)
    buf = nan_like(fresh)
    assert jacobian(tanh_affine, *args, argnums=1, method=method, out=buf) is buf
    assert torch.equal(buf, fresh)


@pytest.mark.parametrize("method", ROUTES)
def test_out_tuple_argnums_shared_and_unbatched(method):
    A, W, B = inputs()
    # shared W: in_dims None for it
    fresh = jacobian(affine, A, W[0], B, argnums=(0, 1), in_dims=(0, None, 0), method=method)
    bufs = tuple(nan_like(J) for J in fresh)
    got = jacobian(
        affine, A, W[0], B, argnums=(0, 1), in_dims=(0, None, 0), method=method, out=bufs
    )
    assert got[0] is bufs[0] and got[1] is bufs[1]
    for a, b in zip(got, fresh, strict=True):
        assert torch.equal(a, b)
    # no batch at all
    fresh1 = jacobian(affine, A[0], W[0], B[0], argnums=1, in_dims=None, method=method)
    buf1 = nan_like(fresh1)
    got1 = jacobian(affine, A[0], W[0], B[0], argnums=1, in_dims=None, method=method, out=buf1)
    assert got1.data_ptr() == buf1.data_ptr()
    assert torch.equal(buf1, fresh1)


def test_out_is_written_in_place_by_the_closed_form():
    """The closed form writes straight into out: no second buffer of the output's size."""
    args = inputs(b=4, m=3, p=3, q=20, dtype=torch.float32)
    buf = torch.empty(4, 3, 20, 3, 20)
    ptr = buf.data_ptr()
    J = jacobian(affine, *args, argnums=1, method="closed_form", out=buf)
    assert J.data_ptr() == ptr
    A = args[0]
    expected = A[:, :, None, :, None] * torch.eye(20)[None, None, :, None, :]
    assert torch.equal(J, expected)


def test_out_float32_matches_float64_reference():
    args = inputs(dtype=torch.float32)
    buf = torch.empty(3, 2, 3, 4, 3)
    jacobian(affine, *args, argnums=1, out=buf)
    ref = (
        args[0].double()[:, :, None, :, None]
        * torch.eye(3, dtype=torch.float64)[None, None, :, None, :]
    )
    torch.testing.assert_close(buf.double(), ref, rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(
    b=st.integers(1, 4),
    m=st.integers(1, 4),
    p=st.integers(1, 4),
    q=st.integers(1, 4),
    method=st.sampled_from(ROUTES),
    vec=st.sampled_from([None, "row", "col"]),
)
def test_out_property(b, m, p, q, method, vec):
    args = inputs(b, m, p, q)
    fresh = jacobian(affine, *args, argnums=1, method=method, vec=vec)
    buf = nan_like(fresh)
    jacobian(affine, *args, argnums=1, method=method, vec=vec, out=buf)
    assert torch.equal(buf, fresh)


# ---------------------------------------------------------------------------------------------
# Errors: before any work, in the project's wording
# ---------------------------------------------------------------------------------------------


def test_out_wrong_shape():
    args = inputs()
    with pytest.raises(ValueError, match=r"jacobian: expected out of shape \(3, 2, 3, 4, 3\)"):
        jacobian(affine, *args, argnums=1, out=torch.empty(3, 6, 12))


def test_out_wrong_shape_for_vec():
    args = inputs()
    with pytest.raises(ValueError, match=r"expected out of shape \(3, 6, 12\)"):
        jacobian(affine, *args, argnums=1, vec="row", out=torch.empty(3, 2, 3, 4, 3))


def test_out_wrong_dtype():
    args = inputs()
    with pytest.raises(TypeError, match=r"jacobian: expected out of dtype torch\.float64"):
        jacobian(affine, *args, argnums=1, out=torch.empty(3, 2, 3, 4, 3, dtype=torch.float32))


def test_out_wrong_device():
    args = inputs()
    with pytest.raises(ValueError, match="jacobian: expected out on device cpu"):
        jacobian(
            affine,
            *args,
            argnums=1,
            out=torch.empty(3, 2, 3, 4, 3, dtype=torch.float64, device="meta"),
        )


def test_out_not_contiguous():
    args = inputs()
    buf = torch.empty(3, 4, 3, 2, 3, dtype=torch.float64).permute(0, 3, 4, 1, 2)
    assert buf.shape == (3, 2, 3, 4, 3)
    with pytest.raises(ValueError, match="jacobian: expected a contiguous out tensor"):
        jacobian(affine, *args, argnums=1, out=buf)


def test_out_requires_grad():
    args = inputs()
    buf = torch.empty(3, 2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="expected out not to require grad"):
        jacobian(affine, *args, argnums=1, out=buf)


def test_out_not_a_tensor():
    args = inputs()
    with pytest.raises(TypeError, match=r"jacobian: expected out to be a torch\.Tensor, got list"):
        jacobian(affine, *args, argnums=1, out=[1.0])


def test_out_tuple_mismatch():
    args = inputs()
    one = torch.empty(3, 2, 3, 4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="expected out to be a tuple of tensors, one per argnum"):
        jacobian(affine, *args, argnums=(0, 1), out=one)
    with pytest.raises(TypeError, match="expected out to be one tensor, got tuple"):
        jacobian(affine, *args, argnums=1, out=(one,))


def test_out_untouched_on_error():
    args = inputs()
    buf = torch.full((3, 2, 3, 4, 3), 7.0, dtype=torch.float32)
    with pytest.raises(TypeError):
        jacobian(affine, *args, argnums=1, out=buf)
    assert bool((buf == 7).all())
