"""Closed-form Jacobian rules registered per function and argument (today: :func:`jacbatch.affine`).

A registered rule returns the Jacobian of one function w.r.t. one argument as lettered terms
(:mod:`jacbatch.rules.terms`, the one representation of Jacobian structure), for a whole batch,
without autodiff and without running the function. Its signature is::

    rule(args, batched) -> list[Term]

where ``args`` are the function's arguments with the batch dimension first (for ``batched[i]``)
or shared (unbatched). The one writer (:mod:`jacbatch.rules.write`) materializes the terms.

Plain torch code needs no registration: its aten graph is traced and the per-op rules
(:mod:`jacbatch.rules.ops`) give the same terms. A function is registered only where a
measurement shows the traced route's per-call work costs too much (NOTE [Why affine keeps a
registered rule] in :mod:`jacbatch.rules.affine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..structured import JacobianOperator
    from .terms import Term


class FunctionRule(Protocol):
    """``rule(args, batched) -> list[Term]`` (see the module docstring)."""

    def __call__(self, args: Sequence[torch.Tensor], batched: Sequence[bool]) -> list[Term]: ...


_REGISTRY: dict[Callable[..., Any], dict[int, FunctionRule]] = {}


def register(func: Callable[..., Any], argnum: int) -> Callable[[FunctionRule], FunctionRule]:
    """Decorator: register ``rule`` as the closed-form Jacobian of ``func`` w.r.t. ``args[argnum]``."""

    def deco(rule: FunctionRule) -> FunctionRule:
        _REGISTRY.setdefault(func, {})[argnum] = rule
        return rule

    return deco


def lookup(func: Callable[..., Any], argnum: int) -> FunctionRule | None:
    """The rule for ``func`` w.r.t. ``args[argnum]``, or ``None``."""
    return _REGISTRY.get(func, {}).get(argnum)


def available() -> list[str]:
    """Human-readable list of functions with closed forms, e.g. ``['jacbatch.affine (argnums 0, 1, 2)']``."""
    out = []
    for func, rules in _REGISTRY.items():
        nums = ", ".join(str(k) for k in sorted(rules))
        out.append(f"{func.__module__.split('.')[0]}.{func.__qualname__} (argnums {nums})")
    return out


# ---------------------------------------------------------------------------------------------
# Structured rules: the Jacobian as a lazy operator (jacbatch.structured) instead of a tensor
# ---------------------------------------------------------------------------------------------


class StructuredRule(Protocol):
    """``rule(args, batched, batch_size) -> JacobianOperator``.

    ``args`` and ``batched`` as for :class:`FunctionRule`; ``batch_size`` is ``B``, or ``None`` for a
    call without a batch. The operator's ``shape`` is what :func:`jacbatch.jacobian` returns.
    """

    def __call__(
        self,
        args: Sequence[torch.Tensor],
        batched: Sequence[bool],
        batch_size: int | None,
    ) -> JacobianOperator: ...


_STRUCTURED: dict[Callable[..., Any], dict[int, StructuredRule]] = {}


def register_structured(
    func: Callable[..., Any], argnum: int
) -> Callable[[StructuredRule], StructuredRule]:
    """Decorator: register ``rule`` as the structured Jacobian of ``func`` w.r.t. ``args[argnum]``."""

    def deco(rule: StructuredRule) -> StructuredRule:
        _STRUCTURED.setdefault(func, {})[argnum] = rule
        return rule

    return deco


def lookup_structured(func: Callable[..., Any], argnum: int) -> StructuredRule | None:
    """The structured rule for ``func`` w.r.t. ``args[argnum]``, or ``None``."""
    return _STRUCTURED.get(func, {}).get(argnum)


def available_structured() -> list[str]:
    """Like :func:`available`, for structured rules."""
    out = []
    for func, found in _STRUCTURED.items():
        nums = ", ".join(str(k) for k in sorted(found))
        out.append(f"{func.__module__.split('.')[0]}.{func.__qualname__} (argnums {nums})")
    return out


from . import affine as _affine  # noqa: E402,F401  (registers the affine rules)
