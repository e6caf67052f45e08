"""A Jacobian call leaves the caller's world as it found it: state, arguments and randomness.

NOTE [Writes into tensors that existed before the call]
    ``func`` may write into tensors it did not create: a train-mode ``BatchNorm`` updates its
    running statistics, a counter is incremented, a custom buffer is averaged in place. A
    Jacobian call runs ``func`` several times (the probe, tracing, each route, fallbacks), so
    left alone every call would advance that state several times. The rule is: **a Jacobian
    call does not change any tensor the function closes over**, and each evaluation of ``func``
    sees the state as the caller left it (so the Jacobian is that of one call of ``func`` made
    now, per sample).

    :class:`Guard` is a ``TorchDispatchMode`` that sees every aten op below autograd and
    ``torch.func``. It knows which storages are *fresh* (made by an op it saw, or handed to it as
    the call's own copies); any op that writes (schema alias ``a!``, or the running statistics
    of a training-mode batch-norm kernel, which its schema does not mark) into a storage that is
    not fresh is a write into pre-existing state, and the written tensor is cloned before its
    first write. :meth:`Guard.restore` copies the snapshots back, newest first, under
    ``no_grad`` through the written tensors themselves, so their version counters move and
    autograd refuses (rather than silently uses) a graph that saved a value we restored. Example:
    ``c.add_(1); return x * c`` in the vjp route's per-sample loop (a function vmap rejects)
    raises autograd's "modified by an inplace operation" instead of differentiating a counter
    that drifts from sample to sample. Batch-norm running statistics keep their version: the
    kernel's backward saves them but does not read them in training mode.

    torch.func's ``jacrev``/``jacfwd`` refuse a write into a captured tensor; requested
    explicitly they raise a ``NotImplementedError`` that says so, and ``auto`` falls back to the
    vjp route. Writes that rebind a module's buffer (``self.avg = ...``) are not tensor writes
    and are not seen by the mode; :class:`Bindings` catches those of the modules ``func`` is, is
    bound to or closes over (buffers and parameters rebound are bound back).

    Cost: the probe (:mod:`jacbatch._probe`) runs ``func`` once under this mode anyway and
    reports whether it writes into pre-existing tensors (``writes_state``) or into its arguments
    (``mutated``). Only then does :func:`protect` wrap ``func``; the common case pays nothing
    beyond the probe's one run. The wrapper enters the guard for each evaluation of ``func``,
    restores the state written by an earlier evaluation before the next one starts (outside
    ``torch.func`` transforms, i.e. the per-sample loop of the vjp route and separate batch
    chunks), and everything is restored when the route has finished, whether it returned or
    raised.

NOTE [Arguments func writes into]
    A ``func`` that writes into its argument (``x.mul_(2)``) must never write into the caller's
    tensor, and it cannot write into a leaf that requires grad either. The wrapper hands such a
    ``func`` a differentiable ``clone()`` of each argument the probe saw it write into; the
    Jacobian is then that of ``x -> func(x.clone())``, i.e. with respect to the argument's value
    on entry, which is what per-sample autograd on a copy of the argument gives.

NOTE [Randomness: one realization per sample]
    ``randomness`` has ``torch.func.vmap``'s meaning: ``"error"`` refuses a function that draws
    random numbers, ``"different"`` gives every sample its own draw, ``"same"`` gives every
    sample the same draw. In both cases each sample's Jacobian is the Jacobian of ONE realization
    of ``func``: every row and column of it sees the same draw.

    * Each evaluation of ``func`` under ``"same"`` starts from the generator state when the call
      was planned (:attr:`Protection.start`), so separate evaluations (samples of the per-sample
      loop, batch chunks, streamed chunks, forward-mode column chunks) all draw the same numbers.
      The probe puts the generator back, so that state is the caller's.
    * Under ``"different"``, an evaluation of different samples draws afresh, while re-running the
      same samples (the forward route's column chunks and argnums, each a new forward pass) replays
      the generator state: see :func:`jacbatch.methods.functorch.compute`. Within one forward, the
      forward route's tangent ``vmap`` uses ``randomness="same"`` so that every column of a
      sample shares the sample's draw.
    * The traced closed form cannot reproduce a draw: it is never used for random functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage; a torch.func wrapper is keyed by the tensor it wraps
    (dispatch modes see the unwrapped tensor), a tensor without storage by its own identity."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    try:
        return int(t.untyped_storage()._cdata)
    except (NotImplementedError, RuntimeError):
        return id(t)


# Ops that write into arguments their schema does not mark ``a!``: the batch-norm kernels update
# the running statistics in place. Schema name -> (written argument indices, index of the
# ``training`` flag that must be true, or None for always). The composite ops (batch_norm,
# instance_norm) reach the mode themselves under inference mode, where autograd does not
# decompose them.
_UNANNOTATED_WRITES: dict[str, tuple[tuple[int, ...], int | None]] = {
    "batch_norm": ((3, 4), 5),
    "_batch_norm_impl_index": ((3, 4), 5),
    "instance_norm": ((3, 4), 5),
    "native_batch_norm": ((3, 4), 5),
    "cudnn_batch_norm": ((3, 4), 5),
    "miopen_batch_norm": ((3, 4), 5),
    "batch_norm_update_stats": ((1, 2), None),
    "batch_norm_gather_stats_with_counts": ((3, 4), None),
}


@dataclasses.dataclass(frozen=True)
class _OpWrites:
    """What an aten overload writes: argument positions/names, and a flag that must be true."""

    where: tuple[tuple[int, str], ...]
    flag: tuple[int, str] | None
    statistics: bool  # unannotated batch-norm running statistics (see Guard.restore)
    fresh_outputs: bool  # its outputs are new storages (no output aliases an input)


_OP_WRITES: dict[Any, _OpWrites] = {}
_LIFTS = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy", "aten::lift"})


def _op_writes(func: Any) -> _OpWrites:
    """Per overload, computed once from its schema (the per-op cost is then a dict lookup)."""
    found = _OP_WRITES.get(func)
    if found is not None:
        return found
    schema = func._schema
    params = [(i, a.name) for i, a in enumerate(schema.arguments)]
    # lift_fresh wraps a tensor made by a Python constructor (torch.tensor([...])) inside func
    fresh = all(r.alias_info is None for r in schema.returns) or schema.name in _LIFTS
    extra = _UNANNOTATED_WRITES.get(schema.name.split("::")[-1])
    if extra is not None:
        idx, flag = extra
        found = _OpWrites(
            tuple(params[i] for i in idx), None if flag is None else params[flag], True, fresh
        )
    else:
        where = tuple(
            p
            for p, a in zip(params, schema.arguments, strict=True)
            if a.alias_info is not None and a.alias_info.is_write
        )
        found = _OpWrites(where, None, False, fresh)
    _OP_WRITES[func] = found
    return found


def _value(args: Sequence[Any], kwargs: dict[str, Any], where: tuple[int, str]) -> Any:
    return args[where[0]] if where[0] < len(args) else kwargs.get(where[1])


class Guard(TorchDispatchMode):
    """Snapshots every pre-existing tensor before its first write; :meth:`restore` undoes them.

    Args:
        own: tensors whose storages count as fresh (the call's own copies of the arguments).
    """

    def __init__(self, own: Sequence[torch.Tensor] = ()) -> None:
        super().__init__()
        self.fresh: set[int] = {_key(t) for t in own}
        self.saved: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        op = _op_writes(func)
        if op.where and (op.flag is None or _value(args, kwargs, op.flag)):
            for w in op.where:
                for t in tree_leaves(_value(args, kwargs, w)):
                    if not isinstance(t, torch.Tensor):
                        continue
                    if _key(t) not in self.fresh and id(t) not in self._seen:
                        self._seen.add(id(t))
                        self.saved.append((t, t.detach().clone(), op.statistics))
        out = func(*args, **kwargs)
        if op.fresh_outputs:
            if isinstance(out, torch.Tensor):
                self.fresh.add(_key(out))
            elif isinstance(out, (tuple, list)):
                for t in out:
                    if isinstance(t, torch.Tensor):
                        self.fresh.add(_key(t))
        return out

    @property
    def wrote(self) -> bool:
        """Whether any pre-existing tensor was written (and is waiting to be restored)."""
        return bool(self.saved)

    def restore(self) -> None:
        """Copy every snapshot back, newest first (the oldest value of a storage wins).

        The copy moves the tensor's version counter, so a graph that saved the written value
        fails loudly in backward instead of using the restored one. The one exception: running
        statistics written by a training-mode batch-norm kernel, which its backward saves but
        never reads in training mode (it uses the batch statistics), keep their version.
        """
        with torch.no_grad():
            for t, snap, statistics in reversed(self.saved):
                version = t._version
                t.copy_(snap)
                if statistics:
                    _set_version(t, version)
        self.saved.clear()
        self._seen.clear()


def _set_version(t: torch.Tensor, version: int) -> None:
    set_version: Any = torch._C._autograd._unsafe_set_version_counter
    try:
        set_version((t,), (version,))
    except TypeError:  # torch < 2.4 takes one tensor
        set_version(t, version)


def _modules(func: Callable[..., Any]) -> list[torch.nn.Module]:
    """The modules ``func`` is, is a bound method of, or closes over, with their submodules."""
    roots: list[Any] = [func, getattr(func, "__self__", None)]
    for cell in getattr(func, "__closure__", None) or ():
        try:
            roots.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    found: dict[int, torch.nn.Module] = {}
    for r in roots:
        if isinstance(r, torch.nn.Module):
            for m in r.modules():
                found.setdefault(id(m), m)
    return list(found.values())


def _differs(now: dict[str, Any], then: dict[str, Any]) -> bool:
    return now.keys() != then.keys() or any(now[k] is not v for k, v in then.items())


class Bindings:
    """Which tensors the modules of ``func`` hold as buffers and parameters.

    A ``forward`` that rebinds a buffer (``self.avg = 0.9 * self.avg + ...``) changes module state
    without writing into any tensor; :meth:`restore` binds the original tensors again.
    """

    def __init__(self, func: Callable[..., Any]) -> None:
        self.entries = [(m, dict(m._buffers), dict(m._parameters)) for m in _modules(func)]

    def changed(self) -> bool:
        return any(
            _differs(m._buffers, b) or _differs(m._parameters, p) for m, b, p in self.entries
        )

    def restore(self) -> None:
        for m, b, p in self.entries:
            if _differs(m._buffers, b):
                m._buffers.clear()
                m._buffers.update(b)
            if _differs(m._parameters, p):
                m._parameters.clear()
                m._parameters.update(p)


def rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generator state(s) ``func`` draws from on ``device`` (CPU, and CUDA's for CUDA)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_state(device: torch.device, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _in_transform() -> bool:
    """Whether we are inside a ``torch.func`` transform (vmap, grad, jvp, ...)."""
    return torch._C._functorch.maybe_current_level() is not None


@dataclasses.dataclass
class Protection:
    """What the probe found, and how the call's evaluations of ``func`` are to be protected.

    Attributes:
        writes_state: ``func`` writes into tensors that existed before the call.
        mutated: indices of arguments ``func`` writes into.
        random: ``func`` draws random numbers.
        randomness: the caller's ``randomness`` option.
        start: under ``randomness="same"``, the generator state every evaluation of ``func``
            starts from: the state when the call was planned, so that batch chunks and
            streamed chunks all replay one draw.
    """

    writes_state: bool = False
    mutated: tuple[int, ...] = ()
    random: bool = False
    randomness: str = "error"
    start: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @property
    def needed(self) -> bool:
        return (
            self.writes_state or bool(self.mutated) or (self.random and self.randomness == "same")
        )


@contextlib.contextmanager
def protect(func: Callable[..., Any], p: Protection, device: torch.device) -> Iterator[Any]:
    """Yield ``func`` itself, or a wrapper that keeps the caller's world untouched.

    The wrapper clones the arguments ``func`` writes into, evaluates ``func`` under a
    :class:`Guard` (restoring what an earlier evaluation wrote first, outside transforms), and
    under ``randomness="same"`` starts every evaluation from the generator state at entry. On
    exit every pre-existing tensor written is restored.
    """
    if not p.needed:
        yield func
        return
    guard = Guard()
    bindings = Bindings(func) if p.writes_state else None
    start = None
    if p.random and p.randomness == "same":
        start = p.start if p.start is not None else rng_state(device)
    mutated = frozenset(p.mutated)

    @functools.wraps(func)
    def wrapper(*args: Any) -> Any:
        if start is not None:
            set_rng_state(device, start)
        if not _in_transform():
            if guard.wrote:
                guard.restore()
            if bindings is not None and bindings.changed():
                bindings.restore()
        with guard if p.writes_state else contextlib.nullcontext():
            if mutated:  # inside the guard: the copies are fresh, never restored
                args = tuple(a.clone() if i in mutated else a for i, a in enumerate(args))
            return func(*args)

    try:
        yield wrapper
    finally:
        guard.restore()
        if bindings is not None:
            bindings.restore()


__all__ = ["Bindings", "Guard", "Protection", "protect", "rng_state", "set_rng_state"]
