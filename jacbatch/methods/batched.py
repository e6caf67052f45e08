"""Routes for batched functions (``jacobian(..., batched=True)``): ``func`` maps a batch to a
batch of independent samples, and its Jacobians are computed from whole-batch evaluations,
without ``vmap`` over the samples.

NOTE [Batched functions: one call, two views]
    Most research code is written for a batch: an ``nn.Module``, a forward-kinematics chain
    (pytorch-kinematics), a simulator step. With ``batched=True`` the caller declares that
    ``func(*args)`` takes the arguments as given (batch along ``in_dims``) and returns
    ``(B, *out_shape)``, row ``b`` depending on sample ``b``'s inputs only. The normalized
    :class:`~jacbatch.call.Call` then holds two views of the one function:

    * ``call.batched_func``: the caller's function, which the routes of this module evaluate
      once per batch;
    * ``call.func``: a per-sample wrapper (:func:`per_sample`), ``func`` on a batch of one
      (``x.unsqueeze(d)`` in, ``y.squeeze(0)`` out). Everything that reasons about one sample
      uses it unchanged: the probe (on meta tensors, a batch of one), the traced closed form
      (the graph of one sample, evaluated for the batch under ``vmap``), the state and
      argument-write protection, the per-sample policy for non-finite values.

    The wrapper is made once per (function, ``in_dims``) and kept while the function lives,
    so the traced graph's cache (keyed by the function) holds across calls.

NOTE [The sum trick: one backward pass per output element, for the whole batch]
    Samples are independent, so ``d Y[b, o] / d X[b'] = 0`` for ``b != b'``: the gradient of
    ``Y[:, o].sum()`` with respect to the batched ``X`` holds row ``o`` of every sample's
    Jacobian. ``Y = func(X)`` is evaluated once; the pull-backs of the one-hot cotangents
    ``e_o`` (one per output element, the same for every sample) are vectorized over ``o`` with
    ``torch.autograd.grad(..., is_grads_batched=True)`` (``vmap`` over the backward graph, not
    over ``func``), ``chunk_size`` rows at a time, and fall back to one backward pass per row
    (``retain_graph``) where that vmap fails. A shared differentiated argument (``in_dims``
    ``None``) receives the sum over the batch under that cotangent, so its per-sample rows are
    pulled back with cotangents that select one sample (``B`` vectorized passes); ``auto``
    prefers forward mode for such an argument.

NOTE [Forward mode on a batched function]
    One ``jvp`` of the batched function per input element ``i``, with the tangent that is one
    at ``i`` in every sample (for a shared argument: one at ``i``, no batch), gives column
    ``i`` of every sample's Jacobian. The ``jvp``s are vectorized over ``i`` with
    ``vmap(lambda t: jvp(func, X, t))`` (vmap over tangents only, which also accepts most
    in-place writes), ``chunk_size`` columns at a time, with a loop of ``jvp``s as fallback.

NOTE [What batched=True cannot check]
    Independence is the caller's declaration. A function that mixes samples (a train-mode
    BatchNorm, attention across the batch, ``x - x.mean(0)``) gives wrong rows: the sum trick
    adds the other samples' contributions into each row, forward mode reports the change of
    sample ``b``'s output with every sample's input moved at once. Checking it would cost
    extra evaluations of ``func`` on real data on every call, so only what the probe sees for
    free is refused: a function that writes into tensors it closes over (running statistics)
    or draws random numbers. The traced closed form, which differentiates ``func`` on a batch
    of one, is checked on every call against row 0 of ``func`` on the first two samples (NOTE
    [A batched function on a batch of one] in :mod:`jacbatch.methods.traced`): a function
    whose rows depend on the batch's size or on each other fails that check, and the call
    falls back to the routes of this module, which differentiate ``func`` on the batch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jvp, vmap

from ..call import Call
from . import Route, finish, usable

# Per function, per in_dims: the per-sample wrapper (NOTE [Batched functions: one call, two views]).
_WRAPPERS: weakref.WeakKeyDictionary[Any, dict[tuple[int | None, ...], Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)


def per_sample(func: Callable[..., Any], in_dims: tuple[int | None, ...]) -> Callable[..., Any]:
    """The per-sample view of a batched ``func``: ``func`` on a batch of one.

    Args:
        func: maps arguments batched along ``in_dims`` to ``(B, *out_shape)``.
        in_dims: per argument, the batch dimension or ``None`` (shared).

    Returns:
        ``sample(*xs) -> (*out_shape)`` for per-sample ``xs``; it raises ``ValueError`` when
        ``func``'s output does not lead with the batch of one.
    """
    try:
        cache = _WRAPPERS.setdefault(func, {})
    except TypeError:  # not weak-referenceable: a fresh wrapper each call
        cache = {}
    if in_dims in cache:
        return cache[in_dims]

    def sample(*xs: torch.Tensor) -> Any:
        y = func(*(x if d is None else x.unsqueeze(d) for x, d in zip(xs, in_dims, strict=True)))
        if not isinstance(y, torch.Tensor):
            return y  # the probe words the error
        check_output(y, 1)
        return y.squeeze(0)

    functools.update_wrapper(sample, func)
    name = getattr(func, "__name__", type(func).__name__)  # a module: its class, in messages
    sample.__name__ = name
    sample.__qualname__ = getattr(func, "__qualname__", name)
    sample.__wrapped__ = func  # type: ignore[attr-defined]
    cache[in_dims] = sample
    return sample


def check_output(y: object, B: int, out_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``y`` as a batched function's output for a batch of ``B``: ``(B, *out_shape)``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(
            f"jacobian: expected func to return one tensor with batched=True, got "
            f"{type(y).__name__}."
        )
    if y.dim() == 0 or y.shape[0] != B or (out_shape is not None and y.shape[1:] != out_shape):
        want = f"({B}, *out_shape)" if out_shape is None else str((B, *out_shape))
        raise ValueError(
            f"jacobian: expected func to return {want} with batched=True (the batch first, "
            f"B={B}), got shape {tuple(y.shape)}. With batched=True func takes the whole batch "
            f"and returns one row per sample; use batched=False for a per-sample func."
        )
    return y


def _inputs(call: Call) -> tuple[list[torch.Tensor], int]:
    """The arguments as ``func`` takes them (inference tensors cloned) and ``B``."""
    return [usable(a) for a in call.args], (call.batch_size or 0)


def _evaluate(call: Call, args: Sequence[torch.Tensor], B: int, out_shape: tuple[int, ...]) -> Any:
    """``func(*args)``, with copies of the arguments it writes into, checked to be
    ``(B, *out_shape)``."""
    mutated = set(call.probe.mutated) if call.probe is not None else set()
    xs = [a.clone() if i in mutated else a for i, a in enumerate(args)]
    assert call.batched_func is not None
    return check_output(call.batched_func(*xs), B, out_shape)


def _to_rows(
    g: torch.Tensor | None, d: int, n: int, like: torch.Tensor, numel: int
) -> torch.Tensor:
    """Gradients ``(n, *arg_shape)`` (batch at ``d + 1``) as ``(B, n, in_numel)``."""
    B = like.shape[0]
    if g is None:  # no path from this argument to the output
        return torch.zeros(B, n, numel, dtype=like.dtype, device=like.device)
    return g.movedim(d + 1, 1).reshape(n, B, numel).transpose(0, 1)


# ---------------------------------------------------------------------------------------------
# reverse mode: the sum trick
# ---------------------------------------------------------------------------------------------


def _reverse(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    chunk_size: int | None = None,
    max_rows: int | None = None,
    vectorize: bool = True,
) -> list[torch.Tensor]:
    """Jacobians by the sum trick (NOTE [The sum trick]), ``(B, *out_shape, *in_shape)`` per
    argnum (or ``(B, out_numel, in_numel)`` with ``vec``)."""
    graph = call.create_graph
    O = math.prod(out_shape)
    with torch.inference_mode(False) if not graph else contextlib.nullcontext():
        args, B = _inputs(call)
        if not graph:
            args = [a.detach() for a in args]
        if not graph:
            for a in argnums:
                args[a] = args[a].requires_grad_(True)
        primals = [args[a] for a in argnums]

        if graph:
            # torch.func.vjp at the caller's tensors composes with autograd and with outer
            # transforms (where fresh leaves are not allowed), as the vjp route's graph path
            def f(*xs: torch.Tensor) -> torch.Tensor:
                full = list(args)
                for a, x in zip(argnums, xs, strict=True):
                    full[a] = x
                return _evaluate(call, full, B, out_shape)

            with torch.enable_grad():
                Y, pull = torch.func.vjp(f, *primals)[:2]

            def many(V: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                return tuple(vmap(pull)(V))

            def one(v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                return tuple(pull(v))
        else:
            with torch.enable_grad():
                Y = _evaluate(call, args, B, out_shape)

            def many(V: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                return torch.autograd.grad(
                    Y, primals, V, retain_graph=True, create_graph=graph, allow_unused=True,
                    is_grads_batched=True,
                )  # fmt: skip

            def one(v: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
                return torch.autograd.grad(
                    Y, primals, v, retain_graph=True, create_graph=graph, allow_unused=True
                )

        dims = [call.in_dims[a] for a in argnums]
        numels = [math.prod(call.sample_shape(a)) for a in argnums]
        rows_run = O if max_rows is None else min(O, max_rows)
        step = max(1, min(chunk_size or rows_run, rows_run)) if vectorize else 1
        # (under torch.func.vjp, Y's requires_grad says nothing about the transform's levels)
        live = (graph or Y.requires_grad) and B > 0 and O > 0
        parts: list[list[torch.Tensor]] = [[] for _ in argnums]
        batched_idx = [i for i, d in enumerate(dims) if d is not None]
        shared_idx = [i for i, d in enumerate(dims) if d is None]

        def pull_rows(V: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            """Pull back ``(n, B, *out_shape)`` cotangents, vectorized or one by one."""
            nonlocal vectorize
            if vectorize and V.shape[0] > 1:
                try:
                    return many(V)
                except (RuntimeError, NotImplementedError, ValueError, TypeError):
                    vectorize = False  # vmap over this backward graph fails: one by one
            gs = [one(v) for v in V]
            return tuple(
                None if all(g[i] is None for g in gs) else _stack_grads(gs, i, primals[i])
                for i in range(len(primals))
            )

        for k0 in range(0, rows_run if live else 0, step):
            n = min(step, rows_run - k0)
            if batched_idx:
                V = torch.zeros(n, B, O, dtype=Y.dtype, device=Y.device)
                V[torch.arange(n), :, torch.arange(k0, k0 + n)] = 1
                grads = pull_rows(V.view(n, *Y.shape))
                for i in batched_idx:
                    parts[i].append(_to_rows(grads[i], dims[i], n, Y, numels[i]))  # type: ignore[arg-type]
            if shared_idx:  # one sample at a time: its rows k0 .. k0 + n
                per: list[list[torch.Tensor]] = [[] for _ in argnums]
                for b in range(B):
                    V = torch.zeros(n, B, O, dtype=Y.dtype, device=Y.device)
                    V[torch.arange(n), b, torch.arange(k0, k0 + n)] = 1
                    grads = pull_rows(V.view(n, *Y.shape))
                    for i in shared_idx:
                        g = grads[i]
                        per[i].append(
                            torch.zeros(n, numels[i], dtype=Y.dtype, device=Y.device)
                            if g is None
                            else g.reshape(n, numels[i])
                        )
                for i in shared_idx:
                    parts[i].append(torch.stack(per[i]))
        results = []
        for p, a, n_in, buf in zip(parts, argnums, numels, outs, strict=True):
            if p and sum(x.shape[1] for x in p) == O:
                J = torch.cat(p, dim=1) if len(p) > 1 else p[0]
            else:  # constant output, empty batch, or max_rows: the rest is zero
                done = torch.cat(p, dim=1) if p else None
                rest = torch.zeros(
                    B, O - (0 if done is None else done.shape[1]), n_in, dtype=Y.dtype,
                    device=Y.device,
                )  # fmt: skip
                J = rest if done is None else torch.cat([done, rest], dim=1)
            if not graph:
                J = J.detach()
            in_shape = call.sample_shape(a)
            results.append(
                finish(J.reshape(B, *out_shape, *in_shape), len(out_shape), len(in_shape), vec, buf)
            )
        return results


def _stack_grads(
    gs: Sequence[tuple[torch.Tensor | None, ...]], i: int, like: torch.Tensor
) -> torch.Tensor:
    return torch.stack([torch.zeros_like(like) if g[i] is None else g[i] for g in gs])  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# forward mode: batched tangents
# ---------------------------------------------------------------------------------------------


def _forward(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    chunk_size: int | None = None,
    max_rows: int | None = None,
) -> list[torch.Tensor]:
    """Jacobians by one ``jvp`` of the batched function per input element (NOTE [Forward mode
    on a batched function]); shapes as :func:`_reverse`."""
    graph = call.create_graph
    args, B = _inputs(call)
    if not graph:
        args = [a.detach() for a in args]
    results = []
    for a, buf in zip(argnums, outs, strict=True):
        in_shape = call.sample_shape(a)
        J = _columns(call, args, a, B, out_shape, chunk_size)
        if not graph:
            J = J.detach()
        results.append(
            finish(J.reshape(B, *out_shape, *in_shape), len(out_shape), len(in_shape), vec, buf)
        )
    return results


def _columns(
    call: Call,
    args: Sequence[torch.Tensor],
    a: int,
    B: int,
    out_shape: tuple[int, ...],
    chunk_size: int | None,
) -> torch.Tensor:
    """``(B, out_numel, in_numel)``: the columns for argument ``a``, ``chunk_size`` ``jvp``s
    under one ``vmap`` over tangents (one by one where that fails)."""
    x, d = args[a], call.in_dims[a]
    in_shape = call.sample_shape(a)
    n_in, O = math.prod(in_shape), math.prod(out_shape)
    lead = (B,) if d is not None else ()

    def f(xa: torch.Tensor) -> torch.Tensor:
        full = list(args)
        full[a] = xa
        return _evaluate(call, full, B, out_shape)

    def push(t: torch.Tensor) -> torch.Tensor:
        return jvp(f, (x,), (t,))[1]

    step = max(1, min(chunk_size or n_in, n_in)) if n_in else 1
    cols: list[torch.Tensor] = []
    vectorize = True
    for j0 in range(0, n_in if B > 0 else 0, step):
        n = min(step, n_in - j0)
        # (n, *x.shape): one-hot at j0 + c in every sample (no batch for a shared argument)
        T = torch.zeros(n, *lead, n_in, dtype=x.dtype, device=x.device)
        T[torch.arange(n), ..., torch.arange(j0, j0 + n)] = 1
        T = T.view(n, *lead, *in_shape)
        T = T.movedim(1, d + 1) if d is not None else T
        dY = None
        if vectorize and n > 1:
            try:
                dY = vmap(push)(T)
            except (RuntimeError, NotImplementedError, ValueError, TypeError):
                vectorize = False  # vmap over these tangents fails: one jvp at a time
        if dY is None:
            dY = torch.stack([push(t) for t in T])
        cols.append(dY.reshape(n, B, O))
    if not cols:
        return torch.zeros(B, O, n_in, dtype=call.dtype, device=call.device)
    return torch.cat(cols).permute(1, 2, 0)


REVERSE: Route = Route("batched_rev", _reverse, vectorized=True, fallback_multiple=3.0)
FORWARD: Route = Route("batched_fwd", _forward, vectorized=True, fallback_multiple=4.0)
LOOP: Route = Route(
    "batched_vjp", functools.partial(_reverse, vectorize=False), fallback_multiple=1.5
)

#: The batched route a ``method`` maps to (``auto`` and ``closed_form`` are planned).
BY_METHOD: dict[str, str] = {"jacrev": "batched_rev", "jacfwd": "batched_fwd", "vjp": "batched_vjp"}
