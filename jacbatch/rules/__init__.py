"""Closed-form Jacobian rules, registered per function and argument.

A rule computes the flattened Jacobian of one registered function with respect to one argument
for a whole batch, without autodiff. Its signature is::

    rule(args, batched, batch_size, order, out) -> Tensor  # (B, out_numel, in_numel)

where ``args`` are the function's arguments with the batch dimension first (for ``batched[i]``)
or shared (unbatched), ``order`` is ``"row"`` or ``"col"`` (the vec order of both axes) and ``out``
is ``None`` or a contiguous ``(B, out_numel, in_numel)`` buffer to write into.

Adding a closed form: write the function in :mod:`jacbatch.functions`, add a file here with one
rule per argument decorated with :func:`register`, and import it at the bottom of this module.

Plain torch code uses a second registry keyed by aten op instead (:mod:`jacbatch.rules.ops`),
whose rules return lettered terms (:mod:`jacbatch.rules.terms`) that the traced route composes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..structured import JacobianOperator


class Rule(Protocol):
    def __call__(
        self,
        args: Sequence[torch.Tensor],
        batched: Sequence[bool],
        batch_size: int,
        order: str,
        out: torch.Tensor | None,
    ) -> torch.Tensor: ...


_REGISTRY: dict[Callable[..., Any], dict[int, Rule]] = {}


def register(func: Callable[..., Any], argnum: int) -> Callable[[Rule], Rule]:
    """Decorator: register ``rule`` as the closed-form Jacobian of ``func`` w.r.t. ``args[argnum]``."""

    def deco(rule: Rule) -> Rule:
        _REGISTRY.setdefault(func, {})[argnum] = rule
        return rule

    return deco


def lookup(func: Callable[..., Any], argnum: int) -> Rule | None:
    """The rule for ``func`` w.r.t. ``args[argnum]``, or ``None``."""
    return _REGISTRY.get(func, {}).get(argnum)


def available() -> list[str]:
    """Human-readable list of functions with closed forms, e.g. ``['jacbatch.affine (argnums 0, 1, 2)']``."""
    out = []
    for func, rules in _REGISTRY.items():
        nums = ", ".join(str(k) for k in sorted(rules))
        out.append(f"{func.__module__.split('.')[0]}.{func.__qualname__} (argnums {nums})")
    return out


def eye(n: int, like: torch.Tensor) -> torch.Tensor:
    """``I_n`` with ``like``'s dtype and device."""
    return torch.eye(n, dtype=like.dtype, device=like.device)


# ---------------------------------------------------------------------------------------------
# Structured rules: the Jacobian as a lazy operator (jacbatch.structured) instead of a tensor
# ---------------------------------------------------------------------------------------------


class StructuredRule(Protocol):
    """``rule(args, batched, batch_size) -> JacobianOperator``.

    ``args`` and ``batched`` as for :class:`Rule`; ``batch_size`` is ``B``, or ``None`` for a
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
