"""Turning a per-sample function into an aten graph soundly: Dynamo's guards decide re-tracing.

Every call of :func:`jacbatch.jacobian` that may use the traced route calls ``func`` ONCE through
``torch.compile(backend=<capturing backend>, fullgraph=True, dynamic=False)`` on example inputs
that jacbatch creates (zeros of the per-sample shapes, dtype and device). The backend computes
nothing: it keeps Dynamo's FX graph and returns a callable that, when Dynamo runs it, records
which graph ran and the *real* tensors it received (the example arguments, plus every tensor
Dynamo lifted as a graph input: globals, closed-over tensors, attributes, list and dict elements,
module parameters and buffers). The graph is converted once into the aten graph the op rules read
(:func:`jacbatch.tracing.to_aten`), and cached with the capture.

When Dynamo runs no graph or rebuilds the result outside its graph (``lambda x: x.T``), the
function is traced fresh with make_fx for that call only, never cached. A failed capture is
remembered per code object with a back-off (skip 1, 2, 4 ... 64 calls before trying again): a
failure only costs speed (autodiff), so it need not be re-checked on every call;
``method="closed_form"`` always tries again.

NOTE [Why Dynamo decides when to re-trace]
    A cached trace may be reused only when it is the same computation. Three designs, measured
    here (CPU, torch 2.13, one thread, a 2-core machine loaded by other jobs; medians):

    (a) **Dynamo's guards** (this module). While Dynamo traces, it records every Python value
        the graph depends on (globals, closure cells, attributes, defaults, ``training`` flags,
        float constants, the code object of every inlined function, hooks) and re-checks them
        before reusing the graph; tensors it reads are graph *inputs*, so swapping or updating
        them needs no re-trace and can never be stale. Cost per call: 15-20 µs for the guard
        check, 32-44 µs for :func:`capture` as a whole (a tiny ``tanh(x @ W)``, and a 3-layer
        256-wide MLP); a new capture (Dynamo compile + aten conversion) 40-110 ms, once per
        distinct computation. The cache lives on the code object, so an inline ``lambda``
        re-created on every call is captured once: ``jacobian(lambda x: tanh(x * SCALE), X)``
        in a loop went from 11.9 ms to 1.25 ms per call (re-traced every call before), and the
        cached tiny case stayed at 1.3-1.4 ms per call (paired rounds after/before: 1.01).
        Limits (graph breaks, builtins Dynamo cannot trace, :data:`RECOMPILE_LIMIT`) all end
        in "no traced closed form": autodiff, never a stale graph. Settings documented by
        Dynamo as unsafe are turned off for our compiles (NOTE [Dynamo settings that trade
        soundness for speed]).
    (b) **Validate a cached graph against the real function on every call**: one real forward
        of a sample (3.6 µs tiny, 48 µs for the MLP, growing with the model where a guard check
        does not) plus evaluating the cached graph and comparing. It cannot see a change that
        leaves the sampled value equal but changes the derivative: a threshold or a branch the
        sample does not reach (``relu``/``clamp`` bounds, a flag read only for some inputs), a
        swapped parameter that agrees at that point. A check on values is not a proof.
    (c) **No reuse without an explicit prepared object**: sound, but every plain call pays a
        fresh make_fx trace (4.6-16 ms tiny, 14-46 ms for the MLP here: 100-1000x a guard
        check), exactly the cost the cache exists to remove, and it adds API.

    (a) is as sound as the guards ``torch.compile`` relies on for every compiled model, costs a
    small constant per call, and needs no new API: chosen.

Thread safety: Dynamo compiles under a lock; the record slot is thread-local.

Size: about 650 lines, over the project's 600, on purpose: the capture, its soundness settings,
the failure back-off and the cache eviction are one protocol with Dynamo that changes together.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from . import tracing

#: The most graphs Dynamo keeps per code object for jacbatch's calls (its default is 8; raised
#: only around our own calls, and only after the default was reached). A function re-captured
#: for every new value (a float closure changing in a loop) wastes at most this many captures
#: (tens of ms each) before autodiff takes over for good.
RECOMPILE_LIMIT = 16

_LOCK = threading.RLock()
_LOCAL = threading.local()
_CAPTURES = 0
_FAILED_BACKOFF_MAX = 64


def capture_count() -> int:
    """How many graphs the capturing backend has received so far (for tests)."""
    return _CAPTURES


# ---------------------------------------------------------------------------------------------
# The backend and one capture
# ---------------------------------------------------------------------------------------------


class _Capture:
    """One Dynamo graph of ``func`` (one set of guards) and what jacbatch derived from it."""

    def __init__(self, gm: torch.fx.GraphModule, dummies: tuple[Any, ...]) -> None:
        self.gm = gm
        self.dummies = dummies
        self.layout: tuple[tuple[int | None, ...], int] | None = None  # inputs' args, result
        self.aten: torch.fx.GraphModule | None = None
        self.error: str | None = None
        self.converted = False
        self.graphs: dict[tuple[bool, ...], tracing.TracedGraph] = {}


def _dummy(node: Any) -> Any:
    val = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):  # cheap, distinct per output (identity tells which ran)
        return torch.zeros((), dtype=val.dtype, device=val.device).expand(val.shape)
    return None


def _backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """Keep Dynamo's graph; at run time record (capture, real inputs) instead of computing."""
    global _CAPTURES
    _CAPTURES += 1
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outs = out if isinstance(out, (tuple, list)) else (out,)
    cap = _Capture(gm, tuple(_dummy(o) for o in outs))

    def run(*inputs: Any) -> Any:
        _LOCAL.record = (cap, inputs)
        return cap.dummies

    return run


def _trampoline(fn: Callable[..., Any], *xs: torch.Tensor) -> Any:
    return fn(*xs)


_RUNNER: Callable[..., Any] | None = None

# NOTE [Dynamo settings that trade soundness for speed]
#     A few Dynamo settings skip guards "for speed" and are documented as unsafe: with
#     ``skip_nnmodule_hook_guards`` a forward hook added after the capture is not noticed (the
#     catalogue in tests/test_capture.py caught exactly that), and
#     ``assume_dunder_attributes_remain_unchanged`` ignores a rebound ``__defaults__`` or
#     ``__code__``. jacbatch turns them off while Dynamo compiles one of its captures (the
#     settings are read when guards are built, not when they are checked), from Dynamo's
#     compile-start callback, gated on this thread capturing; other compiles are untouched.
#     Without the callback API every capture call patches them (about 45 µs more per call).
_SOUND_SETTINGS = {
    "skip_nnmodule_hook_guards": False,
    "skip_no_tensor_aliasing_guards_on_parameters": False,
    "skip_tensor_guards_with_matching_dict_tags": False,
    "assume_dunder_attributes_remain_unchanged": False,
}
_PATCH_EVERY_CALL = False


def _sound_settings_on(args: object = None) -> None:
    if not getattr(_LOCAL, "capturing", False) or getattr(_LOCAL, "saved", None) is not None:
        return
    _silence_warnings()
    from torch._dynamo import config

    saved = {k: getattr(config, k) for k in _SOUND_SETTINGS if hasattr(config, k)}
    for k in saved:
        setattr(config, k, _SOUND_SETTINGS[k])
    _LOCAL.saved = saved


def _sound_settings_off(args: object = None) -> None:
    _restore_warnings()
    saved = getattr(_LOCAL, "saved", None)
    if saved is None:
        return
    from torch._dynamo import config

    for k, v in saved.items():
        setattr(config, k, v)
    _LOCAL.saved = None


def _runner() -> Callable[..., Any]:
    """``torch.compile`` of a trampoline whose own frame Dynamo skips: the compiled frame, and
    the cache, is that of ``func`` itself (its code object), not one shared by every function.

    Re-installs the trampoline's skip and the compile callbacks after ``torch._dynamo.reset()``.
    """
    global _RUNNER, _PATCH_EVERY_CALL
    from torch import _dynamo

    handler = getattr(_dynamo, "callback_handler", None)
    if _RUNNER is not None and (
        _PATCH_EVERY_CALL or _sound_settings_on in handler.start_callbacks  # type: ignore[union-attr]
    ):
        return _RUNNER
    _dynamo.eval_frame.skip_code(_trampoline.__code__)
    try:
        assert handler is not None
        handler.register_start_callback(_sound_settings_on)
        handler.register_end_callback(_sound_settings_off)
    except (AssertionError, AttributeError):
        _PATCH_EVERY_CALL = True
    if _RUNNER is None:
        _RUNNER = torch.compile(_trampoline, backend=_backend, fullgraph=True, dynamic=False)
    return _RUNNER


def _call_through(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*xs: torch.Tensor) -> Any:
        return fn(*xs)

    return call


# A code object of its own per module or other callable without Python code (it holds no
# reference to the callable, so the callable can be freed).
_CODES: weakref.WeakKeyDictionary[Any, types.CodeType] = weakref.WeakKeyDictionary()


def _own_code(f: Any) -> bool:
    return isinstance(f, types.FunctionType) and not f.__module__.startswith("torch")


def _target(func: Callable[..., Any]) -> Callable[..., Any]:
    """What Dynamo compiles: ``func`` when its first frame is Python code of the caller's (a
    function, method, ``functools.partial`` of one, an object with a Python ``__call__``), else
    a wrapper frame.

    Modules and other callables get a wrapper with a code object of its own per object, so they
    do not share one recompile budget; builtins (not weakly referenceable) share one wrapper
    code, guarded on the builtin's identity.
    """
    inner = func.func if isinstance(func, functools.partial) else func
    inner = inner.__func__ if isinstance(inner, types.MethodType) else inner
    if _own_code(inner) or (
        not isinstance(inner, torch.nn.Module)
        and not isinstance(inner, types.FunctionType)
        and _own_code(vars(type(inner)).get("__call__"))
    ):
        return func
    base = _call_through(func)
    try:
        code = _CODES.get(func)
        if code is None:
            code = base.__code__.replace()
            _CODES[func] = code
    except TypeError:  # not weak-referenceable (a builtin): the shared wrapper code
        return base
    return types.FunctionType(code, base.__globals__, "call", None, base.__closure__)


# ---------------------------------------------------------------------------------------------
# Quiet: a failed capture is an expected answer, never a log line
# ---------------------------------------------------------------------------------------------


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_LOCAL, "quiet", False)


_QUIET = _Quiet()
_QUIETED: set[str] = set()


_QUIET_SEEN = [0]


def _install_quiet() -> None:
    """Drop records of torch's loggers while this thread captures (installed once per logger,
    looked for again only when new loggers exist)."""
    loggers = logging.root.manager.loggerDict
    if len(loggers) == _QUIET_SEEN[0]:
        return
    _QUIET_SEEN[0] = len(loggers)
    for name, lg in list(loggers.items()):
        if name in _QUIETED or not name.startswith("torch") or not isinstance(lg, logging.Logger):
            continue
        lg.addFilter(_QUIET)
        _QUIETED.add(name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No log record from torch while this thread captures (a logger filter reads this flag)."""
    prev = getattr(_LOCAL, "quiet", False)
    _LOCAL.quiet = True
    try:
        yield
    finally:
        _LOCAL.quiet = prev


def _silence_warnings() -> None:
    """Ignore warnings while Dynamo compiles one of our captures (it warns, e.g., about builtins
    it cannot trace: a fallback to autodiff, not the user's concern). ``catch_warnings`` is
    process-wide: it is held only while compiling, under the capture lock."""
    if getattr(_LOCAL, "warnings", None) is None:
        ctx = warnings.catch_warnings()
        ctx.__enter__()
        warnings.simplefilter("ignore")
        _LOCAL.warnings = ctx


def _restore_warnings() -> None:
    ctx = getattr(_LOCAL, "warnings", None)
    if ctx is not None:
        _LOCAL.warnings = None
        ctx.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------
# Per-call capture
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Captured:
    """The traced graph for one call, and the values of its lifted (shared) inputs.

    Attributes:
        graph: the :class:`~jacbatch.tracing.TracedGraph` (``graph.gm is None`` when there is
            no traced closed form; ``graph.error`` says why).
        lifted: the current values of the tensors the graph reads besides the arguments
            (globals, closed-over tensors, parameters ...), in the graph's order; they follow the
            arguments in :func:`jacbatch.tracing.jacobian_terms`.
    """

    graph: tracing.TracedGraph
    lifted: tuple[torch.Tensor, ...] = ()


def _failed(error: str, batched: Sequence[bool]) -> Captured:
    return Captured(tracing.TracedGraph(None, error, tuple(batched)))


# Captures that failed, per code object (or callable), with a back-off before trying again:
# a failure is only slower (autodiff), never wrong, so it need not be re-checked on every call.
_FAILED: weakref.WeakKeyDictionary[Any, dict[Any, list[Any]]] = weakref.WeakKeyDictionary()


def _failure_owner(func: Any) -> Any:
    inner = func.__func__ if isinstance(func, types.MethodType) else func
    return getattr(inner, "__code__", inner)


def capture(
    func: Callable[..., Any],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    batched: Sequence[bool],
    *,
    retry: bool = False,
) -> Captured:
    """Capture ``func`` for per-sample ``shapes`` (Dynamo's guards decide whether to re-trace).

    Args:
        func: the per-sample function.
        shapes: per-sample shape of each argument.
        dtype, device: the arguments' dtype and device.
        batched: per argument, whether it carries the batch dimension.
        retry: try again even if capturing this function failed recently.

    Returns:
        A :class:`Captured`; never raises (a failure is ``graph.gm is None``).
    """
    batched = tuple(batched)
    busy = _busy()
    if busy is not None:  # not now, and nothing remembered: the next plain call captures
        return _failed(busy, batched)
    key = (tuple(shapes), dtype, device)
    owner = _failure_owner(func)
    try:
        failures = _FAILED.setdefault(owner, {})
    except TypeError:
        failures = {}
    seen = failures.get(key)
    if seen is not None and not retry and seen[0] > 0:
        seen[0] -= 1
        return _failed(seen[2], batched)
    result = _capture(func, shapes, dtype, device, batched)
    if result.graph.gm is None and result.graph.error is not None:
        backoff = min(2 * seen[1], _FAILED_BACKOFF_MAX) if seen is not None else 1
        failures[key] = [backoff, backoff, result.graph.error]
    elif seen is not None:
        del failures[key]
    return result


def forget(func: Callable[..., Any]) -> None:
    """Drop Dynamo's cached captures of ``func`` (its code object): the next call captures anew.

    Used when a capture is found stale (NOTE [The value check] in jacbatch.methods.traced).
    """
    target = _target(func)
    inner = target.func if isinstance(target, functools.partial) else target
    inner = inner.__func__ if isinstance(inner, types.MethodType) else inner
    code = getattr(inner, "__code__", None)
    if code is None:
        code = getattr(vars(type(inner)).get("__call__"), "__code__", None)
    if code is not None:
        torch._C._dynamo.eval_frame.reset_code(code)
    with contextlib.suppress(TypeError):  # not weak-referenceable: nothing remembered
        _FAILED.pop(_failure_owner(func), None)
        _SIGNATURES.pop(_failure_owner(func), None)


def _busy() -> str | None:
    """Why Dynamo must not be asked to capture right now, or ``None``.

    NOTE [No capture under a dispatch mode, a transform or another compile]
        Under an active ``TorchDispatchMode`` (a probe run of an enclosing ``jacobian`` call, a
        fake-tensor trace) or inside a torch.func transform, Dynamo
        does not compile the frame and marks its code object to be skipped from then on: every
        later capture of that function would fail ("found no compiled frames"). A nested
        ``jacobian`` call therefore never captures in these contexts; it uses autodiff, which
        composes with all of them.
    """
    if torch._C._len_torch_dispatch_stack() > 0:
        return "not captured while a torch dispatch mode is active"
    if torch._C._functorch.maybe_current_level() is not None:
        return "not captured inside a torch.func transform"
    return None


# NOTE [A full cache and a new signature]
#     Dynamo keeps at most RECOMPILE_LIMIT graphs per code object. When a capture hits that limit,
#     two cases differ. (1) The function is re-captured for the same shapes, dtype, device and
#     batching as before: something else changes on every call (a float it closes over, a
#     counter), so every call would capture afresh; autodiff takes over for good, as Dynamo
#     itself does. (2) The signature is new since the cache was last emptied: the function is
#     simply used with many shapes (``jacbatch.affine`` across a whole program). Then the code
#     object's cache is emptied (:func:`forget`) and the function captured again, so a function
#     with a closed form keeps it however many shapes it meets; a program cycling through more
#     shapes than the limit pays one capture per shape per cycle.
_SIGNATURES: weakref.WeakKeyDictionary[Any, set[Any]] = weakref.WeakKeyDictionary()


def _signatures(func: Any) -> set[Any]:
    """The signatures captured for ``func`` since its cache was last emptied (a throwaway set
    for callables that cannot be weakly referenced)."""
    try:
        return _SIGNATURES.setdefault(_failure_owner(func), set())
    except TypeError:
        return set()


def _new_signature(func: Any, signature: Any) -> bool:
    return signature not in _signatures(func)


def _is_limit(err: BaseException) -> bool:
    return type(err).__name__ == "FailOnRecompileLimitHit" or "recompile limit" in str(err)


def _capture(
    func: Callable[..., Any],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    batched: tuple[bool, ...],
) -> Captured:
    target = _target(func)
    signature = (tuple(shapes), dtype, device, batched)
    with _LOCK, _quiet(), torch.inference_mode(False), torch.enable_grad():
        # our own tensors, never the caller's (nor inference tensors from the caller's mode)
        examples = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        runner = _runner()
        _install_quiet()
        _LOCAL.record = None
        _LOCAL.capturing = True
        before = _CAPTURES
        try:
            if _PATCH_EVERY_CALL:
                _sound_settings_on()
            try:
                ret = runner(target, *examples)
            except Exception as err:
                if not _is_limit(err):
                    raise
                from torch import _dynamo

                with _dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    _LOCAL.record = None
                    try:
                        ret = runner(target, *examples)
                    except Exception as err2:
                        if not (_is_limit(err2) and _new_signature(func, signature)):
                            raise
                        # NOTE [A full cache and a new signature]
                        forget(func)
                        _LOCAL.record = None
                        ret = runner(target, *examples)
            _signatures(func).add(signature)
        except Exception as err:  # graph break, recompile limit, any error: no closed form
            _install_quiet()
            return _failed(f"Dynamo could not capture it ({tracing._first_line(err)})", batched)
        finally:
            record, _LOCAL.record = _LOCAL.record, None
            _LOCAL.capturing = False
            _sound_settings_off()
        if before != _CAPTURES:
            _install_quiet()  # loggers of modules imported while compiling
        if record is None:
            # Dynamo ran no graph (nothing to capture): trace now, fresh, never cached.
            return Captured(tracing.trace(func, shapes, dtype, device, batched))
        cap, inputs = record
        if not any(d is not None and d is ret for d in cap.dummies):
            # Dynamo rebuilt the result outside its graph (a view of an argument, such as
            # ``x.T``): trace now, fresh, never cached.
            return Captured(tracing.trace(func, shapes, dtype, device, batched))
        return _graph_for(cap, inputs, ret, examples, batched)


def _graph_for(
    cap: _Capture,
    inputs: Sequence[Any],
    ret: Any,
    examples: Sequence[torch.Tensor],
    batched: tuple[bool, ...],
) -> Captured:
    """The traced graph of ``cap`` for this call's batching, and this call's lifted values."""
    # Which runtime inputs are the arguments: by identity with the tensors we created (sources
    # cannot tell: a module's parameters come first, a partial's keywords are frame locals too).
    args: list[int | None] = []
    for x in inputs:
        args.append(next((i for i, e in enumerate(examples) if x is e), None))
    result = next((k for k, d in enumerate(cap.dummies) if d is not None and d is ret), None)
    if result is None:
        return _failed("the function's result is not a traced tensor", batched)
    layout = (tuple(args), result)
    if cap.layout is None:
        cap.layout = layout
    elif cap.layout != layout:  # the same guards, a different wiring: never guess
        return _failed("the captured graph's inputs changed between calls", batched)
    if not cap.converted:
        cap.aten, cap.error = _convert(cap, result)
        cap.converted = True
    if cap.aten is None:
        return _failed(cap.error or "conversion failed", batched)
    n = len(examples)
    where: list[int] = []
    lifted: list[torch.Tensor] = []
    for x, i in zip(inputs, args, strict=True):
        if i is None:
            if not isinstance(x, torch.Tensor):
                return _failed("the captured graph reads a non-tensor input", batched)
            where.append(n + len(lifted))
            lifted.append(x)
        else:
            where.append(i)
    tg = cap.graphs.get(batched)
    if tg is None:
        flags = tuple(batched[i] if i < n else False for i in where)
        tg = tracing.TracedGraph(cap.aten, None, flags, inputs=tuple(where))
        cap.graphs[batched] = tg
    return Captured(tg, tuple(lifted))


# ---------------------------------------------------------------------------------------------
# Dynamo graph -> aten graph
# ---------------------------------------------------------------------------------------------


def _is_inplace(node: torch.fx.Node) -> bool:
    """An op that writes into its first operand (``mul_``, ``x += 1``, ``x[i] = v``)."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    if getattr(t, "__module__", None) == "_operator" and name.startswith("i"):
        return True  # operator.iadd and friends
    return name in ("setitem", "__setitem__")


def _honour_grad_mode(gm: torch.fx.GraphModule) -> str | None:
    """Make grad-disabled regions (``no_grad``, ``set_grad_enabled(False)``,
    ``inference_mode``) stop-gradients, as autograd does: every tensor computed while grad is
    off is detached where it is used. Returns why it cannot, or ``None``.
    """
    import torch.autograd.grad_mode as gmode

    enter = getattr(gmode, "_enter_inference_mode", None)
    leave = getattr(gmode, "_exit_inference_mode", None)
    graph = gm.graph
    enabled = True  # the capture runs under enable_grad
    stack: list[bool] = []
    markers: list[torch.fx.Node] = []
    inside: dict[torch.fx.Node, None] = {}
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        if node.target is torch._C._set_grad_enabled:
            enabled = bool(node.args[0])
            graph.erase_node(node)
        elif enter is not None and node.target is enter:
            stack.append(enabled)
            enabled = enabled and not bool(node.args[0] if node.args else True)
            markers.append(node)
        elif leave is not None and node.target is leave:
            if not stack:
                return "an unbalanced inference_mode in the captured graph"
            enabled = stack.pop()
            markers.append(node)
        elif not enabled:
            if _is_inplace(node) and any(a not in inside for a in node.all_input_nodes):
                return "an in-place op under no_grad writes into a value computed outside it"
            inside[node] = None
    for node in reversed(markers):  # each exit before its enter (the exit uses its handle)
        if any(u not in markers for u in node.users):
            return "the captured graph uses an inference_mode handle"
        graph.erase_node(node)
    for node in inside:
        users = [u for u in node.users if u not in inside]
        if not users or not isinstance(node.meta.get("example_value"), torch.Tensor):
            continue
        with graph.inserting_after(node):
            det = graph.call_function(torch.Tensor.detach, (node,))
        det.meta = dict(node.meta)
        for u in users:
            u.replace_input_with(node, det)
    return None


def _convert(cap: _Capture, result: int) -> tuple[torch.fx.GraphModule | None, str | None]:
    """The aten graph of the capture's result, over all its placeholders (args and lifted)."""
    gm = cap.gm
    graph = gm.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    out_node.args = ((outs[result],),)
    why = _honour_grad_mode(gm)
    if why is not None:
        return None, why
    gm.recompile()  # no dead-code elimination: FX does not know `y.mul_(2)` is not dead
    examples = []
    for p in (n for n in graph.nodes if n.op == "placeholder"):
        v = p.meta.get("example_value")
        if not isinstance(v, torch.Tensor):
            return None, "the captured graph has a non-tensor input"
        examples.append(torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device))
    return tracing.to_aten(gm, examples)


__all__ = ["Captured", "capture", "capture_count"]
