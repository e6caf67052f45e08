"""Property tests over shapes and batch layouts (hypothesis, bounded sizes)."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import jacbatch
from tests.conftest import assert_matches, reference_jacobian

ROUTES = [*jacbatch.methods.names(), "auto"]  # every route a caller may ask for
dim = st.integers(0, 3)


@st.composite
def affine_calls(draw):
    B, m, p, q = draw(st.integers(0, 3)), draw(dim), draw(dim), draw(dim)
    bias_full = draw(st.booleans())
    shapes = [(m, p), (p, q), (m, q) if bias_full else (q,)]
    in_dims = []
    args = []
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    for s in shapes:
        d = draw(st.sampled_from([None, 0, len(s)]))  # shared, batch first, batch last
        in_dims.append(d)
        full = list(s)
        if d is not None:
            full.insert(d, B)
        args.append(torch.randn(full, generator=g, dtype=torch.float64))
    if all(d is None for d in in_dims) and draw(st.booleans()):
        in_dims = [None, None, None]  # an unbatched call
    return args, tuple(in_dims)


@given(
    call=affine_calls(),
    method=st.sampled_from(ROUTES),
    argnum=st.integers(0, 2),
    vec=st.sampled_from([None, "row", "col"]),
)
def test_affine_every_route_any_layout(call, method, argnum, vec):
    args, in_dims = call
    J = jacbatch.jacobian(
        jacbatch.affine, *args, argnums=argnum, in_dims=in_dims, method=method, vec=vec
    )
    ref = reference_jacobian(jacbatch.affine, args, argnum, in_dims)
    batched = any(d is not None for d in in_dims)
    if vec is None:
        assert_matches(J, ref, torch.float64)
    else:
        lead = 1 if batched else 0
        out_n = ref.shape[lead : lead + 2].numel()
        assert J.shape == (*ref.shape[:lead], out_n, ref.shape[lead + 2 :].numel())
        if vec == "row":
            assert_matches(J, ref.reshape(J.shape), torch.float64)
        else:  # column-major of both sides: reverse each group of axes
            n_in = ref.ndim - lead - 2
            perm = (*range(lead), lead + 1, lead, *reversed(range(lead + 2, lead + 2 + n_in)))
            assert_matches(J, ref.permute(perm).reshape(J.shape), torch.float64)


UNARY = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "exp": torch.exp,
    "softplus": torch.nn.functional.softplus,
    "log_softmax": lambda x: torch.log_softmax(x, -1),
    "square_sum": lambda x: (x**2).sum(-1),
    "gram": lambda x: x @ x.mT,
}


@given(
    B=st.integers(1, 3),
    m=st.integers(1, 3),
    n=st.integers(1, 3),
    name=st.sampled_from(sorted(UNARY)),
    method=st.sampled_from([r for r in ROUTES if r != "closed_form"]),
    chunk=st.sampled_from([None, 1, 2, 7]),
)
def test_op_families_any_shape(B, m, n, name, method, chunk):
    x = torch.randn(B, m, n, dtype=torch.float64)
    J = jacbatch.jacobian(UNARY[name], x, method=method, chunk_size=chunk)
    assert_matches(J, reference_jacobian(UNARY[name], (x,), 0, (0,)), torch.float64)
