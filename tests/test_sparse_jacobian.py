"""jacobian(..., sparse=...): decompressed values against an independent float64 reference
(per-sample torch.autograd.functional.jacobian), every mode, shared and batched arguments,
chunking, out=, iter_jacobian, and the errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import jacbatch
from jacbatch.sparse import SparsityPattern, engine
from tests._sparse_reference import flat_reference

DT = torch.float64
B = 4


def reference(
    f: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], in_dims: tuple[Any, ...], a: int
) -> torch.Tensor:
    """``(B, out_numel, in_numel)``: per-sample autograd Jacobians w.r.t. ``args[a]``."""
    return flat_reference(f, args, in_dims, a)


def structure(
    f: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], in_dims: tuple[Any, ...], a: int
) -> SparsityPattern:
    """The pattern, from the reference's nonzeros at the arguments and at a second random point
    (structural entries are nonzero at random points)."""
    other = tuple(torch.randn_like(x) for x in args)
    mask = (reference(f, args, in_dims, a) != 0).any(0) | (
        reference(f, other, in_dims, a) != 0
    ).any(0)
    xs = [x[0] if d is not None else x for x, d in zip(args, in_dims, strict=True)]
    return SparsityPattern.from_mask(mask, tuple(f(*xs).shape), tuple(xs[a].shape))


def diff(x: torch.Tensor) -> torch.Tensor:
    return (x[1:] - x[:-1]) ** 2


def brusselator(u: torch.Tensor) -> torch.Tensor:
    """2-D Brusselator residual on a periodic N x N grid, u: (2, N, N) (SciML benchmark)."""
    a, b, alpha = 3.4, 1.0, 10.0
    U, V = u[0], u[1]

    def lap(z: torch.Tensor) -> torch.Tensor:
        return z.roll(1, 0) + z.roll(-1, 0) + z.roll(1, 1) + z.roll(-1, 1) - 4 * z

    du = alpha * lap(U) + b + U**2 * V - (a + 1) * U
    dv = alpha * lap(V) + a * U - U**2 * V
    return torch.stack([du, dv])


def heat(x: torch.Tensor) -> torch.Tensor:
    """Tridiagonal heat-equation residual with a cubic source (Dirichlet ends)."""
    lap = -2 * x + F.pad(x[:-1], (1, 0)) + F.pad(x[1:], (0, 1))
    return lap + 0.1 * x**3


BLOCKS = torch.randn(5, 4, 3, dtype=DT, generator=torch.Generator().manual_seed(3))
DENSE_W = torch.randn(6, 5, dtype=DT, generator=torch.Generator().manual_seed(4))


def block_diag(x: torch.Tensor) -> torch.Tensor:  # x: (5, 3) -> (5, 4), block k uses x[k]
    return torch.tanh(torch.einsum("kij,kj->ki", BLOCKS, x))


def elementwise(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * torch.exp(0.3 * x)


def dense(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(DENSE_W @ x)


def weighted_diff(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x[1:] * w[1:] - x[:-1] * w[:-1]) ** 2 + x[:-1] * w[0]


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name: (func, args, in_dims, argnums)
CASES: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], Any, Any]] = {
    "diff": (diff, (torch.randn(B, 12, dtype=DT, generator=g(0)),), (0,), 0),
    "brusselator_8": (brusselator, (torch.rand(B, 2, 8, 8, dtype=DT, generator=g(1)),), (0,), 0),
    "heat": (heat, (torch.randn(B, 15, dtype=DT, generator=g(2)),), (0,), 0),
    "block_diag": (block_diag, (torch.randn(B, 5, 3, dtype=DT, generator=g(3)),), (0,), 0),
    "elementwise": (elementwise, (torch.randn(B, 3, 4, dtype=DT, generator=g(4)),), (0,), 0),
    "dense": (dense, (torch.randn(B, 5, dtype=DT, generator=g(5)),), (0,), 0),
    "shared_w": (
        weighted_diff,
        (torch.randn(B, 10, dtype=DT, generator=g(6)), torch.randn(10, dtype=DT, generator=g(7))),
        (0, None),
        (0, 1),
    ),
    "batched_w": (
        weighted_diff,
        (
            torch.randn(B, 10, dtype=DT, generator=g(8)),
            torch.randn(B, 10, dtype=DT, generator=g(9)),
        ),
        (0, 0),
        (0, 1),
    ),
}


def patterns(name: str) -> Any:
    f, args, in_dims, argnums = CASES[name]
    if isinstance(argnums, tuple):
        return tuple(structure(f, args, in_dims, a) for a in argnums)
    return structure(f, args, in_dims, argnums)


def check(name: str, J: Any, vec: str = "row") -> None:
    f, args, in_dims, argnums = CASES[name]
    Js = J if isinstance(argnums, tuple) else (J,)
    for a, Ja in zip(argnums if isinstance(argnums, tuple) else (argnums,), Js, strict=True):
        assert Ja.layout == torch.sparse_csr
        ref = reference(f, args, in_dims, a)
        if vec == "col":
            ref = jacbatch.jacobian(f, *args, argnums=a, in_dims=in_dims, vec="col")
        torch.testing.assert_close(Ja.to_dense(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "jacfwd", "jacrev"])
@pytest.mark.parametrize("name", list(CASES))
def test_exact(name: str, method: str) -> None:
    f, args, in_dims, argnums = CASES[name]
    J = jacbatch.jacobian(
        f, *args, argnums=argnums, in_dims=in_dims, sparse=patterns(name), method=method
    )
    check(name, J)


@pytest.mark.parametrize("name", ["brusselator_8", "shared_w", "elementwise"])
def test_vec_col(name: str) -> None:
    f, args, in_dims, argnums = CASES[name]
    J = jacbatch.jacobian(
        f, *args, argnums=argnums, in_dims=in_dims, sparse=patterns(name), vec="col"
    )
    check(name, J, vec="col")


def test_result_shares_indices_across_the_batch() -> None:
    f, args, _, _ = CASES["diff"]
    P = patterns("diff")
    J = jacbatch.jacobian(f, *args, sparse=P)
    assert J.shape == (B, 11, 12)
    assert J.crow_indices().stride(0) == 0 and J.col_indices().stride(0) == 0
    assert J.values().shape == (B, P.nnz)


def test_no_batch_is_two_dimensional() -> None:
    f, args, _, _ = CASES["heat"]
    P = patterns("heat")
    J = jacbatch.jacobian(f, args[0][0], in_dims=None, sparse=P)
    assert J.shape == (15, 15)
    ref = torch.autograd.functional.jacobian(f, args[0][0])
    torch.testing.assert_close(J.to_dense(), ref, rtol=0, atol=1e-12)


def test_float32() -> None:
    f, args, in_dims, _ = CASES["brusselator_8"]
    x32 = args[0].float()
    J = jacbatch.jacobian(f, x32, sparse=patterns("brusselator_8"))
    assert J.dtype == torch.float32
    torch.testing.assert_close(
        J.to_dense(), reference(f, args, in_dims, 0).float(), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("method", ["jacfwd", "jacrev"])
@pytest.mark.parametrize("max_memory", ["24KiB", "200KiB"])
def test_chunked_by_max_memory(method: str, max_memory: str) -> None:
    """Small budgets chunk over samples, then over colors; the values do not change."""
    f, args, _, _ = CASES["brusselator_8"]
    P = patterns("brusselator_8")
    prep = engine.prepare(
        "jacobian", f, args, argnums=0, in_dims=0, sparse=P, method=method, vec=None,
        max_memory=max_memory, progress=None, randomness="error", create_graph=False,
        batched=False,
    )  # fmt: skip
    batch, colors = engine.chunking(prep, count_values=False)
    assert batch < B or colors[0] < prep.parts[0].coloring.n_colors
    J = jacbatch.jacobian(
        f, *args, sparse=patterns("brusselator_8"), method=method, max_memory=max_memory
    )
    check("brusselator_8", J)


def test_chunk_size_limits_colors_per_pass() -> None:
    f, args, in_dims, argnums = CASES["shared_w"]
    J = jacbatch.jacobian(
        f, *args, argnums=argnums, in_dims=in_dims, sparse=patterns("shared_w"), chunk_size=1
    )
    check("shared_w", J)


def test_out_values_buffer() -> None:
    f, args, _, _ = CASES["heat"]
    P = patterns("heat")
    buf = torch.empty(B, P.nnz, dtype=DT)
    J = jacbatch.jacobian(f, *args, sparse=P, out=buf)
    assert J.values().data_ptr() == buf.data_ptr()
    check("heat", J)
    with pytest.raises(ValueError, match=r"\(4, 43\)"):
        jacbatch.jacobian(f, *args, sparse=P, out=torch.empty(B, P.nnz + 1, dtype=DT))
    with pytest.raises(TypeError, match="dtype"):
        jacbatch.jacobian(f, *args, sparse=P, out=torch.empty(B, P.nnz, dtype=torch.float32))
    with pytest.raises(TypeError, match="tuple"):
        jacbatch.jacobian(f, *args, sparse=P, out=(buf,))


def test_out_tuple_for_tuple_argnums() -> None:
    f, args, in_dims, argnums = CASES["batched_w"]
    P = patterns("batched_w")
    bufs = tuple(torch.empty(B, p.nnz, dtype=DT) for p in P)
    J = jacbatch.jacobian(f, *args, argnums=argnums, in_dims=in_dims, sparse=P, out=bufs)
    assert all(j.values().data_ptr() == b.data_ptr() for j, b in zip(J, bufs, strict=True))
    check("batched_w", J)


@pytest.mark.parametrize("batch_chunk", [None, 3])
def test_iter_jacobian(batch_chunk: int | None) -> None:
    f, args, in_dims, argnums = CASES["shared_w"]
    ref = [reference(f, args, in_dims, a) for a in argnums]
    seen = 0
    for sl, Js in jacbatch.iter_jacobian(
        f,
        *args,
        argnums=argnums,
        in_dims=in_dims,
        sparse=patterns("shared_w"),
        batch_chunk=batch_chunk,
    ):
        for J, R in zip(Js, ref, strict=True):
            assert J.layout == torch.sparse_csr
            torch.testing.assert_close(J.to_dense(), R[sl], rtol=0, atol=1e-12)
        seen += sl.stop - sl.start
    assert seen == B


@pytest.mark.parametrize("detected", [False, True])
def test_batched_function(detected: bool) -> None:
    x = CASES["heat"][1][0]
    sparse = True if detected else patterns("heat")

    def heat_batch(X: torch.Tensor) -> torch.Tensor:  # heat, written for a batch (B, n)
        lap = -2 * X + F.pad(X[:, :-1], (1, 0)) + F.pad(X[:, 1:], (0, 1))
        return lap + 0.1 * X**3

    J = jacbatch.jacobian(heat_batch, x, sparse=sparse, batched=True)
    check("heat", J)


def test_nonfinite_follows_reverse_mode() -> None:
    """sqrt(x**2) at 0: NaN where per-sample reverse mode puts it, nothing mixed into other
    entries of the same color."""
    f = lambda x: torch.sqrt(x[1:] ** 2 + x[:-1] ** 2)  # noqa: E731
    x = torch.randn(B, 9, dtype=DT, generator=g(11))
    x[1, 4] = 0.0
    x[1, 5] = 0.0
    P = structure(f, (x,), (0,), 0)
    for method in ("jacfwd", "jacrev"):
        J = jacbatch.jacobian(f, x, sparse=P, method=method)
        torch.testing.assert_close(
            J.to_dense(), reference(f, (x,), (0,), 0), rtol=0, atol=1e-12, equal_nan=True
        )


@pytest.mark.parametrize("method", ["jacfwd", "jacrev"])
def test_pattern_missing_a_dependence(method: str) -> None:
    f, args, _, _ = CASES["diff"]
    r = torch.arange(11)
    P = SparsityPattern.from_coo(r, r, (11,), (12,))  # misses the i + 1 column of each row
    with pytest.raises(ValueError, match=r"sparse=.*11 nonzero entries outside the pattern"):
        jacbatch.jacobian(f, *args, sparse=P, method=method)


def test_pattern_of_wrong_shape() -> None:
    f, args, _, _ = CASES["diff"]
    P = SparsityPattern.from_mask(torch.ones(12, 12, dtype=torch.bool), (12,), (12,))
    with pytest.raises(ValueError, match="out_shape"):
        jacbatch.jacobian(f, *args, sparse=P)


@pytest.mark.parametrize("bad", ["yes", 1, None, [0], (True,)])
def test_bad_sparse_types(bad: object) -> None:
    f, args, _, _ = CASES["diff"]
    with pytest.raises(TypeError, match="sparse"):
        jacbatch.jacobian(f, *args, sparse=bad)  # type: ignore[call-overload]


def test_pattern_count_must_match_argnums() -> None:
    f, args, in_dims, argnums = CASES["shared_w"]
    with pytest.raises(ValueError, match="one per argnum"):
        jacbatch.jacobian(
            f, *args, argnums=argnums, in_dims=in_dims, sparse=patterns("shared_w")[0]
        )


def test_refused_options() -> None:
    f, args, _, _ = CASES["diff"]
    P = patterns("diff")
    with pytest.raises(ValueError, match="method"):
        jacbatch.jacobian(f, *args, sparse=P, method="vjp")
    with pytest.raises(ValueError, match="randomness"):
        jacbatch.jacobian(f, *args, sparse=P, randomness="different")


def test_explain() -> None:
    f, args, _, _ = CASES["brusselator_8"]
    P = patterns("brusselator_8")
    text = str(jacbatch.explain(f, *args, sparse=P))
    assert f"nnz {P.nnz}" in text and "colors: column" in text and "chosen:" in text
    assert math.isclose(P.density, P.nnz / 128**2)


def test_create_graph_values_differentiable() -> None:
    f, args, _, _ = CASES["heat"]
    x = args[0].clone().requires_grad_(True)
    J = jacbatch.jacobian(f, x, sparse=patterns("heat"))
    (gx,) = torch.autograd.grad(J.values().sum(), x)
    # d/dx of the sum of every entry: the diagonal 0.3 x^2 terms only
    torch.testing.assert_close(gx, 0.6 * x.detach(), rtol=0, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda() -> None:
    f, args, in_dims, _ = CASES["brusselator_8"]
    J = jacbatch.jacobian(f, args[0].cuda(), sparse=patterns("brusselator_8"))
    assert J.device.type == "cuda"
    torch.testing.assert_close(
        J.to_dense().cpu(), reference(f, args, in_dims, 0), rtol=0, atol=1e-12
    )


def test_empty_batch() -> None:
    P = patterns("diff")
    J = jacbatch.jacobian(diff, torch.zeros(0, 12, dtype=DT), sparse=P)
    assert J.shape == (0, 11, 12) and J.values().shape == (0, P.nnz)


def test_refused_inside_a_transform() -> None:
    P = patterns("diff")
    with pytest.raises(NotImplementedError, match=r"torch\.func transform"):
        torch.func.vmap(lambda x: jacbatch.jacobian(diff, x, in_dims=None, sparse=P).values())(
            torch.randn(2, 12, dtype=DT)
        )


@pytest.mark.parametrize("method", ["auto", "jacfwd", "jacrev"])
@pytest.mark.parametrize("name", list(CASES))
def test_detected(name: str, method: str) -> None:
    """sparse=True: the detected pattern gives the reference values, and covers the pattern
    found from the reference's nonzeros."""
    f, args, in_dims, argnums = CASES[name]
    J = jacbatch.jacobian(f, *args, argnums=argnums, in_dims=in_dims, sparse=True, method=method)
    check(name, J)
    known = patterns(name)
    for Ja, p in zip(
        J if isinstance(J, tuple) else (J,),
        known if isinstance(known, tuple) else (known,),
        strict=True,
    ):
        assert bool((Ja[0].to_dense() != 0).le(p.to_mask()).all())
        detected = torch.zeros(p.shape, dtype=torch.bool)
        crow, col = Ja.crow_indices()[0], Ja.col_indices()[0]
        rows = torch.repeat_interleave(torch.arange(p.shape[0]), crow[1:] - crow[:-1])
        detected[rows, col] = True
        assert bool(p.to_mask().le(detected).all())


def test_detected_iter_and_explain() -> None:
    f, args, in_dims, argnums = CASES["shared_w"]
    ref = [reference(f, args, in_dims, a) for a in argnums]
    for sl, Js in jacbatch.iter_jacobian(
        f, *args, argnums=argnums, in_dims=in_dims, sparse=True, batch_chunk=3
    ):
        for J, R in zip(Js, ref, strict=True):
            torch.testing.assert_close(J.to_dense(), R[sl], rtol=0, atol=1e-12)
    text = str(jacbatch.explain(f, *args, argnums=argnums, in_dims=in_dims, sparse=True))
    assert "pattern (detected)" in text


def test_iter_jacobian_within_max_memory() -> None:
    f, args, in_dims, _ = CASES["brusselator_8"]
    P = patterns("brusselator_8")
    ref = reference(f, args, in_dims, 0)
    slices = []
    for sl, J in jacbatch.iter_jacobian(f, *args, sparse=P, max_memory="48KiB"):
        torch.testing.assert_close(J.to_dense(), ref[sl], rtol=0, atol=1e-12)
        slices.append((sl.start, sl.stop))
    assert len(slices) > 1 and slices[-1][1] == B


class _Cube(torch.autograd.Function):
    """x**3 with a backward and no forward-mode formula (torch.func-ready: setup_context and
    a generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return x**3

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * g


def test_pattern_check_without_forward_mode() -> None:
    # _Cube has no forward-mode formula: a row-mode call checks its pattern by a reverse-mode
    # product instead, and a pattern missing a dependence is still refused.
    def f(x: torch.Tensor) -> torch.Tensor:
        return _Cube.apply(x) + x[[1, 2, 3, 4, 0]]

    X = torch.randn(B, 5, dtype=DT)
    eye = torch.eye(5, dtype=torch.bool)
    full = SparsityPattern.from_mask(eye | eye[[1, 2, 3, 4, 0]], (5,), (5,))
    J = jacbatch.jacobian(f, X, sparse=full, method="jacrev")
    torch.testing.assert_close(J.to_dense(), reference(f, (X,), (0,), 0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="sparse= pattern"):
        jacbatch.jacobian(f, X, sparse=SparsityPattern.from_mask(eye, (5,), (5,)), method="jacrev")


def test_known_torch_bug_is_routed_around_or_refused() -> None:
    # cdist's backward under vmap over cotangents is wrong in torch (jacbatch._torch_bugs):
    # method="jacrev" (vmap-ed row passes) is refused; auto tries column passes, where forward
    # mode has no formula for cdist, and falls back to rows pulled back one color at a time
    # (NOTE [Forward-mode gaps fall back to rows]); never a wrong value.
    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x.reshape(5, 1), x.reshape(5, 1)).sum(1)

    X = torch.randn(B, 5, dtype=DT)
    with pytest.raises(NotImplementedError, match="cdist_backward_vmap"):
        jacbatch.jacobian(f, X, sparse=True, method="jacrev")
    J = jacbatch.jacobian(f, X, sparse=True)
    torch.testing.assert_close(J.to_dense(), reference(f, (X,), (0,), 0), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["jacfwd", "jacrev"])
def test_estimate_memory(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The estimate's output is the values plus the shared index tensors; its peak bounds the
    # measured peak of the compressed passes and the gather of a whole-batch call (measured up
    # to the CSR construction, whose storage the tracker cannot read).
    from jacbatch.memory import LiveBytes

    f, args, in_dims, _ = CASES["brusselator_8"]
    P = patterns("brusselator_8")
    est = jacbatch.estimate_memory(f, *args, in_dims=in_dims, sparse=P, method=method)
    item = torch.empty((), dtype=DT).element_size()
    assert est.output_bytes == B * P.nnz * item + (P.shape[0] + 1 + P.nnz) * 8
    assert est.batch_size == B and est.exact
    assert ("column" if method == "jacfwd" else "row") in est.route
    jacbatch.jacobian(f, *args, in_dims=in_dims, sparse=P, method=method)  # warm caches
    monkeypatch.setattr(engine, "results", lambda prep, values: list(values))
    with LiveBytes(include_meta=False) as live:
        jacbatch.jacobian(f, *args, in_dims=in_dims, sparse=P, method=method)
    assert 0 < live.peak <= est.peak_bytes * 1.5 and est.peak_bytes <= 4 * live.peak


def test_detected_pattern_object_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    # sparse=True gets detection's cached pattern itself, so a second call finds its coloring
    # and layout by object, without hashing the pattern's indices again.
    f, args, in_dims, _ = CASES["heat"]
    prep1 = engine.prepare("jacobian", f, args, argnums=0, in_dims=in_dims, sparse=True,
                           method="auto", vec=None, progress=None, randomness="error",
                           create_graph=False, batched=False)  # fmt: skip
    hashed = []
    monkeypatch.setattr(engine.hashlib, "blake2b", lambda *a, **k: hashed.append(1))
    prep2 = engine.prepare("jacobian", f, args, argnums=0, in_dims=in_dims, sparse=True,
                           method="auto", vec=None, progress=None, randomness="error",
                           create_graph=False, batched=False)  # fmt: skip
    assert prep2.parts[0].pattern is prep1.parts[0].pattern and not hashed
    assert prep2.parts[0].coloring is prep1.parts[0].coloring
