"""One cheap run of the per-sample function that tells every route what it needs to know.

NOTE [The probe: one run on shapes, observed op by op]
    Before any route runs, :func:`probe` calls ``func`` once for one sample, on ``meta`` tensors
    (shapes only, no data, no compute), under a :class:`~torch.utils._python_dispatch.
    TorchDispatchMode` that sees every aten op below autograd. From that one run it learns:

    * the per-sample output shape and dtype;
    * the aten ops the function runs (``ops``), for the list of known torch bugs;
    * whether any op ran with grad mode off (``grad_disabled``): ``torch.no_grad()``,
      ``set_grad_enabled(False)`` or ``inference_mode()`` inside ``func``. The probe itself runs
      with grad mode on, so an op that sees it off was switched off by ``func``. Reverse-mode
      routes honour such a stop-gradient; forward-mode AD does not see grad mode at all;
    * whether such an op ran with forward-mode AD still on (``forward_blind``): the stop-gradient
      forward mode would differentiate through. A custom ``autograd.Function``'s forward runs
      with both off (its ``jvp`` and ``backward`` define the derivative), and so does
      ``inference_mode``, which forward AD does honour: neither counts;
    * whether any op draws random numbers (``random``: ops tagged ``nondeterministic_seeded``,
      e.g. ``dropout``, ``rand_like``, ``bernoulli``);
    * nothing else: the generator state is restored afterwards, so the probe never shifts the
      caller's random stream;
    * which arguments ``func`` writes into (``mutated``: their version counters moved);
    * whether ``func`` writes into tensors that existed before the call (``writes_state``: a
      train-mode BatchNorm's running statistics, a counter it closes over). Those writes are
      undone when the probe returns, even when ``func`` raised (NOTE [Writes into tensors that
      existed before the call] in :mod:`jacbatch._state`);
    * whether an op reads a tensor that requires grad (``reads_grad``): the probe's own inputs
      do not, so such a tensor is one ``func`` closes over (a module's parameters), and a
      Jacobian must then stay differentiable w.r.t. it under grad mode.

    The inputs are fresh meta tensors that do not require grad (so nothing is recorded or
    saved for backward; grad mode is on all the same, which is all the check needs). A function that cannot run on meta tensors (``.item()``,
    data-dependent shapes, closures that mix devices) is run once on a *copy* of the first
    sample instead, so even then nothing the caller owns is written to.

    While a probe runs, :func:`probing` is true: a :func:`jacbatch.jacobian` called inside
    ``func`` (a Hessian as the Jacobian of a Jacobian) then takes its differentiable path, as it
    will when ``func`` is differentiated for real, so the probe sees what that path does (its
    backward passes keep grad mode on) rather than the detached fast path.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from ._state import Bindings, Guard

_PROBING: contextvars.ContextVar[bool] = contextvars.ContextVar("jacbatch_probing", default=False)


def probing() -> bool:
    """Whether a probe run is in progress (see NOTE [The probe])."""
    return _PROBING.get()


@dataclass(frozen=True)
class ProbeResult:
    """What one probe run of a per-sample function showed.

    Attributes:
        out: the per-sample output (a meta tensor, or a real one when ``on_meta`` is False),
            or whatever non-tensor object ``func`` returned.
        ops: names of the aten ops the function ran, e.g. ``"aten.mm.default"``.
        grad_disabled: some op ran with grad mode off (``no_grad`` etc. inside ``func``).
        random: some op draws random numbers.
        mutated: indices of arguments ``func`` wrote into.
        on_meta: the probe ran on meta tensors (else on a copy of the first sample).
        writes_state: ``func`` wrote into tensors that existed before the call (undone since).
        reads_grad: some op read a tensor that requires grad (one ``func`` closes over).
        forward_blind: some op ran with grad mode off but forward-mode AD on (``no_grad``
            inside ``func``): forward mode would not see that stop-gradient.
        custom_function: ``func`` called a custom ``torch.autograd.Function``, whose
            ``backward`` (not its forward's ops) defines the derivative (NOTE [Custom
            autograd.Functions]).
    """

    out: Any
    ops: frozenset[str]
    grad_disabled: bool
    random: bool
    mutated: tuple[int, ...]
    on_meta: bool
    writes_state: bool = False
    reads_grad: bool = False
    forward_blind: bool = False
    custom_function: bool = False


class _Observe(Guard):
    """Records op names, grad mode and randomness of every aten op it sees, and guards state."""

    def __init__(self, own: Sequence[torch.Tensor]) -> None:
        super().__init__(own)
        self.ops: set[str] = set()
        self.grad_disabled = False
        self.random = False
        self.reads_grad = False
        self.forward_blind = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(str(func))
        if not torch.is_grad_enabled():
            self.grad_disabled = True
            if torch._C._is_fwd_grad_enabled():
                self.forward_blind = True
        if torch.Tag.nondeterministic_seeded in getattr(func, "tags", ()):
            self.random = True
        if not self.reads_grad:
            self.reads_grad = any(_requires_grad(a) for a in args)
        return super().__torch_dispatch__(func, types, args, kwargs)


def _requires_grad(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.requires_grad
    if isinstance(a, (list, tuple)):
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in a)
    return False


# NOTE [Custom autograd.Functions]
#     A custom ``torch.autograd.Function`` defines its derivative by its ``backward`` (a
#     straight-through estimator, a clipped or rescaled gradient), not by the ops of its
#     ``forward``. Dynamo captures a call made without grad-requiring inputs as the forward's ops
#     alone, so a closed form composed from the traced graph, or autodiff of that graph, would
#     differentiate the forward: a silently wrong Jacobian. torch.func's transforms and autograd
#     honour the ``backward``. A ``Function``'s forward runs with grad mode off, so only when the
#     probe saw an op run with grad off does it look further: ``func`` runs once more on
#     grad-requiring copies of the inputs, and its output's autograd graph is searched for a
#     ``Function``'s node. Such a function (or one whose second run fails: it cannot be told
#     apart) gets neither the traced closed form nor a program over its graph.


def _calls_custom_function(func: Callable[..., Any], xs: Sequence[torch.Tensor]) -> bool:
    """Whether ``func``'s output graph holds a custom ``autograd.Function``'s node (run under
    the probe's guard, which undoes any state it writes)."""
    try:
        ys = [x.detach().requires_grad_() if x.is_floating_point() else x for x in xs]
        out = func(*ys)
    except Exception:
        return True  # cannot tell: the conservative answer
    stack = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, torch.autograd.function.BackwardCFunction):
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False


def _run(func: Callable[..., Any], inputs: Sequence[torch.Tensor], on_meta: bool) -> ProbeResult:
    xs = list(inputs)
    versions = [x._version for x in xs]
    mode = _Observe(xs)
    bindings = Bindings(func)
    custom = False
    try:
        with mode:
            out = func(*xs)
            if mode.grad_disabled:  # NOTE [Custom autograd.Functions]
                reads_grad = mode.reads_grad  # the copies' requires_grad is not func's
                custom = _calls_custom_function(func, xs)
                mode.reads_grad = reads_grad
    finally:
        writes_state = mode.wrote or bindings.changed()
        mode.restore()
        bindings.restore()
    mutated = tuple(i for i, (x, v) in enumerate(zip(xs, versions, strict=True)) if x._version != v)
    return ProbeResult(
        out if not isinstance(out, torch.Tensor) else out.detach(),
        frozenset(mode.ops),
        mode.grad_disabled,
        mode.random,
        mutated,
        on_meta,
        writes_state,
        mode.reads_grad,
        mode.forward_blind,
        custom,
    )


def probe(
    func: Callable[..., Any],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    sample: Callable[[], Sequence[torch.Tensor]],
) -> ProbeResult:
    """Run ``func`` once for one sample and observe it (see NOTE [The probe]).

    Args:
        func: the per-sample function.
        shapes: per-sample shape of each argument.
        dtype: the arguments' dtype.
        sample: returns the first sample's arguments (only called when ``func`` cannot run on
            meta tensors); they are copied before ``func`` sees them.

    Returns:
        A :class:`ProbeResult`.
    """
    # The probe draws no random numbers the caller could notice: the generator is put back.
    rng = torch.get_rng_state()
    token = _PROBING.set(True)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            # Inside a trace (fake tensors), meta tensors would become constants of the
            # enclosing graph: probe on the (fake) first sample instead.
            if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None:
                try:
                    meta = [torch.empty(s, dtype=dtype, device="meta") for s in shapes]
                    return _run(func, meta, on_meta=True)
                except Exception:
                    pass
            real = [x.detach().clone() for x in sample()]
            cuda = real[0].device if real and real[0].device.type == "cuda" else None
            cuda_rng = None if cuda is None else torch.cuda.get_rng_state(cuda)
            try:
                return _run(func, real, on_meta=False)
            finally:
                if cuda is not None and cuda_rng is not None:
                    torch.cuda.set_rng_state(cuda_rng, cuda)
    finally:
        _PROBING.reset(token)
        torch.set_rng_state(rng)


__all__ = ["ProbeResult", "probe", "probing"]
