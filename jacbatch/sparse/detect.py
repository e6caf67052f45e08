"""Structural sparsity detection: which entries of a per-sample Jacobian can be nonzero.

:func:`detect` traces the per-sample function into an aten graph the way the traced route does
(:func:`jacbatch.capture.capture`: Dynamo, closures and parameters lifted as graph inputs;
:func:`jacbatch.tracing.trace` when Dynamo cannot capture it) and propagates index sets through
the graph: for every node, per flat element, the set of flat argument elements it may depend on
(:class:`jacbatch.sparse._sets.Deps`, CSR, vectorized). The output's sets are the rows of the
:class:`~jacbatch.sparse.pattern.SparsityPattern`. No derivative is computed and no argument
value is read: the pattern holds for every input and is shared by the whole batch.

NOTE [Exact and conservative op classes]
    A pattern may hold entries whose derivative happens to vanish (a superset); it must never
    miss one. Per op class (:mod:`jacbatch.sparse._ops`):

    * **pointwise** (``torch.Tag.pointwise``: ``add``, ``mul``, ``sin``, ``where``, ``clamp`` ...):
      output element ``k`` depends on the union of its broadcast input elements' sets. Exact
      up to derivatives that vanish for particular values (``relu`` at negative inputs,
      ``where``'s unchosen branch, ``x * 0``): a structural pattern keeps them.
    * **known masks**: ``where(cond, a, b)`` and ``masked_fill(x, mask, v)`` with a condition
      computed from constants (a boundary mask the function closes over) depend on the branch
      each element takes, and ``a * c`` with such a constant ``c`` depends on nothing where
      ``c`` is exactly zero (its derivative there is ``0 * a'``). Exact.
    * **zero derivative** (``detach``, ``sign``, ``floor``, ``round``, ``zeros_like`` ...) and
      every integer or boolean value (``argmax``, comparisons, indices): depend on nothing,
      exactly as autograd, which passes no derivative through them.
    * **data movement** (views, ``slice``, ``select``, ``cat``, ``stack``, ``roll``, ``flip``,
      padding, ``gather``/``index_select``/``index`` with index tensors whose values are known
      ...): the very same op is applied to a tensor of element ids, which tells, per output
      element, the one input element it copies (or none: padding). Exact. An index computed
      from the arguments (value-dependent) is not known: the output then depends on the whole
      source (conservative).
    * **scatters** (``index_put``, ``scatter``, ``scatter_add``, ``index_add`` ...): each
      written element depends on every source element written into it (all duplicates), plus
      the destination's own element where it is accumulated into or not written. Exact up to
      duplicates of an overwriting scatter (torch keeps one of them; all are kept here).
    * **reductions** (``sum``, ``mean``, ``prod``, ``amax``, ``var``, ``norm``, ``max.dim``
      ...): the union over the reduced dims. Exact for smooth ones; ``amax``/``max``/
      ``median`` pick an element by value, so the union is conservative.
    * **fibers** (``softmax``, ``log_softmax``, ``sort``, ``topk``, layer norm): every output
      element depends on its whole fiber along the dim(s). Exact for softmax and layer norm;
      conservative for value-dependent choices (sort, topk). **Prefixes** (``cumsum``,
      ``cumprod``, ``cummax`` ...): element ``p`` of a fiber depends on elements ``0..p``.
    * **contractions** (``mm``, ``bmm``, ``mv``, ``dot``, ``addmm``, ``baddbmm`` ...; ``matmul``,
      ``einsum`` and ``linear`` decompose into them): ``Z[i, j]`` depends on ``A[i, :]`` and
      ``B[:, j]``. The other operand's values are never read: every entry may be nonzero, so
      zeros inside a constant matrix are not exploited (conservative, value-independent).
    * **windows** (``convolution``, pooling): an output element depends on its receptive field,
      over every input channel of its group, on its output channel's weights whose taps land
      inside the input, and on its bias. Exact for convolution and average pooling (the other
      operand's values are not read); max pooling picks by value (conservative).
    * **interpolation** (linear, bilinear, bicubic, trilinear upsampling): the op's fixed
      weights, found by applying it to basis planes; exact. Nearest upsampling is data movement.
    * **normalization**: layer norm (the normalized dims), group norm (the group), batch norm
      (the channel in training, pointwise in eval), plus the channel's weight and bias; exact.
    * **anything else**: every output element depends on the union of all the op's inputs'
      sets (dense over the op): conservative, never misses a dependence.

NOTE [What is refused]
    A function that draws random numbers, one whose shapes depend on values (``x[x > 0]``), one
    that cannot be traced (``.item()``, control flow on values, in-place writes into tensors
    that exist before the call) or one that calls a custom ``torch.autograd.Function`` (its
    ``backward``, which the graph does not show, defines the derivative: a straight-through
    ``round`` would read as "depends on nothing") has no pattern that holds for every input
    without guessing: :class:`NoPatternError` (a ``NotImplementedError``) says why, and the
    caller computes the Jacobian densely. Random ops and custom functions are seen by the
    project's probe run (:func:`jacbatch._probe.probe`), the rest by tracing. Detection is also
    refused inside a torch.func transform or under a dispatch mode, where the project never
    captures (NOTE [No capture under a dispatch mode, a transform or another compile] in
    :mod:`jacbatch.capture`).

NOTE [Cost and caching]
    The function is captured once per computation by :func:`jacbatch.capture.capture` (shared
    with the traced route; Dynamo's guards decide re-tracing). Propagation is vectorized: the
    1-D ``(x[1:] - x[:-1])**2`` with 10,000 unknowns and the 2-D Brusselator with 2,048 take
    milliseconds. The pattern is cached per captured graph, argnum and shapes, unless it
    depends on the value of a lifted tensor (an index tensor or a mask the function closes
    over: its values may change between calls without a re-capture); a constant factor
    without zeros leaves the pattern as it would be for any value, so it is cached (a later
    zero only makes the cached pattern a superset). A cached pattern is returned as a copy.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from .. import _validation as V
from .. import capture, tracing
from . import _ops
from ._sets import Deps
from .pattern import SparsityPattern


class NoPatternError(NotImplementedError):
    """No structural sparsity pattern can be given for this function (see NOTE [What is
    refused]); the Jacobian can still be computed densely."""


# Per aten graph (one Dynamo capture), per (argnum, placeholder wiring): the pattern, kept only
# when it did not read the value of a lifted tensor (an index tensor the function closes over).
_CACHE: weakref.WeakKeyDictionary[torch.fx.GraphModule, dict[Any, SparsityPattern]] = (
    weakref.WeakKeyDictionary()
)


def _sample_shape(x: torch.Tensor, d: int | None) -> tuple[int, ...]:
    shape = list(x.shape)
    if d is not None:
        del shape[d]
    return tuple(shape)


def detect(
    func: Callable[..., Any],
    args: Sequence[torch.Tensor],
    argnum: int,
    in_dims: tuple[int | None, ...],
    batched: bool = False,
    copy: bool = True,
) -> SparsityPattern:
    """The structural pattern of ``d func(*sample) / d sample[argnum]``, shared by the batch.

    Args:
        func: the per-sample function (with ``batched=True``: a function of the whole batch whose
            samples are independent, see ``jacobian(..., batched=True)``), returning one tensor.
        args: the call's arguments as the caller passes them (batched ones with their batch
            dimension at ``in_dims[i]``); only their shapes, dtype and device are used.
        argnum: the differentiated argument (non-negative).
        in_dims: per argument, its batch dimension or ``None`` (shared).
        batched: ``func`` takes the whole batch.
        copy: return a cached pattern as a copy (the caller may write into its index
            tensors); ``False``: the cached object itself, for callers that only read it
            and key their own caches (coloring, gather layout) on the object.

    Returns:
        The :class:`SparsityPattern` of the flattened per-sample Jacobian ``(out_numel,
        in_numel)`` (row-major vec of output and argument).

    Raises:
        NoPatternError: the function draws random numbers, has value-dependent shapes or
            control flow, or cannot be traced (see NOTE [What is refused]).
    """
    where = "sparsity"
    args = tuple(args)
    in_dims = tuple(in_dims)
    if not 0 <= argnum < len(args):
        raise ValueError(f"{where}: expected argnum in [0, {len(args)}), got {argnum}.")
    if batched:
        from ..methods.batched import per_sample

        func = per_sample(func, in_dims)
    shapes = [_sample_shape(x, d) for x, d in zip(args, in_dims, strict=True)]
    flags = [d is not None for d in in_dims]
    dtype, device = args[0].dtype, args[0].device
    busy = capture._busy()
    if busy is not None:
        raise NoPatternError(f"{where}: no pattern can be detected here: {busy}.")
    got = capture.capture(func, shapes, dtype, device, flags, retry=True)
    tg, lifted = got.graph, got.lifted
    if tg.gm is None:  # Dynamo could not capture it: trace it directly (closures as constants)
        first = tg.error
        tg, lifted = tracing.trace(func, shapes, dtype, device, flags), ()
        if tg.gm is None:
            raise NoPatternError(
                f"{where}: expected a function that traces into one graph of tensor ops, got "
                f"one that does not ({tg.error or first}). A pattern that holds for every input "
                f"needs a graph: value-dependent control flow, .item(), value-dependent shapes "
                f"(x[x > 0], nonzero) and in-place writes into tensors that exist before the "
                f"call (a train-mode BatchNorm's statistics) have none. Compute the Jacobian "
                f"densely (jacbatch.jacobian)."
            )
    gm = tg.gm
    key = (argnum, tg.inputs, tuple(shapes))
    cached = _CACHE.get(gm, {}).get(key)
    if cached is not None and not copy:
        return cached
    if cached is not None:  # a copy: the caller may write into its index tensors
        return SparsityPattern(
            cached.out_shape, cached.in_shape, cached.crow_indices.clone(),
            cached.col_indices.clone(),
        )  # fmt: skip
    _check_probe(func, args, in_dims, shapes)
    walk = _Walk(gm, tg.inputs, len(args), lifted, argnum, shapes[argnum])
    pattern = walk.run()
    if not walk.read_lifted:
        _CACHE.setdefault(gm, {})[key] = pattern
    return pattern


def _check_probe(
    func: Callable[..., Any],
    args: tuple[torch.Tensor, ...],
    in_dims: tuple[int | None, ...],
    shapes: Sequence[tuple[int, ...]],
) -> None:
    """Refuse what the graph cannot show (NOTE [What is refused]): the project's probe run
    (:func:`jacbatch._probe.probe`, on meta tensors) sees random ops and custom
    ``autograd.Function`` calls, whose ``backward``, not the traced forward, defines the
    derivative (NOTE [Custom autograd.Functions] in :mod:`jacbatch._probe`)."""
    from .. import _probe

    def sample() -> list[torch.Tensor]:
        return [x if d is None else x.select(d, 0) for x, d in zip(args, in_dims, strict=True)]

    got = _probe.probe(func, shapes, args[0].dtype, sample)
    if got.random:
        random = sorted(op for op in got.ops if _ops.is_random(_resolve(op)))
        _refuse_random(random)
    if got.custom_function:
        raise NoPatternError(
            "sparsity: expected a function whose traced ops define its derivative, got one that "
            "calls a custom torch.autograd.Function (its backward defines the derivative, and "
            "the graph shows only its forward). Compute the Jacobian densely (jacbatch.jacobian)."
        )


def _resolve(name: str) -> Any:
    """``"aten.bernoulli.p"`` -> the op overload (``None`` if there is none)."""
    obj: Any = torch.ops
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _refuse_random(ops: Sequence[str]) -> None:
    raise NoPatternError(
        f"sparsity: expected a deterministic func, got one that draws random numbers "
        f"({', '.join(ops) or 'a random op'}). Its pattern would describe one draw only. Put "
        f"dropout in eval mode, or compute the Jacobian densely (jacbatch.jacobian with "
        f"randomness='different' or 'same')."
    )


class _Walk:
    """One propagation of index sets through an aten graph (see the module docstring)."""

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        inputs: tuple[int, ...] | None,
        n_args: int,
        lifted: Sequence[torch.Tensor],
        argnum: int,
        in_shape: tuple[int, ...],
    ) -> None:
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        ph = [n for n in self.nodes if n.op == "placeholder"]
        where = list(range(len(ph))) if inputs is None else list(inputs)
        self.source = dict(zip(ph, where, strict=True))  # placeholder -> index in args+lifted
        self.n_args = n_args
        self.lifted = tuple(lifted)
        self.argnum = argnum
        self.in_shape = in_shape
        self.n = math.prod(in_shape)
        self.env: dict[torch.fx.Node, Any] = {}
        self.values: dict[torch.fx.Node, Any] = {}
        self.from_lifted: set[torch.fx.Node] = set()  # known values computed from lifted ones
        self.read_lifted = False

    # -- what rules read ---------------------------------------------------------------------

    def deps(self, a: object) -> Deps | None:
        """The sets of a node argument (``None``: a number, or depends on nothing)."""
        if not isinstance(a, torch.fx.Node):
            return None
        d = self.env.get(a)
        return d if isinstance(d, Deps) else None

    def known(self, a: object) -> Any:
        """:meth:`value`, for a rule whose result depends on it: a pattern that read a value
        computed from a lifted tensor (which may change without a re-capture) is not cached."""
        v = self.value(a)
        if v is not None and a in self.from_lifted:
            self.read_lifted = True
        return v

    def value(self, a: object) -> Any:
        """The value of a node whose inputs are all known (graph constants, lifted tensors,
        factories), or ``None``: the arguments' values are never known (they vary). Use
        :meth:`known` when the result depends on the value."""
        if not isinstance(a, torch.fx.Node):
            return a
        if a not in self.values:
            todo, stack, seen = [], [a], set()
            while stack:
                n = stack.pop()
                if n in self.values or n in seen:
                    continue
                seen.add(n)
                todo.append(n)
                stack.extend(n.all_input_nodes)
            for n in sorted(todo, key=self.pos.__getitem__):
                self.values[n] = self._evaluate(n)
                if any(i in self.from_lifted for i in n.all_input_nodes):
                    self.from_lifted.add(n)
        return self.values[a]

    def _evaluate(self, n: torch.fx.Node) -> Any:
        if n.op == "placeholder":
            k = self.source[n] - self.n_args
            if k < 0:
                return None
            self.from_lifted.add(n)
            return self.lifted[k]
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            return obj
        if n.op != "call_function" or _ops.is_random(n.target):
            return None
        if any(self.values.get(a) is None for a in n.all_input_nodes):
            return None
        try:
            with torch.no_grad():
                return n.target(  # type: ignore[operator]
                    *torch.fx.node.map_arg(n.args, self.values.__getitem__),
                    **torch.fx.node.map_arg(n.kwargs, self.values.__getitem__),
                )
        except Exception:  # not evaluable here: unknown, the rules stay conservative
            return None

    # -- the walk ------------------------------------------------------------------------------

    def run(self) -> SparsityPattern:
        random = sorted(
            {
                _op_name(n.target)
                for n in self.nodes
                if n.op == "call_function" and _ops.is_random(n.target)
            }
        )
        if random:
            _refuse_random(random)
        for n in self.nodes:
            val = n.meta.get("val")
            for v in val if isinstance(val, (tuple, list)) else (val,):
                if isinstance(v, torch.Tensor) and not all(isinstance(s, int) for s in v.shape):
                    raise NoPatternError(
                        f"sparsity: expected static shapes, got {n.name} ({_op_name(n.target)}) "
                        f"with a shape that depends on the values. Compute the Jacobian densely."
                    )
        result = None
        for n in self.nodes:
            if n.op == "placeholder":
                if self.source[n] == self.argnum:
                    self.env[n] = Deps.identity(self.n)
            elif n.op == "call_function":
                self.env[n] = self._step(n)
            elif n.op == "output":
                result = n.args[0]
        if isinstance(result, (tuple, list)):
            if len(result) != 1:
                raise NoPatternError(
                    f"sparsity: expected func to return one tensor, got {len(result)} outputs. "
                    f"Detect each output's pattern with a function returning it."
                )
            result = result[0]
        if not isinstance(result, torch.fx.Node) or not isinstance(
            result.meta.get("val"), torch.Tensor
        ):
            raise NoPatternError("sparsity: expected func to return a tensor.")
        out_shape = _ops.shape(result)
        d = self.deps(result)
        if d is None:
            empty = torch.zeros(0, dtype=torch.int64)
            return SparsityPattern.from_coo(empty, empty, out_shape, self.in_shape)
        assert d.rows == math.prod(out_shape)
        return SparsityPattern(out_shape, self.in_shape, d.crow, d.col)

    def _step(self, n: torch.fx.Node) -> Any:
        if n.target is operator.getitem:
            src = self.env.get(n.args[0])  # type: ignore[arg-type]
            return src[n.args[1]] if isinstance(src, (list, tuple)) else None  # type: ignore[index]
        if all(self.deps(a) is None for a in n.all_input_nodes):
            return None  # depends on nothing (constants, other arguments)
        out = _ops.propagate(self, n)
        return _ops.mask_nondifferentiable(n, out)


def _op_name(op: Any) -> str:
    return str(op) if hasattr(op, "overloadpacket") else getattr(op, "__name__", repr(op))


# ---------------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------------


def sparsity(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    batched: bool = False,
) -> Any:
    """The structural sparsity pattern of the per-sample Jacobian of ``func`` w.r.t. ``args[argnums]``.

    Nothing is differentiated and no argument value is read: ``func`` is traced once for one
    sample and the pattern is the set of entries that can be nonzero for *some* input (see
    NOTE [Exact and conservative op classes] in :mod:`jacbatch.sparse.detect`). It is the same
    for every sample of the batch.

    Args:
        func: per-sample function of tensors returning one tensor of shape ``out_shape``.
        *args: its arguments, as for :func:`jacbatch.jacobian` (a batched argument has a batch
            dimension of size ``B`` at its in_dim).
        argnums: the argument(s) to differentiate; a tuple returns a tuple of patterns.
        in_dims: as for :func:`jacbatch.jacobian` (``None``: shared by the whole batch).
        batched: ``func`` takes the whole batch (``jacobian(..., batched=True)``).

    Returns:
        A :class:`~jacbatch.sparse.SparsityPattern` of shape ``(out_numel, in_numel)`` (its
        ``out_shape`` and ``in_shape`` per sample), or a tuple of them for tuple ``argnums``.

    Raises:
        NoPatternError: (a ``NotImplementedError``) ``func`` draws random numbers, has
            value-dependent shapes or control flow, or cannot be traced.

    Example:
        >>> p = jacbatch.sparsity(lambda x: x[1:] * x[:-1], torch.ones(8, 4))  # B = 8, n = 4
        >>> p
        SparsityPattern(out_shape=(3,), in_shape=(4,), nnz=6, density=0.5)
        >>> p.to_mask().int()
        tensor([[1, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    where = "sparsity"
    call = V.normalize_call(where, func, args, argnums, in_dims)
    V.check_bool(where, "batched", batched)
    got = tuple(detect(call.func, call.args, a, call.in_dims, batched) for a in call.argnums)
    return got if call.tuple_argnums else got[0]


__all__ = ["NoPatternError", "detect", "sparsity"]
