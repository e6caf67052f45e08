"""Exact derivative-based sensitivity analysis on top of :func:`jacbatch.jacobian`.

Local sensitivities (the Jacobian and its elasticity form at a batch of points) and
derivative-based global sensitivity measures (DGSM) over a sample, with standard errors and, for
independent uniform or normal inputs, upper bounds on the Sobol total indices. Derivatives are
exact (autodiff or closed forms), not finite differences; the sample goes through
:func:`jacbatch.jacobian` in batches of ``batch_size`` samples, and any further option of
:func:`jacbatch.jacobian` (e.g. ``chunk_size``) is passed through.

NOTE [DGSM and the bound on Sobol total indices]
    For ``f: R^d -> R`` and independent inputs ``X_j``, the DGSM of input ``j`` is
    ``ν_j = E[(∂f/∂x_j)²]``, estimated by the sample mean over ``N`` points with standard error
    ``std((∂f/∂x_j)²) / sqrt(N)``; ``E[|∂f/∂x_j|]`` likewise (Sobol' & Kucherenko 2009).
    The Poincaré inequality for the conditional variance gives the total Sobol index
    ``S_T,j <= C_j ν_j / V`` with ``V = Var f(X)`` and ``C_j`` the Poincaré constant of ``X_j``:
    ``(b_j − a_j)² / π²`` for ``U[a_j, b_j]``, ``σ_j²`` for ``N(μ_j, σ_j²)``. Here ``V`` is the
    unbiased sample variance of the outputs on the same sample. Vector outputs are handled per
    output element.

Example (a study in a few lines):
    >>> import math
    >>> def f(x):  # per sample: x (3,) -> scalar
    ...     return torch.sin(x[0]) + 7 * torch.sin(x[1]) ** 2 + 0.1 * x[2] ** 4 * torch.sin(x[0])
    >>> bounds = [[-math.pi, math.pi]] * 3
    >>> X = sample_uniform(bounds, 10_000, seed=0)
    >>> res = dgsm(f, X, bounds=bounds, input_names=["x1", "x2", "x3"])
    >>> res.nu.shape, res.total_index_bound.shape
    (torch.Size([3]), torch.Size([3]))
    >>> bool((res.total_index_bound >= torch.tensor([0.558, 0.442, 0.244], dtype=X.dtype)).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import _sensitivity_checks as C
from . import _state
from . import _validation as V
from ._dgsm import (
    DGSMAccumulator,
    DGSMResult,
    Moments,
    _default_names,
    _output_names,
)
from ._table import format_table
from .api import explain
from .executor import execute
from .methods import vjp as _vjp
from .request import build_request

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DGSMAccumulator",
    "DGSMResult",
    "LocalSensitivity",
    "Moments",
    "dgsm",
    "local_sensitivity",
    "sample_normal",
    "sample_uniform",
]

#: Samples per call to :func:`jacbatch.jacobian` unless ``batch_size`` says otherwise.
DEFAULT_BATCH_SIZE: int = 2**16


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _generator(
    where: str,
    seed: int | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> tuple[torch.Generator | None, torch.device]:
    C.check_seed(where, seed, generator)
    if device is None:
        dev = generator.device if generator is not None else torch.device("cpu")
    else:
        dev = torch.device(device)
    if generator is not None:
        C.check_generator_device(where, generator, dev)
        return generator, dev
    if seed is not None:
        return torch.Generator(device=dev).manual_seed(seed), dev
    return None, dev


def sample_uniform(
    bounds: torch.Tensor | Sequence[Sequence[float]],
    n: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``n`` independent samples of inputs uniform on ``[a_j, b_j]``.

    Args:
        bounds: ``(d, 2)``, one ``[a_j, b_j]`` row per input, ``a_j < b_j``.
        n: number of samples.
        seed: seeds a fresh ``torch.Generator`` on ``device`` (reproducible); ``None`` uses
            ``generator`` or else torch's global generator.
        generator: a ``torch.Generator`` on ``device`` (instead of ``seed``).
        device: where the sample lives; default the generator's device, else CPU.
        dtype: floating dtype of the sample.

    Returns:
        ``X (n, d)``.

    Example:
        >>> X = sample_uniform([[0.0, 1.0], [-2.0, 2.0]], 5, seed=0)
        >>> X.shape, bool((X[:, 1].abs() <= 2).all())
        (torch.Size([5, 2]), True)
    """
    where = "sample_uniform"
    n = C.check_sample_count(where, n)
    gen, dev = _generator(where, seed, generator, device)
    b = C.as_bounds(where, bounds, _rows(bounds), dtype, dev)
    u = torch.rand(n, b.shape[0], generator=gen, device=dev, dtype=dtype)
    return torch.clamp(b[:, 0] + (b[:, 1] - b[:, 0]) * u, b[:, 0], b[:, 1])


def sample_normal(
    mean: torch.Tensor | Sequence[float],
    std: torch.Tensor | Sequence[float],
    n: int,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``n`` independent samples of inputs ``X_j ~ N(mean_j, std_j²)``.

    Args:
        mean: ``(d,)``.
        std: ``(d,)``, positive.
        n, seed, generator, device, dtype: as in :func:`sample_uniform`.

    Returns:
        ``X (n, d)``.

    Example:
        >>> sample_normal([0.0, 10.0], [1.0, 0.5], 4, seed=0).shape
        torch.Size([4, 2])
    """
    where = "sample_normal"
    n = C.check_sample_count(where, n)
    gen, dev = _generator(where, seed, generator, device)
    mu = C.as_vector(where, "mean", mean, None, dtype, dev)
    sigma = C.as_positive_vector(where, "std", std, mu.shape[0], dtype, dev)
    return mu + sigma * torch.randn(n, mu.shape[0], generator=gen, device=dev, dtype=dtype)


def _rows(bounds: object) -> int:
    """Number of rows of a bounds-like object, for the shape check (-1 when it has none)."""
    try:
        return len(bounds)  # type: ignore[arg-type]
    except TypeError:
        return -1


# ---------------------------------------------------------------------------------------------
# Running a sample through jacobian() in batches
# ---------------------------------------------------------------------------------------------


#: The options of :func:`jacbatch.jacobian` a caller may pass through (the others are set here).
_JACOBIAN_OPTIONS = frozenset(
    ("chunk_size", "max_memory", "progress", "randomness", "create_graph")
)


def _batches(
    where: str,
    func: Callable[..., torch.Tensor],
    X: torch.Tensor,
    method: str,
    batch_size: int | None,
    jacobian_kwargs: dict[str, Any],
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(start, x (c, *in_shape), y (c, *out_shape), J (c, o, i))`` per batch, all finite.

    The Jacobian comes first: :func:`jacbatch.jacobian` validates ``func`` and its output.
    """
    N = X.shape[0]
    step = N if batch_size is None else batch_size
    # randomness="same": one draw for the whole sample, so every batch replays the generator.
    same = _state.rng_state(X.device) if jacobian_kwargs.get("randomness") == "same" else None
    for start in range(0, N, step):
        xc = X[start : start + step]
        if same is not None:
            _state.set_rng_state(X.device, same)
        for k in jacobian_kwargs:  # as jacbatch.jacobian(**jacobian_kwargs) would refuse it
            if k not in _JACOBIAN_OPTIONS:
                raise TypeError(f"jacobian() got an unexpected keyword argument {k!r}")
        req = build_request(
            "jacobian", func, (xc,), 0, 0, method=method, vec="row", **jacobian_kwargs
        )
        J = execute(req)
        assert isinstance(J, torch.Tensor)
        # the forward on the request's call: validated once, not probed again
        call = dataclasses.replace(req.call, create_graph=False, probe=None)
        if same is not None:  # the outputs of the same draw
            _state.set_rng_state(X.device, same)
        with torch.no_grad():
            y = _vjp.forward(call, [xc], [True], xc.shape[0])
        C.check_finite_outputs(where, y, start)
        C.check_finite_jacobian(where, J, start)
        yield start, xc, y.detach(), J


def _route(
    func: Callable[..., torch.Tensor], x: torch.Tensor, method: str, randomness: str = "error"
) -> str:
    """The route(s) jacobian took for ``func`` (after any fallback), e.g. ``"jacrev"``."""
    return explain(func, x, method=method, randomness=randomness).routes


# ---------------------------------------------------------------------------------------------
# Local sensitivity
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalSensitivity:
    """Local sensitivities of ``y = func(x)`` at a batch of points (see :func:`local_sensitivity`).

    Attributes:
        points: ``x (B, *in_shape)``.
        outputs: ``y (B, *out_shape)``.
        jacobian: ``∂y_i/∂x_j`` of shape ``(B, *out_shape, *in_shape)``.
        elasticity: ``x_j / y_i · ∂y_i/∂x_j`` of shape ``(B, *out_shape, *in_shape)``; NaN
            where ``y_i == 0`` (the relative change of a zero output is undefined).
        input_names: one name per input element (row-major order).
        output_names: one name per output element (row-major order).
        route: the route :func:`jacbatch.jacobian` took.
    """

    points: torch.Tensor
    outputs: torch.Tensor
    jacobian: torch.Tensor
    elasticity: torch.Tensor
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    route: str

    #: How many points, outputs and inputs ``str`` shows at most.
    _SHOW: ClassVar[tuple[int, int, int]] = (3, 12, 8)

    def __str__(self) -> str:
        B = self.points.shape[0]
        o, i = len(self.output_names), len(self.input_names)
        n_pts, n_out, n_in = self._SHOW
        J = self.jacobian.reshape(B, o, i)
        E = self.elasticity.reshape(B, o, i)
        lines = [f"local sensitivity at {B} point(s) (route: {self.route})"]
        nan = int(torch.isnan(E).sum())
        if nan:
            lines.append(f"  {nan} elasticities are NaN (output y_i == 0)")
        for b in range(min(B, n_pts)):
            lines.append(f"point {b}:")
            header = ["output", *(f"{n}" for n in self.input_names[:n_in])]
            rows = []
            for k in range(min(o, n_out)):
                rows.append(
                    [f"{self.output_names[k]} dy/dx", *(f"{float(v):.4g}" for v in J[b, k, :n_in])]
                )
                rows.append(
                    [f"{self.output_names[k]} elast.", *(f"{float(v):.4g}" for v in E[b, k, :n_in])]
                )
            lines.extend(format_table(header, rows, indent="  "))
            if o > n_out or i > n_in:
                lines.append(f"  ... ({o} outputs x {i} inputs in all)")
        if n_pts < B:
            lines.append(f"... {B - n_pts} more point(s)")
        return "\n".join(lines)


def local_sensitivity(
    func: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    method: str = "auto",
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    zero_output: str = "nan",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **jacobian_kwargs: Any,
) -> LocalSensitivity:
    """Jacobian and elasticities ``x_j / y_i · ∂y_i/∂x_j`` of ``func`` at a batch of points.

    Args:
        func: per-point model ``x (*in_shape) -> y (*out_shape)``.
        x: points ``(B, *in_shape)``, finite; for one point pass ``x[None]``.
        method: route of :func:`jacbatch.jacobian` (``"auto"`` picks the fastest expected).
        batch_size: points per call to :func:`jacbatch.jacobian` (bounds memory); ``None`` for
            all at once.
        zero_output: where an output ``y_i`` is exactly zero its elasticities are undefined:
            ``"nan"`` (default) sets them to NaN, ``"raise"`` raises ``ValueError``.
        input_names: one name per element of ``in_shape`` (row-major), for the table.
        output_names: one name per element of ``out_shape`` (row-major), for the table.
        **jacobian_kwargs: further options of :func:`jacbatch.jacobian` (e.g. ``chunk_size``).

    Returns:
        A :class:`LocalSensitivity`; ``jacobian`` and ``elasticity`` are
        ``(B, *out_shape, *in_shape)``.

    Raises:
        ValueError: non-finite points, model outputs or derivatives (with the first bad index).

    Example:
        >>> def f(x):  # y = x0² x1 (elasticities 2 and 1 everywhere)
        ...     return x[0] ** 2 * x[1]
        >>> res = local_sensitivity(f, torch.tensor([[1.0, 2.0], [3.0, -1.0]]))
        >>> res.jacobian
        tensor([[ 4.,  1.],
                [-6.,  9.]])
        >>> res.elasticity
        tensor([[2., 1.],
                [2., 1.]])
    """
    where = "local_sensitivity"
    x = C.check_points(where, x).detach()
    method = V.check_method(where, method)
    batch_size = C.check_samples_per_call(where, batch_size)
    zero_output = C.check_zero_output(where, zero_output)
    jacobian_kwargs = C.check_jacobian_kwargs(where, jacobian_kwargs)
    B, in_shape = x.shape[0], tuple(x.shape[1:])
    i = math.prod(in_shape)
    in_names = C.check_names(where, "input_names", input_names, i)

    ys, Js = [], []
    out_names = None
    for start, _, y, J in _batches(where, func, x, method, batch_size, jacobian_kwargs):
        if start == 0:  # the output size is known now: check the names before more work
            out_names = C.check_names(where, "output_names", output_names, J.shape[1])
        ys.append(y)
        Js.append(J)
    y_all, J_flat = torch.cat(ys), torch.cat(Js)  # (B, *out_shape), (B, o, i)
    out_shape = tuple(y_all.shape[1:])
    y_flat = y_all.reshape(B, -1)

    zero = y_flat == 0
    if zero_output == "raise" and bool(zero.any()):
        count = int(zero.any(dim=1).sum())
        C.zero_output_error(where, count, int(zero.any(dim=1).nonzero()[0, 0]))
    x_flat = x.reshape(B, 1, i)
    with torch.no_grad():
        E = J_flat * x_flat / y_flat.unsqueeze(-1)
        E = torch.where(zero.unsqueeze(-1), torch.full_like(E, math.nan), E)
    return LocalSensitivity(
        points=x,
        outputs=y_all,
        jacobian=J_flat.reshape(B, *out_shape, *in_shape),
        elasticity=E.reshape(B, *out_shape, *in_shape),
        input_names=in_names or _default_names("x", i),
        output_names=out_names or _output_names(out_shape),
        route=_route(func, x[:1], method, jacobian_kwargs.get("randomness", "error")),
    )


# ---------------------------------------------------------------------------------------------
# Derivative-based global sensitivity measures
# ---------------------------------------------------------------------------------------------


def dgsm(
    func: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    *,
    bounds: torch.Tensor | Sequence[Sequence[float]] | None = None,
    std: torch.Tensor | Sequence[float] | None = None,
    method: str = "auto",
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    **jacobian_kwargs: Any,
) -> DGSMResult:
    """Derivative-based global sensitivity measures of ``func`` over the sample ``X``.

    ``ν_j = E[(∂f/∂x_j)²]`` and ``E[|∂f/∂x_j|]`` with standard errors, per output element, from
    exact derivatives; with the input distribution (``bounds`` or ``std``) also the upper bounds
    on the Sobol total indices (see the NOTE at the top of this module). The sample goes through
    :func:`jacbatch.jacobian` in batches of ``batch_size``; statistics are accumulated in float64
    (numerically stable merging across batches) and returned in ``X``'s dtype.

    Args:
        func: per-sample model ``x (d,) -> y (*out_shape)`` (a scalar or any tensor shape).
        X: the sample ``(N, d)``, ``N >= 2``, finite, e.g. from :func:`sample_uniform`.
        bounds: ``(d, 2)`` rows ``[a_j, b_j]`` for independent inputs ``U[a_j, b_j]``: adds
            ``total_index_bound`` with ``C_j = (b_j − a_j)² / π²``. ``X`` must lie inside.
        std: ``(d,)`` for independent normal inputs ``N(μ_j, σ_j²)``: adds ``total_index_bound``
            with ``C_j = σ_j²``. At most one of ``bounds`` and ``std``.
        method: route of :func:`jacbatch.jacobian` (``"auto"`` picks the fastest expected).
        batch_size: samples per call to :func:`jacbatch.jacobian` (bounds memory); ``None`` for
            all at once.
        input_names: ``d`` names, for the table and plot.
        output_names: one name per output element (row-major).
        **jacobian_kwargs: further options of :func:`jacbatch.jacobian` (e.g. ``chunk_size``).

    Returns:
        A :class:`DGSMResult` (tensors of shape ``(*out_shape, d)`` and ``out_shape``).

    Raises:
        ValueError: a sample that is not ``(N, d)`` with ``N >= 2`` or not finite; bounds with
            ``a_j >= b_j`` or a sample outside them; non-finite model outputs or derivatives
            (with the first bad row).

    Example:
        >>> def f(x):  # f = 2 x0 + x1, inputs U[0, 1]: ν = (4, 1), V = 5/12
        ...     return 2 * x[0] + x[1]
        >>> X = sample_uniform([[0.0, 1.0], [0.0, 1.0]], 1000, seed=0)
        >>> res = dgsm(f, X, bounds=[[0.0, 1.0], [0.0, 1.0]])
        >>> res.nu, res.nu_se
        (tensor([4., 1.], dtype=torch.float64), tensor([0., 0.], dtype=torch.float64))
    """
    where = "dgsm"
    setup = _dgsm_setup(where, X, bounds, std, method, batch_size, jacobian_kwargs, input_names)
    acc = _dgsm_accumulate(where, func, setup)
    return _dgsm_result(where, func, setup, acc, output_names)


@dataclass(frozen=True)
class _DGSMSetup:
    X: torch.Tensor
    method: str
    batch_size: int | None
    jacobian_kwargs: dict[str, Any]
    in_names: tuple[str, ...] | None
    poincare: torch.Tensor | None


def _dgsm_setup(
    where: str,
    X: object,
    bounds: object,
    std: object,
    method: object,
    batch_size: object,
    jacobian_kwargs: dict[str, Any],
    input_names: Sequence[str] | None,
) -> _DGSMSetup:
    """Validate a DGSM study before any work; the Poincaré constants of the inputs."""
    X = C.check_sample(where, X).detach()
    method = V.check_method(where, method)
    batch_size = C.check_samples_per_call(where, batch_size)
    jacobian_kwargs = C.check_jacobian_kwargs(where, jacobian_kwargs)
    C.check_input_distribution(where, bounds, std)
    _, d = X.shape
    in_names = C.check_names(where, "input_names", input_names, d)
    poincare = None
    if bounds is not None:
        box = C.as_bounds(where, bounds, d, X.dtype, X.device)
        C.check_within_bounds(where, X, box)
        poincare = ((box[:, 1] - box[:, 0]) / math.pi) ** 2
    elif std is not None:
        poincare = C.as_positive_vector(where, "std", std, d, X.dtype, X.device) ** 2
    return _DGSMSetup(X, method, batch_size, jacobian_kwargs, in_names, poincare)


def _dgsm_accumulate(
    where: str,
    func: Callable[..., torch.Tensor],
    setup: _DGSMSetup,
    rows: slice = slice(None),
) -> DGSMAccumulator:
    """The statistics of ``J²``, ``|J|`` and ``y`` over ``X[rows]`` (its output shape known even
    for an empty slice)."""
    acc = DGSMAccumulator()
    X = setup.X[rows]
    kw = setup.jacobian_kwargs
    for _, _, y, J in _batches(where, func, X, setup.method, setup.batch_size, kw):
        acc.update(J, y)
    if acc.out_shape is None:  # an empty slice (a rank without samples): the shape from one sample
        _, _, y, _ = next(_batches(where, func, setup.X[:1], setup.method, None, kw))
        acc.out_shape, acc.n_inputs = tuple(y.shape[1:]), setup.X.shape[1]
    return acc


def _dgsm_result(
    where: str,
    func: Callable[..., torch.Tensor],
    setup: _DGSMSetup,
    acc: DGSMAccumulator,
    output_names: Sequence[str] | None,
) -> DGSMResult:
    """The DGSM result from the statistics over the whole sample."""
    X = setup.X
    assert acc.out_shape is not None
    out_names = C.check_names(where, "output_names", output_names, math.prod(acc.out_shape))
    randomness = setup.jacobian_kwargs.get("randomness", "error")
    return acc.result(
        setup.poincare, setup.in_names, out_names, X.dtype,
        _route(func, X[:1], setup.method, randomness),
    )  # fmt: skip
