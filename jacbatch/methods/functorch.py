"""The torch.func route: ``vmap(jacrev(func))``, and forward mode from ``vmap`` and ``jvp``.

``chunk_size`` bounds how many Jacobian rows (reverse) or columns (forward) are computed in one
vectorized pass. ``torch.func.jacrev`` chunks natively.

NOTE [Forward mode: vmap over tangents outside the batch]
    ``vmap(jacfwd(f))`` nests the tangent vmap *inside* the batch vmap. In torch 2.13 that nesting
    returns wrong Jacobians for LU-based ops: for ``torch.linalg.det``, ``torch.logdet`` and
    ``torch.linalg.solve`` on a batch of well-conditioned 3x3 matrices the result differs from
    per-sample ``jacfwd`` (and from ``jacrev``) by up to 1e5, while ``jvp`` under a single vmap is
    right (tests/test_routes.py sweeps these ops). The forward route therefore puts the tangent
    vmap *outside*: ``vmap(lambda e: jvp(vmap(f), (X,), (e,)))`` over one-hot tangents, one
    ``jvp`` of the batched function per input element, which is the same work as ``jacfwd`` and
    needs no copies of the inputs. ``torch.func.jacfwd`` has no chunking; the chunks here are
    slices of the one-hot basis. (Listed with the other known torch bugs in
    :mod:`jacbatch._torch_bugs` as ``lu_forward_nested_vmap``.)

NOTE [Forward mode does not see torch.no_grad]
    ``torch.no_grad()`` (or ``.detach()``) inside ``func`` makes a value a constant for
    autograd, and reverse mode (``jacrev``, the vjp route) honours it. Forward-mode AD ignores
    grad mode: in torch 2.13 ``jacfwd(lambda x: x * no_grad(x.sum()))`` differentiates through
    the ``no_grad`` block (``.detach()`` it does honour). The forward route therefore refuses a
    function the probe saw switch grad mode off while forward AD stayed on (``forward_blind``;
    a custom ``autograd.Function`` or ``inference_mode`` switches both off, which forward AD
    honours), and ``auto`` takes reverse mode for it.

"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jacrev, jvp, vmap

from .. import _state, _threads, _torch_bugs, memory
from ..call import Call
from . import Route, batched_args, finish, has_tangents


def _forward_columns(
    func: Callable[..., Any],
    args: Sequence[torch.Tensor],
    dims: tuple[int | None, ...],
    batched: bool,
    argnum: int,
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    randomness: str = "error",
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Forward-mode Jacobian w.r.t. ``args[argnum]`` for the whole batch: ``(B, *out, *in)``.

    ``vmap`` over one-hot tangents (``chunk_size`` at a time) of ``jvp`` of the batch-vmapped
    function; see NOTE [Forward mode: vmap over tangents outside the batch]. With ``rng``
    every chunk starts from that generator state, and the tangent vmap draws once for all
    columns, so every column sees the same realization (NOTE [Randomness: one realization per
    sample] in :mod:`jacbatch._state`).
    """
    g = vmap(func, in_dims=dims, randomness=randomness) if batched else func
    tangent_randomness = "error" if randomness == "error" else "same"
    x = args[argnum]
    in_shape = x.shape[1:] if dims[argnum] is not None else x.shape
    n = math.prod(in_shape)
    B = x.shape[0] if dims[argnum] is not None else None

    def push(e: torch.Tensor) -> torch.Tensor:
        t = e.expand_as(x) if B is not None else e
        xs = list(args)

        def f(xx: torch.Tensor) -> torch.Tensor:
            xs[argnum] = xx
            return g(*xs)

        return jvp(f, (x,), (t,))[1]

    step = n if chunk_size is None else chunk_size
    cols = []
    for start in range(0, n, max(step, 1)):
        stop = min(n, start + step)
        basis = torch.zeros(stop - start, n, dtype=x.dtype, device=x.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
        if rng is not None:
            _state.set_rng_state(x.device, rng)
        cols.append(vmap(push, randomness=tangent_randomness)(basis.view(stop - start, *in_shape)))
    lead = x.shape[:1] if B is not None else ()
    if not batched:
        lead = ()
    if not cols:
        cols.append(torch.zeros(0, *lead, *out_shape, dtype=x.dtype, device=x.device))
    Jt = cols[0] if len(cols) == 1 else torch.cat(cols)  # (n, [B,] *out)
    J = Jt.movedim(0, -1).reshape(*Jt.shape[1:], *in_shape)
    return J if batched else J.unsqueeze(0)


def compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    mode: str,
    chunk_size: int | None = None,
    max_rows: int | None = None,
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` with torch.func (``mode`` ``"rev"``/``"fwd"``).

    ``chunk_size`` bounds the rows (``"rev"``) or columns (``"fwd"``) of one vectorized pass;
    ``max_rows`` is part of the route protocol and unused here.

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``vec``).
    """
    if mode == "fwd" and call.probe is not None and call.probe.forward_blind:
        raise NotImplementedError(
            "jacobian: expected a func that keeps grad mode on for method='jacfwd', got one "
            "that switches it off inside (torch.no_grad, set_grad_enabled(False) or "
            "inference_mode). Forward-mode AD does not see that stop-gradient and would "
            "differentiate through it; use method='jacrev', 'vjp' or 'auto' (reverse mode), "
            "or .detach() the value instead."
        )
    if mode == "fwd" and has_tangents(call.args):
        raise NotImplementedError(
            "jacobian: expected arguments without forward-mode tangents for method='jacfwd', "
            "got dual tensors (torch.autograd.forward_ad): torch does not nest forward-mode "
            "AD in forward-mode AD. Use method='jacrev', 'vjp' or 'auto'."
        )
    if mode == "fwd":
        # Tangents take the size of a view's whole storage: NOTE [A chunk costs what it holds].
        call = dataclasses.replace(call, args=tuple(memory.compact(a) for a in call.args))
    args, flags, _ = batched_args(call)
    dims = tuple(0 if f else None for f in flags)
    nums = tuple(argnums)
    jacs: list[torch.Tensor] = []
    with contextlib.ExitStack() as stack:
        if call.create_graph:  # see NOTE [Differentiable results] in jacbatch.methods
            stack.enter_context(torch.enable_grad())
        if mode == "fwd":
            stack.enter_context(_threads.FORWARD_AD)  # NOTE [First calls from several threads]
        if mode == "rev":
            stack.enter_context(_torch_bugs.reverse_mode())  # lu_backward_nested_vmap_no_grad
            fn = jacrev(call.func, argnums=nums, chunk_size=chunk_size)
            res = (
                vmap(fn, in_dims=dims, randomness=call.randomness)(*args)
                if call.batched
                else fn(*args)
            )
            jacs.extend(r if call.batched else r.unsqueeze(0) for r in res)
        else:
            # Each argnum and column chunk is a new forward pass over the same samples: replay
            # the generator so that all of them see one realization.
            rng = None if call.randomness == "error" else _state.rng_state(call.device)
            for a in nums:
                # A shared differentiated argument gets a per-sample tangent through the batched
                # function's jvp, so the result is per sample without expanding it.
                jacs.append(
                    _forward_columns(
                        call.func,
                        args,
                        dims,
                        call.batched,
                        a,
                        chunk_size,
                        out_shape,
                        call.randomness,
                        rng,
                    )
                )
        if not call.create_graph:
            jacs = [J.detach() for J in jacs]
        return [
            finish(J, len(out_shape), len(call.sample_shape(a)), vec, buf)
            for J, a, buf in zip(jacs, nums, outs, strict=True)
        ]


def _no_state_writes(call: Call) -> bool:
    """torch.func refuses a ``func`` that writes into tensors it closes over."""
    return not (call.probe is not None and call.probe.writes_state)


JACREV: Route = Route(
    "jacrev", functools.partial(compute, mode="rev"), method="jacrev", applies=_no_state_writes, vectorized=True,
    fallback_multiple=3.0,
)  # fmt: skip
JACFWD: Route = Route(
    "jacfwd", functools.partial(compute, mode="fwd"), method="jacfwd", applies=_no_state_writes, vectorized=True,
    fallback_multiple=4.0,
)  # fmt: skip
