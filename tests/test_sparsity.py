"""Structural sparsity detection (jacbatch.sparsity / jacbatch.sparse.detect) against the nonzeros
of dense per-sample Jacobians from an independent reference.

The reference is the project's independent one (``tests/_reference.py``: a per-sample loop of
``torch.autograd.functional.jacobian`` in float64) at several random points, OR-ed: an entry
that is nonzero at some point must be in the pattern (never missed); for op classes the
detector treats exactly, the pattern must equal that union (random points avoid accidental
zeros).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F

import jacbatch
from jacbatch.sparse import NoPatternError, SparsityPattern
from jacbatch.sparse.detect import detect
from tests.conftest import reference_jacobian

DT = torch.float64
POINTS = 4


def observed(
    func: Callable[..., torch.Tensor],
    shapes: Sequence[tuple[int, ...]],
    argnum: int = 0,
    points: int = POINTS,
    seed: int = 0,
) -> torch.Tensor:
    """``(out_numel, in_numel)`` bool: entries of the reference Jacobian that are nonzero at some
    of ``points`` random points (every argument drawn afresh per point, per-sample shapes)."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(points, *s, dtype=DT, generator=gen) for s in shapes]
    J = reference_jacobian(func, xs, argnum, 0, vec="row")  # (points, out_numel, in_numel)
    return (J != 0).any(0)


def pattern_of(
    func: Callable[..., torch.Tensor],
    shapes: Sequence[tuple[int, ...]],
    argnum: int = 0,
    B: int = 3,
) -> SparsityPattern:
    """Detected pattern for a batched call (every argument batched along dim 0)."""
    args = [torch.randn(B, *s, dtype=DT) for s in shapes]
    got = jacbatch.sparsity(func, *args, argnums=argnum)
    assert isinstance(got, SparsityPattern)
    return got


def assert_exact(func: Callable[..., torch.Tensor], *shapes: tuple[int, ...], argnum: int = 0):
    p = pattern_of(func, shapes, argnum)
    ref = observed(func, shapes, argnum)
    mask = p.to_mask()
    assert mask.shape == ref.shape
    missed = ref & ~mask
    assert not missed.any(), f"missed {int(missed.sum())} entries"
    extra = mask & ~ref
    assert not extra.any(), f"{int(extra.sum())} entries more than observed"
    return p


def assert_superset(func: Callable[..., torch.Tensor], *shapes: tuple[int, ...], argnum: int = 0):
    p = pattern_of(func, shapes, argnum)
    ref = observed(func, shapes, argnum, points=8)
    missed = ref & ~p.to_mask()
    assert not missed.any(), f"missed {int(missed.sum())} entries"
    return p


# ---------------------------------------------------------------------------------------------
# Functions
# ---------------------------------------------------------------------------------------------


def diff1d(x: torch.Tensor) -> torch.Tensor:
    return (x[1:] - x[:-1]) ** 2


def heat_residual(u: torch.Tensor) -> torch.Tensor:
    """Tridiagonal: (u[i-1] - 2 u[i] + u[i+1]) / h^2 + sin(u[i]), zero Dirichlet boundaries."""
    z = u.new_zeros(1)
    left = torch.cat([z, u[:-1]])
    right = torch.cat([u[1:], z])
    return (left - 2 * u + right) * 4.0 + torch.sin(u)


def brusselator(N: int, via: str = "roll") -> Callable[[torch.Tensor], torch.Tensor]:
    """The 2-D Brusselator right-hand side on an N x N periodic grid (2 N^2 unknowns), with the
    5-point Laplacian through torch.roll or through index arithmetic."""

    def lap(z: torch.Tensor) -> torch.Tensor:
        if via == "roll":
            return (
                torch.roll(z, 1, 0) + torch.roll(z, -1, 0) + torch.roll(z, 1, 1)
                + torch.roll(z, -1, 1) - 4 * z
            )  # fmt: skip
        i = torch.arange(N)
        ip, im = (i + 1) % N, (i - 1) % N
        return z[ip] + z[im] + z[:, ip] + z[:, im] - 4 * z

    def f(u: torch.Tensor) -> torch.Tensor:
        U = u.reshape(2, N, N)
        a, b = U[0], U[1]
        du = 1 + a * a * b - 4.4 * a + 10.0 * lap(a)
        dv = 3.4 * a - a * a * b + 10.0 * lap(b)
        return torch.stack([du, dv]).reshape(-1)

    return f


def brusselator_pattern(N: int) -> torch.Tensor:
    """The Brusselator's pattern built by hand: each species' 5-point stencil plus the other
    species at the same point."""
    mask = torch.zeros(2 * N * N, 2 * N * N, dtype=torch.bool)
    for s in range(2):
        for i in range(N):
            for j in range(N):
                r = s * N * N + i * N + j
                for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
                    mask[r, s * N * N + ((i + di) % N) * N + (j + dj) % N] = True
                mask[r, (1 - s) * N * N + i * N + j] = True
    return mask


GEN = torch.Generator().manual_seed(1)
W1 = torch.randn(7, 5, dtype=DT, generator=GEN)
B1 = torch.randn(7, dtype=DT, generator=GEN)
W2 = torch.randn(3, 7, dtype=DT, generator=GEN)
WBLK = torch.randn(4, 3, 3, dtype=DT, generator=GEN)
WMAT = torch.randn(4, 5, dtype=DT, generator=GEN)
IDX = torch.tensor([3, 0, 0, 5, 2])
MASK = torch.tensor([True, False, False, True, False, True])
INTERIOR = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=DT)
WCONV = torch.randn(4, 2, 3, 3, dtype=DT, generator=GEN)
BCONV = torch.randn(4, dtype=DT, generator=GEN)
WCONV1 = torch.randn(6, 2, 3, dtype=DT, generator=GEN)
XCONV = torch.randn(1, 2, 5, 6, dtype=DT, generator=GEN)
BN_W, BN_B, BN_M = (torch.randn(3, dtype=DT, generator=GEN) for _ in range(3))
BN_V = torch.rand(3, dtype=DT, generator=GEN) + 0.5
BN_W4 = torch.randn(4, dtype=DT, generator=GEN)


def mlp(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(W2 @ torch.tanh(W1 @ x + B1))


def block_diag(x: torch.Tensor) -> torch.Tensor:
    return torch.bmm(WBLK, x.reshape(4, 3, 1)).reshape(-1)


def elementwise(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * torch.exp(x) + x**3 / (1 + x**2) - (1 + torch.tanh(x) ** 2).sqrt()


def gathers(x: torch.Tensor) -> torch.Tensor:
    rows = torch.tensor([1, 1, 0])
    return torch.cat(
        [x.index_select(0, IDX), x[IDX[::2]], x.reshape(2, 3).gather(1, rows.reshape(3, 1).T)[0]]
    )


def movements(x: torch.Tensor) -> torch.Tensor:
    m = x.reshape(2, 3)
    return torch.cat(
        [
            torch.stack([m.flip(1), torch.roll(m, 1, 1)]).reshape(-1),
            F.pad(m, (1, 2)).reshape(-1) * 3,
            F.pad(m.unsqueeze(0), (2, 1), mode="reflect").reshape(-1),
            m.T.reshape(-1)[1:4],
            torch.diagonal(m),
            m.expand(2, 2, 3).sum(0).reshape(-1),
        ]
    )


def writes(x: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[1:3] = y[1:3] * 2  # slice_scatter
    z = torch.zeros(8, dtype=x.dtype)
    z[torch.tensor([7, 0, 2])] = x[:3]  # index_put
    s = torch.zeros(3, dtype=x.dtype).scatter_add(0, torch.tensor([0, 2, 2, 1, 0, 0]), x)
    return torch.cat([y, z * 3, s])


# ---------------------------------------------------------------------------------------------
# Exact classes: the pattern equals the union of observed nonzeros
# ---------------------------------------------------------------------------------------------

EXACT = {
    "diff1d": (diff1d, [(12,)]),
    "heat_residual": (heat_residual, [(9,)]),
    "brusselator_roll": (brusselator(4), [(32,)]),
    "brusselator_index": (brusselator(4, "index"), [(32,)]),
    "elementwise_chain": (elementwise, [(6,)]),
    "dense_mlp": (mlp, [(5,)]),
    "block_diag_bmm": (block_diag, [(12,)]),
    "cumsum": (lambda x: torch.cumsum(x.reshape(3, 4), 1) * x.reshape(3, 4), [(12,)]),
    "softmax_dim": (lambda x: torch.softmax(x, dim=1), [(3, 4)]),
    "log_softmax_dim0": (lambda x: torch.log_softmax(x, dim=0) ** 2, [(3, 4)]),
    "gather_index_select": (gathers, [(6,)]),
    "cat_with_integers": (lambda x: torch.cat([x, torch.arange(3)]).flip(0) * 2, [(4,)]),
    "cat_stack_flip_roll_pad": (movements, [(6,)]),
    "reduce_one_dim": (
        lambda x: torch.cat([x.sum(0), x.prod(1), x.mean(1, keepdim=True).reshape(-1)]),
        [(3, 4)],
    ),
    "norm_var": (lambda x: torch.cat([x.norm(dim=1), x.var(0)]), [(3, 4)]),
    "matmul_constant": (lambda x: x @ WMAT, [(3, 4)]),
    "einsum": (lambda x: torch.einsum("ij,jk->ik", x, WMAT).tanh(), [(3, 4)]),
    "layer_norm": (lambda x: F.layer_norm(x, (4,)), [(3, 4)]),
    "scatter_writes": (writes, [(6,)]),
    "erfcx_no_rule": (lambda x: torch.special.erfcx(x[1:] * x[:-1]), [(7,)]),
    "i1e_no_rule": (lambda x: torch.special.i1e(x).cumsum(0), [(5,)]),
    "where_constant_mask": (lambda x: torch.where(MASK, x.roll(1) * x, x**2), [(6,)]),
    "masked_fill_constant_mask": (lambda x: (x.roll(1) * x).masked_fill(MASK, 2.0), [(6,)]),
    "dirichlet_mask_mul": (
        lambda u: INTERIOR * (u.roll(1) + u.roll(-1) - 2 * u) + (1 - INTERIOR) * (u - 1.0),
        [(6,)],
    ),
    "detach_stops": (lambda x: x * x.detach().sum() + torch.sign(x).sum(), [(4,)]),
    "conv2d_stride_bias": (
        lambda x: F.conv2d(x.reshape(1, 2, 5, 6), WCONV, BCONV, padding=1, stride=(1, 2)),
        [(60,)],
    ),
    "conv2d_dilation": (
        lambda x: F.conv2d(x.reshape(2, 5, 6), WCONV, None, padding=2, dilation=2),
        [(60,)],
    ),
    "conv1d_groups": (
        lambda x: F.conv1d(x.reshape(1, 4, 7), WCONV1, groups=2, padding=1),
        [(28,)],
    ),
    "conv2d_weight": (lambda w: F.conv2d(XCONV, w, padding=1), [(4, 2, 3, 3)]),
    "batch_norm_train": (
        lambda x: F.batch_norm(x.reshape(2, 3, 4), None, None, BN_W, BN_B, training=True),
        [(24,)],
    ),
    "batch_norm_eval": (
        lambda x: F.batch_norm(x.reshape(2, 3, 4), BN_M, BN_V, BN_W, BN_B) * x.reshape(2, 3, 4),
        [(24,)],
    ),
    "group_norm": (lambda x: F.group_norm(x.reshape(1, 4, 3), 2, BN_W4, None), [(12,)]),
    "interpolate_linear": (
        lambda x: F.interpolate(x.reshape(1, 2, 5), scale_factor=2.5, mode="linear"),
        [(10,)],
    ),
    "interpolate_bilinear_corners": (
        lambda x: F.interpolate(
            x.reshape(1, 1, 3, 4), size=(5, 7), mode="bilinear", align_corners=True
        ),
        [(12,)],
    ),
    "interpolate_bicubic": (
        lambda x: F.interpolate(x.reshape(1, 2, 4, 3), scale_factor=0.7, mode="bicubic"),
        [(24,)],
    ),
    "glu_trace_prelu": (
        lambda x: torch.cat(
            [
                F.glu(x.reshape(4, 4), 0).reshape(-1),
                x.reshape(4, 4).trace().reshape(1),
                F.prelu(x.reshape(1, 4, 4), BN_W4[:1]).reshape(-1),
            ]
        ),
        [(16,)],
    ),
    "avg_pool": (lambda x: F.avg_pool2d(x.reshape(2, 5, 6), 3, stride=2, padding=1), [(60,)]),
    "adaptive_avg_pool": (lambda x: F.adaptive_avg_pool2d(x.reshape(2, 5, 7), (3, 2)), [(70,)]),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_patterns(name: str) -> None:
    func, shapes = EXACT[name]
    assert_exact(func, *shapes)


def test_brusselator_n32_matches_the_stencil() -> None:
    N = 32
    p = pattern_of(brusselator(N), [(2 * N * N,)])
    assert torch.equal(p.to_mask(), brusselator_pattern(N))
    q = pattern_of(brusselator(N, "index"), [(2 * N * N,)])
    assert q.equals(p)
    assert p.nnz == 6 * 2 * N * N


def test_diff1d_large() -> None:
    n = 10_000
    p = pattern_of(diff1d, [(n,)])
    assert p.nnz == 2 * (n - 1)
    rows = p.row_indices()
    assert torch.equal(p.col_indices - rows, torch.arange(2).repeat(n - 1))


# ---------------------------------------------------------------------------------------------
# Conservative classes: a superset of every observed nonzero
# ---------------------------------------------------------------------------------------------

CONSERVATIVE = {
    "sort": (lambda x: torch.sort(x, dim=1).values, [(3, 4)]),
    "topk": (lambda x: torch.topk(x, 2, dim=1).values * 2, [(3, 4)]),
    "amax": (lambda x: x.amax(1) + x.max(0).values.sum(), [(3, 4)]),
    "relu_where": (lambda x: torch.where(x > 0, x, x**2).relu() + x.clamp(-0.5, 0.5), [(6,)]),
    "cholesky_no_rule": (
        lambda x: torch.linalg.cholesky(x @ x.T + 3 * torch.eye(3, dtype=x.dtype)),
        [(3, 3)],
    ),
    "cdist_no_rule": (lambda x: torch.cdist(x, x.flip(0)), [(4, 2)]),
    "value_index": (lambda x: x[torch.argsort(x)] * x, [(5,)]),
    "max_pool": (lambda x: F.max_pool2d(x.reshape(1, 2, 5, 6), 2, padding=1), [(60,)]),
}


@pytest.mark.parametrize("name", list(CONSERVATIVE))
def test_conservative_patterns(name: str) -> None:
    func, shapes = CONSERVATIVE[name]
    assert_superset(func, *shapes)


M4 = torch.randn(4, 4, dtype=DT, generator=GEN)
PERM = torch.randperm(8, generator=GEN)
CHAIN_OPS: list[Callable[[torch.Tensor], torch.Tensor]] = [
    torch.sin,
    lambda x: torch.roll(x, 3),
    lambda x: x.flip(0),
    lambda x: x.cumsum(0),
    lambda x: F.pad(x[2:], (0, 2)),
    lambda x: x * x.roll(1),
    lambda x: (x.reshape(2, 4) @ M4).reshape(-1),
    lambda x: torch.softmax(x.reshape(4, 2), 1).reshape(-1),
    lambda x: x[PERM],
    lambda x: x.reshape(2, 4).sum(1, keepdim=True).expand(2, 4).reshape(-1) + x,
    lambda x: torch.cat([x[4:], x[:4]]) * 2,
    lambda x: x.reshape(2, 4).T.reshape(-1),
    lambda x: torch.where(x > 0, x, x.flip(0)),
    lambda x: x.sort().values,
    lambda x: torch.special.erfcx(x).amax(0) * x,
]


@pytest.mark.parametrize("seed", range(8))
def test_random_chains_never_miss(seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    chain = [CHAIN_OPS[int(i)] for i in torch.randint(len(CHAIN_OPS), (3,), generator=g)]

    def f(x: torch.Tensor) -> torch.Tensor:
        for op in chain:
            x = op(x)
        return x

    assert_superset(f, (8,))


def test_sort_and_topk_give_whole_fibers() -> None:
    fiber = torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 3)
    assert torch.equal(pattern_of(CONSERVATIVE["sort"][0], [(3, 4)]).to_mask(), fiber)
    topk = pattern_of(CONSERVATIVE["topk"][0], [(3, 4)]).to_mask()
    assert torch.equal(topk, fiber.reshape(3, 4, 12)[:, :2].reshape(6, 12))


def test_unknown_op_is_dense_over_its_inputs() -> None:
    p = pattern_of(CONSERVATIVE["cholesky_no_rule"][0], [(3, 3)])
    assert p.density == 1.0


# ---------------------------------------------------------------------------------------------
# Calls: shared and batched arguments, closures, argnums
# ---------------------------------------------------------------------------------------------


def test_shared_and_batched_arguments_and_argnums() -> None:
    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x[1:] * w[:-1]).cumsum(0) + w[1:] ** 2

    X = torch.randn(5, 6, dtype=DT)
    w = torch.randn(6, dtype=DT)
    px = jacbatch.sparsity(f, X, w, in_dims=(0, None))
    pw = jacbatch.sparsity(f, X, w, argnums=1, in_dims=(0, None))
    both = jacbatch.sparsity(f, X, w, argnums=(0, 1), in_dims=(0, None))
    assert isinstance(both, tuple) and len(both) == 2
    assert both[0].equals(px) and both[1].equals(pw)
    assert torch.equal(px.to_mask(), observed(f, [(6,), (6,)], 0))
    assert torch.equal(pw.to_mask(), observed(f, [(6,), (6,)], 1))
    # batch dim elsewhere, and no batch at all
    p2 = jacbatch.sparsity(f, X.T.contiguous(), w, in_dims=(1, None))
    p3 = jacbatch.sparsity(f, X[0], w, in_dims=None)
    assert p2.equals(px) and p3.equals(px)


def test_closure_over_tensors_and_module() -> None:
    lin = torch.nn.Linear(4, 3).double()
    scale = torch.randn(3, dtype=DT)

    def f(x: torch.Tensor) -> torch.Tensor:
        return lin(x.reshape(2, 4)) * scale

    p = pattern_of(f, [(8,)])
    assert torch.equal(p.to_mask(), observed(f, [(8,)]))
    assert torch.equal(p.to_mask(), torch.block_diag(*[torch.ones(3, 4, dtype=torch.bool)] * 2))


def test_index_closure_values_are_read_each_call() -> None:
    idx = torch.tensor([0, 1])

    def f(x: torch.Tensor) -> torch.Tensor:
        return x[idx] * 2

    X = torch.randn(2, 4, dtype=DT)
    assert torch.equal(jacbatch.sparsity(f, X).col_indices, torch.tensor([0, 1]))
    idx.copy_(torch.tensor([3, 2]))
    assert torch.equal(jacbatch.sparsity(f, X).col_indices, torch.tensor([3, 2]))


def test_pattern_cached_per_captured_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    from jacbatch.sparse import detect as detect_module

    runs: list[int] = []
    real = detect_module._Walk.run

    def counting(self: detect_module._Walk) -> SparsityPattern:
        runs.append(1)
        return real(self)

    monkeypatch.setattr(detect_module._Walk, "run", counting)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.roll(x, 2) * x

    X = torch.randn(3, 7, dtype=DT)
    first = jacbatch.sparsity(f, X)
    again = jacbatch.sparsity(f, X)
    assert len(runs) == 1 and again.equals(first)
    again.col_indices.zero_()  # the caller's copy: the cache is untouched
    assert jacbatch.sparsity(f, X).equals(first)
    jacbatch.sparsity(f, torch.randn(3, 8, dtype=DT))  # new shapes: a new capture and walk
    assert len(runs) == 2
    idx = torch.tensor([1, 0])
    for _ in range(2):  # reads a lifted index tensor's values: walked on every call
        jacbatch.sparsity(lambda x: x[idx], X)
    assert len(runs) == 4
    scale = torch.arange(1.0, 8.0, dtype=DT)
    for _ in range(2):  # a lifted factor without zeros: the pattern does not depend on it
        jacbatch.sparsity(lambda x: x * scale, X)
    assert len(runs) == 5
    scale[0] = 0.0
    for _ in range(2):  # with a zero it does: walked on every call
        jacbatch.sparsity(lambda x: x.flip(0) * scale, X)
    assert len(runs) == 7


def test_batched_function() -> None:
    def f(X: torch.Tensor) -> torch.Tensor:  # the whole batch (B, n) -> (B, n - 1)
        return X[:, 1:] * X[:, :-1]

    p = jacbatch.sparsity(f, torch.randn(4, 6, dtype=DT), batched=True)
    assert torch.equal(p.to_mask(), observed(diff1d, [(6,)]))


def test_output_independent_of_argument_is_empty() -> None:
    p = jacbatch.sparsity(lambda x, y: y * 2, torch.ones(2, 3), torch.ones(2, 4))
    assert p.nnz == 0 and p.shape == (4, 3)


def test_identity_and_detect_directly() -> None:
    X = torch.randn(3, 4, dtype=DT)
    p = detect(lambda x: x, (X,), 0, (0,))
    assert torch.equal(p.to_mask(), torch.eye(4, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# Refusals and validation
# ---------------------------------------------------------------------------------------------


def test_random_function_is_refused() -> None:
    with pytest.raises(NoPatternError, match="random"):
        jacbatch.sparsity(lambda x: F.dropout(x, 0.5, training=True), torch.ones(2, 3))
    with pytest.raises(NotImplementedError, match="random"):
        jacbatch.sparsity(lambda x: x * torch.rand_like(x), torch.ones(2, 3))


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        return g


def test_custom_autograd_function_is_refused() -> None:
    # its forward (round) has a zero derivative; its backward says identity: no guess
    with pytest.raises(NoPatternError, match=r"custom torch\.autograd\.Function"):
        jacbatch.sparsity(lambda x: _StraightThrough.apply(x) * 2, torch.ones(2, 3))


def test_value_dependent_shape_is_refused() -> None:
    with pytest.raises(NoPatternError, match="value"):
        jacbatch.sparsity(lambda x: x[x > 0].sum() * x, torch.ones(2, 3))


def test_value_dependent_control_flow_is_refused() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum().item() > 0 else x * 3

    with pytest.raises(NoPatternError, match="trace"):
        jacbatch.sparsity(f, torch.ones(2, 3))


def test_bad_input_is_refused_as_jacobian_does() -> None:
    with pytest.raises(TypeError, match="sparsity: expected func to be callable"):
        jacbatch.sparsity(3, torch.ones(2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="argnums"):
        jacbatch.sparsity(lambda x: x, torch.ones(2), argnums=2)
    with pytest.raises(TypeError, match="floating-point"):
        jacbatch.sparsity(lambda x: x, torch.ones(2, dtype=torch.long))
    with pytest.raises(TypeError, match="batched"):
        jacbatch.sparsity(lambda x: x, torch.ones(2), batched=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# SparsityPattern: repr, to_sparse, plot
# ---------------------------------------------------------------------------------------------


def test_repr_and_to_sparse() -> None:
    p = pattern_of(diff1d, [(5,)])
    assert repr(p) == "SparsityPattern(out_shape=(4,), in_shape=(5,), nnz=8, density=0.4)"
    s = p.to_sparse()
    assert s.layout == torch.sparse_csr and s.dtype == torch.bool and s.shape == (4, 5)
    assert torch.equal(s.to_dense(), p.to_mask())
    assert not p.equals(pattern_of(diff1d, [(6,)]))


def test_plot_writes_a_png_atomically(tmp_path: os.PathLike[str]) -> None:
    pytest.importorskip("matplotlib")
    p = pattern_of(brusselator(4), [(32,)])
    path = os.path.join(os.fspath(tmp_path), "spy.png")
    with open(path, "wb") as f:
        f.write(b"old")
    p.plot(path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["spy.png"]  # no temporary file left behind


def test_plot_of_a_large_pattern_draws_bins(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib")
    from jacbatch.sparse import pattern as pattern_module

    monkeypatch.setattr(pattern_module, "SPY_MARKERS_MAX", 10)
    p = pattern_of(EXACT["cumsum"][0], [(12,)])
    path = os.path.join(os.fspath(tmp_path), "big.png")
    p.plot(path, title="cumsum")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
