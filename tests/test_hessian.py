"""jacbatch.hessian against torch.func and an independent per-sample autograd loop (float64).

The reference is a loop over samples of ``torch.autograd.functional.hessian`` (scalar outputs)
or of ``torch.autograd.functional.jacobian`` nested twice (vector outputs): plain torch only.
``vmap(torch.func.hessian(f))`` is compared as well, except for LU-based ops (``det``,
``logdet``, ``solve``), where torch 2.13 gets it wrong (see ``test_torch_func_hessian_is_wrong_for_logdet``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import jacbatch

H = importlib.import_module("jacbatch.hessian")

TOL = {"rtol": 1e-12, "atol": 1e-12}
METHODS = ("auto", "closed_form", "jacfwd", "jacrev")

gen = torch.Generator().manual_seed(1234)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


W1 = _randn(6, 4) / 2
B1 = _randn(6)
W2 = _randn(3, 6) / 2
Y = _randn(3)
A_SYM = _randn(4, 4)
A_SYM = A_SYM + A_SYM.T
K = torch.tensor(1)


def mlp_loss(x: torch.Tensor) -> torch.Tensor:
    return ((W2 @ torch.tanh(W1 @ x + B1) - Y) ** 2).sum()


def logdet_gram(X: torch.Tensor) -> torch.Tensor:
    return torch.logdet(X.T @ X + 0.5 * torch.eye(X.shape[1], dtype=X.dtype))


def inverse_sum(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(X.T @ X + torch.eye(X.shape[1], dtype=X.dtype)).sum()


def quadratic(x: torch.Tensor) -> torch.Tensor:
    return x @ A_SYM @ x


def sin_poly(x: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x) * x**2).sum()


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(W1 @ x, 0)


def cross_entropy(x: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(W2 @ torch.tanh(W1 @ x), 0)[1]


def vector_out(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(W1 @ x)


def trace_quartic(X: torch.Tensor) -> torch.Tensor:
    G = X @ X.T
    return torch.trace(G @ G)


def sigmoid_bilinear(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s @ A_SYM @ s


def exp_norm(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(0.3 * x).sum() * torch.sqrt((x * x).sum() + 1.0)


def softplus_matrix(X: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(X @ W1[:3, :3]).mean(0)


#: (id, func, per-sample input shape, whether vmap(torch.func.hessian) is right for it)
CASES: list[tuple[str, Callable[..., torch.Tensor], tuple[int, ...], bool]] = [
    ("mlp_loss", mlp_loss, (4,), True),
    ("logdet_gram", logdet_gram, (5, 3), False),
    ("inverse_sum", inverse_sum, (5, 3), True),
    ("quadratic", quadratic, (4,), True),
    ("sin_poly", sin_poly, (4,), True),
    ("logsumexp", logsumexp, (4,), True),
    ("cross_entropy", cross_entropy, (4,), True),
    ("vector_out", vector_out, (4,), True),
    ("trace_quartic", trace_quartic, (3, 2), True),
    ("sigmoid_bilinear", sigmoid_bilinear, (4,), True),
    ("exp_norm", exp_norm, (4,), True),
    ("softplus_matrix", softplus_matrix, (2, 3), True),
]


def reference_hessian(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    argnums: int | tuple[int, ...] = 0,
    in_dims: Sequence[int | None] | None = None,
) -> Any:
    """Per-sample loop of autograd's ``hessian`` (scalar output) or a twice nested
    ``jacobian``; nested tuples for tuple ``argnums``; no batch when nothing is batched."""
    dims = list(in_dims) if in_dims is not None else [0] * len(args)
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    sizes = {a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None}
    batched = bool(sizes)
    n = sizes.pop() if batched else 1
    per_sample = []
    for b in range(n):
        sample = [a.select(d, b) if d is not None else a for a, d in zip(args, dims, strict=True)]

        def f(*xs: torch.Tensor, sample: list[torch.Tensor] = sample) -> torch.Tensor:
            full = list(sample)
            for k, x in zip(nums, xs, strict=True):
                full[k] = x
            return func(*full)

        inputs = tuple(sample[k] for k in nums)
        out = f(*inputs)
        if out.dim() == 0:
            h = torch.autograd.functional.hessian(f, inputs)
        else:

            def jac(*xs: torch.Tensor) -> Any:
                return torch.autograd.functional.jacobian(f, xs, create_graph=True)

            h = torch.autograd.functional.jacobian(jac, inputs)
        per_sample.append(h)
    if not isinstance(argnums, tuple):
        blocks = [h[0][0] if isinstance(h, tuple) else h for h in per_sample]
        return torch.stack(blocks) if batched else blocks[0]
    return tuple(
        tuple(
            torch.stack([h[i][j] for h in per_sample]) if batched else per_sample[0][i][j]
            for j in range(len(nums))
        )
        for i in range(len(nums))
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("name", "func", "shape", "vmap_ok"), CASES, ids=[c[0] for c in CASES])
def test_matches_reference(
    name: str,
    func: Callable[..., torch.Tensor],
    shape: tuple[int, ...],
    vmap_ok: bool,
    method: str,
) -> None:
    X = _randn(3, *shape)
    got = jacbatch.hessian(func, X, method=method)
    want = reference_hessian(func, [X])
    torch.testing.assert_close(got, want, **TOL)
    if vmap_ok:
        torch.testing.assert_close(got, torch.func.vmap(torch.func.hessian(func))(X), **TOL)


def test_closed_form_covers_the_targets() -> None:
    """The MLP loss and logdet(XᵀX + λI) run as second-order closed forms (built once, checked
    against autodiff), and a later call runs no autodiff at all."""
    for func, shape in ((mlp_loss, (4,)), (logdet_gram, (5, 3))):
        X = _randn(4, *shape)
        jacbatch.hessian(func, X, method="closed_form")

        def refuse(*a: object, **k: object) -> None:
            raise AssertionError("autodiff ran")

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(H, "autodiff", refuse)
            mp.setattr(torch.autograd, "grad", refuse)
            got = jacbatch.hessian(func, X, method="closed_form")
        torch.testing.assert_close(got, reference_hessian(func, [X]), **TOL)


def test_logdet_program_writes_its_result_in_place() -> None:
    """The rewrites of jacbatch.second_order.passes on logdet(XᵀX + λI): the product by the
    identity masks' ones is dropped, and the last sum of two batched products is accumulated
    in the result buffer (``bmm`` then ``baddbmm_``) instead of being added into a fresh
    tensor and copied there; the values are the loop's."""
    X = _randn(4, 6, 3)
    got = jacbatch.hessian(logdet_gram, X, method="closed_form")
    torch.testing.assert_close(got, reference_hessian(logdet_gram, [X]), **TOL)
    call = H.normalize("hessian", logdet_gram, (X,), 0, 0)
    gm = H._PROGRAMS[H._captured(call).graph.gm][H._key(call)].run
    targets = {nd.target for nd in gm.graph.nodes}
    aten = torch.ops.aten
    assert aten.baddbmm_.default in targets  # the two products summed in the result buffer
    assert aten.add.out not in targets


def test_passes_leave_written_operands_alone() -> None:
    """``compute_into_result`` does not move a sum past an in-place write into its operand,
    and ``drop_unit_factors`` keeps a product by ones whose factor is later written."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from jacbatch.second_order import passes

    def prog(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = a + b
        a.mul_(2.0)  # the operand changes between the sum and the copy
        y = torch.empty(3, 4, dtype=a.dtype)
        y.copy_(s.T)
        ones = torch.ones_like(b)
        p = b * ones
        b.add_(1.0)  # the factor's source changes after the product
        return y, p

    a, b = _randn(4, 3), _randn(4, 3)
    gm = make_fx(prog)(a.clone(), b.clone())
    assert passes.compute_into_result(gm) == 0
    assert passes.drop_unit_factors(gm) == 0
    want = prog(a.clone(), b.clone())
    got = gm(a.clone(), b.clone())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)

    def clean(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.empty(3, 4, dtype=a.dtype)
        y.copy_((a + b).T)
        return y, b * torch.ones_like(b)

    gm = make_fx(clean)(a, b)
    assert passes.compute_into_result(gm) == 1 and passes.drop_unit_factors(gm) == 1
    for g, w in zip(gm(a, b), clean(a, b), strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_torch_func_hessian_is_wrong_for_logdet() -> None:
    """Why logdet is compared with the loop only: ``vmap(torch.func.hessian)`` (forward over
    reverse, the tangent vmap inside the batch vmap) is wrong for LU-based ops in torch 2.13;
    jacbatch's autodiff route runs reverse over reverse for them."""
    X = _randn(3, 5, 3)
    want = reference_hessian(logdet_gram, [X])
    bad = torch.func.vmap(torch.func.hessian(logdet_gram))(X)
    assert not torch.allclose(bad, want)
    assert H.outer_route({"aten._linalg_slogdet.default"}, "jacfwd") == "jacrev"
    torch.testing.assert_close(jacbatch.hessian(logdet_gram, X, method="jacfwd"), want, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_tuple_argnums_and_shared_argument(method: str) -> None:
    """``argnums=(0, 1)`` nests blocks as torch.func.hessian; a shared weight (in_dims None)
    gets a per-sample Hessian block too."""

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ x).pow(2).sum() + (x * x).sum() * w.sum()

    x, w = _randn(3, 4), _randn(2, 4)
    got = jacbatch.hessian(f, x, w, argnums=(0, 1), in_dims=(0, None), method=method)
    want = reference_hessian(f, [x, w], (0, 1), (0, None))
    torch.testing.assert_close(got, want, **TOL)
    tf = torch.func.vmap(torch.func.hessian(f, argnums=(0, 1)), in_dims=(0, None))(x, w)
    torch.testing.assert_close(got, tf, **TOL)
    only_w = jacbatch.hessian(f, x, w, argnums=1, in_dims=(0, None), method=method)
    torch.testing.assert_close(only_w, want[1][1], **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_no_batch_and_other_batch_dim(method: str) -> None:
    x = _randn(4)
    got = jacbatch.hessian(mlp_loss, x, in_dims=None, method=method)
    torch.testing.assert_close(got, torch.func.hessian(mlp_loss)(x), **TOL)
    X = _randn(4, 3)  # batch along dim 1
    got = jacbatch.hessian(mlp_loss, X, in_dims=1, method=method)
    torch.testing.assert_close(got, reference_hessian(mlp_loss, [X], in_dims=[1]), **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_empty_batch(method: str) -> None:
    got = jacbatch.hessian(mlp_loss, _randn(0, 4), method=method)
    assert got.shape == (0, 4, 4)


@pytest.mark.parametrize("vec", ["row", "col"])
def test_vec(vec: str) -> None:
    X = _randn(2, 2, 3)
    got = jacbatch.hessian(softplus_matrix, X, vec=vec)  # out (3,), in (2, 3)
    want = reference_hessian(softplus_matrix, [X])  # (B, 3, 2, 3, 2, 3)
    if vec == "col":
        want = want.permute(0, 1, 3, 2, 5, 4)
    torch.testing.assert_close(got, want.reshape(2, 3, 6, 6), **TOL)
    scalar = jacbatch.hessian(trace_quartic, _randn(2, 3, 2), vec=vec)
    assert scalar.shape == (2, 6, 6)


def test_chunked_by_memory_budget() -> None:
    X = _randn(7, 4)
    per_sample = 4 * 4 * 8  # bytes of one sample's Hessian
    got = jacbatch.hessian(mlp_loss, X, max_memory=H._WORK_MULTIPLE * per_sample * 2)
    torch.testing.assert_close(got, reference_hessian(mlp_loss, [X]), **TOL)
    got = jacbatch.hessian(mlp_loss, X, method="jacrev", chunk_size=2)
    torch.testing.assert_close(got, reference_hessian(mlp_loss, [X]), **TOL)
    with pytest.raises(jacbatch.errors.JacobianMemoryError, match="hessian"):
        jacbatch.hessian(mlp_loss, X, max_memory=16)


def test_no_rule_falls_back_or_refuses() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfcx(x).sum() * x.sum()

    X = _randn(3, 4).abs()
    torch.testing.assert_close(jacbatch.hessian(f, X), reference_hessian(f, [X]), **TOL)
    with pytest.raises(NotImplementedError, match=r"hessian: .*method='auto'"):
        jacbatch.hessian(f, X, method="closed_form")


def test_differentiable_when_asked() -> None:
    X = _randn(3, 4).requires_grad_()
    got = jacbatch.hessian(mlp_loss, X)
    assert got.requires_grad
    (g,) = torch.autograd.grad(got.sum(), X)
    want = torch.autograd.grad(torch.func.vmap(torch.func.hessian(mlp_loss))(X).sum(), X)[0]
    torch.testing.assert_close(g, want, **TOL)
    with pytest.raises(NotImplementedError, match="differentiable"):
        jacbatch.hessian(mlp_loss, X, method="closed_form")


def test_follows_a_changed_closure() -> None:
    """A closed-over value that changes between calls is seen (Dynamo's guards re-capture, and
    the program belongs to the captured graph)."""
    scale = [1.0]
    W = _randn(3, 4)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(scale[0] * (W @ x)).sum()

    X = _randn(3, 4)
    for s in (1.0, 2.5):
        scale[0] = s
        torch.testing.assert_close(jacbatch.hessian(f, X), reference_hessian(f, [X]), **TOL)
    W.mul_(3.0)  # an in-place update of a read tensor
    torch.testing.assert_close(jacbatch.hessian(f, X), reference_hessian(f, [X]), **TOL)


def test_singular_input_goes_to_autodiff() -> None:
    """A singular Gram matrix gives a non-finite closed form: autodiff answers, and raises as
    the per-sample autograd loop does, rather than returning a silently different value."""

    def f(X: torch.Tensor) -> torch.Tensor:
        return torch.logdet(X.T @ X)

    X = _randn(3, 4, 2)
    X[1, :, 1] = X[1, :, 0]  # sample 1 is singular
    with pytest.raises(RuntimeError, match="singular"):
        reference_hessian(f, [X])
    with pytest.raises(RuntimeError, match="singular"):
        jacbatch.hessian(f, X)
    torch.testing.assert_close(jacbatch.hessian(f, X[::2]), reference_hessian(f, [X[::2]]), **TOL)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "newton"}, ValueError, "hessian: expected method to be one of"),
        ({"vec": "diag"}, ValueError, "hessian: expected vec"),
        ({"chunk_size": 0}, ValueError, "hessian: expected chunk_size"),
        ({"argnums": 3}, ValueError, "hessian: expected argnums"),
        ({"in_dims": (0, 0)}, ValueError, "hessian: expected in_dims"),
        ({"max_memory": "lots"}, ValueError, "hessian: expected max_memory"),
    ],
)
def test_refuses_bad_options(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        jacbatch.hessian(mlp_loss, _randn(3, 4), **kwargs)


def test_refuses_bad_inputs() -> None:
    with pytest.raises(TypeError, match=r"hessian: expected every leaf .* args\[0\]\[0\]: float"):
        jacbatch.hessian(mlp_loss, [1.0, 2.0])  # a list is a pytree: its leaves are named
    with pytest.raises(TypeError, match="hessian: "):
        jacbatch.hessian(lambda x: [x.sum(), "x"], _randn(3, 4))
    with pytest.raises((TypeError, ValueError), match="hessian: "):
        jacbatch.hessian(lambda x: x.sum(), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="hessian: expected a deterministic func"):
        jacbatch.hessian(lambda x: (x * torch.rand_like(x)).pow(2).sum(), _randn(3, 4))


def test_module_parameters() -> None:
    """A module's parameters require grad: under ``no_grad`` the closed form answers (no graph
    asked for); with grad on, autodiff gives a differentiable result. Both agree with the loop."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    net = net.double()

    def f(x: torch.Tensor) -> torch.Tensor:
        return net(x).squeeze(0) ** 2

    X = _randn(3, 4)
    want = reference_hessian(f, [X])
    with torch.no_grad():
        torch.testing.assert_close(jacbatch.hessian(f, X, method="closed_form"), want, **TOL)
    got = jacbatch.hessian(f, X)
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), want, **TOL)


# ---------------------------------------------------------------------------------------------
# Pytrees and has_aux (NOTE [Pytree Hessians] in jacbatch.second_order.trees)
# ---------------------------------------------------------------------------------------------

from torch.func import functional_call, jacfwd, jacrev, vmap  # noqa: E402
from torch.utils import _pytree as pt  # noqa: E402


def torch_func_hessian(func: Any, args: Any, argnums: Any = 0, in_dims: Any = 0,
                       has_aux: bool = False) -> Any:  # fmt: skip
    """``vmap(torch.func.hessian(func, argnums), in_dims)`` (``jacfwd(jacrev)`` with
    ``has_aux``, which ``torch.func.hessian`` lacks); unbatched when nothing is batched."""
    if has_aux:
        h = jacfwd(jacrev(func, argnums, has_aux=True), argnums, has_aux=True)
    else:
        h = torch.func.hessian(func, argnums)
    dims = pt._broadcast_to_and_flatten(in_dims, pt.tree_structure(tuple(args)))
    if all(d is None for d in dims):
        return h(*args)
    return vmap(h, in_dims=in_dims)(*args)


def assert_tree_close(got: Any, want: Any) -> None:
    assert pt.tree_structure(got) == pt.tree_structure(want)
    for g, w in zip(pt.tree_leaves(got), pt.tree_leaves(want), strict=True):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL)


def _net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)
    ).double()


@pytest.mark.parametrize("method", METHODS)
def test_parameter_dict_loss(method: str) -> None:
    """The Hessian of a per-sample loss w.r.t. a module's parameter dict, nested
    ``H[k1][k2]`` ``(B, *shape_k1, *shape_k2)`` as torch.func nests it, and against the
    autograd loop on the parameters concatenated into one vector."""
    net = _net()
    params = {k: v.detach() for k, v in net.named_parameters()}
    X, T = _randn(4, 3), _randn(4, 2)

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((functional_call(net, p, (x,)) - t) ** 2).sum()

    got = jacbatch.hessian(loss, params, X, T, in_dims=(None, 0, 0), method=method)
    assert_tree_close(got, torch_func_hessian(loss, (params, X, T), 0, (None, 0, 0)))
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def flat_loss(theta: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parts = torch.split(theta, sizes)
        p = {k: v.reshape(params[k].shape) for k, v in zip(names, parts, strict=True)}
        return loss(p, x, t)

    theta = torch.cat([params[k].reshape(-1) for k in names])
    want = reference_hessian(flat_loss, [theta, X, T], 0, [None, 0, 0])  # (B, P, P)
    pairs = list(zip(names, sizes, strict=True))
    full = torch.cat(
        [torch.cat([got[a][b].reshape(4, sa, sb) for b, sb in pairs], 2) for a, sa in pairs], 1
    )
    torch.testing.assert_close(full, want, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_tuple_argnums_prefix_in_dims_and_tree_output(method: str) -> None:
    p = {"w": _randn(5, 3, 2), "b": _randn(2)}
    state = (_randn(3), {"s": _randn(5, 2)})

    def f(p: Any, state: Any) -> Any:
        h = torch.tanh((state[0] + 1.0) @ p["w"] + p["b"])
        return {"sum": (h * state[1]["s"]).sum(), "vec": [h.sin() * state[0][:2]]}

    in_dims = ({"w": 0, "b": None}, (None, {"s": 0}))
    got = jacbatch.hessian(f, p, state, argnums=(0, 1), in_dims=in_dims, method=method)
    assert_tree_close(got, torch_func_hessian(f, (p, state), (0, 1), in_dims))
    assert got["vec"][0][0]["w"][1][0].shape == (5, 2, 3, 2, 3)  # out, w, state[0]


@pytest.mark.parametrize("vec", ["row", "col"])
def test_vec_of_tree_output(vec: str) -> None:
    """Each output leaf flattened as a tensor output is: no ``out_numel`` axis for a scalar."""
    p = {"a": _randn(2, 3)}
    X = _randn(4, 3)

    def f(p: Any, x: torch.Tensor) -> Any:
        z = p["a"] @ x
        return (z**3).sum(), torch.outer(z, z).sin()

    got = jacbatch.hessian(f, p, X, in_dims=(None, 0), vec=vec)
    for k in range(2):

        def g(a: torch.Tensor, x: torch.Tensor, k: int = k) -> torch.Tensor:
            return f({"a": a}, x)[k]

        want = jacbatch.hessian(g, p["a"], X, in_dims=(None, 0), vec=vec)  # the tensor path
        torch.testing.assert_close(got[k]["a"]["a"], want, **TOL)
    assert got[0]["a"]["a"].shape == (4, 6, 6) and got[1]["a"]["a"].shape == (4, 4, 6, 6)
    ref = torch_func_hessian(f, (p, X), 0, (None, 0))[1]["a"]["a"]  # (4, 2, 2, 2, 3, 2, 3)
    if vec == "col":
        ref = ref.permute(0, 2, 1, 4, 3, 6, 5)
    torch.testing.assert_close(got[1]["a"]["a"], ref.reshape(4, 4, 6, 6), **TOL)


@pytest.mark.parametrize("method", ["auto", "jacfwd"])
def test_has_aux(method: str) -> None:
    net = _net()
    params = {k: v.detach() for k, v in net.named_parameters()}
    X = _randn(4, 3)

    def f(p: Any, x: torch.Tensor) -> Any:
        y = functional_call(net, p, (x,))
        return y.pow(2).sum(), {"y": y, "one": torch.ones(2, dtype=torch.float64)}

    got, aux = jacbatch.hessian(f, params, X, in_dims=(None, 0), has_aux=True, method=method)
    want, want_aux = torch_func_hessian(f, (params, X), 0, (None, 0), has_aux=True)
    assert_tree_close(got, want)
    assert_tree_close(aux, want_aux)
    assert aux["one"].shape == (4, 2)  # batched like the output, as vmap returns it
    # a plain tensor argument with has_aux
    got, aux = jacbatch.hessian(lambda x: (x.sin().sum(), x.cos()), X, has_aux=True)
    want, want_aux = torch_func_hessian(lambda x: (x.sin().sum(), x.cos()), (X,), has_aux=True)
    assert_tree_close((got, aux), (want, want_aux))
    with pytest.raises(
        TypeError, match=r"hessian: expected func to return a tuple \(output, aux\)"
    ):
        jacbatch.hessian(lambda x: x.sum(), X, has_aux=True)


def test_unbatched_tree_and_tensor_tuple_output() -> None:
    p = {"w": _randn(3), "v": [_randn(2)]}

    def f(p: Any) -> Any:
        return (p["w"].exp() * p["v"][0].sum()).sum(), p["w"] ** 2

    got = jacbatch.hessian(f, p, in_dims=None)
    assert_tree_close(got, torch_func_hessian(f, (p,), 0, None))
    X = _randn(4, 3)
    got = jacbatch.hessian(lambda x: (x.pow(3).sum(), x.sin()), X)  # a tensor, a tuple output
    assert_tree_close(got, torch_func_hessian(lambda x: (x.pow(3).sum(), x.sin()), (X,)))


def test_tree_errors_name_the_leaf() -> None:
    p = {"w": _randn(3), "n": torch.arange(3)}
    with pytest.raises(TypeError, match=r"hessian: .*args\[0\]\['n'\]"):
        jacbatch.hessian(lambda p: (p["w"] * p["n"]).sum(), p, in_dims=None)
    with pytest.raises(ValueError, match=r"hessian: expected in_dims to be a prefix"):
        jacbatch.hessian(lambda p: p["w"].sum(), p, in_dims=({"x": 0},))
