"""The elimination order of the traced closed forms: forward, reverse or cut accumulation.

The traced route (:mod:`jacbatch.tracing`) has, per differentiated argument, the steps of the
graph from that argument to the output, each with a rule giving its local Jacobians as lettered
terms (:mod:`jacbatch.rules.terms`). This module composes them by the chain rule in an order
chosen from the shapes, and estimates what that costs.

NOTE [Choosing the elimination order]
    The Jacobian of the output ``y`` w.r.t. an argument ``x`` is a sum over paths of products of
    local Jacobians; the order the products are formed in decides the cost (the Jacobian
    accumulation problem). Three orders are used:

    * **forward**: from the identity on ``x``, ``J[n] = Σ_i L_(n,u_i) ∘ J[u_i]`` in graph order.
      Every intermediate is a Jacobian w.r.t. ``x``: cheap when ``x`` is small.
    * **reverse**: from the identity on ``y``, the adjoint ``Ȳ[u] = Σ_consumers Ȳ[n] ∘ L_(n,u)``
      in reverse graph order. Every intermediate is a Jacobian *of* ``y``: cheap when ``y`` is
      small (a parameter Jacobian of a small output). One reverse pass gives the Jacobian w.r.t.
      every argument it reaches, so the argnums that take reverse share one pass.
    * **cut**: at a node ``c`` every path from ``x`` to ``y`` goes through (a dominator),
      forward from ``x`` to ``c`` and reverse from ``y`` to ``c``, then ``Ȳ[c] ∘ J[c]``: cheap
      when ``c`` is narrow and both ends are wide (a bottleneck).

    The estimate is the classic dense one: a product ``L_(n,u) ∘ J[u]`` costs
    ``|n| · f · |x|`` multiply-adds in forward order and ``Ȳ[n] ∘ L_(n,u)`` costs
    ``|y| · |n| · f`` in reverse, where ``|·|`` is a per-sample size and ``f`` the fan-in of
    ``L`` (how many entries of ``u`` one entry of ``n`` reads: 1 for elementwise ops and views,
    the inner size of a matrix product, the reduced size of a reduction, ``|u|`` for dense linear
    algebra). A product with the seed identity is free (letters are renamed, nothing is
    multiplied), and so is the first step of either order. The cut adds ``|y| · |c| · |x|`` for
    its last product. Writing the result costs ``|y| · |x|`` in every order. Everything is
    per sample, times ``B``. Lettered terms keep deltas, so the true cost is often far below
    the dense figure; the estimate is for comparing orders (and routes), where what matters is
    which side of the graph is narrow. Ties go to forward (the order whose terms the structured
    operators and their tests describe); a cut must beat both by a clear margin
    (:data:`CUT_MARGIN`), since it adds a product of its own.

``order`` can be forced for tests and benchmarks with :func:`forced_order`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from .rules import ops as op_rules
from .rules import terms
from .rules.terms import Term, Unsupported

if TYPE_CHECKING:
    from .tracing import Analysis, _Step

#: The orders :func:`forced_order` accepts; ``"auto"`` chooses from the estimate.
ORDERS = ("auto", "forward", "reverse", "cut")
#: A cut is taken only when its estimate is below this fraction of forward's and reverse's.
CUT_MARGIN = 0.5

_FORCED: ContextVar[str] = ContextVar("jacbatch_accumulation_order", default="auto")


@contextmanager
def forced_order(order: str) -> Iterator[None]:
    """Compose every traced closed form in ``order`` (one of :data:`ORDERS`) inside the block.

    For tests and benchmarks: the results must not depend on it. ``"cut"`` takes the cheapest
    dominator on each argument's path, or forward order where there is none.
    """
    if order not in ORDERS:
        raise ValueError(f"forced_order: expected one of {ORDERS}, got {order!r}")
    token = _FORCED.set(order)
    try:
        yield
    finally:
        _FORCED.reset(token)


def current_order() -> str:
    """The order forced by :func:`forced_order`, or ``"auto"``."""
    return _FORCED.get()


@dataclass(frozen=True)
class Choice:
    """The order one argnum's Jacobian is composed in, and the estimates behind the choice.

    Attributes:
        order: ``"forward"``, ``"reverse"`` or ``"cut"``.
        cost: estimated multiply-adds per sample of the chosen order, the write included; for
            a reverse pass shared by several argnums, the whole pass (counted once by
            :func:`total_cost`).
        forward: the same estimate for forward order.
        reverse: the same estimate for a reverse pass for this argnum alone.
        cut: the node the cut order meets at (``None`` unless ``order == "cut"``).
        shared: the argnums served by the same reverse pass (reverse order only).
    """

    order: str
    cost: float
    forward: float
    reverse: float
    cut: torch.fx.Node | None = None
    shared: tuple[int, ...] = ()

    def describe(self, batch: int) -> str:
        """One line, e.g. ``reverse accumulation, est. 1.2 MFLOP (forward 9.8 MFLOP)``."""
        b = max(1, batch)
        if self.order == "forward":
            what = "forward accumulation"
            other = f"reverse {_flop(self.reverse * b)}"
        elif self.order == "reverse":
            what = "reverse accumulation"
            other = f"forward {_flop(self.forward * b)}"
            if len(self.shared) > 1:
                what += " (one pass for argnums " + ", ".join(map(str, self.shared)) + ")"
                other += " for this argnum"
        else:
            assert self.cut is not None
            what = f"forward to {self.cut.name} {tuple(_shape(self.cut))}, reverse from the output"
            other = f"forward {_flop(self.forward * b)}, reverse {_flop(self.reverse * b)}"
        return f"{what}, est. {_flop(self.cost * b)} ({other})"


def _flop(x: float) -> str:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOP"


# ---------------------------------------------------------------------------------------------
# The estimate (NOTE [Choosing the elimination order])
# ---------------------------------------------------------------------------------------------


def _shape(n: torch.fx.Node) -> tuple[int, ...]:
    """The per-sample shape of a traced node (read once, kept with the node)."""
    got = n.meta.get("jacbatch_shape")
    if got is None:
        got = tuple(int(d) for d in n.meta["val"].shape)
        n.meta["jacbatch_shape"] = got
    return got


def _numel(n: torch.fx.Node) -> int:
    return math.prod(_shape(n))


def _arg_numel(a: Any) -> int:
    val = a.meta.get("val") if isinstance(a, torch.fx.Node) else None
    return math.prod(val.shape) if isinstance(val, torch.Tensor) else 1


_MATMUL = {"mm", "bmm", "mv", "dot", "matmul"}
_ADDMM = {"addmm", "baddbmm", "addmv"}
_ROWWISE = {"_softmax", "_log_softmax", "softmax", "log_softmax"}


def _fan_in(s: _Step, u: torch.fx.Node) -> int:
    """How many entries of operand ``u`` one entry of the step's output reads (the NOTE)."""
    name = getattr(getattr(s.op, "overloadpacket", s.op), "__name__", "")
    args: tuple[Any, ...] = tuple(s.src.args)
    if name in _MATMUL or name in _ADDMM:
        left = args[1] if name in _ADDMM else args[0]
        if name in _ADDMM and u is args[0]:
            return 1
        shape = _shape(left) if isinstance(left, torch.fx.Node) else ()
        return int(shape[-1]) if len(shape) else 1
    if name in _ROWWISE and len(args) > 1:
        shape = _shape(s.node)
        return int(shape[int(args[1]) % len(shape)]) if shape else 1
    if "linalg" in name:
        return _arg_numel(u)
    return max(1, _arg_numel(u) // max(1, _numel(s.node)))


def _forward_costs(an: Analysis) -> list[float]:
    """Per step of ``an``, the forward product's estimate per sample (0 for products with the
    seed identity)."""
    assert an.x is not None
    nx = _numel(an.x)
    return [
        float(sum(_numel(s.node) * _fan_in(s, u) * nx for _, u in s.operands if u is not an.x))
        for s in an.steps
    ]


def _reverse_costs(steps: Sequence[_Step], out: torch.fx.Node) -> list[float]:
    """Per step, the reverse product's estimate per sample (0 at the output: the seed)."""
    ny = _numel(out)
    return [
        0.0
        if s.node is out
        else float(sum(ny * _numel(s.node) * _fan_in(s, u) for _, u in s.operands))
        for s in steps
    ]


def dominators(an: Analysis) -> list[int]:
    """Indices of the steps of ``an`` whose node every path from the argument to the output
    passes (the output itself excluded).

    In graph order, a node ``c`` is on every path iff no edge of the path subgraph jumps over
    it (from a node before ``c`` to one after it): every node of the subgraph lies on some
    path from the argument to the output, so such an edge gives a path around ``c``.
    """
    assert an.x is not None
    pos = {an.x: -1, **{s.node: k for k, s in enumerate(an.steps)}}
    heads: dict[int, int] = {}
    for k, s in enumerate(an.steps):
        for _, u in s.operands:
            t = pos.get(u, -1)
            heads[t] = max(heads.get(t, -1), k)
    far = heads.get(-1, -1)
    found = []
    for k, s in enumerate(an.steps):
        if far <= k and s.node is not an.out:
            found.append(k)
        far = max(far, heads.get(k, -1))
    return found


def _single(an: Analysis) -> tuple[float, float, tuple[float, int] | None]:
    """Forward, reverse and the best cut ``(cost, step index)`` for one argnum, per sample."""
    assert an.x is not None and an.out is not None
    nx, ny = _numel(an.x), _numel(an.out)
    write = float(nx * ny)
    fc = _forward_costs(an)
    rc = _reverse_costs(an.steps, an.out)
    fwd, rev = sum(fc) + write, sum(rc) + write
    best: tuple[float, int] | None = None
    if an.steps:
        prefix = list(_cumsum(fc))
        suffix = list(reversed(list(_cumsum(reversed(rc)))))
        for k in dominators(an):
            after = suffix[k + 1] if k + 1 < len(rc) else 0.0
            cost = prefix[k] + after + ny * _numel(an.steps[k].node) * nx + write
            if best is None or cost < best[0]:
                best = (cost, k)
    return fwd, rev, best


def _cumsum(xs: Iterator[float] | Sequence[float]) -> Iterator[float]:
    total = 0.0
    for x in xs:
        total += x
        yield total


def _union(analyses: Sequence[Analysis]) -> list[_Step]:
    """The steps of several analyses as one list in graph order (operands of a node merged)."""
    from .tracing import _Step

    merged: dict[torch.fx.Node, _Step] = {}
    order: dict[torch.fx.Node, int] = {}
    for an in analyses:
        for s in an.steps:
            prev = merged.get(s.node)
            if prev is None:
                merged[s.node] = s
            elif not set(s.operands) <= set(prev.operands):
                ops = tuple(sorted(set(prev.operands) | set(s.operands), key=lambda p: p[0]))
                merged[s.node] = _Step(s.node, s.op, s.rule, s.src, ops, s.listed)
    if not merged:
        return []
    graph = next(iter(merged)).graph
    for k, n in enumerate(graph.nodes):
        order[n] = k
    return sorted(merged.values(), key=lambda s: order[s.node])


def choose(analyses: Mapping[int, Analysis], order: str = "auto") -> dict[int, Choice]:
    """The order per argnum (NOTE [Choosing the elimination order]); ``order`` forces one.

    ``analyses`` are the (successful) analyses of the call's argnums; argnums whose argument the
    output does not depend on are composed forward (they have nothing to compose).
    """
    singles: dict[int, tuple[float, float, tuple[float, int] | None]] = {}
    for a, an in analyses.items():
        if an.x is not None and an.out is not None:
            singles[a] = _single(an)
    picks: dict[int, str] = {}
    for a, (fwd, rev, cut) in singles.items():
        if order != "auto":
            picks[a] = order if order != "cut" or cut is not None else "forward"
        elif cut is not None and cut[0] < CUT_MARGIN * min(fwd, rev):
            picks[a] = "cut"
        else:
            picks[a] = "reverse" if rev < fwd else "forward"
    rev_set = [a for a, p in picks.items() if p == "reverse"]
    shared_cost = 0.0
    if rev_set and order == "auto":
        # argnums whose whole path the reverse pass covers anyway cost it nothing more
        covered = {(s.node, o) for a in rev_set for s in analyses[a].steps for o in s.operands}
        for a, p in picks.items():
            steps = analyses[a].steps
            if p != "reverse" and all((s.node, o) in covered for s in steps for o in s.operands):
                picks[a] = "reverse"
        rev_set = [a for a, p in picks.items() if p == "reverse"]
    if rev_set:
        out = analyses[rev_set[0]].out
        assert out is not None
        union = _union([analyses[a] for a in rev_set])
        xs = [x for x in (analyses[a].x for a in rev_set) if x is not None]
        shared_cost = sum(_reverse_costs(union, out)) + float(
            sum(_numel(out) * _numel(x) for x in xs)
        )
    result: dict[int, Choice] = {}
    for a, an in analyses.items():
        if a not in singles:
            result[a] = Choice("forward", 0.0, 0.0, 0.0)
            continue
        fwd, rev, cut = singles[a]
        p = picks[a]
        if p == "reverse":
            result[a] = Choice("reverse", shared_cost, fwd, rev, None, tuple(rev_set))
        elif p == "cut":
            assert cut is not None
            result[a] = Choice("cut", cut[0], fwd, rev, an.steps[cut[1]].node)
        else:
            result[a] = Choice("forward", fwd, fwd, rev)
    return result


def total_cost(choices: Mapping[int, Choice]) -> float:
    """The estimate per sample of composing and writing every argnum (a shared reverse pass
    counted once)."""
    total = sum(c.cost for c in choices.values() if c.order != "reverse")
    return total + max((c.cost for c in choices.values() if c.order == "reverse"), default=0.0)


# ---------------------------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------------------------


class _Locals:
    """Local Jacobians ``L_(n, i)`` of the steps, computed once per call (rules run once even
    when several passes compose them)."""

    def __init__(self, values: Mapping[torch.fx.Node, torch.Tensor]) -> None:
        self.values = values
        self._ctx: dict[torch.fx.Node, op_rules.OpContext] = {}
        self._local: dict[tuple[torch.fx.Node, int], list[Term]] = {}

    def __call__(self, s: _Step, i: int) -> list[Term]:
        key = (s.node, i)
        got = self._local.get(key)
        if got is None:
            ctx = self._ctx.get(s.node)
            if ctx is None:
                ctx = _context(s, self.values)
                self._ctx[s.node] = ctx
            got = s.rule(ctx, i)
            self._local[key] = got
        return got


def _context(s: _Step, values: Mapping[torch.fx.Node, torch.Tensor]) -> op_rules.OpContext:
    return op_rules.OpContext(
        args=tuple(_value(a, values) for a in s.src.args),
        kwargs={k: _value(v, values) for k, v in s.src.kwargs.items()},
        out=values[s.node],
        out_shape=_shape(s.node),
        shapes=_arg_shapes(s.src),
        list_shapes=_list_shapes(s.src.args[0]) if s.listed else (),
    )


def _list_shapes(xs: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(_shape(a) for a in xs)


def _arg_shapes(src: torch.fx.Node) -> tuple[tuple[int, ...] | None, ...]:
    got = src.meta.get("jacbatch_arg_shapes")
    if got is None:
        got = tuple(
            _shape(a)
            if isinstance(a, torch.fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
            else None
            for a in src.args
        )
        src.meta["jacbatch_arg_shapes"] = got
    return got


def _value(a: Any, values: Mapping[torch.fx.Node, torch.Tensor]) -> Any:
    return torch.fx.node.map_arg(a, lambda n: values[n] if n in values else _missing(n))


def _missing(n: torch.fx.Node) -> Any:
    raise Unsupported(f"value of {n.name} is not available")


def _identity(n: torch.fx.Node, like: torch.Tensor) -> list[Term]:
    shape = _shape(n)
    idx = "".join(op_rules.letters(len(shape)))
    return [terms.make(1.0, "", idx, idx, shape, shape, like)]


def _forward(
    steps: Sequence[_Step], x: torch.fx.Node, local: _Locals, like: torch.Tensor
) -> dict[torch.fx.Node, list[Term]]:
    """Jacobians w.r.t. ``x`` of the nodes of ``steps`` (forward order)."""
    J: dict[torch.fx.Node, list[Term]] = {x: _identity(x, like)}
    for s in steps:
        acc: list[Term] = []
        for i, u in s.operands:
            Ju = J.get(u)
            if Ju:
                acc.extend(terms.chain_rule_sums(local(s, i), Ju))
        J[s.node] = terms.merge(acc)
    return J


def _reverse(
    steps: Sequence[_Step], out: torch.fx.Node, local: _Locals, like: torch.Tensor
) -> dict[torch.fx.Node, list[Term]]:
    """Jacobians of ``out`` w.r.t. the operands of ``steps`` (reverse order, adjoints of the
    step nodes dropped once used)."""
    Y: dict[torch.fx.Node, list[Term]] = {out: _identity(out, like)}
    for s in reversed(steps):
        G = Y.pop(s.node, None)
        if not G:
            continue
        for i, u in s.operands:
            add = terms.chain_rule_sums(G, local(s, i))
            if add:
                Y[u] = terms.merge([*Y.get(u, []), *add])
    return Y


def compose(
    analyses: Mapping[int, Analysis],
    choices: Mapping[int, Choice],
    values: Mapping[torch.fx.Node, torch.Tensor],
    likes: Mapping[int, torch.Tensor],
) -> dict[int, list[Term]]:
    """The terms of the Jacobian of the output w.r.t. each argnum, in the chosen orders.

    ``values``: the graph's values the rules read (``(B or 1, *shape)``); ``likes``: per
    argnum, a tensor with the Jacobian's dtype and device.
    """
    local = _Locals(values)
    result: dict[int, list[Term]] = {}
    rev = [a for a, c in choices.items() if c.order == "reverse"]
    if rev:
        out = analyses[rev[0]].out
        assert out is not None
        Y = _reverse(_union([analyses[a] for a in rev]), out, local, likes[rev[0]])
        for a in rev:
            x = analyses[a].x
            result[a] = Y.get(x, []) if x is not None else []
    for a, an in analyses.items():
        if a in result:
            continue
        c = choices[a]
        if an.x is None or an.out is None:
            result[a] = []
        elif c.order == "cut" and c.cut is not None:
            k = next(k for k, s in enumerate(an.steps) if s.node is c.cut)
            J = _forward(an.steps[: k + 1], an.x, local, likes[a])
            Y = _reverse(an.steps[k + 1 :], an.out, local, likes[a])
            result[a] = terms.chain_rule_sums(Y.get(c.cut, []), J.get(c.cut, []))
        else:
            result[a] = _forward(an.steps, an.x, local, likes[a]).get(an.out, [])
    return result


__all__ = ["ORDERS", "Choice", "choose", "compose", "forced_order", "total_cost"]
