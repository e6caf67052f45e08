"""``jacobian(..., batched=True)``: functions that map a batch to a batch of independent samples
(NOTE [Batched functions: one call, two views] in :mod:`jacbatch.methods.batched`).

Every result is compared with the independent float64 reference (``tests/_reference.py``) of
the per-sample function, written here by hand: ``func`` on a batch of one.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import jacbatch
from tests.conftest import assert_matches, reference_jacobian

F64 = torch.float64
METHODS = ("auto", "closed_form", "jacrev", "jacfwd", "vjp")
DATA = pathlib.Path(__file__).parent / "data"


def one(func, in_dims):
    """The per-sample function of a batched ``func`` (the reference's view of it)."""

    def f(*xs):
        return func(
            *(x if d is None else x.unsqueeze(d) for x, d in zip(xs, in_dims, strict=True))
        ).squeeze(0)

    return f


def mlp() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4), torch.nn.Softplus()
    ).double()


def no_rule_mlp() -> torch.nn.Module:  # erfcx has no closed-form rule: autodiff routes
    net = mlp()
    return lambda x: torch.special.erfcx(net(x))  # type: ignore[return-value]


X = torch.randn(6, 5, dtype=F64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("vec", [None, "row", "col"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [mlp, no_rule_mlp], ids=["mlp", "mlp_erfcx"])
def test_module_every_method_and_vec(make, method, vec):
    net = make()
    ref = reference_jacobian(one(net, (0,)), (X,), vec=vec)
    if make is no_rule_mlp and method == "closed_form":
        with pytest.raises(NotImplementedError):
            jacbatch.jacobian(net, X, batched=True, method=method)
        return
    J = jacbatch.jacobian(net, X, batched=True, method=method, vec=vec)
    assert_matches(J, ref, F64)


def test_auto_routes():
    plan = jacbatch.explain(mlp(), X, batched=True)
    assert [s.route for s in plan.steps] == ["traced"]
    assert any("batched=True" in n for n in plan.notes)
    wide = jacbatch.explain(no_rule_mlp(), X, batched=True)  # 4 outputs <= 5 inputs
    assert [s.route for s in wide.steps] == ["batched_rev"]
    tall = jacbatch.explain(lambda x: torch.special.erfcx(x.repeat(1, 3)), X, batched=True)
    assert [s.route for s in tall.steps] == ["batched_fwd"]
    for method, name in [
        ("jacrev", "batched_rev"),
        ("jacfwd", "batched_fwd"),
        ("vjp", "batched_vjp"),
    ]:
        assert jacbatch.explain(mlp(), X, batched=True, method=method).steps[0].route == name


def shared(x, w, b, s):  # x (B, 3); w (3, 2), b (2,), s () shared
    return torch.special.erfcx(torch.tanh(x @ w + b) * s).cumsum(1)


ARGS = (
    torch.randn(4, 3, dtype=F64),
    torch.randn(3, 2, dtype=F64),
    torch.randn(2, dtype=F64),
    torch.tensor(1.5, dtype=F64),
)
DIMS = (0, None, None, None)


@pytest.mark.parametrize("method", METHODS)
def test_shared_arguments_tuple_argnums(method):
    argnums = (0, 1, 2, 3)
    refs = reference_jacobian(one(shared, DIMS), ARGS, argnums, DIMS)
    if method == "closed_form":  # erfcx: no closed form
        with pytest.raises(NotImplementedError):
            jacbatch.jacobian(
                shared, *ARGS, argnums=argnums, in_dims=DIMS, batched=True, method=method
            )
        return
    Js = jacbatch.jacobian(
        shared, *ARGS, argnums=argnums, in_dims=DIMS, batched=True, method=method
    )
    assert isinstance(Js, tuple) and len(Js) == 4
    for J, ref in zip(Js, refs, strict=True):
        assert_matches(J, ref, F64)


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_batch_dimension_not_first(method):
    def f(x, w):  # x (3, B): batch along dim 1; output (B, 2)
        return torch.sin(w @ x).T.cumsum(1)

    x, w = torch.randn(3, 5, dtype=F64), torch.randn(2, 3, dtype=F64)
    for argnums in (0, 1):
        ref = reference_jacobian(one(f, (1, None)), (x, w), argnums, (1, None))
        J = jacbatch.jacobian(
            f, x, w, argnums=argnums, in_dims=(1, None), batched=True, method=method
        )
        assert_matches(J, ref, F64)


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_chunk_size_and_scalar_output(method):
    net = no_rule_mlp()
    ref = reference_jacobian(one(net, (0,)), (X,))
    assert_matches(jacbatch.jacobian(net, X, batched=True, method=method, chunk_size=3), ref, F64)

    def scalar(x):  # (B,) out: a gradient per sample
        return (x.sin() ** 2).cumsum(1).sum(1)

    ref = reference_jacobian(one(scalar, (0,)), (X,))
    assert_matches(jacbatch.jacobian(scalar, X, batched=True, method=method), ref, F64)


@pytest.mark.parametrize("method", METHODS)
def test_create_graph(method):
    net = mlp()
    x = X.clone().requires_grad_(True)
    J = jacbatch.jacobian(net, x, batched=True, method=method, create_graph=True)
    assert J.requires_grad
    (g,) = torch.autograd.grad(J.pow(2).sum(), x)
    xr = X.clone().requires_grad_(True)
    ref = reference_jacobian(one(net, (0,)), (xr,), create_graph=True)
    (gr,) = torch.autograd.grad(ref.pow(2).sum(), xr)
    torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_inside_a_torch_func_transform(method):
    net = mlp()

    def penalty(x):  # a Jacobian penalty, differentiated by torch.func.grad
        return jacbatch.jacobian(net, x, batched=True, method=method).pow(2).sum()

    xr = X.clone().requires_grad_(True)
    ref = reference_jacobian(one(net, (0,)), (xr,), create_graph=True)
    (gr,) = torch.autograd.grad(ref.pow(2).sum(), xr)
    torch.testing.assert_close(torch.func.grad(penalty)(X), gr)


def test_hessian_through_nested_calls():
    def grad_of(x):  # (B, 5) -> (B, 5): the per-sample gradient of sum(sin(x)^2 * x)
        return jacbatch.jacobian(lambda y: (y.sin() ** 2 * y).sum(1), x, batched=True)

    ref = torch.stack(
        [torch.autograd.functional.hessian(lambda y: (y.sin() ** 2 * y).sum(), x) for x in X]
    )
    for method in ("auto", "jacrev", "jacfwd", "vjp"):
        H = jacbatch.jacobian(grad_of, X, batched=True, method=method)
        assert not H.requires_grad
        assert_matches(H, ref, F64)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode, torch.enable_grad])
@pytest.mark.parametrize("method", METHODS)
def test_contexts(method, context):
    net = mlp()
    ref = reference_jacobian(one(net, (0,)), (X,))
    with context():
        J = jacbatch.jacobian(net, X, batched=True, method=method)
    if context is not torch.enable_grad:  # (else differentiable w.r.t. the parameters)
        assert not J.requires_grad
    assert_matches(J, ref, F64)


def test_iter_save_and_estimate(tmp_path):
    net = no_rule_mlp()
    ref = reference_jacobian(one(net, (0,)), (X,))
    parts = [J for _, J in jacbatch.iter_jacobian(net, X, batched=True, batch_chunk=4)]
    assert_matches(torch.cat(parts), ref, F64)
    path = tmp_path / "J.npy"
    jacbatch.save_jacobian(path, net, X, batched=True, batch_chunk=4)
    assert_matches(torch.from_numpy(np.load(path)), ref, F64)
    est = jacbatch.estimate_memory(net, X, batched=True)
    assert est.output_bytes == ref.numel() * 8


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_out_buffer_and_batch_chunks(method):
    net = no_rule_mlp()
    ref = reference_jacobian(one(net, (0,)), (X,), vec="col")
    out = torch.empty(6, 4, 5, dtype=F64)
    got = jacbatch.jacobian(net, X, batched=True, method=method, vec="col", out=out)
    assert got is out
    assert_matches(out, ref, F64)
    chunked = jacbatch.jacobian(net, X, batched=True, method=method, vec="col", max_memory="1KiB")
    assert_matches(chunked, ref, F64)


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_non_finite_values_follow_per_sample_reverse_mode(method):
    def f(x):  # sqrt of a negative entry is NaN; where hides it from forward mode only
        return torch.where(x > 0, x.abs().sqrt() * torch.sqrt(x), x).cumsum(1)

    x = X.clone()
    x[1, 2] = -1.0
    ref = reference_jacobian(one(f, (0,)), (x,))
    J = jacbatch.jacobian(f, x, batched=True, method=method)
    assert ref.isnan().any()
    torch.testing.assert_close(J, ref, equal_nan=True)


def test_mutating_func_gets_copies():
    def f(x):
        x.mul_(2)  # writes into its argument
        return x.sin()

    x0 = X.clone()
    ref = reference_jacobian(lambda x: torch.sin(2 * x), (X,))
    for method in ("auto", "jacrev", "jacfwd", "vjp"):
        assert_matches(jacbatch.jacobian(f, X, batched=True, method=method), ref, F64)
    assert torch.equal(X, x0)


def test_bad_inputs():
    net = mlp()
    with pytest.raises(ValueError, match=r"batched=True.*in_dims"):
        jacbatch.jacobian(net, X, in_dims=None, batched=True)
    with pytest.raises(TypeError, match="batched"):
        jacbatch.jacobian(net, X, batched=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"return \(1, \*out_shape\).*got shape \(4,\)"):
        jacbatch.jacobian(lambda x: net(x).sum(0), X, batched=True)
    with pytest.raises(ValueError, match="batched=True"):
        jacbatch.jacobian(lambda x: net(x)[:1], X, batched=True, method="jacrev")
    with pytest.raises(TypeError, match=r"one tensor|single torch\.Tensor"):
        jacbatch.jacobian(lambda x: net(x).sum().item(), X, batched=True)
    with pytest.raises(ValueError, match="random"):
        jacbatch.jacobian(
            lambda x: torch.nn.functional.dropout(x, 0.5), X, batched=True, randomness="different"
        )
    bn = torch.nn.BatchNorm1d(5).double().train()  # mixes samples, writes running statistics
    with pytest.raises(ValueError, match="eval mode"):
        jacbatch.jacobian(bn, torch.randn(6, 5, 4, dtype=F64), batched=True)


# ---------------------------------------------------------------------------------------------
# pytorch-kinematics: forward kinematics of a 7-joint KUKA iiwa
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kuka():
    pk = pytest.importorskip("pytorch_kinematics")
    urdf = (DATA / "kuka_iiwa.urdf").read_text()
    return pk.build_serial_chain_from_urdf(urdf, "lbr_iiwa_link_7").to(dtype=F64)


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_kuka_forward_kinematics(kuka, method):
    TH = torch.rand(16, 7, dtype=F64, generator=torch.Generator().manual_seed(1)) * 4 - 2

    def fk(th):
        return kuka.forward_kinematics(th).get_matrix()[:, :3, 3]

    J = jacbatch.jacobian(fk, TH, batched=True, method=method)
    ref = reference_jacobian(one(fk, (0,)), (TH,))
    assert_matches(J, ref, F64)
    torch.testing.assert_close(J, kuka.jacobian(TH)[:, :3])
