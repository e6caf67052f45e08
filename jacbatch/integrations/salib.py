"""DGSM in SALib's conventions from exact derivatives (extra ``[salib]``).

`SALib <https://salib.readthedocs.io>`_ estimates derivative-based global sensitivity measures
(``SALib.analyze.dgsm``) from forward finite differences: ``SALib.sample.finite_diff`` adds, for
every base point, one point per input moved by a relative step ``delta``, and the model runs on
all ``N (D + 1)`` rows. Here the derivatives are exact (:func:`jacbatch.jacobian`: autodiff or
closed forms) at the ``N`` base points only, and the result is SALib's: a ``ResultDict`` with
the keys of ``SALib.analyze.dgsm.analyze`` (``vi``, ``vi_std``, ``dgsm``, ``dgsm_conf``,
``names``) and ``to_df()``. Switching is a two-line change::

    # finite differences (SALib)
    X = finite_diff.sample(problem, 1024)                # (N (D + 1), D), numpy
    Si = dgsm.analyze(problem, X, model_numpy(X), seed=1)

    # exact derivatives (jacbatch)
    X = jacbatch.integrations.salib.sample(problem, 1024)  # the same N base points, (N, D)
    Si = jacbatch.integrations.salib.analyze(problem, model_torch, X, seed=1)

``model_torch`` is the model for one sample, ``x (D,) -> scalar``, written in torch.
:func:`sample` draws SALib's own base points (the unscrambled Sobol' sequence after
``skip_values`` points, mapped to each input's distribution), so both estimates average over the
same points and differ only by the finite-difference error.

SALib is optional: with it installed the result is its ``SALib.util.ResultDict`` (with its
``to_df`` and ``plot``); without it, a ``dict`` subclass with ``to_df()`` (needs pandas).

NOTE [SALib's DGSM, term by term]
    SALib 1.6's ``dgsm.analyze`` computes, per input ``j``, from the squared derivatives
    ``g_j = (∂f/∂x_j)²`` at the base points (finite differences there, exact here):

    * ``vi = mean(g_j)``, the DGSM ``ν_j = E[(∂f/∂x_j)²]``;
    * ``vi_std = std(g_j)``, the population standard deviation (``ddof=0``) of ``g_j`` over the
      sample — a spread of the squared derivatives, not a standard error;
    * ``dgsm = vi · (b_j − a_j)² / (π² D)`` with ``D = var(f)`` over the base points (``ddof=0``):
      the Poincaré upper bound on the Sobol total index of ``U[a_j, b_j]`` inputs;
    * ``dgsm_conf = z · std(bootstrap means of g_j, ddof=1)`` with ``z = Φ⁻¹(0.5 + conf/2)`` and
      ``num_resamples`` resamples of the ``N`` rows drawn by ``np.random.randint`` after
      ``np.random.seed(seed)``. It is the half-width of the confidence interval of ``vi``, not
      of ``dgsm`` (SALib does not rescale it): the interval of ``dgsm`` is
      ``dgsm_conf · dgsm / vi`` wide on each side.

    All four are reproduced here exactly: the bootstrap draws the same rows from a
    ``np.random.RandomState(seed)`` (the stream ``np.random.seed(seed)`` gives; no global state
    is touched), so on the same base points and model, results agree with SALib's to rounding
    when its finite differences are exact (a linear model). ``seed=None`` draws unseeded; unlike
    SALib, ``seed=0`` seeds (SALib tests ``if seed:``). ``num_resamples=None`` replaces the
    bootstrap by its normal approximation ``z · std(g_j, ddof=0) / sqrt(N)``.

NOTE [the dgsm scaling for inputs that are not uniform]
    SALib scales every input by ``(bounds[1] − bounds[0])² / π²``, whatever its distribution.
    That constant is the Poincaré constant of ``U[a, b]``; it also bounds that of any log-concave
    density on ``[a, b]`` (Payne–Weinberger), so for ``"triang"`` (``bounds = [start, end,
    peak]``) SALib's value is a valid, conservative bound and is kept. For ``"norm"`` (``bounds =
    [μ, σ]``) the Poincaré constant is ``σ²``, used here instead of SALib's ``(σ − μ)² / π²``,
    which bounds nothing. A lognormal input satisfies no Poincaré inequality (its tail is heavier
    than exponential): ``dgsm`` and ``dgsm_conf`` are NaN for ``"lognorm"`` inputs. ``vi`` and
    ``vi_std`` do not depend on the scaling and match SALib for every distribution.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from .. import _sensitivity_checks as C
from .. import _validation as V
from ..sensitivity import DEFAULT_BATCH_SIZE, _batches

__all__ = ["DISTRIBUTIONS", "ResultDict", "analyze", "sample"]

#: The input distributions of a SALib problem (``problem["dists"]``) supported here, with the
#: meaning of their ``bounds`` row (as in SALib).
DISTRIBUTIONS: dict[str, str] = {
    "unif": "[low, high]: uniform on [low, high] (the default)",
    "norm": "[mean, std]: normal",
    "lognorm": "[mean, std] of log(x): lognormal",
    "triang": "[start, end, peak]: triangular on [start, end], mode at start + peak (end - start)",
}


# ---------------------------------------------------------------------------------------------
# The result type
# ---------------------------------------------------------------------------------------------


class _FallbackResultDict(dict[str, Any]):
    """SALib's ``ResultDict`` where SALib is not installed: a dict with ``to_df()``."""

    def to_df(self) -> Any:
        """The indices as a pandas ``DataFrame``, one row per input (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            C.missing_optional_error("ResultDict.to_df", "pandas", "salib")
        return pd.DataFrame({k: v for k, v in self.items() if k != "names"}, index=self["names"])


def _result_dict_type() -> type[dict[str, Any]]:
    try:
        from SALib.util import ResultDict as SALibResultDict
    except ImportError:
        return _FallbackResultDict
    return cast("type[dict[str, Any]]", SALibResultDict)


#: The type :func:`analyze` returns: ``SALib.util.ResultDict`` when SALib is installed, else a
#: ``dict`` subclass with ``to_df()``.
ResultDict: type[dict[str, Any]] = _result_dict_type()


# ---------------------------------------------------------------------------------------------
# The problem
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    name: str
    dist: str
    params: tuple[float, ...]

    @property
    def support(self) -> tuple[float, float]:
        if self.dist == "unif":
            return self.params[0], self.params[1]
        if self.dist == "triang":
            return self.params[0], self.params[1]
        if self.dist == "lognorm":
            return 0.0, math.inf
        return -math.inf, math.inf

    @property
    def poincare(self) -> float:
        """The Poincaré constant the ``dgsm`` key scales ``vi`` by (NOTE at the top)."""
        if self.dist in ("unif", "triang"):
            return (self.params[1] - self.params[0]) ** 2 / math.pi**2
        if self.dist == "norm":
            return self.params[1] ** 2
        return math.nan  # lognorm: no Poincaré inequality

    def from_unit(self, u: torch.Tensor) -> torch.Tensor:
        """Inverse CDF: uniform ``u (N,)`` in ``[0, 1]`` to this input's distribution."""
        p = self.params
        if self.dist == "unif":
            return u * (p[1] - p[0]) + p[0]  # SALib's operation order: the same floats
        if self.dist == "norm":
            return p[0] + p[1] * torch.special.ndtri(u)
        if self.dist == "lognorm":
            return torch.exp(p[0] + p[1] * torch.special.ndtri(u))
        start, end, c = p
        width, mode = end - start, start + c * (end - start)
        left = start + torch.sqrt(u * width * (mode - start))
        right = end - torch.sqrt((1 - u) * width * (end - mode))
        return torch.where(u < c, left, right)


def _problem(where: str, problem: object) -> list[_Input]:
    """The inputs of a SALib problem dict, validated."""
    if not isinstance(problem, Mapping):
        raise TypeError(
            f"{where}: expected a SALib problem dict with 'num_vars', 'names' and 'bounds' (and "
            f"optionally 'dists'), got {type(problem).__name__}."
        )
    missing = [k for k in ("num_vars", "names", "bounds") if k not in problem]
    if missing:
        raise ValueError(
            f"{where}: expected a SALib problem dict with 'num_vars', 'names' and 'bounds', got "
            f"one without {', '.join(repr(k) for k in missing)}."
        )
    d = problem["num_vars"]
    if isinstance(d, bool) or not isinstance(d, int | np.integer) or d < 1:
        raise ValueError(f"{where}: expected problem['num_vars'] to be a positive int, got {d!r}.")
    d = int(d)
    names, bounds = problem["names"], problem["bounds"]
    dists = problem.get("dists")
    if dists is None:
        dists = ["unif"] * d
    for key, value in (("names", names), ("bounds", bounds), ("dists", dists)):
        if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
            raise TypeError(
                f"{where}: expected problem[{key!r}] to be a list, got {type(value).__name__}."
            )
        if len(value) != d:
            raise ValueError(
                f"{where}: expected problem[{key!r}] to have num_vars = {d} entries, one per "
                f"input, got {len(value)}."
            )
    inputs = []
    for name, row, dist in zip(names, bounds, dists, strict=True):
        inputs.append(_input(where, str(name), row, dist))
    return inputs


def _input(where: str, name: str, row: object, dist: object) -> _Input:
    if dist not in DISTRIBUTIONS:
        listing = "; ".join(f"{k!r} {v}" for k, v in DISTRIBUTIONS.items())
        raise ValueError(
            f"{where}: expected the distribution of input {name!r} to be one of {listing}; got "
            f"{dist!r}. Its inverse CDF (and, for dgsm, its Poincaré constant) is not "
            f"implemented here: transform the input yourself, e.g. x = exp(u) for a log-uniform "
            f"input from a uniform u, and give the model u."
        )
    try:
        params = tuple(float(v) for v in row)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        raise TypeError(
            f"{where}: expected the bounds of input {name!r} as a list of numbers, got {row!r}."
        ) from None
    want = 3 if dist == "triang" else 2
    if len(params) != want or not all(math.isfinite(v) for v in params):
        extra = (
            " (SALib's deprecated two-value form [end, peak] is not accepted: write [0, end, peak])"
            if dist == "triang"
            else ""
        )
        raise ValueError(
            f"{where}: expected the bounds of {dist!r} input {name!r} as {want} finite numbers "
            f"{DISTRIBUTIONS[dist].split(':')[0]}{extra}, got {list(params)}."
        )
    bad = (
        (dist == "unif" and not params[0] < params[1])
        or (dist in ("norm", "lognorm") and not params[1] > 0)
        or (dist == "triang" and not (params[0] < params[1] and 0 <= params[2] <= 1))
    )
    if bad:
        raise ValueError(
            f"{where}: expected valid bounds {DISTRIBUTIONS[dist]} for input {name!r}, got "
            f"{list(params)}."
        )
    return _Input(name, str(dist), params)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def sample(
    problem: Mapping[str, Any],
    N: int,
    *,
    skip_values: int = 1024,
    scramble: bool = False,
    seed: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``N`` points of the Sobol' sequence, mapped to the problem's input distributions.

    With the defaults these are exactly the base points of ``SALib.sample.finite_diff.sample(
    problem, N)`` (rows ``0, D + 1, 2 (D + 1), ...`` of its result): the unscrambled sequence
    after its first ``skip_values`` points, each coordinate mapped by the inverse CDF of its
    input's distribution. SALib's ``N (D + 1)`` rows with perturbed points are not needed here.

    Args:
        problem: a SALib problem dict (``num_vars``, ``names``, ``bounds``, optional ``dists``
            from :data:`DISTRIBUTIONS`).
        N: number of points.
        skip_values: points of the sequence skipped first (SALib's default 1024; the first point
            is 0, which a normal input maps to -inf).
        scramble: Owen-scrambled Sobol' points (randomized QMC) instead of SALib's.
        seed: the scrambling seed; as in SALib's ``finite_diff.sample``, it does not change
            unscrambled points.
        dtype, device: of the result.

    Returns:
        ``X (N, D)``.

    Example:
        >>> problem = {"num_vars": 2, "names": ["a", "b"], "bounds": [[0, 1], [-1, 1]]}
        >>> sample(problem, 4)
        tensor([[ 0.0015, -0.2471],
                [ 0.5015,  0.7529],
                [ 0.7515, -0.7471],
                [ 0.2515,  0.2529]], dtype=torch.float64)
    """
    where = "salib.sample"
    inputs = _problem(where, problem)
    N = C.check_sample_count(where, N)
    if isinstance(skip_values, bool) or not isinstance(skip_values, int) or skip_values < 0:
        raise ValueError(f"{where}: expected skip_values to be an int >= 0, got {skip_values!r}.")
    C.check_seed(where, seed, None)
    engine = torch.quasirandom.SobolEngine(len(inputs), scramble=scramble, seed=seed)
    if skip_values:
        engine.fast_forward(skip_values)
    U = engine.draw(N, dtype=torch.float64)  # (N, D), float64 on CPU
    X = torch.stack([inp.from_unit(U[:, j]) for j, inp in enumerate(inputs)], dim=1)
    return X.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


def _check_sample(where: str, X: object, inputs: Sequence[_Input]) -> torch.Tensor:
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(np.ascontiguousarray(X))
    t = C.check_sample(where, X).detach()
    if t.shape[1] != len(inputs):
        raise ValueError(
            f"{where}: expected a sample X of shape (N, {len(inputs)}) (num_vars columns), got "
            f"shape {tuple(t.shape)}. SALib's finite_diff.sample returns N (D + 1) rows with "
            f"perturbed points; pass its base points X[::{len(inputs) + 1}], or use sample()."
        )
    for j, inp in enumerate(inputs):
        low, high = inp.support
        col = t[:, j]
        outside = (col < low) | (col > high) if inp.dist != "lognorm" else col <= 0
        if bool(outside.any()):
            row = int(outside.nonzero()[0, 0])
            raise ValueError(
                f"{where}: expected column {j} of X (input {inp.name!r}, {inp.dist!r}) in the "
                f"support of its distribution, got {float(col[row])} at row {row}. Draw X from "
                f"the problem (sample()) or fix problem['bounds']."
            )
    return t


def _z(where: str, conf_level: object) -> float:
    if isinstance(conf_level, bool) or not isinstance(conf_level, int | float):
        raise TypeError(f"{where}: expected conf_level to be a float, got {conf_level!r}.")
    if not 0 < conf_level < 1:
        raise ValueError(f"{where}: expected 0 < conf_level < 1, got {conf_level!r}.")
    return statistics.NormalDist().inv_cdf(0.5 + float(conf_level) / 2)


def _bootstrap_std(g: np.ndarray, num_resamples: int, seed: int | None) -> np.ndarray:
    """``std(ddof=1)`` over ``num_resamples`` bootstrap means of each column of ``g (N, D)``,
    drawing the rows as SALib 1.6 does: per input in order, ``num_resamples`` rows of ``N``
    indices each from one legacy RandomState (row by row: the same stream, ``N`` ints of memory
    at a time instead of ``num_resamples · N``)."""
    N, D = g.shape
    rng = np.random.RandomState(seed)
    out = np.empty(D)
    for j in range(D):
        col = g[:, j]
        means = np.empty(num_resamples)
        for i in range(num_resamples):
            means[i] = col[rng.randint(N, size=N)].mean()
        out[j] = means.std(ddof=1)
    return out


def analyze(
    problem: Mapping[str, Any],
    func: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor | np.ndarray | None = None,
    *,
    N: int | None = None,
    num_resamples: int | None = 100,
    conf_level: float = 0.95,
    seed: int | None = None,
    print_to_console: bool = False,
    method: str = "auto",
    batch_size: int | None = DEFAULT_BATCH_SIZE,
    **jacobian_kwargs: Any,
) -> dict[str, Any]:
    """SALib's DGSM (``SALib.analyze.dgsm.analyze``) with exact derivatives.

    The same keys, definitions, bound scaling and bootstrap confidence intervals as SALib 1.6
    (NOTE [SALib's DGSM, term by term] at the top of this module), from ``∂f/∂x_j`` computed by
    :func:`jacbatch.jacobian` at the sample's points instead of forward finite differences at
    ``N (D + 1)`` points.

    Args:
        problem: a SALib problem dict: ``num_vars`` ``D``, ``names``, ``bounds`` and optionally
            ``dists`` (see :data:`DISTRIBUTIONS`; default uniform).
        func: the model for one sample, ``x (D,) -> scalar`` (a tensor with one element), in
            torch; one output at a time, as in SALib (``lambda x: f(x)[k]`` for output ``k``).
        X: the points ``(N, D)`` (torch or numpy), e.g. from :func:`sample`; ``None`` draws
            ``sample(problem, N)``.
        N: the number of points to draw when ``X`` is ``None``.
        num_resamples: bootstrap resamples for ``dgsm_conf`` (SALib's default 100); ``None``:
            the normal approximation instead (no resampling; for very large ``N``).
        conf_level: the confidence level of ``dgsm_conf``.
        seed: seeds the bootstrap (as SALib's ``seed``).
        print_to_console: print ``to_df()`` (as SALib).
        method: route of :func:`jacbatch.jacobian` (``"auto"`` picks the fastest expected).
        batch_size: points per call to :func:`jacbatch.jacobian` (bounds memory); ``None``: all
            at once.
        **jacobian_kwargs: further options of :func:`jacbatch.jacobian` (e.g. ``chunk_size``).

    Returns:
        A ``ResultDict`` (:data:`ResultDict`) with ``vi``, ``vi_std``, ``dgsm``, ``dgsm_conf``
        (numpy arrays ``(D,)``, float64) and ``names``.

    Raises:
        ValueError: an invalid problem or unsupported distribution, a sample of the wrong shape,
            outside the inputs' supports or not finite, a model without exactly one output
            element, or non-finite outputs or derivatives (naming the first bad row).

    Example:
        >>> problem = {"num_vars": 2, "names": ["a", "b"], "bounds": [[0, 1], [0, 1]]}
        >>> Si = analyze(problem, lambda x: 2 * x[0] + x[1], N=256, seed=1)
        >>> Si["vi"], Si["vi_std"]
        (array([4., 1.]), array([0., 0.]))
    """
    where = "salib.analyze"
    inputs = _problem(where, problem)
    z = _z(where, conf_level)
    if num_resamples is not None and (
        isinstance(num_resamples, bool) or not isinstance(num_resamples, int) or num_resamples < 2
    ):
        raise ValueError(
            f"{where}: expected num_resamples to be an int >= 2 (bootstrap resamples) or None "
            f"(normal approximation), got {num_resamples!r}."
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{where}: expected seed to be an int or None, got {seed!r}.")
    if X is None:
        if N is None:
            raise ValueError(
                f"{where}: expected a sample X or a number of points N, got neither. Pass "
                f"X=sample(problem, N) or N=..."
            )
        X = sample(problem, N)
    elif N is not None:
        raise ValueError(f"{where}: expected X or N, got both. Drop N: X has {len(X)} rows.")
    Xt = _check_sample(where, X, inputs)
    method = V.check_method(where, method)
    batch_size = C.check_samples_per_call(where, batch_size)
    jacobian_kwargs = C.check_jacobian_kwargs(where, jacobian_kwargs)

    gs, ys = [], []
    for _, _, y, J in _batches(where, func, Xt, method, batch_size, jacobian_kwargs):
        if J.shape[1] != 1:
            raise ValueError(
                f"{where}: expected a model with one output per sample (a scalar, as SALib's "
                f"Y), got out_shape {tuple(y.shape[1:])}. Analyze one output at a time, e.g. "
                f"lambda x: f(x)[k]."
            )
        J64 = J[:, 0, :].to(torch.float64)
        gs.append((J64 * J64).cpu())
        ys.append(y.reshape(-1).to(torch.float64).cpu())
    g = torch.cat(gs).numpy()  # (N, D): (∂f/∂x_j)² per point
    Y = torch.cat(ys).numpy()  # (N,)

    vi = g.mean(axis=0)
    vi_std = g.std(axis=0)
    var_y = Y.var()
    poincare = np.array([inp.poincare for inp in inputs])
    with np.errstate(divide="ignore", invalid="ignore"):
        dgsm = np.where(var_y > 0, vi * poincare / var_y, math.nan)
    if num_resamples is None:
        half = z * vi_std / math.sqrt(g.shape[0])
    else:
        half = z * _bootstrap_std(g, num_resamples, seed)
    dgsm_conf = np.where(np.isnan(poincare), math.nan, half)

    S = ResultDict(vi=vi, vi_std=vi_std, dgsm=dgsm, dgsm_conf=dgsm_conf)
    S["names"] = [inp.name for inp in inputs]
    if print_to_console:
        print(S.to_df())  # type: ignore[attr-defined]
    return S
