"""Ops without a forward-mode formula: column passes fall back to row passes.

NOTE [Forward-mode gaps fall back to rows]
    Some ops have no forward-mode formula in torch (``cdist``, ``pdist``, ``grid_sample``,
    ``multi_margin_loss``, ``multilabel_margin_loss``, a custom ``autograd.Function``
    without ``jvp``); the probe cannot tell, and a trial JVP per call would cost as much as
    the probe. So with ``method="auto"`` the column passes run, and where torch reports such
    a gap (``GAP_RE``) the argnum is remembered (per function, probed ops and argnum) and the
    call prepared again with it colored by rows (``rows=``); later calls are colored by rows
    at once, and a repeated call's kept preparation and program (NOTE [Repeated sparse
    calls] in :mod:`jacbatch.sparse._hot`) are those of the call that succeeded, so they are
    row passes. ``method="jacfwd"`` raises ``ValueError`` naming the fix. Where the row
    passes meet ``cdist_backward_vmap`` (the backward of ``cdist`` under ``vmap`` over
    cotangents), they pull back one color at a time (``Layout.loop``); ``method="jacrev"``
    keeps refusing it (it names the ``vmap``-ed passes). ``explain`` runs one JVP on meta
    tensors to report the mode that will run. The NaN policy runs no forward AD (its extra
    pass is a plain forward one), and the pattern check falls back to the other product.
"""

from __future__ import annotations

import contextlib
import re
import types
import weakref
from typing import Any

import torch

from .. import _torch_bugs
from ..call import Call
from .compressed import column_pass


class ForwardGap(Exception):
    """Column passes hit an op without a forward-mode formula (``method="auto"``): the call is
    prepared again with ``argnum`` colored by rows."""

    def __init__(self, argnum: int) -> None:
        super().__init__(argnum)
        self.argnum = argnum


GAP_RE = re.compile(
    r"forward AD with \S+ that does not support it|jvp function for custom autograd\.Function"
)
#: Per function (its code object for a plain function), the ``(probed ops, argnum)`` whose
#: column passes hit a forward-mode gap (NOTE [Forward-mode gaps fall back to rows]).
_NO_FORWARD: weakref.WeakKeyDictionary[Any, set[tuple[Any, int]]] = weakref.WeakKeyDictionary()


def _gap_key(call: Call) -> tuple[Any, Any]:
    f = call.func
    owner = f.__code__ if isinstance(f, types.FunctionType) else f
    return owner, (call.probe.ops if call.probe is not None else None)


def known(call: Call, argnum: int) -> bool:
    owner, ops = _gap_key(call)
    try:
        return (ops, argnum) in _NO_FORWARD.get(owner, ())
    except TypeError:  # not weakly referenceable
        return False


def remember(call: Call, argnum: int) -> None:
    owner, ops = _gap_key(call)
    with contextlib.suppress(TypeError):  # not weakly referenceable
        _NO_FORWARD.setdefault(owner, set()).add((ops, argnum))


def is_gap(err: BaseException) -> bool:
    return isinstance(err, (NotImplementedError, RuntimeError)) and bool(GAP_RE.search(str(err)))


def jacfwd_error(where: str, argnum: int, err: BaseException | None = None) -> ValueError:
    why = f" ({str(err).splitlines()[0]})" if err is not None else ""
    return ValueError(
        f"{where}: method='jacfwd' (column coloring, forward mode) cannot differentiate this "
        f"function w.r.t. argnum {argnum}: an op has no forward-mode formula in torch{why}. "
        f"Use method='jacrev' (row coloring, reverse mode) or 'auto', which falls back to it."
    )


def row_loop(where: str, call: Call) -> bool:
    """Whether row passes must pull back one color at a time: the probed ops meet a known bug
    of the backward under ``vmap`` over cotangents only (``cdist``); raises where a bug of the
    row passes cannot be routed around so (then neither coloring is right)."""
    ops = call.probe.ops if call.probe is not None else frozenset()
    bugs = _torch_bugs.affecting(ops, "jacrev")
    if not bugs:
        return False
    if all(b.name in _LOOPABLE for b in bugs):
        return True
    names = ", ".join(sorted(f"{b.name} ({b.what})" for b in bugs))
    raise NotImplementedError(
        f"{where}: forward mode has no formula for an op of this function and "
        f"{_torch_bugs.NOTE_PREFIX}: {names} makes the row passes wrong; use the dense jacobian "
        f"(sparse=False), which routes around it."
    )


#: Known bugs of the backward under ``vmap`` over cotangents only: looping over the colors
#: (one pull-back each, the batch still ``vmap``-ed) avoids them.
_LOOPABLE = frozenset({"cdist_backward_vmap"})


def meta_gap(call: Call, argnum: int, width: int) -> bool:
    """Whether one color's JVP of one sample, on meta tensors, meets an op without a
    forward-mode formula (remembered, as a call that met it; False where ``func`` cannot run on
    meta for another reason)."""
    shapes = [
        (1, *call.sample_shape(i)) if d is not None else call.sample_shape(i)
        for i, d in enumerate(call.in_dims)
    ]
    args = [torch.empty(s, dtype=call.dtype, device="meta") for s in shapes]
    flags = [d is not None for d in call.in_dims]
    seeds = torch.empty((1, width), dtype=call.dtype, device="meta")
    try:
        column_pass(call.func, args, flags, argnum, call.sample_shape(argnum), seeds)
    except Exception as err:  # any failure other than a gap: not known here
        if is_gap(err):
            remember(call, argnum)
            return True
    return False


__all__ = ["ForwardGap", "is_gap", "jacfwd_error", "known", "meta_gap", "remember", "row_loop"]
