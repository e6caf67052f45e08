"""The public entry points: :func:`jacobian`, :func:`explain`, :func:`estimate_memory` and
:func:`structured_jacobian`.

Each builds one request (:func:`jacbatch.request.build_request`: the validated call, its plan,
vec, buffers and budget) and runs or inspects it; planning lives in :mod:`jacbatch.plan`,
running in :mod:`jacbatch.executor`, the routes in :mod:`jacbatch.methods`, and
:func:`check` in :mod:`jacbatch.check`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import torch

from . import _validation as V
from . import memory, pytree, repeated
from .check import CheckReport, check
from .executor import execute
from .methods import names as _route_names
from .plan import (
    LARGE_JACOBIAN,
    Plan,
    Step,
    choose_autodiff,
    plan_auto,
    probe_call,
    probe_output,
)
from .request import build_request, estimate
from .sparse import SparsityPattern
from .sparse.engine import SparsePlan
from .structured import JacobianOperator

#: The routes a caller may name (besides ``"auto"``), from the registry.
ROUTES: tuple[str, ...] = _route_names()

_probe_output = probe_output  # the name structured_jacobian uses


@overload
def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    out: torch.Tensor | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    create_graph: bool = False,
    batched: bool = False,
    has_aux: bool = False,
    sparse: bool | SparsityPattern | tuple[SparsityPattern, ...] = False,
) -> torch.Tensor: ...


@overload
def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: tuple[int, ...],
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    create_graph: bool = False,
    batched: bool = False,
    has_aux: bool = False,
    sparse: bool | SparsityPattern | tuple[SparsityPattern, ...] = False,
) -> tuple[torch.Tensor, ...]: ...


def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    out: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    create_graph: bool = False,
    batched: bool = False,
    has_aux: bool = False,
    sparse: bool | SparsityPattern | tuple[SparsityPattern, ...] = False,
) -> Any:
    """Full Jacobian of ``func`` w.r.t. ``args[argnums]``, for one input or a batch of inputs.

    ``func`` is written for ONE sample; ``in_dims`` says which arguments carry a batch dimension,
    exactly as in ``torch.func.vmap``.

    Args:
        func: per-sample function of tensors returning one floating-point tensor of shape
            ``out_shape``, or a pytree of them (tuple, list, dict; see Returns).
        *args: its arguments: tensors, or pytrees of tensors (a parameter dict for
            ``torch.func.functional_call``). A batched argument (leaf) has its per-sample shape
            plus a batch dimension of size ``B`` at its in_dim.
        argnums: the argument(s) to differentiate; a tuple returns a tuple of Jacobians.
        in_dims: int (every argument), or a tuple with one entry per argument: an int/``None``,
            or for a pytree argument a matching tree of them (a prefix, as in
            ``torch.func.vmap``). ``None`` marks an argument shared by the whole batch; all
            ``None`` means no batch.
        method: ``"auto"`` (a registered closed form, else a closed form composed from op
            rules when ``func`` traces into ops that all have one, else the autodiff route
            expected to be fastest for the shapes), ``"closed_form"`` (registered or traced; raises
            ``NotImplementedError`` otherwise), ``"jacrev"``, ``"jacfwd"`` or ``"vjp"``.
        vec: ``None`` keeps the layout ``(B, *out_shape, *in_shape)``; ``"row"`` / ``"col"``
            flatten to ``(B, out_numel, in_numel)`` in row-major (PyTorch) or column-major order.
        chunk_size: at most this many Jacobian rows (jacrev) or columns (jacfwd) per vectorized
            pass. The closed form writes the result directly and the vjp route already computes
            one row per backward pass, so neither is affected by it.
        out: a contiguous tensor of the result's shape, dtype and device to write into (a tuple
            of them for tuple ``argnums``, a tree of them for a pytree argument, as the result
            nests; refused for a pytree output); a tensor over a numpy memmap streams to disk.
        max_memory: working-memory budget beyond the result, in bytes or as a string such as
            ``"512MiB"``. The route is chunked over the batch (and over rows or columns for
            jacrev/jacfwd) to stay within it. Default: half of the memory free now. A result that
            cannot fit in free memory at all is refused before anything is allocated.
        progress: show a progress bar for chunked runs that take over 2 seconds; ``None`` shows
            it only when stderr is a terminal.
        randomness: for a ``func`` that draws random numbers (dropout, ``rand_like``), as in
            ``torch.func.vmap``: ``"error"`` (default) refuses it before any work,
            ``"different"`` gives each sample its own draw, ``"same"`` one draw for every
            sample. Either way each sample's Jacobian is that of ONE realization (every row
            and column sees the same draw), by every route; the traced closed form is not used.

    ``func`` may write into tensors it closes over (a train-mode BatchNorm's running
    statistics): each evaluation sees them as the caller left them, and they are restored when
    the call returns. A ``func`` that writes into its arguments gets copies of them (the
    Jacobian is then with respect to the argument's value on entry). See NOTE [Writes into
    tensors that existed before the call] in :mod:`jacbatch._state`.
        create_graph: make the result differentiable (as in
            ``torch.autograd.functional.jacobian``), even under ``torch.no_grad()`` or when no
            argument requires grad. Not needed when autograd or torch.func already asks: the
            result is differentiable whenever grad mode is on and an argument (or a tensor
            ``func`` closes over, such as a module's parameters) requires grad, and whenever
            ``jacobian`` runs inside a torch.func transform (``grad``, ``vjp``, ``jacrev``,
            ``jacfwd``, ``vmap``), so ``jacobian(lambda x: jacobian(f, x), X)`` is the Hessian.
            Under ``torch.inference_mode()`` nothing is differentiable.
        batched: ``func`` already maps a batch to a batch of independent samples (an
            ``nn.Module``, a forward-kinematics chain): ``func(*args)`` takes the arguments as
            given (batch along ``in_dims``) and returns ``(B, *out_shape)``. The result is the
            same as for the per-sample function; it is computed from whole-batch evaluations
            (one backward pass per output element for the whole batch, or one ``jvp`` per input
            element), without ``vmap`` over the samples. Independence is the caller's
            declaration: a ``func`` that mixes samples (a train-mode BatchNorm) gives wrong
            rows. See NOTE [Batched functions: one call, two views] in
            :mod:`jacbatch.methods.batched`.
        has_aux: ``func`` returns ``(output, aux)``; the result is ``(jacobian, aux)`` with
            ``aux`` batched like the output (one more batched evaluation of ``func``), as
            ``vmap(torch.func.jacrev(func, has_aux=True))``.
        sparse: ``False`` (dense); ``True`` (detect the per-sample Jacobian's structural
            sparsity pattern from ``func``'s traced graph); or a
            :class:`~jacbatch.sparse.SparsityPattern` (a tuple of them for tuple ``argnums``),
            checked by one random product on the first sample (a pattern that misses a
            dependence raises ``ValueError``). The Jacobian is then computed by one JVP per
            column color (``method="jacfwd"``) or one VJP per row color (``"jacrev"``;
            ``"auto"``: fewer colors) and returned as a sparse CSR tensor ``(B, out_numel,
            in_numel)`` (no ``B`` without a batch) in ``vec`` order (row-major unless
            ``vec="col"``), index tensors shared by the batch; ``out=`` is then the ``(B,
            nnz)`` values buffer. See ``docs/sparse.md`` and :mod:`jacbatch.sparse.engine`.

    Returns:
        ``(B, *out_shape, *in_shape)`` (no ``B`` without a batch), or ``(B, out_numel,
        in_numel)`` with ``vec``; a scalar output gives gradients ``(B, *in_shape)``. A tuple of
        those for tuple ``argnums``. Pytrees nest as ``torch.func.jacrev``: the output's tree,
        each output leaf holding the differentiated argument's tree of Jacobians (a tuple of
        those for tuple ``argnums``); see NOTE [Pytree calls] in :mod:`jacbatch.pytree`. The
        result carries an autograd graph only when it must be differentiable (see
        ``create_graph``); otherwise none is built. An ``out=`` buffer is filled with
        ``copy_``, so it carries the graph in that case; inside a torch.func transform ``out=``
        is refused (a plain buffer cannot hold a transformed value).

    Example:
        >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> W, B = torch.zeros(3, 2), torch.zeros(2)
        >>> jacobian(jacbatch.affine, A, W, B, argnums=1, in_dims=None, vec="row")
        tensor([[1., 0., 2., 0., 3., 0.],
                [0., 1., 0., 2., 0., 3.],
                [4., 0., 5., 0., 6., 0.],
                [0., 4., 0., 5., 0., 6.]])
    """

    if sparse is not False:  # NOTE [Sparse Jacobians: what a call does]
        from .sparse.engine import jacobian as sparse_jacobian

        return sparse_jacobian(
            func, args, out, argnums=argnums, in_dims=in_dims, sparse=sparse, method=method,
            vec=vec, chunk_size=chunk_size, max_memory=max_memory, progress=progress,
            randomness=randomness, create_graph=create_graph, batched=batched, has_aux=has_aux,
        )  # fmt: skip

    def tree() -> torch.Tensor | tuple[torch.Tensor, ...]:  # NOTE [Pytree calls]
        opts = _tree_options(
            method, vec, chunk_size, max_memory, progress, randomness, create_graph, batched
        )
        return pytree.jacobian(func, args, argnums, in_dims, has_aux, out, opts)

    if pytree.is_tree_call(args, in_dims, has_aux):
        return tree()
    options = (argnums, in_dims, method, vec, chunk_size, max_memory, randomness, progress, batched)
    plain = out is None and create_graph is False
    if plain:  # NOTE [Repeated plain calls]
        result = repeated.run(func, args, options)
        if result is not None:
            return result
    try:
        req = build_request(
            "jacobian", func, args, argnums, in_dims, method=method, vec=vec,
            chunk_size=chunk_size, randomness=randomness, create_graph=create_graph, out=out,
            max_memory=max_memory, progress=progress, batched=batched,
        )  # fmt: skip
    except V.TreeOutput:  # a tuple, list or dict output: the pytree path
        return tree()
    result = execute(req)
    if plain:
        repeated.record(func, args, options, req, result)
    return result


def _tree_options(*values: object) -> dict[str, Any]:
    """The options :func:`jacobian` passes on to :func:`jacbatch.pytree.jacobian`, by name."""
    names = ("method", "vec", "chunk_size", "max_memory", "progress", "randomness")
    return dict(zip((*names, "create_graph", "batched"), values, strict=True))


@overload
def explain(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    randomness: str = "error",
    batched: bool = False,
    has_aux: bool = False,
    sparse: Literal[False] = False,
) -> Plan: ...


@overload
def explain(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    randomness: str = "error",
    batched: bool = False,
    has_aux: bool = False,
    sparse: Literal[True] | SparsityPattern | tuple[SparsityPattern, ...],
) -> SparsePlan: ...


def explain(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    randomness: str = "error",
    batched: bool = False,
    has_aux: bool = False,
    sparse: bool | SparsityPattern | tuple[SparsityPattern, ...] = False,
) -> Plan | SparsePlan:
    """Say which route :func:`jacobian` would run for this call, and why, without running it.

    Args:
        func, args, argnums, in_dims, method, randomness, batched, has_aux: as in
            :func:`jacobian` (a random ``func`` under ``randomness="error"`` raises as
            :func:`jacobian` would). A pytree call is explained as the flat call it runs
            (NOTE [Pytree calls] in :mod:`jacbatch.pytree`): one input per tensor leaf, and
            the output leaves concatenated into one vector unless ``func`` returns one tensor.
        sparse: as in :func:`jacobian`; a sparse call is explained by a
            :class:`~jacbatch.sparse.engine.SparsePlan`: per argnum the pattern (nnz, density),
            the colors of both modes and the mode chosen.

    Returns:
        A :class:`Plan` (a ``SparsePlan`` with ``sparse=``); ``str(plan)`` is a readable
        summary.

    Example:
        >>> A, W, B = torch.ones(2, 3), torch.ones(3, 2), torch.ones(2)
        >>> print(explain(jacbatch.affine, A, W, B, argnums=1, in_dims=None))
        jacobian plan (no batch, out (2, 2), in [(3, 2)]):
          argnums (1,): closed_form — registered closed-form rule, no autodiff

        Plain torch code is traced; the notes say which op rule each node matched:

        >>> print(explain(lambda x: torch.special.erfcx(x).tanh(), torch.ones(4, 3)))
        jacobian plan (B=4, out (3,), in [(3,)]):
          argnums (0,): jacrev — no closed form (special_erfcx (aten.special_erfcx.default) has no rule); reverse mode: 3 output elements <= 3 input elements
          note: argnum 0: special_erfcx = aten.special_erfcx.default: no closed-form rule for this op
          note: argnum 0: tanh = aten.tanh.default -> rule elementwise_tanh
    """
    if sparse is not False:  # NOTE [Sparse Jacobians: what a call does]
        from .sparse.engine import explain as sparse_explain

        return sparse_explain(
            func, args, argnums=argnums, in_dims=in_dims, sparse=sparse, method=method,
            vec=None, max_memory=None, progress=None, randomness=randomness,
            create_graph=False, batched=batched, has_aux=has_aux,
        )  # fmt: skip
    call = (func, args, argnums, in_dims)
    if pytree.is_tree_call(args, in_dims, has_aux):  # NOTE [Pytree calls]
        call = pytree.flat_call("explain", *call, has_aux=has_aux, batched=batched)
    options: dict[str, Any] = {
        "method": method, "randomness": randomness, "batched": batched, "fit": None,
    }  # fmt: skip
    try:
        req = build_request("explain", *call, **options)
    except V.TreeOutput:  # a tuple, list or dict output: the flat call
        call = pytree.flat_call("explain", *call, has_aux=has_aux, batched=batched)
        req = build_request("explain", *call, **options)
    return req.plan


def estimate_memory(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
    batched: bool = False,
    has_aux: bool = False,
    sparse: bool | SparsityPattern | tuple[SparsityPattern, ...] = False,
) -> memory.MemoryEstimate:
    """Preflight: the result's bytes and the route's peak working bytes, from shapes alone.

    The route is run on ``meta`` tensors of the arguments' shapes under an allocation tracker
    (no data, no compute, no memory). Only a function that cannot run on meta tensors at all is
    evaluated once on the first sample, to learn its output shape.

    Args:
        func, args, argnums, in_dims, method, vec, chunk_size, randomness, batched, has_aux:
            as in :func:`jacobian` (pytrees too).
        sparse: as in :func:`jacobian`: the estimate of the sparse call (the values ``(B,
            nnz)`` and the shared CSR index tensors as output, the compressed passes of every
            color and sample at once as working memory; see
            :func:`jacbatch.sparse.sizing.estimate_memory`).

    Returns:
        A :class:`~jacbatch.memory.MemoryEstimate` (``output_bytes``, ``peak_bytes``,
        ``working_bytes``).

    Example:
        >>> A, W, B = torch.randn(8, 64, 64), torch.randn(64, 64), torch.randn(64)
        >>> est = estimate_memory(jacbatch.affine, A, W, B, argnums=1, in_dims=(0, None, None))
        >>> est.output_bytes // 2**20, est.working_bytes < est.output_bytes // 100
        (512, True)
    """
    if sparse is not False:  # NOTE [Sparse Jacobians: what a call does]
        from .sparse.sizing import estimate_memory as sparse_estimate

        return sparse_estimate(
            func, args, argnums=argnums, in_dims=in_dims, sparse=sparse, method=method,
            vec=vec, chunk_size=chunk_size, progress=False, randomness=randomness,
            create_graph=False, batched=batched, has_aux=has_aux,
        )  # fmt: skip
    where, call = "estimate_memory", (func, args, argnums, in_dims)
    if pytree.is_tree_call(args, in_dims, has_aux):  # NOTE [Pytree calls]
        call = pytree.flat_call(where, *call, has_aux=has_aux, vec=vec, batched=batched)
    options: dict[str, Any] = {
        "method": method, "vec": vec, "chunk_size": chunk_size, "randomness": randomness,
        "batched": batched, "fit": None,
    }  # fmt: skip
    try:
        req = build_request(where, *call, **options)
    except V.TreeOutput:  # a tuple, list or dict output: the flat call
        call = pytree.flat_call(where, *call, has_aux=has_aux, vec=vec, batched=batched)
        req = build_request(where, *call, **options)
    return estimate(req)


def structured_jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
) -> JacobianOperator | tuple[JacobianOperator, ...]:
    """The Jacobian of ``func`` as a lazy operator that keeps its Kronecker / diagonal structure.

    Same call as :func:`jacobian` (``func`` per sample, ``in_dims`` as in ``torch.func.vmap``).
    Plain torch code is traced and its Jacobian kept as the op rules' lettered terms
    (:class:`~jacbatch.structured.TermJacobian`): ``tanh(A @ W + B)`` w.r.t. ``W`` holds the
    ``(B, m, q)`` derivative of ``tanh`` and ``A``; :func:`jacbatch.affine` gives named
    Kronecker operators (``dZ/dW`` holds ``A`` only). Nothing of size ``out_numel · in_numel``
    is built; a graph that does not trace into rules is held densely (``DenseJacobian``).
    ``to_dense()`` gives ``jacobian(..., method="closed_form")``; ``jvp``, ``vjp``, ``T`` and
    ``@`` (the chain rule) work on the structure (see :mod:`jacbatch.structured`).

    Args:
        func: per-sample function of tensors, as for :func:`jacobian`.
        *args: its arguments, batched along ``in_dims`` as in :func:`jacobian`.
        argnums: the argument(s) to differentiate; a tuple returns a tuple of operators.
        in_dims: as in :func:`jacobian`; shared arguments give factors shared by the batch.

    Returns:
        A :class:`~jacbatch.structured.JacobianOperator` with ``shape`` ``(B, *out_shape,
        *in_shape)`` (no ``B`` without a batch), or a tuple of them for tuple ``argnums``. It
        references the arguments' data (no copy, no autograd graph).

    Example:
        >>> from jacbatch import affine
        >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> W, B = torch.zeros(3, 2), torch.zeros(2)
        >>> J = structured_jacobian(affine, A, W, B, argnums=1, in_dims=None)
        >>> J
        KroneckerJacobian(A: (2, 3) ⊗ I_2, dense (2, 2, 3, 2), 24 B vs 96 B)
        >>> J.vjp(torch.ones(2, 2))  # d sum(Z) / dW
        tensor([[5., 5.],
                [7., 7.],
                [9., 9.]])
    """
    from .structured.traced import structured_jacobian as build

    return build(func, args, argnums, in_dims)


__all__ = [
    "LARGE_JACOBIAN",
    "ROUTES",
    "CheckReport",
    "Plan",
    "Step",
    "check",
    "choose_autodiff",
    "estimate_memory",
    "explain",
    "jacobian",
    "plan_auto",
    "probe_call",
    "structured_jacobian",
]
