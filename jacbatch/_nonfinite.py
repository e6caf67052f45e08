"""NaN and Inf: one policy, the same answer from every route.

NOTE [Non-finite values: one policy]
    At a point where some value is not finite, derivative conventions differ: ``sqrt(x**2)`` at
    ``x = 0`` has the local derivatives ``1/(2·0) = inf`` and ``2·0 = 0``, and ``inf · 0`` lands
    as NaN down the input column in reverse mode (the cotangent is pulled back through every
    input) but across the output row in forward mode (the tangent is pushed through every
    output); ``relu`` at NaN passes the gradient in autograd (``NaN <= 0`` is false); forward
    mode drops a NaN tangent that ``where`` masks out, while reverse mode multiplies it by the
    masked zero. jacbatch fixes ONE reference:

        The Jacobian of a sample is what per-sample reverse-mode autograd gives
        (``torch.autograd.functional.jacobian`` on that sample alone), NaN and Inf included.

    Every route follows it:

    * closed-form rules are written with autograd's conventions (``relu'`` is 1 where
      ``NaN <= 0`` is false, ``maximum`` gives 1 to both operands at NaN, ...) and compose by
      multiplication, as reverse mode does;
    * after any route, the samples whose arguments (batched or shared) or whose Jacobian hold a
      non-finite value are recomputed by per-sample reverse mode (the ``per_sample`` route: the
      vjp route with the forward run sample by sample) and overwritten;
    * forward mode can also hide a non-finite intermediate (``where`` selects the tangent
      instead of multiplying it), so after the ``jacfwd`` route one extra batched forward pass
      looks at every intermediate value (a dispatch mode below autograd); samples with a
      non-finite intermediate are recomputed likewise. Functions that draw random numbers are
      not re-run (that would move the generator).

    Where every value is finite, nothing is recomputed and the check costs one sum over each
    argument and over the result (plus the one forward pass after ``jacfwd``). Registered
    closed forms (``closed_form``: today :func:`jacbatch.affine`, whose Jacobians ``A ⊗ I``,
    ``I ⊗ Wᵀ``, ``1 ⊗ I`` hold entries of the arguments or ones) are finite exactly when their
    arguments are, so only the arguments are summed; a registered rule whose entries are not
    copies of its arguments' must be listed here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import _probe
from .call import Call


def _not_finite(t: torch.Tensor) -> bool:
    if not (t.dtype.is_floating_point or t.dtype.is_complex) or t.numel() == 0:
        return False
    if (
        t.layout != torch.strided
        or t._is_zerotensor()
        or torch._C._functorch.is_functorch_wrapped_tensor(t)
    ):
        return False  # zeros by construction, or a transform's wrapper: nothing to look at here
    return not bool(torch.isfinite(t).all())


class _Watch(TorchDispatchMode):
    """Records whether any aten op produced a non-finite floating-point value."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.seen and func is not torch.ops.aten.empty.memory_format:
            self.seen = any(
                isinstance(t, torch.Tensor) and t.device.type != "meta" and _not_finite(t)
                for t in tree_leaves(out)
            )
        return out


def _intermediates(
    call: Call, args: Sequence[torch.Tensor], batched: Sequence[bool], B: int
) -> torch.Tensor:
    """``(B,)`` bool: samples for which some intermediate value of ``func`` is not finite."""
    dims = tuple(0 if f else None for f in batched)
    watch = _Watch()
    with torch.no_grad():
        try:
            with watch:
                if call.batched_func is not None:  # batched=True: one call on the whole batch
                    call.batched_func(
                        *(
                            x if d is None else x.movedim(0, d)
                            for x, d in zip(args, call.in_dims, strict=True)
                        )
                    )
                else:
                    torch.func.vmap(call.func, in_dims=dims)(*args)
            if not watch.seen:
                return torch.zeros(B, dtype=torch.bool)
        except Exception:  # vmap rejects it: look sample by sample
            pass
        bad = torch.zeros(B, dtype=torch.bool)
        for b in range(B):
            w = _Watch()
            try:
                with w:
                    call.func(*(x[b] if f else x for x, f in zip(args, batched, strict=True)))
            except Exception:
                w.seen = True
            bad[b] = w.seen
    return bad


def _finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite, by one sum (a finite overflow only costs a recompute)."""
    if t.numel() == 0 or not (t.dtype.is_floating_point or t.dtype.is_complex):
        return True
    return bool(torch.isfinite(t.detach().sum()))


def affected(
    call: Call,
    jacs: Sequence[torch.Tensor],
    method: str,
    random: bool,
) -> torch.Tensor:
    """``(B,)`` bool: the samples the policy recomputes (NOTE [Non-finite values: one policy]).

    The common case (everything finite) costs one sum per argument and per Jacobian; only
    then are per-sample flags computed.
    """
    from .methods import batched_args

    args, batched, B = batched_args(call)
    bad = torch.zeros(B, dtype=torch.bool, device=call.device)
    for x, f in zip(args, batched, strict=True):
        if _finite(x):
            continue
        if not f:  # a shared argument: every sample sees it
            bad[:] = True
            return bad
        bad |= ~torch.isfinite(x.detach().reshape(B, -1)).all(1)
    for J in jacs if method != "closed_form" else ():
        if not _finite(J):
            bad |= ~torch.isfinite(J.detach().reshape(B, -1)).all(1)
    if method in ("jacfwd", "batched_fwd") and not random and not bool(bad.all()):
        copies = [a.detach().clone() for a in args]  # func may write into its arguments
        bad |= _intermediates(call, copies, batched, B).to(bad.device)
    return bad


def enforce(
    call: Call,
    argnums: Sequence[int],
    jacs: Sequence[torch.Tensor],
    method: str,
    out_shape: tuple[int, ...],
    vec: str | None,
    random: bool = False,
) -> None:
    """Overwrite, in ``jacs`` (``(B, ...)`` each), the samples the policy recomputes.

    Inside a torch.func transform (a ``jacobian`` call nested in ``vmap``, ``grad``, another
    ``jacobian``) values cannot be inspected, and in an enclosing call's probe run there is
    nothing to fix; the check is left to the call outside it.
    """
    from .methods import being_traced, in_transform, vjp

    if method == "per_sample" or call.device.type == "meta":
        return
    if in_transform(call.args) or being_traced(call.args) or _probe.probing():
        return
    bad = affected(call, jacs, method, random)
    if not bool(bad.any()):
        return
    idx = bad.nonzero().view(-1)
    if call.batched:
        sub = dataclasses.replace(
            call,
            args=tuple(
                a if d is None else a.index_select(d, idx.to(a.device))
                for a, d in zip(call.args, call.in_dims, strict=True)
            ),
            batch_size=int(idx.numel()),
        )
    else:
        sub = call
    fixed = vjp.compute(sub, argnums, out_shape, vec, [None] * len(argnums), per_sample=True)
    for J, R in zip(jacs, fixed, strict=True):
        J[idx] = R.to(J.dtype)


__all__ = ["affected", "enforce"]
