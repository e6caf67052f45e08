"""The elimination order of traced closed forms: every order gives the reference Jacobian, and
the planner picks the order the shapes call for.

The reference is the shared per-sample ``torch.autograd.functional.jacobian`` loop in float64
(``tests/_reference.py``). Orders are forced with :func:`jacbatch.accumulation.forced_order`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

import jacbatch
from jacbatch import accumulation, tracing
from jacbatch._validation import normalize_call
from jacbatch.methods import traced
from jacbatch.rules import write
from tests.conftest import reference_jacobian

F64 = torch.float64
ORDERS = ("forward", "reverse", "cut", "auto")


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) / 2


B = 3
X = rnd(B, 4, 5, seed=1)
W1, c1, W2, c2 = rnd(5, 6, seed=2), rnd(6, seed=3), rnd(6, 3, seed=4), rnd(3, seed=5)
Y = rnd(B, 4, 2, seed=6)
S = rnd(B, 3, 3, seed=7)
Wq, Wk, Wv = rnd(5, 5, seed=8), rnd(5, 5, seed=9), rnd(5, 5, seed=10)
V1, V2, V3, V4 = (
    rnd(16, 16, seed=11),
    rnd(16, 1, seed=12),
    rnd(1, 16, seed=13),
    rnd(16, 16, seed=14),
)
Xv = rnd(B, 4, 16, seed=15)
W7, W3 = rnd(7, 3, seed=20), rnd(3, 3, seed=21)


def mlp(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w1 + b1) @ w2 + c2


def fan_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    h = x @ w  # used three times
    return torch.tanh(h) * h + h.sum(-1, keepdim=True) + (x * x.detach()).sum(-1, keepdim=True)


def attention(x: torch.Tensor) -> torch.Tensor:
    q, k, v = x @ Wq, x @ Wk, x @ Wv
    return torch.softmax(q @ k.mT / math.sqrt(5), dim=-1) @ v


def bottleneck(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(torch.tanh(torch.tanh(x @ V1) @ V2) @ V3) @ V4


# (id, func, args, in_dims, argnums)
CASES: list[
    tuple[
        str,
        Callable[..., torch.Tensor],
        tuple[torch.Tensor, ...],
        tuple[int | None, ...],
        tuple[int, ...],
    ]
] = [
    ("mlp_weights", mlp, (X, W1, c1, W2), (0, None, None, None), (1, 2, 3)),
    ("mlp_input", mlp, (X, W1, c1, W2), (0, None, None, None), (0,)),
    ("mlp_all", mlp, (X, W1, c1, W2), (0, None, None, None), (0, 1, 2, 3)),
    ("fan_out", fan_out, (X, W1), (0, None), (0, 1)),
    (
        "cat_stack",
        lambda x, y: (
            torch.stack([torch.cat([x, torch.tanh(y)], -1), torch.cat([y, x], -1)], 1).sum(1) @ W7
        ),
        (X, Y),
        (0, 0),
        (0, 1),
    ),
    (
        "getitem_and_zero",
        lambda s, w: (
            torch.linalg.slogdet(s @ s.mT + torch.eye(3, dtype=F64))[1] * (s * w).sum()
            + torch.linalg.slogdet(s)[0]
        ),
        (S, W3),
        (0, None),
        (0, 1),
    ),
    ("attention", attention, (X,), (0,), (0,)),
    ("bottleneck", bottleneck, (Xv,), (0,), (0,)),
    ("unused_and_identity", lambda x, y: x, (X, Y), (0, 0), (0, 1)),
]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    ("func", "args", "in_dims", "argnums"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_every_order_gives_the_reference(
    order: str,
    func: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    in_dims: tuple[int | None, ...],
    argnums: tuple[int, ...],
) -> None:
    with accumulation.forced_order(order):
        Js = jacbatch.jacobian(func, *args, argnums=argnums, in_dims=in_dims, method="closed_form")
    refs = reference_jacobian(func, args, argnums, in_dims)
    for J, R in zip(Js, refs, strict=True):
        torch.testing.assert_close(J, R, rtol=1e-12, atol=1e-12 * max(1.0, float(R.abs().max())))


@pytest.mark.parametrize("order", ORDERS)
def test_every_order_differentiable_result(order: str) -> None:
    """create_graph: the composed terms are written out of place, in every order."""
    args = tuple(a.clone().requires_grad_() for a in (X, W1, c1, W2))
    with accumulation.forced_order(order):
        J = jacbatch.jacobian(
            mlp, *args, argnums=1, in_dims=(0, None, None, None), create_graph=True
        )
    R = reference_jacobian(mlp, (X, W1, c1, W2), 1, (0, None, None, None))
    torch.testing.assert_close(J.detach(), R, rtol=1e-12, atol=1e-12)
    assert J.requires_grad


def _orders(
    func: Callable[..., torch.Tensor], args, argnums, in_dims
) -> dict[int, accumulation.Choice]:
    call = normalize_call("t", func, tuple(args), argnums, in_dims)
    return tracing.orders(traced.traced_graph(call), call.argnums)


def test_parameter_jacobian_of_a_small_output_goes_reverse() -> None:
    """MLP 20-64-10 w.r.t. its weights: one reverse pass serves every weight."""
    x = rnd(8, 20, seed=30)
    w1, b1, w2, b2 = rnd(20, 64, seed=31), rnd(64, seed=32), rnd(64, 10, seed=33), rnd(10, seed=34)
    f = lambda x, w1, b1, w2, b2: torch.tanh(x @ w1 + b1) @ w2 + b2  # noqa: E731
    got = _orders(f, (x, w1, b1, w2, b2), (1, 2, 3), (0, None, None, None, None))
    assert {a: c.order for a, c in got.items()} == {1: "reverse", 2: "reverse", 3: "reverse"}
    assert got[1].shared == (1, 2, 3) and got[1].reverse < got[1].forward


def test_input_jacobian_of_a_narrow_input_and_wide_output_goes_forward() -> None:
    x = rnd(8, 2, seed=35)
    w1, w2 = rnd(2, 64, seed=36), rnd(64, 256, seed=37)
    f = lambda x: torch.tanh(x @ w1) @ w2  # noqa: E731
    (got,) = _orders(f, (x,), 0, 0).values()
    assert got.order == "forward" and got.forward < got.reverse


def test_bottleneck_is_cut_at_the_narrow_node() -> None:
    (got,) = _orders(bottleneck, (Xv,), 0, 0).values()
    assert got.order == "cut" and got.cut is not None
    assert tuple(got.cut.meta["val"].shape) == (4, 1)
    assert got.cost < min(got.forward, got.reverse)


def test_forced_cut_without_a_dominator_is_forward() -> None:
    f = lambda x, w: torch.tanh(x @ w) * (x @ w)  # noqa: E731 (x reaches mul along two paths)
    with accumulation.forced_order("cut"):
        got = _orders(f, (X, W1), 0, (0, None))
    assert got[0].order in ("forward", "cut")
    if got[0].order == "cut":  # a dominator after the fan-out joins
        assert got[0].cut is not None


def test_explain_names_the_order_and_its_estimate() -> None:
    plan = jacbatch.explain(mlp, X, W1, c1, W2, argnums=(1, 3), in_dims=(0, None, None, None))
    notes = [n for n in plan.notes if "accumulation" in n]
    assert len(notes) == 2, plan.notes
    assert notes[0].startswith("argnum 1: reverse accumulation") and "FLOP" in notes[0]


def test_estimated_cost() -> None:
    call = normalize_call("t", mlp, (X, W1, c1, W2), (1, 3), (0, None, None, None))
    tg = traced.traced_graph(call)
    cost = tracing.estimated_cost(tg, (1, 3), B)
    assert math.isfinite(cost) and cost >= B * 4 * 3 * (5 * 6 + 6 * 3)  # at least the writes
    assert tracing.estimated_cost(tg, (1, 3), 2 * B) == pytest.approx(2 * cost)
    bad = normalize_call("t", lambda x: torch.special.erfcx(x), (X,), 0, 0)
    assert tracing.estimated_cost(traced.traced_graph(bad), (0,), B) == math.inf


def test_forced_order_rejects_unknown_orders() -> None:
    with pytest.raises(ValueError, match="forced_order"), accumulation.forced_order("sideways"):
        pass


def test_writer_forms_no_full_product_before_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A three-factor term (MLP w.r.t. W1 in reverse) is written by one broadcast multiply into
    the result: no ``copy_`` of a formed product."""
    copies: list[tuple[int, ...]] = []
    real = torch.Tensor.copy_

    def spy(self: torch.Tensor, src: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        copies.append(tuple(self.shape))
        return real(self, src, *a, **k)

    call = normalize_call("t", mlp, (X, W1, c1, W2), 1, (0, None, None, None))
    bargs = [X, W1, c1, W2, *traced.lifted_inputs(call)]
    with accumulation.forced_order("reverse"):
        (ts,) = tracing.jacobian_terms(traced.traced_graph(call), [1], bargs, B)
    assert len(ts) == 1 and len(ts[0].factors) >= 2
    out = torch.empty(B, 4, 3, 5, 6, dtype=F64)
    monkeypatch.setattr(torch.Tensor, "copy_", spy)
    write.materialize(ts, (4, 3), (5, 6), out)
    monkeypatch.undo()
    assert copies == []
    R = reference_jacobian(mlp, (X, W1, c1, W2), 1, (0, None, None, None))
    torch.testing.assert_close(out, R, rtol=1e-12, atol=1e-12)
