"""The statistics of :func:`jacbatch.sensitivity.dgsm` (public there): :class:`Moments`,
:class:`DGSMAccumulator` (batch by batch, mergeable across processes) and
:class:`DGSMResult` with its table and plot. See NOTE [DGSM and the bound on Sobol total
indices] in :mod:`jacbatch.sensitivity`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _sensitivity_checks as C
from ._table import format_table

_MEASURES: tuple[str, ...] = ("nu", "mean_abs", "bound")


def _default_names(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}[{k}]" for k in range(n))


def _output_names(out_shape: tuple[int, ...]) -> tuple[str, ...]:
    return ("y",) if out_shape == () else _default_names("y", math.prod(out_shape))


class Moments:
    """Running count, mean and sum of squared deviations of per-sample values (Chan et al.),
    in float64, merged across batches or across processes.

    Attributes:
        n: the number of samples seen.
        mean: ``(*shape)`` or ``None`` before the first update.
        m2: ``(*shape)``: the sum of squared deviations from the mean, or ``None``.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, q: torch.Tensor) -> None:
        """Add the samples ``q (c, *shape)``."""
        q = q.to(torch.float64)
        c = q.shape[0]
        var_c, mean_c = torch.var_mean(q, dim=0, correction=0)  # one fused pass
        m2_c = var_c * c
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = c, mean_c, m2_c
            return
        n = self.n + c
        delta = mean_c - self.mean
        self.mean = self.mean + delta * (c / n)
        self.m2 = self.m2 + m2_c + delta**2 * (self.n * c / n)
        self.n = n

    def merge(self, other: Moments) -> Moments:
        """The moments of both sets of samples (a new object; Chan et al.'s pairwise update)."""
        if other.n == 0 or other.mean is None or other.m2 is None:
            return self._copy()
        if self.n == 0 or self.mean is None or self.m2 is None:
            return other._copy()
        m = Moments()
        m.n = self.n + other.n
        delta = other.mean - self.mean
        m.mean = self.mean + delta * (other.n / m.n)
        m.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / m.n)
        return m

    def _copy(self) -> Moments:
        m = Moments()
        m.n, m.mean, m.m2 = self.n, self.mean, self.m2
        return m

    def sums(
        self, shape: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum and the sum of squares of the samples, ``(*shape)`` float64 on ``device``
        (zeros before any sample): what adds up across processes."""
        if self.n == 0 or self.mean is None or self.m2 is None:
            zero = torch.zeros(shape, dtype=torch.float64, device=device)
            return zero, zero
        total = self.mean * self.n
        return total.to(device), (self.m2 + total * self.mean).to(device)

    @classmethod
    def from_sums(cls, n: int, total: torch.Tensor, total_sq: torch.Tensor) -> Moments:
        """Moments of ``n`` values from their sum and sum of squares (float64, e.g. over ranks)."""
        m = cls()
        m.n = n
        m.mean = total / n
        m.m2 = (total_sq - total * m.mean).clamp_min(0)
        return m

    def variance(self) -> torch.Tensor:
        """The unbiased sample variance (two or more samples)."""
        assert self.m2 is not None
        return self.m2 / (self.n - 1)

    def standard_error(self) -> torch.Tensor:
        """The standard error of the mean."""
        return torch.sqrt(self.variance() / self.n)


class DGSMAccumulator:
    """The statistics behind :func:`dgsm`, accumulated batch by batch and mergeable.

    Holds the :class:`Moments` of ``J²`` and ``|J|`` (``(o, d)`` per sample) and of the outputs
    ``y`` (``(o,)``). Feed it batches with :meth:`update`, combine partial accumulators (other
    batches, other processes) with :meth:`merge` (or, across processes, add :meth:`sums` and
    rebuild with :meth:`from_sums`), and turn it into a :class:`DGSMResult` with :meth:`result`.

    Example:
        >>> X = torch.rand(100, 2, dtype=torch.float64)
        >>> f = lambda x: 2 * x[0] + x[1]
        >>> acc = DGSMAccumulator()
        >>> acc.update(jacbatch.jacobian(f, X, vec="row"), torch.func.vmap(f)(X))
        >>> acc.result().nu
        tensor([4., 1.], dtype=torch.float64)
    """

    def __init__(self) -> None:
        self.squares = Moments()
        self.absolute = Moments()
        self.outputs = Moments()
        self.out_shape: tuple[int, ...] | None = None
        self.n_inputs: int | None = None

    @property
    def n(self) -> int:
        """The number of samples seen."""
        return self.outputs.n

    def update(self, J: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch: ``J (c, o, d)`` (row-major ``vec="row"`` Jacobians) and the outputs
        ``y (c, *out_shape)``."""
        self.out_shape = tuple(y.shape[1:])
        self.n_inputs = J.shape[-1]
        J64 = J.to(torch.float64)  # (c, o, d)
        self.squares.update(J64 * J64)
        self.absolute.update(J64.abs())
        self.outputs.update(y.reshape(y.shape[0], -1))

    def merge(self, other: DGSMAccumulator) -> DGSMAccumulator:
        """The statistics of both (a new accumulator)."""
        m = DGSMAccumulator()
        m.squares = self.squares.merge(other.squares)
        m.absolute = self.absolute.merge(other.absolute)
        m.outputs = self.outputs.merge(other.outputs)
        m.out_shape = self.out_shape if self.out_shape is not None else other.out_shape
        m.n_inputs = self.n_inputs if self.n_inputs is not None else other.n_inputs
        return m

    def sums(self, out_shape: tuple[int, ...], d: int, device: torch.device) -> torch.Tensor:
        """``[n, sum(J²), sum((J²)²), sum|J|, sum(|J|²), sum(y), sum(y²)]`` flattened into one
        float64 vector on ``device``: everything that adds up across processes (one
        ``all_reduce``); :meth:`from_sums` inverts it."""
        o = math.prod(out_shape)
        parts = [torch.tensor([float(self.n)], dtype=torch.float64, device=device)]
        for m, shape in ((self.squares, (o, d)), (self.absolute, (o, d)), (self.outputs, (o,))):
            parts += [p.reshape(-1) for p in m.sums(shape, device)]
        return torch.cat(parts)

    @classmethod
    def from_sums(cls, packed: torch.Tensor, out_shape: tuple[int, ...], d: int) -> DGSMAccumulator:
        """The accumulator whose :meth:`sums` are ``packed`` (e.g. added over processes)."""
        o = math.prod(out_shape)
        n = round(packed[0].item())
        shapes = [(o, d), (o, d), (o, d), (o, d), (o,), (o,)]
        pieces = torch.split(packed[1:], [math.prod(sh) for sh in shapes])
        acc = cls()
        acc.squares, acc.absolute, acc.outputs = (
            Moments.from_sums(
                n, pieces[2 * k].reshape(shapes[2 * k]), pieces[2 * k + 1].reshape(shapes[2 * k])
            )
            for k in range(3)
        )
        acc.out_shape, acc.n_inputs = out_shape, d
        return acc

    def result(
        self,
        poincare: torch.Tensor | None = None,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        dtype: torch.dtype | None = None,
        route: str = "",
    ) -> DGSMResult:
        """The :class:`DGSMResult` of the samples seen (two or more).

        Args:
            poincare: ``(d,)`` Poincaré constants of the inputs (adds ``total_index_bound``).
            input_names, output_names: names for the table and plot (defaults ``x[j]``,
                ``y[k]``).
            dtype: of the result's tensors (default float64).
            route: the route that computed the Jacobians, as reports name it.
        """
        sq, ab, out = self.squares, self.absolute, self.outputs
        assert sq.mean is not None and ab.mean is not None and out.mean is not None
        assert self.out_shape is not None and self.n_inputs is not None
        out_shape, d = self.out_shape, self.n_inputs
        V_out = out.variance()  # (o,)
        bound = None
        if poincare is not None:
            ratio = poincare.to(torch.float64) * sq.mean / V_out.unsqueeze(-1)
            bound = torch.where((V_out == 0).unsqueeze(-1), torch.full_like(ratio, math.nan), ratio)

        def shaped(t: torch.Tensor, per_input: bool = True) -> torch.Tensor:
            shape = (*out_shape, d) if per_input else out_shape
            return t.reshape(shape).to(dtype or torch.float64)

        return DGSMResult(
            nu=shaped(sq.mean),
            nu_se=shaped(sq.standard_error()),
            mean_abs=shaped(ab.mean),
            mean_abs_se=shaped(ab.standard_error()),
            mean=shaped(out.mean, per_input=False),
            variance=shaped(V_out, per_input=False),
            total_index_bound=None if bound is None else shaped(bound),
            n_samples=self.n,
            input_names=tuple(input_names) if input_names else _default_names("x", d),
            output_names=tuple(output_names) if output_names else _output_names(out_shape),
            route=route,
        )


@dataclass(frozen=True)
class DGSMResult:
    """Derivative-based global sensitivity measures over a sample (see :func:`dgsm`).

    Shapes use ``out_shape`` for the model's per-sample output shape (``()`` for a scalar model)
    and ``d`` for the number of inputs.

    Attributes:
        nu: ``ν_j = E[(∂f/∂x_j)²]``, shape ``(*out_shape, d)``.
        nu_se: standard error of ``nu`` from the sample, ``(*out_shape, d)``.
        mean_abs: ``E[|∂f/∂x_j|]``, ``(*out_shape, d)``.
        mean_abs_se: standard error of ``mean_abs``, ``(*out_shape, d)``.
        mean: sample mean of the outputs, ``out_shape``.
        variance: unbiased sample variance ``V`` of the outputs, ``out_shape``.
        total_index_bound: upper bound ``C_j ν_j / V`` on the Sobol total index ``S_T,j``
            (``C_j = (b_j − a_j)² / π²`` for uniform, ``σ_j²`` for normal inputs), shape
            ``(*out_shape, d)``; NaN for outputs with ``V == 0`` (constant on the sample, so no
            variance to apportion); ``None`` when no input distribution was given.
        n_samples: ``N``.
        input_names: ``d`` names.
        output_names: one name per output element (row-major).
        route: the route :func:`jacbatch.jacobian` took.
    """

    nu: torch.Tensor
    nu_se: torch.Tensor
    mean_abs: torch.Tensor
    mean_abs_se: torch.Tensor
    mean: torch.Tensor
    variance: torch.Tensor
    total_index_bound: torch.Tensor | None
    n_samples: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    route: str

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(len(self.output_names), len(self.input_names))

    def __str__(self) -> str:
        d = len(self.input_names)
        nu, nu_se = self._flat(self.nu), self._flat(self.nu_se)
        ma, ma_se = self._flat(self.mean_abs), self._flat(self.mean_abs_se)
        var = self.variance.reshape(-1)
        bound = None if self.total_index_bound is None else self._flat(self.total_index_bound)
        lines = [
            f"DGSM over N = {self.n_samples} samples (route: {self.route}); "
            f"estimate ± standard error"
        ]
        for k, name in enumerate(self.output_names):
            v = float(var[k])
            note = " — constant on the sample, no total-index bound" if v == 0 else ""
            lines.append(f"output {name}: variance V = {v:.6g}{note}")
            header = ["input", "nu = E[(df/dx)^2]", "E[|df/dx|]"]
            if bound is not None:
                header.append("S_T bound")
            rows = []
            for j in range(d):
                row = [
                    self.input_names[j],
                    f"{float(nu[k, j]):.6g} ± {float(nu_se[k, j]):.2g}",
                    f"{float(ma[k, j]):.6g} ± {float(ma_se[k, j]):.2g}",
                ]
                if bound is not None:
                    b = float(bound[k, j])
                    row.append("n/a" if math.isnan(b) else f"{b:.4g}")
                rows.append(row)
            lines.extend(format_table(header, rows, indent="  "))
        return "\n".join(lines)

    def plot(
        self,
        path: str | None = None,
        *,
        measure: str = "nu",
        outputs: Sequence[int] | None = None,
        log: bool = False,
    ) -> Any:
        """Bar chart of one measure per input, one group of bars per output element.

        Needs matplotlib (imported here, lazily); no pyplot state is touched.

        Args:
            path: where to save the figure as PNG (``None``: only return it).
            measure: ``"nu"`` (with standard-error bars), ``"mean_abs"`` (likewise) or
                ``"bound"`` (the total-index bounds).
            outputs: flat indices of the outputs to show (default all).
            log: log-scaled value axis.

        Returns:
            The ``matplotlib.figure.Figure``.

        Raises:
            ImportError: matplotlib is not installed.
        """
        where = "DGSMResult.plot"
        measure = C.check_choice(where, "measure", measure, _MEASURES)
        if measure == "bound" and self.total_index_bound is None:
            C.no_total_index_bound_error(where)
        o, d = len(self.output_names), len(self.input_names)
        show = list(range(o)) if outputs is None else [int(k) for k in outputs]
        C.check_output_indices(where, show, o)
        try:
            from matplotlib.figure import Figure
        except ImportError:
            C.missing_optional_error(where, "matplotlib", "plot")
        values, errors, label = {
            "nu": (self.nu, self.nu_se, "ν = E[(∂f/∂x)²]"),
            "mean_abs": (self.mean_abs, self.mean_abs_se, "E[|∂f/∂x|]"),
            "bound": (self.total_index_bound, None, "upper bound on S_T"),
        }[measure]
        assert values is not None
        val = self._flat(values).double().cpu()
        err = None if errors is None else self._flat(errors).double().cpu()
        fig = Figure(figsize=(min(12.0, 2.0 + 0.8 * d * max(1, len(show)) ** 0.5), 3.5))
        ax = fig.subplots()
        width = 0.8 / max(1, len(show))
        for n, k in enumerate(show):
            pos = [j + (n - (len(show) - 1) / 2) * width for j in range(d)]
            ax.bar(
                pos,
                val[k].tolist(),
                width=width,
                yerr=None if err is None else err[k].tolist(),
                capsize=3,
                label=self.output_names[k],
            )
        ax.set_xticks(list(range(d)))
        ax.set_xticklabels(self.input_names)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"DGSM, N = {self.n_samples}")
        if len(show) > 1:
            ax.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, format="png", dpi=120)
        return fig
