"""jacobian(..., sparse=...) where forward mode has no formula for an op (NOTE [Forward-mode
gaps fall back to rows] in jacbatch.sparse._gaps): ``method="auto"`` falls back to row
passes, remembered for repeated calls, against an independent float64 reference
(per-sample torch.autograd.functional.jacobian)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import jacbatch
from jacbatch.sparse import _gaps, _hot, engine
from tests._sparse_reference import flat_reference

DT = torch.float64
B = 3


def reference(
    f: Callable[..., torch.Tensor], args: tuple[torch.Tensor, ...], in_dims: tuple[Any, ...], a: int
) -> torch.Tensor:
    """``(B, out_numel, in_numel)``: per-sample autograd Jacobians w.r.t. ``args[a]``."""
    return flat_reference(f, args, in_dims, a)


def cdist_sq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (5, 3), y (4, 3) -> (5, 4): torch has no forward-mode formula for cdist."""
    return torch.cdist(x, y) ** 2 + x[:, :1]


def margin(x: torch.Tensor) -> torch.Tensor:
    """x (6,) -> (3, 4): multi_margin_loss has no forward-mode formula either (2 column
    colors, 4 row colors: auto tries columns first)."""
    loss = F.multi_margin_loss(x.reshape(3, 2), torch.tensor([0, 1, 0]), reduction="none")
    return loss[:, None] * torch.arange(1.0, 5.0, dtype=x.dtype)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    _hot.forget_all()
    _gaps._NO_FORWARD.clear()


@pytest.mark.parametrize("argnums", [0, 1, (0, 1)])
def test_cdist_auto_falls_back_to_rows(argnums: int | tuple[int, ...]) -> None:
    X, Y = torch.randn(B, 5, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    opts: dict[str, Any] = {"in_dims": (0, None), "argnums": argnums, "sparse": True}
    plan = str(jacbatch.explain(cdist_sq, X, Y, **opts))
    assert "chosen: row" in plan and "chosen: column" not in plan
    wanted = argnums if isinstance(argnums, tuple) else (argnums,)
    refs = [reference(cdist_sq, (X, Y), (0, None), a) for a in wanted]
    for _ in range(5):  # repeated calls: the kept preparation and program are row passes
        J = jacbatch.jacobian(cdist_sq, X, Y, **opts)
        Js = J if isinstance(J, tuple) else (J,)
        for Ja, R in zip(Js, refs, strict=True):
            torch.testing.assert_close(Ja.to_dense(), R, rtol=1e-10, atol=1e-12)
    entry = next(iter(_hot._SEEN[cdist_sq.__code__].values()))
    assert entry.prep is not None and entry.program is not None
    assert all(p.coloring.mode == "row" and p.layout.loop for p in entry.prep.parts)


def test_fallback_without_explain_is_remembered() -> None:
    X = torch.randn(B, 6, dtype=DT)
    R = reference(margin, (X,), (0,), 0)
    for i in range(5):
        J = jacbatch.jacobian(margin, X, sparse=True)
        torch.testing.assert_close(J.to_dense(), R, rtol=1e-10, atol=1e-12)
        if i == 0:  # the first call met the gap and remembered it: later calls go by rows
            assert len(_gaps._NO_FORWARD) == 1
            prep = engine.prepare(
                "jacobian", margin, (X,), argnums=0, in_dims=0, sparse=True, method="auto",
                vec=None, progress=False, randomness="error", create_graph=False,
                batched=False,
            )  # fmt: skip
            assert prep.parts[0].coloring.mode == "row" and not prep.parts[0].layout.loop
    entry = next(iter(_hot._SEEN[margin.__code__].values()))
    assert entry.prep is not None
    assert entry.prep.parts[0].coloring.mode == "row"


def test_jacfwd_names_the_fix() -> None:
    X, Y = torch.randn(B, 5, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    for _ in range(2):  # at the gap, and once it is remembered
        with pytest.raises(ValueError, match=r"method='jacfwd'.*method='jacrev'.*'auto'"):
            jacbatch.jacobian(cdist_sq, X, Y, in_dims=(0, None), sparse=True, method="jacfwd")
    with pytest.raises(ValueError, match="method='jacfwd'"):
        jacbatch.explain(cdist_sq, X, Y, in_dims=(0, None), sparse=True, method="jacfwd")


def test_iter_jacobian_falls_back() -> None:
    X, Y = torch.randn(B, 5, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    R = reference(cdist_sq, (X, Y), (0, None), 0)
    got = []
    for sl, J in jacbatch.iter_jacobian(
        cdist_sq, X, Y, in_dims=(0, None), sparse=True, batch_chunk=2
    ):
        got.append((sl, J.to_dense()))
    assert [sl for sl, _ in got] == [slice(0, 2), slice(2, 3)]
    torch.testing.assert_close(torch.cat([J for _, J in got]), R, rtol=1e-10, atol=1e-12)


def test_other_errors_are_not_taken_for_a_gap() -> None:
    def bad(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 100:
            raise RuntimeError("boom")
        return x * 2

    assert not _gaps.is_gap(RuntimeError("boom"))
    X = torch.randn(B, 4, dtype=DT)
    J = jacbatch.jacobian(bad, X, sparse=True)
    torch.testing.assert_close(J.to_dense(), reference(bad, (X,), (0,), 0))
