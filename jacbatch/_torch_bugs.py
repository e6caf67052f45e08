"""Known bugs of torch 2.13 that would give wrong Jacobians, and the route jacbatch uses instead.

NOTE [Known torch bugs: one list, consulted by the planner]
    Some torch transforms return wrong derivatives for some ops, without an error. jacbatch must
    not pass them on, so every such bug it knows of is listed here, once: the aten ops it
    concerns (names as the probe records them, :attr:`jacbatch._probe.ProbeResult.ops`), the
    routes it makes wrong, and why. :func:`jacbatch.plan.make_plan` looks up the probed ops of every
    call (``method="auto"`` and explicitly requested routes alike); a step whose route a bug
    affects runs :func:`replacement` instead, and the plan carries a note starting with
    :data:`NOTE_PREFIX` that names the bug (``jacbatch.explain`` shows it). Each bug has a test
    in ``tests/test_torch_bugs.py`` showing that the replacement gives per-sample reverse-mode
    autograd's answer.

    The replacement is ``jacrev`` (``vmap(jacrev(f))``: the derivative formulas run at the
    per-sample level, above the batch ``vmap``) when the bug leaves it right, else
    ``per_sample``: the vjp route with the forward run sample by sample (no ``vmap`` at all)
    and one backward pass per output element for the whole batch. That is exactly per-sample
    reverse-mode autograd, the reference (NOTE [Non-finite values: one policy] in
    :mod:`jacbatch._nonfinite`), at the cost of ``B`` Python-level forward calls.

    The three routes differ in where the batch ``vmap`` sits. The vjp route differentiates
    *through* ``vmap(f)``: a batching rule that rewrites an op (``max()`` of a sample becomes a
    ``max`` over a dimension of the batch) changes which derivative formula autograd records.
    The forward route pushes tangents through ``vmap(f)`` likewise. ``vmap(jacrev(f))`` records
    the per-sample op's own formula.

Bugs:

* ``none_grad_chunked_lce``: ``nn.functional.linear_cross_entropy`` with ``options`` (the
  chunked path) precomputes its gradient inside forward. Under ``vmap`` the batched output has
  a ``grad_fn`` but no path back to the input, so ``autograd.grad(..., allow_unused=True)``
  returns ``None`` and the vjp route would write zeros; forward AD is unsupported and silently
  gives zero tangents; ``jacrev`` raises (an ``autograd.Function`` without ``setup_context``).
  Instead: ``per_sample`` (plain ``backward`` through the per-sample op is right).
* ``select_scatter_batched_src``: ``select_scatter(base, src, dim, k)`` with a batched ``src``:
  ``vmap`` forward then ``backward`` returns the gradient of ``src`` scaled (5x for a base of 5
  rows), so the vjp route is wrong. Instead: ``jacrev``.
* ``max_min_ties``: ``max()``/``min()``/``median()``/``nanmedian()`` of a whole tensor with
  ties: autograd splits the derivative evenly over the tied elements, but under ``vmap`` the op becomes a reduction over
  a dimension with an index, and the vjp and forward routes put all of it on one element.
  Instead: ``jacrev``.
* ``symmetric_input_forward_mode``: ``cholesky``, ``cholesky_inverse`` and ``eigh`` (and
  ``eigvalsh``) read one triangle of a matrix assumed symmetric. Their reverse-mode formulas
  return the symmetrized gradient; forward mode pushes each one-hot (non-symmetric) tangent as
  it is, so the forward Jacobian differs from reverse mode's off the diagonal. Instead:
  ``jacrev``.
* ``scatter_reduce_forward_mode``: the forward-mode formula of ``scatter_reduce`` with
  ``reduce="prod"`` disagrees with its reverse-mode formula on torch's own samples (the probe
  sees the op, not its ``reduce``, so every ``scatter_reduce`` avoids forward mode). Instead:
  ``jacrev`` (``vjp`` where vmap rejects it).
* ``logcumsumexp_forward_mode``: the forward-mode formula of ``logcumsumexp`` is inaccurate
  when the inputs spread widely: at ``x = (-30, 5, 8.7, -3.7, 9)`` (float64) ``jacfwd`` and
  ``jacrev`` differ by 0.9999, at torch's own samples by up to 1e-2. Instead: ``jacrev``.
* ``cdist_backward_vmap``: the backward of ``cdist`` under ``vmap`` over cotangents (what
  ``jacrev`` runs, ``torch.func.jacrev`` alone included) is wrong for every ``p > 0`` (``p =
  1, 2, 3, inf``, any feature size): for ``f(x) = cdist(x[:, None], y[:, None]).sum(1)`` the
  Jacobian is diagonal, ``jacrev`` repeats the first row's gradient in every row. torch's own
  OpInfo samples of ``cdist`` start with ``p = 0`` (a zero derivative), so they do not show
  it. One backward per output element (the vjp route) is right; forward AD of ``cdist`` is
  not implemented. Instead: ``per_sample`` for ``jacrev``.
* ``lu_forward_nested_vmap``: ``vmap(jacfwd(f))`` (the tangent ``vmap`` inside the batch
  ``vmap``) is wrong for LU-based ops (``det``, ``logdet``, ``solve``). The forward route
  already puts the tangent ``vmap`` outside (NOTE [Forward mode: vmap over tangents outside the
  batch] in :mod:`jacbatch.methods.functorch`), so no route is affected; listed so that the
  nesting is never reintroduced without its test.
* ``lu_backward_nested_vmap_no_grad``: ``vmap(jacrev(f))`` (a ``vmap`` over cotangents inside
  the batch ``vmap``) run under ``torch.no_grad()`` or ``torch.inference_mode()`` is wrong for
  every sample but the first for LU-based ops (``det``, ``slogdet``/``logdet``, ``solve``): at
  ``solve(A, b)`` with a well-conditioned ``A`` (5 x 5, float64) the error is 2.5e4, for
  ``det`` 1e9. The same call with grad mode on is right, as are one cotangent at a time and
  ``jacrev`` without the batch ``vmap``. Every place that runs a reverse-mode transform under
  the batch ``vmap`` (the ``jacrev`` route, the Hessians' autodiff, the sparse row passes) does
  so inside :func:`reverse_mode`, which turns grad mode on for the transform only; the caller's
  grad mode decides, as before, whether the result carries a graph. No op list: it applies to
  every call, whatever the ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

#: Every plan note about a known torch bug starts with this.
NOTE_PREFIX = "known torch bug"

#: Routes a replacement may be (in order of preference).
_REPLACEMENTS = ("jacrev", "per_sample")


@dataclass(frozen=True)
class KnownBug:
    """One torch bug that gives wrong Jacobians.

    Attributes:
        name: short identifier, used in plan notes and tests.
        ops: aten op names (``str(op)``, e.g. ``"aten.max.default"``) that trigger it.
        routes: the jacbatch routes it makes wrong (``"jacrev"``, ``"jacfwd"``, ``"vjp"``).
        what: one line: what goes wrong.
    """

    name: str
    ops: frozenset[str]
    routes: frozenset[str]
    what: str


KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        "none_grad_chunked_lce",
        frozenset(
            {
                "torch_nn._linear_cross_entropy_batch_chunked.default",
                "torch_nn._linear_cross_entropy_batch_chunked_no_reduction.default",
            }
        ),
        frozenset({"jacrev", "jacfwd", "vjp"}),
        "chunked linear_cross_entropy: no autograd path to the input under vmap (None "
        "gradients), zero tangents in forward mode",
    ),
    KnownBug(
        "select_scatter_batched_src",
        frozenset({"aten.select_scatter.default"}),
        frozenset({"vjp"}),
        "select_scatter under vmap then backward scales the gradient of src",
    ),
    KnownBug(
        "max_min_ties",
        frozenset(
            {
                "aten.max.default",
                "aten.min.default",
                "aten.median.default",
                "aten.nanmedian.default",
            }
        ),
        frozenset({"vjp", "jacfwd"}),
        "max()/min()/median() under vmap put the derivative of ties on one element (autograd "
        "splits it)",
    ),
    KnownBug(
        "symmetric_input_forward_mode",
        frozenset(
            {
                "aten.linalg_cholesky_ex.default",
                "aten.cholesky.default",
                "aten.cholesky_inverse.default",
                "aten._linalg_eigh.default",
            }
        ),
        frozenset({"jacfwd"}),
        "cholesky/eigh read one triangle: reverse mode returns the symmetrized gradient, "
        "forward mode takes the one-hot tangent as it is",
    ),
    KnownBug(
        "scatter_reduce_forward_mode",
        frozenset({"aten.scatter_reduce.two"}),
        frozenset({"jacfwd"}),
        "forward AD of scatter_reduce (prod) disagrees with its reverse-mode formula",
    ),
    KnownBug(
        "logcumsumexp_forward_mode",
        frozenset({"aten.logcumsumexp.default"}),
        frozenset({"jacfwd"}),
        "forward AD of logcumsumexp loses all accuracy when the inputs spread widely",
    ),
    KnownBug(
        "cdist_backward_vmap",
        frozenset({"aten._cdist_forward.default"}),
        frozenset({"jacrev"}),
        "the backward of cdist (p > 0) under vmap over cotangents is wrong",
    ),
    KnownBug(
        "lu_forward_nested_vmap",
        frozenset(),  # no route nests the tangent vmap inside the batch vmap
        frozenset(),
        "vmap(jacfwd(f)) is wrong for det/logdet/solve; the forward route avoids the nesting",
    ),
    KnownBug(
        "lu_backward_nested_vmap_no_grad",
        frozenset(),  # every reverse-mode transform under the batch vmap runs in reverse_mode()
        frozenset(),
        "vmap(jacrev(f)) under no_grad/inference_mode is wrong for det/slogdet/solve",
    ),
)


@contextlib.contextmanager
def reverse_mode() -> Iterator[None]:
    """Grad mode on while a reverse-mode transform runs under the batch ``vmap`` (the
    ``lu_backward_nested_vmap_no_grad`` bug). Where the caller had grad mode off, the
    results must be detached by the caller of the transform (the routes detach results that
    need no graph anyway)."""
    with torch.enable_grad():
        yield


def affecting(ops: Iterable[str], route: str) -> tuple[KnownBug, ...]:
    """The known bugs that make ``route`` wrong for a function running ``ops``."""
    ran = set(ops)
    return tuple(b for b in KNOWN_BUGS if route in b.routes and b.ops & ran)


def replacement(ops: Iterable[str], route: str) -> tuple[str, tuple[KnownBug, ...]]:
    """The route to run instead of ``route`` for a function running ``ops``, and the bugs why.

    ``route`` itself (and no bugs) when no known bug affects it.

    Example:
        >>> replacement({"aten.max.default"}, "vjp")[0]
        'jacrev'
        >>> replacement({"aten.mm.default"}, "vjp")
        ('vjp', ())
    """
    ops = frozenset(ops)
    bugs = affecting(ops, route)
    if not bugs:
        return route, ()
    for r in _REPLACEMENTS:
        if not affecting(ops, r):
            return r, bugs
    return "per_sample", bugs  # pragma: no cover  (per_sample is never listed as affected)


def note(bugs: Iterable[KnownBug], route: str, instead: str) -> str:
    """The plan note for running ``instead`` of ``route`` because of ``bugs``."""
    names = ", ".join(f"{b.name} ({b.what})" for b in bugs)
    return f"{NOTE_PREFIX} for {route}: {names}; using {instead}"


__all__ = [
    "KNOWN_BUGS",
    "NOTE_PREFIX",
    "KnownBug",
    "affecting",
    "note",
    "replacement",
    "reverse_mode",
]
