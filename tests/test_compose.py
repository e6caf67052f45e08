"""Jacobians that autograd and torch.func can differentiate again (issue: composability).

Every reference is the per-sample float64 reference (``tests/_reference.py``, plain
``torch.autograd.functional``; ``create_graph=True`` where a derivative of a Jacobian is needed),
sharing no code with jacbatch; the module tests also compare with ``torch.func.vmap(torch.func.jacrev(f))``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, vjp, vmap

import jacbatch
from tests.conftest import assert_matches, reference_jacobian

F64 = torch.float64
ROUTES = ("auto", *jacbatch.methods.names())  # every route a caller may ask for
B, N = 4, 3


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


X = torch.randn(B, N, dtype=F64, generator=_gen(0))
W = torch.randn(N, N, dtype=F64, generator=_gen(1))


def cube_sum(x: torch.Tensor) -> torch.Tensor:
    """Scalar per sample: its Hessian is ``diag(6 x)``."""
    return (x**3).sum() + x[0] * x[1]


def tanh_w(x: torch.Tensor) -> torch.Tensor:
    """Vector per sample: ``tanh(W @ x)``."""
    return torch.tanh(W @ x)


def _per_sample_hessian(f, X):
    """``(B, *out, n, n)``: the reference Jacobian of the reference Jacobian, per sample."""

    def jac(y):
        return reference_jacobian(f, (y,), in_dims=None, create_graph=True)

    return reference_jacobian(jac, (X,))


def _right_or_refused(run, ref, may_refuse: bool) -> None:
    """The result matches ``ref``; or, where ``may_refuse``, a NotImplementedError names the
    way out. Never zeros, never another answer."""
    if not may_refuse:
        assert_matches(run(), ref, F64)
        return
    try:
        got = run()
    except NotImplementedError as err:
        assert "method='auto'" in str(err) or "method='jacrev'" in str(err), str(err)
        return
    assert_matches(got, ref, F64)


# ---------------------------------------------------------------------------------------------
# Nested jacobian: the Hessian by every route
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ROUTES)
@pytest.mark.parametrize("outer", ROUTES)
@pytest.mark.parametrize("f", [cube_sum, tanh_w], ids=["cube_sum", "tanh_W"])
def test_nested_jacobian_is_the_hessian(f, outer, inner):
    ref = _per_sample_hessian(f, X)

    def run():
        return jacbatch.jacobian(
            lambda a: jacbatch.jacobian(f, a, in_dims=None, method=inner), X, method=outer
        )

    # a closed form of traced code is not available inside a torch.func transform, nor for a
    # function that calls jacobian itself: those combinations may refuse, clearly
    may_refuse = outer == "closed_form" or (inner == "closed_form" and outer != "vjp")
    _right_or_refused(run, ref, may_refuse)


@pytest.mark.parametrize("outer", ["auto", "jacrev", "jacfwd", "vjp"])
def test_nested_hessian_of_a_batched_inner_call_and_create_graph(outer):
    # the inner call batched itself (a Hessian of all samples at once), outer over its argument
    ref = _per_sample_hessian(cube_sum, X)
    H = jacbatch.jacobian(
        lambda a: jacbatch.jacobian(cube_sum, a, method=outer).sum(0), X, in_dims=None
    )  # (n, B, n): samples are independent, so H[:, b] is sample b's Hessian
    got = torch.stack([H[:, b] for b in range(B)])
    assert_matches(got, ref, F64)
    # explicit create_graph under no_grad: torch.autograd.grad of the Jacobian is the Hessian
    x = X.clone().requires_grad_()
    with torch.no_grad():
        J = jacbatch.jacobian(cube_sum, x, method=outer, create_graph=True)
    assert J.requires_grad
    rows = [torch.autograd.grad(J[:, k].sum(), x, retain_graph=True)[0] for k in range(N)]
    assert_matches(torch.stack(rows, dim=1), ref, F64)


# ---------------------------------------------------------------------------------------------
# torch.func transforms around a jacobian call
# ---------------------------------------------------------------------------------------------


def g(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(w @ x) * x.sum()


def _ref_jac_w(w: torch.Tensor) -> torch.Tensor:
    """``(B, n, n)``: d g / d x per sample, differentiable w.r.t. ``w``."""
    return reference_jacobian(g, (X, w), 0, (0, None), create_graph=True)


def _jb(w: torch.Tensor, method: str) -> torch.Tensor:
    return jacbatch.jacobian(g, X, w, in_dims=(0, None), method=method)


# jacobian(method="closed_form") of traced code is refused inside a transform
TRANSFORM_ROUTES = ("auto", "jacrev", "jacfwd", "vjp")


@pytest.mark.parametrize("method", TRANSFORM_ROUTES)
def test_func_grad_of_a_jacobian_penalty(method):
    w = W.clone().requires_grad_()
    (ref,) = torch.autograd.grad(_ref_jac_w(w).pow(2).sum(), w)
    got = grad(lambda v: _jb(v, method).pow(2).sum())(W)
    assert_matches(got, ref, F64)
    # torch.autograd.grad of the same loss, w an argument that requires grad
    w2 = W.clone().requires_grad_()
    (got2,) = torch.autograd.grad(_jb(w2, method).pow(2).sum(), w2)
    assert_matches(got2, ref, F64)


@pytest.mark.parametrize("method", TRANSFORM_ROUTES)
def test_func_vjp_jacrev_jacfwd_around_jacobian(method):
    w = W.clone().requires_grad_()
    J = _ref_jac_w(w)  # (B, n, n)
    ref_dJdw = torch.stack(
        [torch.autograd.grad(J.reshape(-1)[k], w, retain_graph=True)[0] for k in range(J.numel())]
    ).reshape(*J.shape, *W.shape)
    assert_matches(jacrev(lambda v: _jb(v, method))(W), ref_dJdw, F64)
    assert_matches(jacfwd(lambda v: _jb(v, method))(W), ref_dJdw, F64)
    ct = torch.randn(J.shape, dtype=F64, generator=_gen(2))
    out, pull = vjp(lambda v: _jb(v, method), W)
    assert_matches(out, J.detach(), F64)
    assert_matches(pull(ct)[0], torch.einsum("bij,bijkl->kl", ct, ref_dJdw), F64)


@pytest.mark.parametrize("method", TRANSFORM_ROUTES)
def test_vmap_around_an_unbatched_jacobian(method):
    ref = reference_jacobian(g, (X, W), 0, (0, None))
    got = vmap(lambda x: jacbatch.jacobian(g, x, W, in_dims=None, method=method))(X)
    assert_matches(got, ref, F64)


@pytest.mark.parametrize("argnum", [0, 1])
@pytest.mark.parametrize("method", ["auto", "closed_form"])
def test_registered_closed_form_composes(method, argnum):
    """jacbatch.affine's rules are torch ops on the inputs: differentiable, inside transforms too."""
    A = torch.randn(B, 2, N, dtype=F64, generator=_gen(3))
    bias = torch.randn(2, dtype=F64, generator=_gen(4))

    def ref_loss(a, w):
        J = reference_jacobian(
            jacbatch.affine, (a, w, bias), argnum, (0, None, None), create_graph=True
        )
        return J.pow(3).sum()

    other = 1 - argnum  # the Jacobian w.r.t. A depends on W and vice versa
    leaves = [A.clone().requires_grad_(), W[:, :2].clone().requires_grad_()]
    (ref,) = torch.autograd.grad(ref_loss(*leaves), leaves[other])

    def loss(a, w):
        J = jacbatch.jacobian(
            jacbatch.affine, a, w, bias, argnums=argnum, in_dims=(0, None, None), method=method
        )
        return J.pow(3).sum()

    args = [A, W[:, :2].contiguous()]
    got = grad(loss, argnums=other)(*args)
    assert_matches(got, ref, F64)
    leaves2 = [a.clone().requires_grad_() for a in args]
    (got2,) = torch.autograd.grad(loss(*leaves2), leaves2[other])
    assert_matches(got2, ref, F64)
    # vmap over samples of an unbatched call
    J = vmap(
        lambda a: jacbatch.jacobian(
            jacbatch.affine, a, args[1], bias, argnums=argnum, in_dims=None, method=method
        )
    )(A)
    refJ = reference_jacobian(jacbatch.affine, (A, args[1], bias), argnum, (0, None, None))
    assert_matches(J, refJ, F64)


# ---------------------------------------------------------------------------------------------
# A Jacobian penalty on a module's parameters (contractive autoencoder)
# ---------------------------------------------------------------------------------------------


def _encoder() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3), torch.nn.Sigmoid()
    ).to(F64)


@pytest.mark.parametrize("how", ["plain", "chunked", "out"])
@pytest.mark.parametrize("method", ROUTES)
def test_contractive_penalty_gradients_reach_the_parameters(method, how):
    enc = _encoder()
    x = torch.randn(6, 5, dtype=F64, generator=_gen(6))
    params = list(enc.parameters())
    # reference 1: the per-sample reference with create_graph
    pen = reference_jacobian(enc, (x,), create_graph=True).pow(2).sum()
    ref = torch.autograd.grad(pen, params)
    # reference 2: torch.func.vmap(torch.func.jacrev(f)) over the same parameters
    named = dict(enc.named_parameters())
    ref_func = grad(
        lambda p: vmap(jacrev(lambda xi: functional_call(enc, p, (xi,))))(x).pow(2).sum()
    )(named)
    for r, name in zip(ref, named, strict=True):
        assert_matches(ref_func[name], r, F64)

    kwargs: dict = {"method": method}
    if how == "chunked":
        kwargs["max_memory"] = "2KiB"  # a few samples per chunk: the chunks are assembled
    buf = torch.empty(6, 3, 5, dtype=F64)
    if how == "out":
        kwargs["out"] = buf
    J = jacbatch.jacobian(enc, x, **kwargs)
    if how == "out":
        assert J is buf and buf.grad_fn is not None
    got = torch.autograd.grad(J.pow(2).sum(), params)
    for gg, r in zip(got, ref, strict=True):
        assert_matches(gg, r, F64)
    assert all(p.grad is None for p in params)  # nothing accumulated behind the caller's back


# ---------------------------------------------------------------------------------------------
# When a graph is built, and when not
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ROUTES)
def test_graph_only_when_asked(method):
    x = X.clone().requires_grad_()
    f = tanh_w
    assert jacbatch.jacobian(f, x, method=method).requires_grad  # grad mode on, x requires grad
    assert not jacbatch.jacobian(f, X, method=method).requires_grad  # nothing requires grad
    with torch.no_grad():
        assert not jacbatch.jacobian(f, x, method=method).requires_grad
        J = jacbatch.jacobian(f, x, method=method, create_graph=True)
    assert J.requires_grad
    with torch.inference_mode():  # nothing is recorded under inference mode
        J = jacbatch.jacobian(f, X, method=method, create_graph=True)
    assert not J.requires_grad
    assert x.grad is None


def test_closed_over_parameters_ask_for_a_graph_and_no_grad_removes_it():
    enc = _encoder()
    x = torch.randn(3, 5, dtype=F64, generator=_gen(7))
    assert jacbatch.jacobian(enc, x).requires_grad
    with torch.no_grad():
        assert not jacbatch.jacobian(enc, x).requires_grad


def test_out_is_refused_inside_a_transform_and_create_graph_is_checked():
    buf = torch.empty(N, N, dtype=F64)
    with pytest.raises(ValueError, match=r"out=None inside a torch\.func transform"):
        vmap(lambda x: jacbatch.jacobian(tanh_w, x, in_dims=None, out=buf))(X)
    with pytest.raises(TypeError, match="create_graph to be True or False"):
        jacbatch.jacobian(tanh_w, X, create_graph=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["auto", "jacrev", "vjp"])
def test_iter_jacobian_chunks_are_differentiable(method):
    x = X.clone().requires_grad_()
    ref = _per_sample_hessian(cube_sum, X)
    chunks = list(jacbatch.iter_jacobian(cube_sum, x, method=method, batch_chunk=3))
    assert [sl.start for sl, _ in chunks] == [0, 3]
    J = torch.cat([c for _, c in chunks])
    rows = [torch.autograd.grad(J[:, k].sum(), x, retain_graph=True)[0] for k in range(N)]
    assert_matches(torch.stack(rows, dim=1), ref, F64)


def test_save_jacobian_needs_no_graph(tmp_path):
    import numpy as np

    x = X.clone().requires_grad_()
    shape = jacbatch.save_jacobian(tmp_path / "j.npy", tanh_w, x, batch_chunk=2)
    ref = reference_jacobian(tanh_w, (X,))
    assert shape == tuple(ref.shape)
    assert_matches(torch.from_numpy(np.load(tmp_path / "j.npy")), ref, F64)
    assert x.grad is None


def test_hessian_vector_products_through_the_vjp_route_use_fresh_cotangents():
    """Double backward through the vjp route: an in-place cotangent would be caught by
    autograd's version check (or give a wrong Hessian)."""
    x = X.clone().requires_grad_()
    J = jacbatch.jacobian(lambda v: torch.sin(v).prod() * v, x, method="vjp")  # (B, n, n)
    (hv,) = torch.autograd.grad(J.sum(), x)
    x_ref = X.clone().requires_grad_()
    J_ref = reference_jacobian(lambda v: torch.sin(v).prod() * v, (x_ref,), create_graph=True)
    (ref,) = torch.autograd.grad(J_ref.sum(), x_ref)
    assert_matches(hv, ref, F64)
    assert math.isfinite(float(hv.abs().sum()))


@pytest.mark.parametrize("method", TRANSFORM_ROUTES)
def test_memory_chunks_keep_the_graph(method, monkeypatch):
    import jacbatch.executor as executor

    calls = []
    real = executor._execute
    monkeypatch.setattr(executor, "_execute", lambda *a, **k: calls.append(1) or real(*a, **k))
    Xl = torch.randn(40, N, dtype=F64, generator=_gen(8))
    x = Xl.clone().requires_grad_()
    with torch.no_grad():  # create_graph: grad mode on inside, the chunks copied with CopySlices
        J = jacbatch.jacobian(cube_sum, x, method=method, create_graph=True, max_memory="1KiB")
    assert len(calls) > 1  # it was chunked
    (got,) = torch.autograd.grad(J.sum(), x)
    ref = _per_sample_hessian(cube_sum, Xl).sum(1)  # (B, n, n): cube_sum's output is a scalar
    assert_matches(got, ref, F64)
    # inside vmap the chunks are concatenated (no plain buffer can hold them)
    calls.clear()
    J = vmap(lambda v: jacbatch.jacobian(cube_sum, v, method=method, max_memory="1KiB"))(
        Xl.reshape(4, 10, N)
    )
    assert len(calls) > 1  # vmap calls the function once; jacobian chunked its 10 samples
    ref = reference_jacobian(cube_sum, (Xl,))
    assert_matches(J.reshape(40, N), ref, F64)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("vec", [None, "col"])
@pytest.mark.parametrize("method", ROUTES)
def test_layouts_and_tuple_argnums_stay_differentiable(method, vec, batched):
    A = torch.randn(B, 2, N, dtype=F64, generator=_gen(9))
    bias = torch.randn(2, dtype=F64, generator=_gen(10))

    def f(a, w, c):
        return torch.tanh(a @ w + c)

    weights = [torch.linspace(-1, 1, k, dtype=F64) for k in (B * 2 * 2 * 2 * N, B * 2 * 2 * N * 2)]

    def loss(Js):
        return sum(
            (J.reshape(-1) * wt[: J.numel()]).sum() for J, wt in zip(Js, weights, strict=True)
        )

    w = W[:, :2].clone().requires_grad_()
    a_in = A if batched else A[0]
    in_dims = (0, None, None) if batched else None
    Js = jacbatch.jacobian(
        f, a_in, w, bias, argnums=(0, 1), in_dims=in_dims, vec=vec, method=method
    )
    (got,) = torch.autograd.grad(loss(Js), w)

    w2 = W[:, :2].clone().requires_grad_()
    refs = reference_jacobian(f, (a_in, w2, bias), (0, 1), in_dims, vec=vec, create_graph=True)
    (ref,) = torch.autograd.grad(loss(refs), w2)
    for J, R in zip(Js, refs, strict=True):
        assert_matches(J, R.detach(), F64)
    assert_matches(got, ref, F64)


@pytest.mark.parametrize(
    "f, args, in_dims",
    [
        (
            jacbatch.affine,
            (torch.randn(B, 2, N, dtype=F64), W, torch.randn(N, dtype=F64)),
            (0, None, None),
        ),
        (tanh_w, (X,), 0),
    ],
    ids=["registered", "traced"],
)
def test_closed_forms_save_nothing_when_no_graph_is_asked_for(f, args, in_dims):
    """Grad mode on, nothing requires grad: the closed forms record nothing for backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        J = jacbatch.jacobian(f, *args, in_dims=in_dims, method="closed_form")
    assert saved == [] and J.grad_fn is None


@pytest.mark.parametrize("where", ["argument", "closure"])
@pytest.mark.parametrize("method", ROUTES)
def test_forward_ad_dual_tensors_carry_tangents(method, where):
    """torch.autograd.forward_ad: the tangent of J(x) along t is the Hessian times t."""
    import torch.autograd.forward_ad as fwAD

    T = torch.randn(B, N, dtype=F64, generator=_gen(11))
    TW = torch.randn(N, N, dtype=F64, generator=_gen(12))

    def ref_tangent(x, t, w, tw):
        def jac(y, v):
            return reference_jacobian(
                lambda u: torch.tanh(v @ u), (y,), in_dims=None, create_graph=True
            )

        return torch.autograd.functional.jvp(jac, (x, w), (t, tw))[1]

    if where == "argument":
        ref = torch.stack(
            [ref_tangent(x, t, W, torch.zeros_like(W)) for x, t in zip(X, T, strict=True)]
        )
    else:
        ref = torch.stack([ref_tangent(x, torch.zeros_like(x), W, TW) for x in X])
    with fwAD.dual_level():
        x = fwAD.make_dual(X, T) if where == "argument" else X
        w = fwAD.make_dual(W, TW) if where == "closure" else W

        def run():
            return jacbatch.jacobian(lambda v: torch.tanh(w @ v), x, method=method)

        if method == "jacfwd" and where == "argument":
            with pytest.raises(NotImplementedError, match="method='jacrev'"):
                run()
            return
        try:
            J = run()
        except RuntimeError as err:  # torch cannot nest forward AD (closure case): never zeros
            assert method == "jacfwd" and "forward mode AD" in str(err), str(err)
            return
        tangent = fwAD.unpack_dual(J).tangent
    assert tangent is not None
    assert_matches(tangent, ref, F64)
