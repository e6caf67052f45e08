"""Every route and entry point gives the same answer under no_grad, inference_mode and
enable_grad (issue: contexts), and the autodiff routes honour torch.no_grad / .detach() inside
func as autograd does.

References are the per-sample float64 reference (``tests/_reference.py``), computed outside
any context.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.distributed as dist

import jacbatch
from jacbatch import distributed as jd
from jacbatch.sensitivity import dgsm, local_sensitivity
from tests.conftest import assert_matches, reference_jacobian

F64 = torch.float64
ROUTES = ("auto", *jacbatch.methods.names())  # every route a caller may ask for
CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
    "enable_grad": torch.enable_grad,
}

X = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
W = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))


def vector_f(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(W @ x) * x.sum()


def ishigami(x: torch.Tensor) -> torch.Tensor:  # scalar output: auto takes the vjp route
    return torch.sin(x[0]) + 7 * torch.sin(x[1]) ** 2 + 0.1 * x[2] ** 4 * torch.sin(x[0])


def scalar_no_rule(x: torch.Tensor) -> torch.Tensor:  # no closed form: auto runs the vjp route
    return torch.sin(torch.special.erfcx(x)).sum() * x[0]


SCALARS = (ishigami, scalar_no_rule)


@pytest.fixture(scope="module")
def one_rank_group():
    """A gloo process group of one rank in this process (jacbatch.distributed's local parts)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("method", ROUTES)
@pytest.mark.parametrize(
    "f", [vector_f, ishigami, scalar_no_rule], ids=["vector", "scalar", "scalar_no_rule"]
)
def test_every_entry_point_under_every_context(f, method, context, tmp_path, one_rank_group):
    ref = reference_jacobian(f, (X,))
    if f is scalar_no_rule and method == "auto":  # the case: auto takes the vjp route
        assert jacbatch.explain(f, X).steps[0].route == "vjp"
    if f is scalar_no_rule and method == "closed_form":  # refused in every context alike
        with CONTEXTS[context](), pytest.raises(NotImplementedError, match="method='auto'"):
            jacbatch.jacobian(f, X, method=method)
        return
    got: dict[str, torch.Tensor] = {}
    with CONTEXTS[context]():
        got["jacobian"] = jacbatch.jacobian(f, X, method=method)
        got["chunked"] = jacbatch.jacobian(f, X, method=method, max_memory="1KiB")
        buf = torch.empty(ref.shape, dtype=F64)
        jacbatch.jacobian(f, X, method=method, out=buf)
        got["out"] = buf
        got["iter_jacobian"] = torch.cat(
            [J for _, J in jacbatch.iter_jacobian(f, X, method=method, batch_chunk=2)]
        )
        jacbatch.save_jacobian(tmp_path / "j.npy", f, X, method=method, batch_chunk=2)
        got["local_sensitivity"] = local_sensitivity(f, X, method=method).jacobian
        got["distributed.jacobian"] = jd.jacobian(f, X, method=method)
        jd.save_jacobian(tmp_path / "jd.npy", f, X, method=method)
        if f in SCALARS:
            bounds = [[-math.pi, math.pi]] * 3
            nu = dgsm(f, X, bounds=bounds, method=method).nu
            nu_d = jd.dgsm(f, X, bounds=bounds, method=method).nu
    got["save_jacobian"] = torch.from_numpy(np.load(tmp_path / "j.npy"))
    got["distributed.save_jacobian"] = torch.from_numpy(np.load(tmp_path / "jd.npy"))
    for name, J in got.items():
        try:
            assert_matches(J.reshape(ref.shape), ref, F64)
        except AssertionError as err:
            raise AssertionError(f"{name} under {context}") from err
    if f in SCALARS:  # nu_j = E[(df/dx_j)^2], never the zeros of an unrecorded backward
        ref_nu = (ref**2).mean(0)
        assert_matches(nu.reshape(ref_nu.shape), ref_nu, F64)
        assert_matches(nu_d.reshape(ref_nu.shape), ref_nu, F64)
        assert (ref_nu > 0).all()


@pytest.mark.parametrize("context", [None, *CONTEXTS])
@pytest.mark.parametrize("method", ROUTES)
@pytest.mark.parametrize("closure", ["normal", "inference"])
def test_inference_tensors_as_arguments_and_closures(method, context, closure):
    with torch.inference_mode():
        Xi, Wi = X.clone(), W.clone()
    Wc = Wi if closure == "inference" else W

    def g(x, w):
        return torch.tanh(w @ x) * x.sum()

    ref = reference_jacobian(vector_f, (X,))
    ref_w = reference_jacobian(g, (X, W), 1, (0, None))

    before = Xi.clone()
    with CONTEXTS[context]() if context else contextlib.nullcontext():
        J = jacbatch.jacobian(lambda x: torch.tanh(Wc @ x) * x.sum(), Xi, method=method)
        Jx, Jw = jacbatch.jacobian(g, Xi, Wc, argnums=(0, 1), in_dims=(0, None), method=method)
    assert_matches(J, ref, F64)
    assert_matches(Jx, ref, F64)
    assert_matches(Jw, ref_w, F64)
    assert torch.equal(Xi, before)


# ---------------------------------------------------------------------------------------------
# torch.no_grad() / .detach() inside func: autograd's meaning is the reference
# ---------------------------------------------------------------------------------------------


def stop_no_grad(x: torch.Tensor) -> torch.Tensor:
    """More outputs than inputs (auto would pick forward mode); erfcx has no closed form."""
    with torch.no_grad():
        c = x.sum()
    return torch.cat([torch.special.erfcx(x) * c, torch.sin(x)])


def stop_set_grad_enabled(x: torch.Tensor) -> torch.Tensor:
    with torch.set_grad_enabled(False):
        c = (x**2).sum()
    return torch.cat([torch.special.erfcx(x), x]) * c


def stop_detach(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.special.erfcx(x), x]) * x.detach().sum()


@pytest.mark.parametrize(
    "f", [stop_no_grad, stop_set_grad_enabled], ids=["no_grad", "set_grad_enabled"]
)
def test_no_grad_inside_func(f):
    ref = reference_jacobian(f, (X,))
    # the reference is not the Jacobian through the stop-gradient
    assert not torch.allclose(ref, torch.func.vmap(torch.func.jacfwd(f))(X))
    for method in ("jacrev", "vjp", "auto"):
        assert_matches(jacbatch.jacobian(f, X, method=method), ref, F64)
    # forward mode would differentiate through the no_grad block: refused, with the way out
    with pytest.raises(NotImplementedError, match="method='jacrev'"):
        jacbatch.jacobian(f, X, method="jacfwd")
    # auto plans reverse mode although there are fewer inputs than outputs, and says why
    step = jacbatch.explain(f, X).steps[0]
    assert step.route == "jacrev" and "grad mode off" in step.reason
    # and a differentiable result (nested in torch.func) honours it too
    got = torch.func.vmap(lambda x: jacbatch.jacobian(f, x, in_dims=None, method="jacrev"))(X)
    assert_matches(got, ref, F64)


def test_detach_inside_func_every_autodiff_route_agrees_with_autograd():
    ref = reference_jacobian(stop_detach, (X,))
    for method in ("auto", "jacrev", "jacfwd", "vjp"):
        assert_matches(jacbatch.jacobian(stop_detach, X, method=method), ref, F64)
    assert jacbatch.explain(stop_detach, X).steps[0].route == "jacfwd"  # forward mode is right


class _Square(torch.autograd.Function):
    """``cat([x, x])**2``. Its forward runs with grad mode off (and forward AD off): not a
    stop-gradient, so forward mode must not be refused."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.cat([x, x]) ** 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        n = x.shape[-1]
        return 2 * x * (g[..., :n] + g[..., n:])

    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 2 * torch.cat([x * t, x * t])


def test_a_custom_function_is_not_mistaken_for_no_grad():
    ref = reference_jacobian(lambda x: torch.cat([x, x]) ** 2, (X,))
    for method in ("auto", "jacrev", "jacfwd", "vjp"):
        assert_matches(jacbatch.jacobian(_Square.apply, X, method=method), ref, F64)
