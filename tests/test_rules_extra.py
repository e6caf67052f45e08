"""The indexing, scan, per-axis, normalization and convolution op rules against the reference.

Each case is a plain function whose graph holds the op (``explain`` must show its rule, so a
case cannot silently pass through autodiff); ``method="closed_form"`` computes it from the rules
alone, compared with the per-sample float64 autograd loop of ``tests/_reference.py`` for every
batching of the arguments (all batched, only the differentiated one, all but it, none). Index
tensors, masks and running statistics are closed over; ``index_from_x`` draws its index from
the input, so it differs per sample.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import jacbatch
from jacbatch.testing import tolerance
from tests.conftest import reference_jacobian
from tests.test_tracing_rules import Case, in_dims_for, make_args

F64 = torch.float64

IDX = torch.tensor([2, 0, 2, 1])
GIDX = torch.tensor([[0, 3], [2, 2], [1, 0]])  # (3, 2) into (3, 4) along dim 1
GIDX_BOX = torch.tensor([[0, 3, 1], [2, 2, 0]])  # (2, 3) into (3, 4): a box on both axes
SIDX = torch.tensor([[4, 1], [0, 3]])  # (2, 2): unique per row, writes into (3, 5) along dim 1
DUP = torch.tensor([[0, 1, 1], [2, 1, 0], [0, 0, 2]])  # (3, 3), repeated along dim 0
EMB = torch.tensor([[1, 4, 1], [0, 3, 2]])
MASK = torch.tensor([[True, False, True, False], [False, False, True, True], [True] * 4])
RM = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
RV = torch.tensor([1.5, 0.7, 2.0], dtype=F64)


def _zeros_in(X: torch.Tensor) -> torch.Tensor:
    """``X`` with about half its entries exactly zero (several in a row)."""
    return torch.where(X > 0, X, 0.0)


def _shape(*s: int):
    return lambda m, p, q: [s]


CASES: list[tuple[Case, str]] = [
    # indexing
    (Case("index_select", lambda X: torch.index_select(X, 1, IDX), _shape(2, 3)), "index_select"),
    (Case("index_select_one", lambda X: X.index_select(0, IDX[1:2]), _shape(3, 2)), "index_select"),
    (Case("gather", lambda X: torch.gather(X, 1, GIDX), _shape(3, 4)), "gather"),
    (Case("gather_box", lambda X: torch.gather(X, 1, GIDX_BOX), _shape(3, 4)), "gather"),
    (Case("index_from_x", lambda X: torch.gather(X, 1, X.argsort(1)), _shape(3, 4)), "gather"),
    (Case("index_cols", lambda X: X[:, IDX], _shape(2, 3)), "index"),
    (Case("index_rows_negative", lambda X: X[IDX - 3], _shape(3, 2)), "index"),
    (Case("index_split", lambda X: X[IDX[:2], :, IDX[2:]], _shape(3, 2, 3)), "index"),
    (Case("index_2d", lambda X: X[:, GIDX], _shape(2, 4)), "index"),
    (
        Case("embedding", lambda W: F.embedding(EMB, W), _shape(5, 3)),
        "embedding",
    ),
    (
        Case("embedding_pad", lambda W: F.embedding(EMB, W, padding_idx=1), _shape(5, 2)),
        "embedding",
    ),
    (
        Case(
            "scatter", lambda X, S: X.scatter(1, SIDX, S), lambda m, p, q: [(3, 5), (2, 2)], (0, 1)
        ),
        "scatter",
    ),
    (Case("scatter_value", lambda X: X.scatter(1, SIDX, 0.5), _shape(3, 5)), "scatter"),
    (
        Case(
            "scatter_add",
            lambda X, S: X.scatter_add(0, DUP, S),
            lambda m, p, q: [(3, 4), (3, 3)],
            (0, 1),
        ),
        "scatter_add",
    ),
    (
        Case(
            "scatter_reduce_sum",
            lambda X, S: X.scatter_reduce(0, DUP, S, "sum", include_self=False),
            lambda m, p, q: [(3, 3), (3, 3)],
            (0, 1),
        ),
        "scatter_reduce",
    ),
    (
        Case(
            "index_add",
            lambda X, S: X.index_add(1, IDX[:3], S, alpha=2.0),
            lambda m, p, q: [(2, 3), (2, 3)],
            (0, 1),
        ),
        "index_add",
    ),
    (Case("masked_fill", lambda X: X.masked_fill(MASK, 0.25), _shape(3, 4)), "masked_fill"),
    (Case("masked_fill_bcast", lambda x: x.masked_fill(MASK, 0.25), _shape(4)), "masked_fill"),
    (
        Case(
            "where_both",
            lambda X, Y: torch.where(MASK, X, 2 * Y),
            lambda m, p, q: [(3, 4), (4,)],
            (0, 1),
        ),
        "where",
    ),
    # per-axis maps
    (Case("flip", lambda X: torch.flip(X, (0, 2)), _shape(2, 3, 4)), "flip"),
    (Case("fliplr", torch.fliplr, _shape(3, 4)), "flip"),
    (Case("roll", lambda X: torch.roll(X, (1, -2, 1), (1, 0, 1)), _shape(3, 4)), "roll"),
    (Case("roll_flat", lambda X: torch.roll(X, 5), _shape(3, 4)), "roll"),
    (Case("pad", lambda X: F.pad(X, (1, 2, 0, 1), value=0.5), _shape(2, 3)), "constant_pad"),
    (Case("pad_crop", lambda X: F.pad(X, (-1, 2)), _shape(2, 3)), "constant_pad"),
    (
        Case("pad_reflect", lambda X: F.pad(X, (2, 1), mode="reflect"), _shape(2, 4)),
        "reflection_pad",
    ),
    (
        Case("pad_replicate", lambda X: F.pad(X, (1, 2, 2, 0), mode="replicate"), _shape(2, 3, 2)),
        "replication_pad",
    ),
    # scans
    (Case("cumsum", lambda X: torch.cumsum(X, 1), _shape(3, 4)), "cumsum"),
    (Case("cumsum_first", lambda X: torch.cumsum(X, 0), _shape(3, 2, 2)), "cumsum"),
    (Case("cumprod", lambda X: torch.cumprod(X, -1), _shape(3, 4)), "cumprod"),
    (Case("cumprod_zeros", lambda X: torch.cumprod(_zeros_in(X), 0), _shape(5, 3)), "cumprod"),
    (Case("logcumsumexp", lambda X: torch.logcumsumexp(X, 1), _shape(2, 4)), "logcumsumexp"),
    (Case("cummax", lambda X: torch.cummax(X, 1).values, _shape(3, 4)), "cummax"),
    (Case("cummin", lambda X: torch.cummin(X, 0).values, _shape(4, 2)), "cummin"),
    # normalization
    (
        Case(
            "layer_norm",
            lambda X, w, b: F.layer_norm(X, (4,), w, b),
            lambda m, p, q: [(3, 4), (4,), (4,)],
            (0, 1, 2),
        ),
        "layer_norm",
    ),
    (Case("layer_norm_2d", lambda X: F.layer_norm(X, (2, 3)), _shape(2, 2, 3)), "layer_norm"),
    (
        Case(
            "batch_norm_eval",
            lambda X, w, b: F.batch_norm(X, RM, RV, w, b, training=False),
            lambda m, p, q: [(2, 3, 2), (3,), (3,)],
            (0, 1, 2),
        ),
        "batch_norm",
    ),
    (
        Case(
            "batch_norm_train",
            lambda X, w: F.batch_norm(X, None, None, w, None, training=True),
            lambda m, p, q: [(4, 3), (3,)],
            (0, 1),
        ),
        "batch_norm",
    ),
    (
        Case(
            "group_norm",
            lambda X, w, b: F.group_norm(X, 2, w, b),
            lambda m, p, q: [(2, 4, 3), (4,), (4,)],
            (0, 1, 2),
        ),
        "group_norm",
    ),
    # convolutions
    (
        Case(
            "conv1d",
            lambda X, W, b: F.conv1d(X, W, b, stride=2, padding=1, dilation=2),
            lambda m, p, q: [(2, 3, 7), (4, 3, 2), (4,)],
            (0, 1, 2),
        ),
        "convolution",
    ),
    (
        Case(
            "conv2d_groups",
            lambda X, W: F.conv2d(X, W, padding=(1, 0), groups=2),
            lambda m, p, q: [(4, 4, 3), (6, 2, 2, 2)],
            (0, 1),
        ),
        "convolution",
    ),
    (
        Case(
            "conv_transpose1d",
            lambda X, W, b: F.conv_transpose1d(X, W, b, stride=2, padding=1, output_padding=1),
            lambda m, p, q: [(1, 3, 4), (3, 2, 3), (2,)],
            (0, 1, 2),
        ),
        "convolution",
    ),
    (
        Case(
            "conv_transpose2d_groups",
            lambda X, W: F.conv_transpose2d(X, W, stride=(1, 2), groups=2, dilation=(2, 1)),
            lambda m, p, q: [(4, 2, 3), (4, 3, 2, 2)],
            (0, 1),
        ),
        "convolution",
    ),
    (
        Case(
            "conv3d",
            lambda X, W: F.conv3d(X, W, stride=(1, 2, 1)),
            lambda m, p, q: [(1, 2, 3, 3, 3), (2, 2, 2, 1, 2)],
            (0, 1),
        ),
        "convolution",
    ),
]


def _batchings(case: Case) -> list[str]:
    if len(case.shapes(2, 2, 2)) == 1:
        return ["all", "none"]
    return ["all", "diff_only", "others_only", "none"]


PARAMS = [pytest.param(c, mode, id=f"{c.name}-{mode}") for c, _ in CASES for mode in _batchings(c)]


def _args(case: Case, B: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    return [x.to(dtype) for x in make_args(case, 2, 2, 2, B, seed=len(case.name))]


@pytest.mark.parametrize(("case", "mode"), PARAMS)
def test_rule_matches_autograd(case: Case, mode: str) -> None:
    full = _args(case, 3)
    for a in case.argnums:
        dims = in_dims_for(mode, len(full), a)
        args = [x if d is not None else x[0] for x, d in zip(full, dims, strict=True)]
        J = jacbatch.jacobian(case.func, *args, argnums=a, in_dims=dims, method="closed_form")
        R = reference_jacobian(case.func, args, a, dims)
        rtol, atol = tolerance(F64)
        torch.testing.assert_close(J, R, rtol=rtol, atol=atol * max(1.0, float(R.abs().max())))


@pytest.mark.parametrize(("case", "rule"), [pytest.param(c, r, id=c.name) for c, r in CASES])
def test_explain_shows_the_rule(case: Case, rule: str) -> None:
    args = _args(case, 2)
    plan = jacbatch.explain(case.func, *args, argnums=case.argnums, method="auto")
    notes = "\n".join(plan.notes)
    assert f"-> rule {rule}\n" in notes + "\n", notes
    assert "no closed-form rule" not in notes, notes
    assert all(st.route == "traced" for st in plan.steps), str(plan)


VEC = ["index_2d", "scatter", "roll", "cumprod_zeros", "layer_norm", "conv2d_groups"]


@pytest.mark.parametrize("vec", ["row", "col"])
@pytest.mark.parametrize("case", [c for c, _ in CASES if c.name in VEC], ids=lambda c: c.name)
def test_vec_layouts(case: Case, vec: str) -> None:
    args = _args(case, 2)
    for a in case.argnums:
        J = jacbatch.jacobian(case.func, *args, argnums=a, vec=vec, method="closed_form")
        R = reference_jacobian(case.func, args, a, [0] * len(args), vec=vec)
        o = math.prod(case.func(*(x[0] for x in args)).shape)
        assert J.shape == (2, o, args[a][0].numel())
        torch.testing.assert_close(J, R, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [c for c, _ in CASES if c.name in VEC], ids=lambda c: c.name)
def test_float32(case: Case) -> None:
    args = _args(case, 2, torch.float32)
    for a in case.argnums:
        J = jacbatch.jacobian(
            case.func_f32 if hasattr(case, "func_f32") else case.func,
            *args,
            argnums=a,
            method="closed_form",
        )
        R = reference_jacobian(case.func, args, a, [0] * len(args))
        assert J.dtype == torch.float32
        rtol, atol = tolerance(torch.float32)
        torch.testing.assert_close(J.double(), R, rtol=rtol, atol=atol)
