"""Closed-form Jacobian rules keyed by torch op, for traced graphs.

The per-function registry in :mod:`jacbatch.rules` maps a registered Python function to rules
that produce a whole flattened Jacobian. Traced code is a graph of aten ops instead, so this
second registry maps an op (``torch.ops.aten.mm.default``, or a whole overload packet such as
``torch.ops.aten.sum``) and, for ops with several outputs, an output index, to a rule::

    rule(ctx: OpContext, i: int) -> list[Term]

returning the local Jacobian of the node's output w.r.t. its ``i``-th argument as lettered terms
(:mod:`jacbatch.rules.terms`). An empty list means "identically zero" (``detach``, the sign of
``slogdet``). A rule raises :class:`~jacbatch.rules.terms.Unsupported` for argument values it
does not cover (e.g. a non-square ``trace``); the traced route then falls back to autodiff.

Values in ``ctx`` carry a leading batch axis of size ``B`` (per sample) or 1 (shared), so a rule
written with negative dims or right-aligned broadcasting works for both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import terms
from .terms import Term


@dataclass(frozen=True)
class OpContext:
    """What a rule sees of one graph node.

    Attributes:
        args: the node's positional arguments; tensors as ``(B or 1, *shape)`` values.
        kwargs: its keyword arguments (tensors likewise).
        out: the output value ``(B or 1, *out_shape)``.
        out_shape: per-sample output shape.
        shapes: per positional argument, its per-sample shape (``None`` for non-tensors).
        list_shapes: for ops taking a list of tensors first (``cat``, ``stack``), the
            per-sample shape of each element; the rule's ``i`` then indexes that list.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: torch.Tensor
    out_shape: tuple[int, ...]
    shapes: tuple[tuple[int, ...] | None, ...]
    list_shapes: tuple[tuple[int, ...], ...] = ()

    def in_shape(self, i: int) -> tuple[int, ...]:
        s = self.shapes[i]
        if s is None:
            raise terms.Unsupported(f"argument {i} is not a tensor")
        return s

    def term(self, T: torch.Tensor | float, t: str, out: str, inp: str, i: int) -> Term:
        """A term of the Jacobian w.r.t. argument ``i`` (see :func:`terms.make`)."""
        return terms.make(T, t, out, inp, self.out_shape, self.in_shape(i), self.out)

    def aligned(self, i: int) -> torch.Tensor:
        """Argument ``i`` right-aligned to the output's rank: ``(B or 1, 1.., *shape)``.

        A number becomes a ``(1, 1, ..)`` tensor.
        """
        x = self.args[i]
        nd = len(self.out_shape)
        if not isinstance(x, torch.Tensor):
            return torch.full((1,) * (1 + nd), x, dtype=self.out.dtype, device=self.out.device)
        s = self.in_shape(i)
        return x.reshape(x.shape[0], *((1,) * (nd - len(s))), *s)


Rule = Callable[[OpContext, int], list[Term]]

_OPS: dict[tuple[Any, int | None], Rule] = {}


def register_op(*ops: Any, output: int | None = None) -> Callable[[Rule], Rule]:
    """Decorator: ``rule`` is the local Jacobian of ``ops`` (output ``output`` for tuple results).

    ``ops`` are ``OpOverload``s (one overload) or ``OpOverloadPacket``s (all overloads).
    """

    def deco(rule: Rule) -> Rule:
        for op in ops:
            _OPS[(op, output)] = rule
        return rule

    return deco


def lookup_op(op: Any, output: int | None = None) -> Rule | None:
    """The rule for ``op`` (an overload first, then its packet), or ``None``."""
    rule = _OPS.get((op, output))
    if rule is None and hasattr(op, "overloadpacket"):
        rule = _OPS.get((op.overloadpacket, output))
    return rule


def op_name(op: Any) -> str:
    """Readable name of a graph target, e.g. ``aten.mm.default``."""
    return str(op) if hasattr(op, "overloadpacket") else getattr(op, "__name__", repr(op))


def letters(n: int, skip: str = "") -> str:
    """``n`` distinct einsum characters, avoiding those in ``skip``."""
    pool = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in skip]
    return "".join(pool[:n])


def broadcast_letters(out: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> str:
    """Letters for an input broadcast to ``out_shape``: right-aligned; broadcast axes get fresh ones.

    A broadcast input axis has size 1, so its letter is dropped by :func:`terms.make`; the output
    letter it would have shared stays free (the Jacobian does not depend on it).
    """
    nd, k = len(out_shape), len(in_shape)
    fresh = iter(c for c in "0123456789!@#$%^&*" if c not in out)
    res = []
    for j, n in enumerate(in_shape):
        o = out[nd - k + j]
        res.append(o if n == out_shape[nd - k + j] else next(fresh))
    return "".join(res)


def identity(ctx: OpContext, i: int, scale: float | torch.Tensor = 1.0) -> list[Term]:
    """``scale ·`` the Jacobian of broadcasting argument ``i`` to the output's shape."""
    o = letters(len(ctx.out_shape))
    return [ctx.term(scale, "", o, broadcast_letters(o, ctx.in_shape(i), ctx.out_shape), i)]


from . import conv as _conv  # noqa: E402,F401
from . import elementwise as _elementwise  # noqa: E402,F401
from . import indexing as _indexing  # noqa: E402,F401
from . import layout as _layout  # noqa: E402,F401
from . import linalg as _linalg  # noqa: E402,F401
from . import linear as _linear  # noqa: E402,F401
from . import norm as _norm  # noqa: E402,F401
from . import pointwise as _pointwise  # noqa: E402,F401
from . import pool as _pool  # noqa: E402,F401
from . import products as _products  # noqa: E402,F401
from . import reductions as _reductions  # noqa: E402,F401
from . import scan as _scan  # noqa: E402,F401
from . import selection as _selection  # noqa: E402,F401
from . import shifts as _shifts  # noqa: E402,F401
from . import softmax as _softmax  # noqa: E402,F401
