"""Pytrees in and out of jacbatch.jacobian, and has_aux, against torch.func and a per-sample
torch.autograd.functional.jacobian float64 loop (NOTE [Pytree calls] in jacbatch.pytree)."""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev, vmap
from torch.utils import _pytree as pt

import jacbatch
from jacbatch import executor, pytree, repeated

METHODS = ["auto", "closed_form", "jacrev", "jacfwd", "vjp"]
DT = torch.float64


def _col(J: torch.Tensor, lead: int, n_out: int) -> torch.Tensor:
    """``J`` ``(*lead, *out, *in)`` flattened column-major on both sides."""
    lead_dims = list(range(lead))
    out = list(reversed(range(lead, lead + n_out)))
    inn = list(reversed(range(lead + n_out, J.ndim)))
    shape = J.shape
    P = J.permute(*lead_dims, *out, *inn)
    return P.reshape(*shape[:lead], math.prod(shape[lead : lead + n_out]), -1)


def reference(func, args, argnums=0, in_dims=0, vec=None, has_aux=False):
    """Per-sample ``torch.autograd.functional.jacobian`` loop, float64: the result's leaves in
    ``torch.func.jacrev``'s order (output leaf, then argnum, then that argument's leaf)."""
    args = pt.tree_map(lambda x: x.detach().to(DT) if isinstance(x, torch.Tensor) else x, args)
    leaves, spec = pt.tree_flatten(tuple(args))
    dims = pt._broadcast_to_and_flatten(
        tuple(in_dims) if isinstance(in_dims, list) else in_dims, spec
    )
    sizes = {x.shape[d] for x, d in zip(leaves, dims, strict=True) if d is not None}
    B = next(iter(sizes)) if sizes else None
    nums = argnums if isinstance(argnums, tuple) else (argnums,)
    owner = [p[0].idx for p, _ in pt.tree_flatten_with_path(tuple(args))[0]]
    diff = [i for a in nums for i in range(len(leaves)) if owner[i] == a]

    def sample(b):
        return [
            x if d is None or b is None else x.select(d, b)
            for x, d in zip(leaves, dims, strict=True)
        ]

    def outs(ls):
        out = func(*pt.tree_unflatten(ls, spec))
        return out[0] if has_aux else out

    per_sample = []
    for b in range(B) if B is not None else [None]:
        ls = sample(b)
        out_leaves = pt.tree_leaves(outs(ls))
        blocks = []
        for i in diff:

            def g(z, i=i, ls=ls):
                return tuple(pt.tree_leaves(outs([z if j == i else x for j, x in enumerate(ls)])))

            J = torch.autograd.functional.jacobian(g, ls[i])
            blocks.append(
                [Jk.reshape(*o.shape, *ls[i].shape) for Jk, o in zip(J, out_leaves, strict=True)]
            )
        per_sample.append([[blk[k] for blk in blocks] for k in range(len(out_leaves))])
    flat = []
    for k in range(len(per_sample[0])):
        for j in range(len(diff)):
            Js = [s[k][j] for s in per_sample]
            n_out = Js[0].ndim - leaves[diff[j]].ndim + (dims[diff[j]] is not None)
            J = torch.stack(Js) if B is not None else Js[0]
            lead = 1 if B is not None else 0
            if vec == "row":
                J = J.reshape(*J.shape[:lead], math.prod(J.shape[lead : lead + n_out]), -1)
            elif vec == "col":
                J = _col(J, lead, n_out)
            flat.append(J)
    return flat


def torch_func(func, args, argnums=0, in_dims=0, has_aux=False):
    """``vmap(jacrev(func, argnums, has_aux), in_dims)(*args)`` (``jacrev`` alone unbatched)."""
    j = jacrev(func, argnums=argnums, has_aux=has_aux)
    spec = pt.tree_structure(tuple(args))
    dims = pt._broadcast_to_and_flatten(in_dims, spec)
    if all(d is None for d in dims):
        return j(*args)
    return vmap(j, in_dims=in_dims)(*args)


def check(got, func, args, argnums=0, in_dims=0, vec=None, has_aux=False):
    """``got`` equals torch.func's result (structure and values) and the reference loop."""
    want = torch_func(func, args, argnums, in_dims, has_aux)
    if has_aux:
        got, aux = got
        want, want_aux = want
        assert pt.tree_structure(aux) == pt.tree_structure(want_aux)
        for a, w in zip(pt.tree_leaves(aux), pt.tree_leaves(want_aux), strict=True):
            torch.testing.assert_close(a, w, rtol=0, atol=0)
    assert pt.tree_structure(got) == pt.tree_structure(want)
    ref = reference(func, args, argnums, in_dims, vec, has_aux)
    got_leaves = pt.tree_leaves(got)
    assert len(got_leaves) == len(ref)
    for g, w, r in zip(got_leaves, pt.tree_leaves(want), ref, strict=True):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
        if vec is None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def _mlp():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(DT)


# ---------------------------------------------------------------------------------------------
# Parameter dicts, every route
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_parameter_dict_every_route(method):
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3, dtype=DT)

    def f(p, x):
        return functional_call(model, p, (x,))

    J = jacbatch.jacobian(f, params, x, in_dims=(None, 0), method=method)
    assert set(J) == set(params)
    for k, v in params.items():
        assert J[k].shape == (4, 2, *v.shape)
    check(J, f, (params, x), 0, (None, 0))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("vec", [None, "row", "col"])
def test_tuple_output_tuple_argnums_and_vec(method, vec):
    W = torch.randn(3, 2, dtype=DT)
    X = torch.randn(5, 4, 3, dtype=DT)
    bias = [torch.randn(2, dtype=DT), torch.randn(4, 2, dtype=DT)]

    def f(W, x, bias):
        Z = x @ W + bias[0] + bias[1]
        return torch.tanh(Z), (Z**2).sum(), Z.T * 2.0

    argnums, in_dims = (0, 2), (None, 0, [None, None])
    J = jacbatch.jacobian(f, W, X, bias, argnums=argnums, in_dims=in_dims, method=method, vec=vec)
    check(J, f, (W, X, bias), argnums, (None, 0, [None, None]), vec)


@pytest.mark.parametrize("method", METHODS)
def test_dict_output_batched_and_shared_leaves(method):
    p = {"w": torch.randn(6, 3, 2, dtype=DT), "b": torch.randn(2, dtype=DT)}
    state = (torch.randn(3, dtype=DT), {"s": torch.randn(6, 2, dtype=DT)})

    def f(p, state):
        h = (state[0] + 1.0) @ p["w"] + p["b"]
        return {"h": torch.sin(h), "n": {"sq": h * state[1]["s"]}}

    in_dims = ({"w": 0, "b": None}, (None, {"s": 0}))
    J = jacbatch.jacobian(f, p, state, argnums=(0, 1), in_dims=in_dims, method=method)
    check(J, f, (p, state), (0, 1), in_dims)
    assert J["h"][0]["w"].shape == (6, 2, 3, 2)


def test_tensor_args_with_tuple_output_and_no_batch():
    A = torch.randn(3, 3, dtype=DT)

    def f(A):
        return A @ A, A.trace()

    J = jacbatch.jacobian(f, A, in_dims=None)
    assert isinstance(J, tuple) and J[0].shape == (3, 3, 3, 3) and J[1].shape == (3, 3)
    check(J, f, (A,), 0, None)


@pytest.mark.parametrize("method", ["auto", "jacrev", "vjp"])
def test_has_aux(method):
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3, dtype=DT)

    def f(p, x):
        y = functional_call(model, p, (x,))
        return y, {"y": y, "norm": x.norm(), "const": torch.ones(2, dtype=DT)}

    J = jacbatch.jacobian(f, params, x, in_dims=(None, 0), method=method, has_aux=True)
    check(J, f, (params, x), 0, (None, 0), has_aux=True)
    assert J[1]["const"].shape == (4, 2)  # batched like the output, as vmap returns it


def test_has_aux_with_plain_tensors_and_tuple_output():
    x = torch.randn(5, 3, dtype=DT)

    def f(x):
        return (x.sin(), x.cos().sum()), x.exp()

    J = jacbatch.jacobian(f, x, has_aux=True, vec="col")
    check(J, f, (x,), 0, 0, vec="col", has_aux=True)


@pytest.mark.parametrize(("method", "budget"), [("vjp", "64KiB"), ("jacfwd", "256KiB")])
def test_chunked_run_matches(monkeypatch, method, budget):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    model = model.to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(32, 8, dtype=DT)

    def f(p, x):
        y = functional_call(model, p, (x,))
        return y, y.sum()

    kw = {"in_dims": (None, 0), "method": method}
    whole = jacbatch.estimate_memory(f, params, x, **kw)
    assert whole.output_bytes == 32 * 5 * sum(v.numel() for v in params.values()) * 8
    calls = []
    real = executor._execute

    def counting(call, *rest, **kw):
        calls.append(call.batch_size)
        return real(call, *rest, **kw)

    monkeypatch.setattr(executor, "_execute", counting)
    J = jacbatch.jacobian(f, params, x, max_memory=budget, **kw)
    assert len(calls) > 1, "the budget must split the batch"
    check(J, f, (params, x), 0, (None, 0))


def test_vec_row_and_col_of_dict_output_agree_with_layout():
    p = {"a": torch.randn(2, 3, dtype=DT)}
    x = torch.randn(4, 3, 2, dtype=DT)

    def f(p, x):
        return {"m": p["a"] @ x, "t": (p["a"] * x.T).T}

    for vec in ("row", "col"):
        J = jacbatch.jacobian(f, p, x, in_dims=(None, 0), vec=vec)
        check(J, f, (p, x), 0, (None, 0), vec=vec)


# ---------------------------------------------------------------------------------------------
# The torch.func idiom with modules
# ---------------------------------------------------------------------------------------------


class _Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(4, 3)
        self.mid = torch.nn.BatchNorm1d(3)
        self.dec = torch.nn.Linear(3, 4)
        self.dec.weight = torch.nn.Parameter(torch.randn(4, 3))
        self.head = torch.nn.Linear(4, 3, bias=False)
        self.head.weight = self.enc.weight  # tied

    def forward(self, x):
        h = torch.tanh(self.mid(self.enc(x)))
        return self.head(self.dec(h))


def _tied_model():
    torch.manual_seed(2)
    model = _Tied().to(DT)
    with torch.no_grad():
        model.mid.running_mean.uniform_(-1, 1)
        model.mid.running_var.uniform_(0.5, 2)
    model.dec.bias.requires_grad_(False)  # frozen
    return model.eval()


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_functional_call_idiom_verbatim(method):
    """``vmap(jacrev(f), in_dims=(None, None, 0))`` with jacbatch substituted: tied weights,
    a frozen parameter, BatchNorm in eval mode with its buffers (an int64 one among them)."""
    model = _tied_model()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    assert buffers["mid.num_batches_tracked"].dtype == torch.int64
    x = torch.randn(5, 4, dtype=DT)

    def f(params, buffers, x):
        return functional_call(model, (params, frozen, buffers), (x.unsqueeze(0),)).squeeze(0)

    J = jacbatch.jacobian(f, params, buffers, x, in_dims=(None, None, 0), method=method)
    want = vmap(jacrev(f), in_dims=(None, None, 0))(params, buffers, x)
    assert set(J) == set(want) == {"enc.weight", "enc.bias", "mid.weight", "mid.bias",
                                   "dec.weight"}  # fmt: skip
    for k in J:
        torch.testing.assert_close(J[k], want[k], rtol=1e-12, atol=1e-12)
    check(J, f, (params, buffers, x), 0, (None, None, 0))
    # Per-sample parameter Jacobians flattened: the (B, K, P) matrix of NTK / Laplace code.
    flatJ = torch.cat([j.flatten(2) for j in J.values()], dim=2)
    assert flatJ.shape == (5, 3, sum(v.numel() for v in params.values()))


def test_model_parameters_and_input_both_differentiated():
    model = _mlp()
    params = dict(model.named_parameters())  # require grad: the result is differentiable

    def f(p, x):
        return functional_call(model, p, (x,))

    x = torch.randn(3, 3, dtype=DT)
    J = jacbatch.jacobian(f, params, x, argnums=(0, 1), in_dims=(None, 0))
    assert J[1].shape == (3, 2, 3)
    check(J, f, (params, x), (0, 1), (None, 0))
    # differentiable w.r.t. the parameters, as torch.func's result
    (got,) = torch.autograd.grad(J[0]["0.weight"].square().sum(), params["2.weight"])
    want = vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, 0))(params, x)[0]["0.weight"]
    (ref,) = torch.autograd.grad(want.square().sum(), params["2.weight"])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_composes_with_torch_func_and_itself():
    """Inside torch.func.grad (a Jacobian penalty w.r.t. a parameter dict), and a Jacobian of a
    pytree Jacobian (second derivatives nest as jacrev(jacrev))."""
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    X = torch.randn(5, 3, dtype=DT)

    def f(p, x):
        return functional_call(model, p, (x,))

    def penalty(jac):
        return lambda p: sum(j.square().sum() for j in jac(p).values())

    got = torch.func.grad(penalty(lambda p: jacbatch.jacobian(f, p, X, in_dims=(None, 0))))(params)
    want = torch.func.grad(penalty(lambda p: vmap(jacrev(f), in_dims=(None, 0))(p, X)))(params)
    for k in params:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)

    def g(z):
        return {"a": z.sin().sum(), "b": z.cos()}

    H = jacbatch.jacobian(lambda x: jacbatch.jacobian(g, x, in_dims=None), X)
    Hr = vmap(jacrev(jacrev(g)))(X)
    assert pt.tree_structure(H) == pt.tree_structure(Hr)
    for a, b in zip(pt.tree_leaves(H), pt.tree_leaves(Hr), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The tensor path is untouched; repeated calls
# ---------------------------------------------------------------------------------------------


def test_tensor_calls_take_the_tensor_path(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the pytree path ran")

    monkeypatch.setattr(pytree, "jacobian", refuse)
    X = torch.randn(4, 3, dtype=DT)
    W = torch.randn(3, 2, dtype=DT)
    J = jacbatch.jacobian(lambda x, w: torch.tanh(x @ w), X, W, in_dims=[0, None], argnums=(0, 1))
    assert J[0].shape == (4, 2, 3)
    assert not pytree.is_tree_call((X, W), (0, None), False)
    assert pytree.is_tree_call(({"w": W},), 0, False)
    assert pytree.is_tree_call((X,), ({"a": 0},), False)
    assert pytree.is_tree_call((X,), 0, True)


def test_repeated_pytree_calls_stay_correct():
    """A loop of pytree calls gets hot like a tensor call; another tree of the same shapes
    (keys swapped) and another function of the same code never reuse a wrong program."""
    repeated.forget_all()
    x = torch.randn(4, 3, dtype=DT)
    scale = [1.0]

    def g(p, x):
        return torch.tanh(x * p["a"]) * scale[0], {"s": (x * p["b"]).sum()}

    p = {"a": torch.randn(3, dtype=DT), "b": torch.randn(3, dtype=DT)}
    for _ in range(repeated.HOT_CALLS + 2):
        check(jacbatch.jacobian(g, p, x, in_dims=(None, 0)), g, (p, x), 0, (None, 0))
    assert any(s.entry is not None for t in repeated._SEEN.values() for s in t.values())
    scale[0] = 3.0  # a guard fails: the full path, the new value
    check(jacbatch.jacobian(g, p, x, in_dims=(None, 0)), g, (p, x), 0, (None, 0))
    for _ in range(repeated.HOT_CALLS + 2):  # has_aux: aux computed beside the program
        J = jacbatch.jacobian(g, p, x, in_dims=(None, 0), has_aux=True, argnums=(0, 1))
        check(J, g, (p, x), (0, 1), (None, 0), has_aux=True)
    for step in range(2 * repeated.HOT_CALLS + 1):
        a, b = torch.randn(3, dtype=DT), torch.randn(3, dtype=DT)
        p = {"a": a, "b": b} if step % 2 == 0 else {"b": a, "a": b}
        scale = float(step + 1)

        def f(p, x, scale=scale):
            return {"o": torch.sin(x * p["a"]) * scale + p["b"] ** 2}

        J = jacbatch.jacobian(f, p, x, in_dims=(None, 0))
        check(J, f, (p, x), 0, (None, 0))


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
def test_batched_function_with_pytrees(method):
    """batched=True: func maps a batch to a batch; trees and has_aux as for a per-sample func."""
    x = torch.randn(4, 3, dtype=DT)
    p = {"a": torch.randn(3, dtype=DT), "b": torch.randn(3, dtype=DT)}

    def f(p, x):  # per sample and batched alike
        return {"o": torch.sin(x * p["a"]) + p["b"] ** 2, "s": (x * p["a"]).sum(-1)}, x.sum(-1)

    J = jacbatch.jacobian(f, p, x, in_dims=(None, 0), batched=True, has_aux=True, method=method)
    check(J, f, (p, x), 0, (None, 0), has_aux=True)


# ---------------------------------------------------------------------------------------------
# out=, explain, estimate_memory, streaming
# ---------------------------------------------------------------------------------------------


def test_out_tree_for_a_single_output():
    p = {"w": torch.randn(3, 2, dtype=DT), "b": torch.randn(2, dtype=DT)}
    x = torch.randn(4, 3, dtype=DT)

    def f(p, x):
        return torch.tanh(x @ p["w"] + p["b"])

    out = {"w": torch.empty(4, 2, 3, 2, dtype=DT), "b": torch.empty(4, 2, 2, dtype=DT)}
    J = jacbatch.jacobian(f, p, x, in_dims=(None, 0), out=out)
    for k in p:
        assert J[k].data_ptr() == out[k].data_ptr()
    check(J, f, (p, x), 0, (None, 0))
    with pytest.raises(TypeError, match="tree of tensors like the Jacobian"):
        jacbatch.jacobian(f, p, x, in_dims=(None, 0), out=(out["w"], out["b"]))
    with pytest.raises(ValueError, match="single tensor with out="):
        jacbatch.jacobian(lambda p, x: (f(p, x), x), p, x, in_dims=(None, 0), out=out)


def test_explain_and_estimate_memory_take_pytrees():
    p = {"w": torch.randn(3, 2, dtype=DT)}
    x = torch.randn(4, 3, dtype=DT)

    def f(p, x):
        return torch.tanh(x @ p["w"]), x.sum()

    plan = jacbatch.explain(f, p, x, in_dims=(None, 0))
    assert plan.batch_size == 4 and plan.out_shape == (3,)
    est = jacbatch.estimate_memory(f, p, x, in_dims=(None, 0))
    assert est.output_bytes == 4 * 3 * 6 * 8
    # tensor arguments, a tuple output
    plan = jacbatch.explain(lambda x: (x.sin(), x.sum()), x)
    assert plan.out_shape == (4,)
    est = jacbatch.estimate_memory(lambda x: (x.sin(), x.sum()), x, vec="col")
    assert est.output_bytes == 4 * 4 * 3 * 8


# ---------------------------------------------------------------------------------------------
# iter_jacobian and save_jacobian (NOTE [Pytree Jacobian files] in jacbatch.streaming)
# ---------------------------------------------------------------------------------------------


def _joined(chunks):
    """The chunks of ``iter_jacobian`` concatenated along the batch, leaf by leaf."""
    slices = [sl for sl, _ in chunks]
    assert slices[0].start == 0
    assert all(a.stop == b.start for a, b in itertools.pairwise(slices))
    specs = {pt.tree_structure(J) for _, J in chunks}
    assert len(specs) == 1
    return pt.tree_map(lambda *xs: torch.cat(xs), *[J for _, J in chunks])


def _stream_cases():
    p = {"w": torch.randn(7, 3, 2, dtype=DT), "b": torch.randn(2, dtype=DT)}
    state = (torch.randn(3, dtype=DT), {"s": torch.randn(7, 2, dtype=DT)})

    def f(p, state):
        h = (state[0] + 1.0) @ p["w"] + p["b"]
        return {"h": torch.sin(h), "n": {"sq": h * state[1]["s"]}}

    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def g(params, x):
        y = functional_call(model, params, (x,))
        return y

    def t(x):  # tensor argument, tuple output
        return x.sin(), (x**2).sum()

    x = torch.randn(7, 3, dtype=DT)
    return {
        "dict-output-batched-and-shared-leaves": (
            f, (p, state), (0, 1), ({"w": 0, "b": None}, (None, {"s": 0}))
        ),
        "parameter-dict": (g, (params, x), 0, (None, 0)),
        "tensor-arg-tuple-output": (t, (torch.randn(7, 12, dtype=DT),), 0, 0),
    }  # fmt: skip


_STREAM = _stream_cases()


@pytest.mark.parametrize("vec", [None, "row", "col"])
@pytest.mark.parametrize("case", list(_STREAM))
@pytest.mark.parametrize("chunking", ["batch_chunk", "max_memory"])
def test_iter_jacobian_chunks_nest_like_jacobian(case, vec, chunking):
    func, args, argnums, in_dims = _STREAM[case]
    if chunking == "batch_chunk":
        kw = {"batch_chunk": 3}
    else:  # a budget for about half the batch (result and working memory)
        est = jacbatch.estimate_memory(func, *args, argnums=argnums, in_dims=in_dims)
        kw = {"max_memory": est.peak_bytes // 2}
    chunks = list(
        jacbatch.iter_jacobian(func, *args, argnums=argnums, in_dims=in_dims, vec=vec, **kw)
    )
    assert len(chunks) > 1, "the batch must be split"
    check(_joined(chunks), func, args, argnums, in_dims, vec)


@pytest.mark.parametrize("vec", [None, "col"])
@pytest.mark.parametrize("case", list(_STREAM))
def test_save_jacobian_writes_a_tree_directory(tmp_path, case, vec):
    func, args, argnums, in_dims = _STREAM[case]
    path = tmp_path / "J"
    shapes = jacbatch.save_jacobian(
        path, func, *args, argnums=argnums, in_dims=in_dims, vec=vec, batch_chunk=3
    )
    loaded = jacbatch.load_jacobian(path)
    assert all(isinstance(a, np.memmap) for a in pt.tree_leaves(loaded))
    got = pt.tree_map(lambda a: torch.from_numpy(np.array(a)), loaded)
    assert pt.tree_map(lambda a: tuple(a.shape), got) == shapes
    check(got, func, args, argnums, in_dims, vec)
    assert os.listdir(tmp_path) == ["J"]  # no temporary left beside it
    # written again: the old result is replaced as a whole, nothing left beside it
    jacbatch.save_jacobian(path, func, *args, argnums=argnums, in_dims=in_dims, vec=vec)
    check(pt.tree_map(lambda a: torch.from_numpy(np.array(a)), jacbatch.load_jacobian(path)),
          func, args, argnums, in_dims, vec)  # fmt: skip
    assert os.listdir(tmp_path) == ["J"]


def test_save_jacobian_tree_failure_leaves_the_old_result(tmp_path):
    func, args, _, in_dims = _STREAM["parameter-dict"]
    path = tmp_path / "J"
    jacbatch.save_jacobian(path, func, *args, in_dims=in_dims)
    before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    calls = []

    def flaky(params, x):
        if x.device.type != "meta":
            calls.append(1)
            if len(calls) > 2:
                raise RuntimeError("simulated interruption")
        return func(params, x)

    with pytest.raises(RuntimeError, match="simulated interruption"):
        jacbatch.save_jacobian(path, flaky, *args, in_dims=in_dims, method="jacrev", batch_chunk=2)
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before
    assert os.listdir(tmp_path) == ["J"]
    with pytest.raises(RuntimeError, match="simulated interruption"):
        calls.clear()
        jacbatch.save_jacobian(
            tmp_path / "new", flaky, *args, in_dims=in_dims, method="jacrev", batch_chunk=2
        )
    assert os.listdir(tmp_path) == ["J"]  # a failed new result does not appear at all


def test_save_jacobian_tree_refuses_to_replace_other_things(tmp_path):
    func, args, _, in_dims = _STREAM["parameter-dict"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "J.npy").write_bytes(b"keep")
    for target in ("mine", "J.npy"):
        with pytest.raises(FileExistsError, match="directory of Jacobian files"):
            jacbatch.save_jacobian(tmp_path / target, func, *args, in_dims=in_dims)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert (tmp_path / "J.npy").read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["J.npy", "mine"]


_KILLED_TREE_WRITER = """
import sys, time, torch
import jacbatch
path, marker = sys.argv[1], sys.argv[2]
calls = []
def slow(p, x):
    if x.device.type != 'meta':
        calls.append(1)
        if len(calls) == 3:
            open(marker, 'w').close()  # two chunks are on their way to disk
        if len(calls) >= 3:
            time.sleep(0.2)
    return {'y': torch.tanh(x @ p['w'] + p['b']), 's': x.sum()}
g = torch.Generator().manual_seed(1)
p = {'w': torch.randn(8, 8, generator=g), 'b': torch.randn(8, generator=g)}
jacbatch.save_jacobian(path, slow, p, torch.randn(40, 8, generator=g), in_dims=(None, 0),
                       method='jacrev', batch_chunk=1)
"""


def test_a_tree_writer_killed_mid_write_leaves_the_old_result(tmp_path):
    import signal

    from tests._killed import kill_at_marker

    func, args, argnums, in_dims = _STREAM["parameter-dict"]
    path, marker = tmp_path / "J", tmp_path.parent / f"{tmp_path.name}.marker"
    jacbatch.save_jacobian(path, func, *args, argnums=argnums, in_dims=in_dims)
    before = {n: (path / n).read_bytes() for n in os.listdir(path)}
    assert kill_at_marker(_KILLED_TREE_WRITER, path, marker) == -signal.SIGKILL
    assert {n: (path / n).read_bytes() for n in os.listdir(path)} == before
    others = [n for n in os.listdir(tmp_path) if n != "J"]
    # a killed process cannot clean up: what it leaves is a hidden, unmistakable temporary
    assert len(others) == 1 and others[0].startswith(".J.tmp-"), others


# ---------------------------------------------------------------------------------------------
# Errors name the leaf and the fix
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "in_dims", "kw", "exc", "match"),
    [
        (({"w": torch.ones(2, dtype=torch.long)}, torch.ones(4, 2)), (None, 0), {}, TypeError,
         r"args\[0\]\['w'\]: dtype torch.int64"),
        (({"w": torch.ones(2)}, torch.ones(4, 2)), ({"v": None}, 0), {}, ValueError,
         "prefix of the arguments' structure"),
        (({"w": torch.ones(2)}, torch.ones(4, 2)), ({"w": 3}, 0), {}, ValueError,
         r"in_dim of args\[0\]\['w'\].*got 3"),
        (({"w": torch.ones(3, 2)}, torch.ones(4, 2)), ({"w": 0}, 0), {}, ValueError,
         r"one batch size.*args\[0\]\['w'\] has 3, args\[1\] has 4"),
        (({"w": torch.ones(2), "v": torch.ones(2, dtype=DT)}, torch.ones(4, 2)), (None, 0), {},
         TypeError, "share one dtype"),
        (({"w": torch.ones(2)}, torch.ones(4, 2)), (None, 0), {"has_aux": True}, TypeError,
         r"tuple \(output, aux\)"),
        (({"w": torch.ones(2)}, torch.ones(4, 2)), (None, 0), {"argnums": 2}, ValueError,
         "argnums in range"),
        (({}, torch.ones(4, 2)), (None, 0), {}, ValueError, "hold at least one tensor"),
        ((torch.ones(4, 2), {"k": torch.ones(4, 2, dtype=DT)}), 0, {}, TypeError,
         r"batched leaves to be dense tensors of the differentiated dtype torch.float32.*"
         r"args\[1\]\['k'\] with dtype torch.float64"),
    ],
)  # fmt: skip
def test_errors_name_the_leaf(args, in_dims, kw, exc, match):
    def f(p, x):
        if isinstance(p, dict):
            p, x = x, p
        return p * sum(x.values())

    with pytest.raises(exc, match=match):
        jacbatch.jacobian(f, *args, in_dims=in_dims, **kw)


def test_non_tensor_output_leaf_is_named():
    with pytest.raises(TypeError, match=r"output\['n'\] of type int"):
        jacbatch.jacobian(lambda x: {"y": x, "n": 3}, torch.ones(4, 2))


def test_shared_leaf_of_another_dtype_is_a_constant():
    x = torch.randn(4, 3, dtype=DT)
    other = {"w": torch.randn(3, dtype=torch.float32)}

    def f(x, other):
        return x * other["w"].double()

    J = jacbatch.jacobian(f, x, other, in_dims=(0, None))
    check(J, f, (x, other), 0, (0, None))


def test_shared_non_tensor_leaves_are_passed_through():
    x = torch.randn(4, 3, dtype=DT)
    cfg = {"scale": 2.5, "idx": torch.tensor([2, 0])}

    def f(x, cfg):
        return x[cfg["idx"]] * cfg["scale"]

    J = jacbatch.jacobian(f, x, cfg, in_dims=(0, None))
    assert isinstance(J, torch.Tensor) and J.shape == (4, 2, 3)
    want = vmap(jacrev(f), in_dims=(0, None))(x, cfg)
    torch.testing.assert_close(J, want, rtol=0, atol=0)
    np.testing.assert_allclose(J[0].numpy(), [[0, 0, 2.5], [2.5, 0, 0]])
