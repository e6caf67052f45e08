"""The indexing, scan, per-axis, normalization and convolution op rules against the reference.

Each case is a plain function whose graph holds the op (``explain`` must show its rule, so a
case cannot silently pass through autodiff); ``method="closed_form"`` computes it from the rules
alone, compared with the per-sample float64 autograd loop of ``tests/_reference.py`` for every
batching of the arguments (all batched, only the differentiated one, all but it, none). Index
tensors, masks and running statistics are closed over; ``index_from_x`` draws its index from
the input, so it differs per sample.

This module is about 750 lines, over the project's 600: most of it is the table of cases, one
or more per rule, kept in one place so that every case goes through the same checks (autograd
agreement for every batching, ``explain`` naming the rule).
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
BCE_T = torch.tensor([[0.0, 1.0, 0.3, 1.0]] * 3, dtype=F64)
BCE_W = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=F64).expand(3, 4)
TGT = torch.tensor([1, 0, 2, 1])
RM = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
RV = torch.tensor([1.5, 0.7, 2.0], dtype=F64)


def _zeros_in(X: torch.Tensor) -> torch.Tensor:
    """``X`` with about half its entries exactly zero (several in a row)."""
    return torch.where(X > 0, X, 0.0)


def _setitem(X: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``X`` with rows 1 and 2 replaced by ``S`` (in-place assignment, functionalized when
    traced into ``slice_scatter``)."""
    Y = X.clone()
    Y[1:3] = S
    return Y


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
    # more elementwise maps
    *(
        (Case(f"unary_{n}", fn, _shape(3, 4), positive=pos), rule)
        for n, fn, pos, rule in [
            ("asin", lambda x: torch.asin(x - 1), True, "elementwise_asin"),
            ("acos", lambda x: torch.acos(x - 1), True, "elementwise_acos"),
            ("asinh", torch.asinh, False, "elementwise_asinh"),
            ("acosh", lambda x: torch.acosh(x + 1), True, "elementwise_acosh"),
            ("atanh", lambda x: torch.atanh(x - 1), True, "elementwise_atanh"),
            ("log2", torch.log2, True, "elementwise_log2"),
            ("log10", torch.log10, True, "elementwise_log10"),
            ("exp2", torch.exp2, False, "elementwise_exp2"),
            ("erfc", torch.erfc, False, "elementwise_erfc"),
            ("erfinv", lambda x: torch.erfinv(x - 1), True, "elementwise_erfinv"),
            ("lgamma", torch.lgamma, True, "elementwise_lgamma"),
            ("digamma", torch.digamma, True, "elementwise_digamma"),
            ("i0", torch.i0, False, "elementwise_i0"),
            ("deg2rad", torch.deg2rad, False, "elementwise_deg2rad"),
            ("rad2deg", torch.rad2deg, False, "elementwise_rad2deg"),
            ("frac", torch.frac, False, "elementwise_frac"),
            ("nan_to_num", torch.nan_to_num, False, "elementwise_nan_to_num"),
            ("sinc", torch.sinc, False, "elementwise_sinc"),
            ("mish", F.mish, False, "elementwise_mish"),
            ("hardsigmoid", lambda x: F.hardsigmoid(4 * x), False, "elementwise_hardsigmoid"),
            ("hardswish", lambda x: F.hardswish(4 * x), False, "elementwise_hardswish"),
            ("floor", lambda x: x.floor() * x, False, "piecewise_constant"),
            ("round", lambda x: torch.round(x, decimals=1) + x, False, "piecewise_constant"),
            ("sign", lambda x: torch.sign(x) * x, False, "piecewise_constant"),
            ("logsigmoid", F.logsigmoid, False, "log_sigmoid"),
            ("polygamma", lambda x: torch.polygamma(2, x), True, "polygamma"),
            ("mvlgamma", lambda x: torch.mvlgamma(x + 2, 3), True, "mvlgamma"),
            ("logit", lambda x: torch.logit(x - 0.5), True, "logit"),
            ("logit_eps", lambda x: torch.logit(x - 0.5, eps=0.2), True, "logit"),
            ("elu", lambda x: F.elu(x, 1.5), False, "elu"),
            ("selu", F.selu, False, "elu"),
            ("celu", lambda x: F.celu(x, 2.0), False, "celu"),
            ("hardtanh", lambda x: F.hardtanh(x, -0.5, 0.7), False, "hardtanh"),
            ("threshold", lambda x: F.threshold(x, 0.1, 2.0), False, "threshold"),
            ("hardshrink", lambda x: F.hardshrink(x, 0.3), False, "shrink"),
            ("softshrink", lambda x: F.softshrink(x, 0.3), False, "shrink"),
            ("add_scalar", lambda x: torch.ops.aten.add.Scalar(x, 2.5), False, "add_scalar"),
            ("mul_scalar", lambda x: torch.ops.aten.mul.Scalar(x, 2.5), False, "mul_scalar"),
            ("div_scalar", lambda x: torch.ops.aten.div.Scalar(x, 4.0), False, "div_scalar"),
            ("clamp_min", lambda x: x.clamp_min(0.1), False, "clamp_min"),
            ("clamp_max", lambda x: x.clamp_max(0.1), False, "clamp_max"),
        ]
    ),
    *(
        (Case(f"binary_{n}", fn, lambda m, p, q: [(3, 4), (4,)], (0, 1), positive=pos), rule)
        for n, fn, pos, rule in [
            ("rsub", lambda X, Y: torch.rsub(X, Y, alpha=2), False, "rsub_tensor"),
            ("clamp_min", torch.clamp_min, False, "clamp_min_tensor"),
            ("clamp_max", torch.clamp_max, False, "clamp_max_tensor"),
            ("logaddexp", torch.logaddexp, False, "logaddexp"),
            ("logaddexp2", torch.logaddexp2, False, "logaddexp2"),
            ("atan2", torch.atan2, False, "atan2"),
            ("hypot", torch.hypot, False, "hypot"),
            ("xlogy", torch.xlogy, True, "xlogy"),
            ("fmax", torch.fmax, False, "fmax"),
            ("fmin_ties", lambda X, Y: torch.fmin(X, X.detach() * 0 + Y), False, "fmin"),
            ("copysign", torch.copysign, False, "copysign"),
            ("fmod", torch.fmod, True, "fmod"),
            ("remainder", torch.remainder, False, "remainder"),
            ("lerp", lambda X, Y: torch.lerp(X, Y, 0.3), False, "lerp"),
            (
                "div_floor",
                lambda X, Y: torch.div(X, Y, rounding_mode="floor") + X,
                True,
                "piecewise_constant",
            ),
        ]
    ),
    (
        Case("lerp_tensor", torch.lerp, lambda m, p, q: [(3, 4), (4,), (3, 1)], (0, 1, 2)),
        "lerp",
    ),
    (
        Case(
            "addcmul",
            lambda S, T, U: torch.addcmul(S, T, U, value=0.5),
            lambda m, p, q: [(3, 4), (4,), (3, 1)],
            (0, 1, 2),
        ),
        "addcmul",
    ),
    (
        Case(
            "addcdiv",
            lambda S, T, U: torch.addcdiv(S, T, U, value=0.5),
            lambda m, p, q: [(3, 4), (4,), (3, 1)],
            (0, 1, 2),
            positive=True,
        ),
        "div",  # addcdiv is decomposed when traced
    ),
    # picking by value
    (Case("max_all_ties", lambda X: torch.cat([X, X]).max(), _shape(3, 4)), "max_all"),
    (Case("min_all", lambda X: X.min(), _shape(3, 4)), "max_all"),
    (Case("median_all", lambda X: X.median(), _shape(3, 3)), "max_all"),
    (Case("amax_ties", lambda X: torch.cat([X, X], 1).amax(1), _shape(3, 4)), "amax"),
    (Case("amin_keep", lambda X: X.amin((0, 2), keepdim=True), _shape(2, 3, 2)), "amax"),
    (Case("max_dim", lambda X: X.max(1).values, _shape(3, 4)), "max_dim"),
    (Case("min_dim_keep", lambda X: X.min(0, keepdim=True).values, _shape(3, 4)), "max_dim"),
    (Case("median_dim", lambda X: X.median(-1).values, _shape(3, 5)), "max_dim"),
    (Case("sort", lambda X: X.sort(0, descending=True).values, _shape(4, 3)), "sort"),
    (Case("topk", lambda X: X.topk(2, 1).values, _shape(3, 4)), "topk"),
    (Case("topk_smallest", lambda X: X.topk(3, 0, largest=False).values, _shape(4, 2)), "topk"),
    (Case("kthvalue", lambda X: X.kthvalue(2, 1).values, _shape(3, 4)), "kthvalue"),
    (Case("var_mean", lambda X: sum(torch.var_mean(X, 1)), _shape(3, 4)), "var"),
    (Case("std_mean", lambda X: sum(torch.std_mean(X, 0, keepdim=True)), _shape(3, 4)), "std"),
    (Case("std", lambda X: torch.std(X, (0, 1), correction=0), _shape(3, 4, 2)), "std"),
    # rearrangements
    (Case("split", lambda X: X.split(2, 1)[1] * X.split(2, 1)[0], _shape(3, 4)), "split"),
    (Case("split_sizes", lambda X: X.split([1, 3], 0)[1], _shape(4, 2)), "split"),
    (Case("chunk_last", lambda X: X.chunk(3, -1)[2], _shape(2, 5)), "split"),
    (Case("unbind", lambda X: X.unbind(1)[2], _shape(3, 4)), "unbind"),
    (Case("diagonal", lambda X: X.diagonal(1, 0, 2), _shape(3, 2, 4)), "diagonal"),
    (Case("diagonal_neg", lambda X: torch.diagonal(X, -1), _shape(4, 3)), "diagonal"),
    (Case("diag_embed", lambda X: torch.diag_embed(X, 1, 0, 2), _shape(2, 3)), "diag_embed"),
    (
        Case(
            "diagonal_scatter",
            lambda X, S: torch.diagonal_scatter(X, S, -1),
            lambda m, p, q: [(4, 3), (3,)],
            (0, 1),
        ),
        "diagonal_scatter",
    ),
    (
        Case(
            "select_scatter",
            lambda X, S: torch.select_scatter(X, S, 1, -1),
            lambda m, p, q: [(3, 4), (3,)],
            (0, 1),
        ),
        "select_scatter",
    ),
    (
        Case(
            "setitem_slice", lambda X, S: _setitem(X, S), lambda m, p, q: [(4, 3), (2, 3)], (0, 1)
        ),
        "slice_scatter",
    ),
    (
        Case(
            "slice_scatter_step",
            lambda X, S: torch.slice_scatter(X, S, 0, 1, 4, 2),
            lambda m, p, q: [(4, 3), (2, 3)],
            (0, 1),
        ),
        "slice_scatter",
    ),
    (Case("repeat", lambda X: X.repeat(2, 1, 3), _shape(2, 3)), "repeat"),
    (Case("unfold", lambda X: X.unfold(1, 3, 2), _shape(2, 7)), "unfold"),
    # fused products, cross product, negative log-likelihood
    (
        Case(
            "addmv",
            lambda s, M, v: torch.addmv(s, M, v, beta=0.5, alpha=2.0),
            lambda m, p, q: [(3,), (3, 4), (4,)],
            (0, 1, 2),
        ),
        "addmv",
    ),
    (
        Case(
            "addr",
            lambda s, u, v: torch.addr(s, u, v, alpha=2.0),
            lambda m, p, q: [(1, 4), (3,), (4,)],
            (0, 1, 2),
        ),
        "addr",
    ),
    (
        Case(
            "baddbmm",
            lambda s, X, Y: torch.baddbmm(s, X, Y, beta=2.0, alpha=0.5),
            lambda m, p, q: [(2, 3, 4), (2, 3, 2), (2, 2, 4)],
            (0, 1, 2),
        ),
        "baddbmm",
    ),
    (
        Case(
            "addbmm",
            lambda s, X, Y: torch.addbmm(s, X, Y, alpha=0.5),
            lambda m, p, q: [(3, 4), (2, 3, 2), (2, 2, 4)],
            (0, 1, 2),
        ),
        "addbmm",
    ),
    (Case("vdot", torch.vdot, lambda m, p, q: [(4,), (4,)], (0, 1)), "dot"),
    (
        Case(
            "cross",
            lambda a, b: torch.linalg.cross(a, b, dim=0),
            lambda m, p, q: [(3, 2, 4), (3, 1, 4)],
            (0, 1),
        ),
        "cross",
    ),
    (
        Case(
            "cross_bcast",
            lambda a, b: torch.linalg.cross(a, b),
            lambda m, p, q: [(2, 3), (1, 3)],
            (0, 1),
        ),
        "cross",
    ),
    (Case("nll_sum", lambda X: F.nll_loss(X, TGT, reduction="sum"), _shape(4, 3)), "nll_loss"),
    (
        Case(
            "nll_none", lambda X: F.nll_loss(X, TGT, reduction="none", ignore_index=2), _shape(4, 3)
        ),
        "nll_loss",
    ),
    (
        Case("nll_mean_weight", lambda X, w: F.nll_loss(X, TGT, w), lambda m, p, q: [(4, 3), (3,)]),
        "nll_loss",
    ),
    (Case("nll_1d", lambda x: F.nll_loss(x, TGT[0]), _shape(3)), "nll_loss"),
    (Case("cross_entropy", lambda X: F.cross_entropy(X, TGT), _shape(4, 3)), "nll_loss"),
    # pooling and resampling
    (Case("avg_pool2d", lambda X: F.avg_pool2d(X, 2), _shape(2, 4, 5)), "avg_pool2d"),
    (
        Case(
            "avg_pool2d_pad",
            lambda X: F.avg_pool2d(X, 3, 2, 1, ceil_mode=True, count_include_pad=False),
            _shape(1, 2, 5, 4),
        ),
        "avg_pool2d",
    ),
    (
        Case(
            "avg_pool2d_div", lambda X: F.avg_pool2d(X, (2, 1), divisor_override=3), _shape(2, 4, 3)
        ),
        "avg_pool2d",
    ),
    (Case("avg_pool1d", lambda X: F.avg_pool1d(X, 3, 2, 1), _shape(2, 6)), "avg_pool2d"),
    (Case("avg_pool3d", lambda X: F.avg_pool3d(X, 2, 1), _shape(1, 3, 3, 4)), "avg_pool3d"),
    (
        Case("adaptive_avg_pool2d", lambda X: F.adaptive_avg_pool2d(X, (3, 2)), _shape(2, 5, 4)),
        "adaptive_avg_pool2d",
    ),
    (
        Case("adaptive_avg_pool1d", lambda X: F.adaptive_avg_pool1d(X, 4), _shape(2, 7)),
        "adaptive_avg_pool2d",
    ),
    (Case("max_pool2d", lambda X: F.max_pool2d(X, 2, 1, 1), _shape(2, 3, 4)), "max_pool2d"),
    (Case("max_pool1d_dil", lambda X: F.max_pool1d(X, 2, dilation=2), _shape(2, 6)), "max_pool2d"),
    (Case("max_pool3d", lambda X: F.max_pool3d(X, 2), _shape(1, 2, 4, 2, 3)), "max_pool3d"),
    (
        Case("adaptive_max_pool2d", lambda X: F.adaptive_max_pool2d(X, (2, 3)), _shape(2, 4, 5)),
        "adaptive_max_pool2d",
    ),
    (Case("nearest", lambda X: F.interpolate(X, scale_factor=2), _shape(1, 2, 3, 2)), "resample"),
    (
        Case(
            "nearest_exact",
            lambda X: F.interpolate(X, size=5, mode="nearest-exact"),
            _shape(1, 2, 3),
        ),
        "resample",
    ),
    (
        Case(
            "bilinear", lambda X: F.interpolate(X, size=(4, 5), mode="bilinear"), _shape(1, 2, 3, 2)
        ),
        "resample",
    ),
    (
        Case(
            "bicubic_corners",
            lambda X: F.interpolate(X, scale_factor=1.5, mode="bicubic", align_corners=True),
            _shape(1, 1, 3, 4),
        ),
        "resample",
    ),
    (
        Case("linear_down", lambda X: F.interpolate(X, size=3, mode="linear"), _shape(2, 1, 5)),
        "resample",
    ),
    (
        Case(
            "trilinear",
            lambda X: F.interpolate(X, scale_factor=2, mode="trilinear"),
            _shape(1, 1, 2, 2, 2),
        ),
        "resample",
    ),
    (
        Case(
            "bilinear_aa",
            lambda X: F.interpolate(X, size=(2, 3), mode="bilinear", antialias=True),
            _shape(1, 1, 5, 6),
        ),
        "resample",
    ),
    # constants, gated and parametric activations, p-norms, block diagonals
    (
        Case("zeros_like", lambda X: torch.ones_like(X) * X + torch.zeros_like(X), _shape(2, 3)),
        "constant_like",
    ),
    (Case("new_full", lambda X: X.new_full((2, 3), 2.0) * X, _shape(2, 3)), "constant_like"),
    (Case("glu", lambda X: F.glu(X, 0), _shape(4, 3)), "glu"),
    (
        Case("prelu", lambda X, w: F.prelu(X, w), lambda m, p, q: [(2, 3, 4), (3,)], (0, 1)),
        "prelu",
    ),
    (
        Case(
            "pairwise_distance",
            lambda X, Y: F.pairwise_distance(X, Y),
            lambda m, p, q: [(3, 4), (3, 4)],
            (0, 1),
        ),
        "p_norm",
    ),
    (
        Case(
            "pairwise_distance_1",
            lambda X, Y: F.pairwise_distance(X, Y, p=1.0, keepdim=True),
            lambda m, p, q: [(3, 4), (3, 4)],
            (0, 1),
        ),
        "p_norm",
    ),
    (
        Case(
            "pairwise_distance_3",
            lambda X, Y: F.pairwise_distance(X, Y, p=3.0, keepdim=True),
            lambda m, p, q: [(3, 4), (3, 4)],
            (0, 1),
        ),
        "p_norm",
    ),
    (
        Case(
            "block_diag",
            lambda X, Y: torch.block_diag(X, Y, X),
            lambda m, p, q: [(2, 3), (1, 2)],
            (0, 1),
        ),
        "block_diag",
    ),
    (
        Case(
            "clamp_tensor",
            lambda X, lo, hi: torch.clamp(X, lo, hi),
            lambda m, p, q: [(3, 4), (4,), (3, 1)],
            (0, 1, 2),
        ),
        "clamp_tensor",
    ),
    (
        Case(
            "clamp_tensor_min",
            lambda X, lo: torch.clamp(X, lo),
            lambda m, p, q: [(3, 4), (4,)],
            (0, 1),
        ),
        "clamp_tensor",
    ),
    (
        Case(
            "bce",
            lambda X, T: F.binary_cross_entropy(torch.sigmoid(X), torch.sigmoid(T)),
            lambda m, p, q: [(3, 4), (3, 4)],
            (0, 1),
        ),
        "binary_cross_entropy",
    ),
    (
        Case(
            "bce_weight_none",
            lambda X: F.binary_cross_entropy(torch.sigmoid(X), BCE_T, BCE_W, reduction="none"),
            _shape(3, 4),
        ),
        "binary_cross_entropy",
    ),
]


#: autograd's hardsigmoid kernel multiplies by 1/6 rounded to float32; the rule uses 1/6
LOOSE = {"unary_hardsigmoid": 1e-7}


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
        if case.name in LOOSE:
            rtol = atol = LOOSE[case.name]
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


def test_ties_fall_back() -> None:
    """The index a kernel returns for tied values is arbitrary: closed forms refuse, auto agrees."""
    X = torch.randn(2, 3, 4, dtype=F64)

    def f(X: torch.Tensor) -> torch.Tensor:
        return torch.cat([X, X], 1).max(1).values

    with pytest.raises(NotImplementedError, match="tied values"):
        jacbatch.jacobian(f, X, method="closed_form")
    torch.testing.assert_close(jacbatch.jacobian(f, X), reference_jacobian(f, [X]))


KINKS = {
    "hardtanh": F.hardtanh,
    "relu6": F.relu6,
    "hardsigmoid": F.hardsigmoid,
    "hardswish": F.hardswish,
    "elu": F.elu,
    "celu": F.celu,
    "selu": F.selu,
    "threshold": lambda x: F.threshold(x, 0.5, 2.0),
    "hardshrink": lambda x: F.hardshrink(x, 0.5),
    "softshrink": lambda x: F.softshrink(x, 0.5),
    "clamp_min": lambda x: x.clamp_min(0.5),
    "clamp_max": lambda x: x.clamp_max(0.5),
    "sinc": torch.sinc,
    "nan_to_num": torch.nan_to_num,
    "logsigmoid": F.logsigmoid,
}


@pytest.mark.parametrize("name", list(KINKS))
def test_kinks_and_nan_follow_autograd(name: str) -> None:
    """At the kinks, the bounds and NaN, the piecewise rules take autograd's value."""
    f = KINKS[name]
    x = torch.tensor([[float("nan"), 0.0, -3.0, 3.0, 1.0, -1.0, 0.5, -0.5]], dtype=F64)
    J = jacbatch.jacobian(f, x, method="closed_form")
    torch.testing.assert_close(
        J, reference_jacobian(f, [x]), rtol=1e-12, atol=1e-12, equal_nan=True
    )


def test_saved_statistics() -> None:
    """Layer and batch norm's saved mean and 1/σ are not differentiable in autograd (zero);
    group norm's depend on what else is differentiated there, so they are refused."""
    X = torch.randn(2, 2, 6, 3, dtype=F64)
    w, b = torch.randn(6, dtype=F64), torch.randn(6, dtype=F64)
    for k in (1, 2):

        def ln(x: torch.Tensor, k: int = k) -> torch.Tensor:
            return torch.ops.aten.native_layer_norm(x, [3], w[:3], b[:3], 1e-5)[k]

        def bn(x: torch.Tensor, k: int = k) -> torch.Tensor:
            return torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)[k]

        def gn(x: torch.Tensor, k: int = k) -> torch.Tensor:
            return torch.ops.aten.native_group_norm(x, w, b, 2, 6, 3, 3, 1e-5)[k]

        for f in (ln, bn):
            J = jacbatch.jacobian(f, X, method="closed_form")
            torch.testing.assert_close(J, reference_jacobian(f, [X]), rtol=0, atol=0)
        with pytest.raises(NotImplementedError):
            jacbatch.jacobian(gn, X, method="closed_form")
