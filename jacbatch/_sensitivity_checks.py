"""Checks of :mod:`jacbatch.sensitivity`'s arguments (its only user); messages read as in
:mod:`jacbatch._validation`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn

import torch

from ._validation import _fmt_options, check_tensor

#: Options of :func:`jacbatch.jacobian` that the sensitivity functions set themselves.
SENSITIVITY_RESERVED_KWARGS: tuple[str, ...] = ("argnums", "in_dims", "vec", "out", "method")


ZERO_OUTPUT_OPTIONS: tuple[str, ...] = ("nan", "raise")


def check_floating_tensor(where: str, name: str, x: object) -> torch.Tensor:
    """A real floating-point tensor with data (not on the meta device)."""
    t = check_tensor(where, name, x)
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{where}: expected {name} to be a floating-point tensor, got dtype {t.dtype}. "
            f"Convert it with .double() or .float()."
        )
    if t.device.type == "meta":
        raise ValueError(
            f"{where}: expected {name} with data, got a tensor on the meta device. "
            f"Materialize it on 'cpu' or 'cuda'."
        )
    return t


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite; one reduction when they are (a NaN or inf anywhere makes
    the sum non-finite; a sum that overflowed falls back to the elementwise check)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _first_bad(mask: torch.Tensor) -> tuple[int, int]:
    """``(count, first index)`` of the rows of a ``(N, ...)`` boolean mask with any True."""
    rows = mask.reshape(mask.shape[0], -1).any(dim=1)
    count = int(rows.sum())
    first = int(rows.nonzero()[0, 0]) if count else -1
    return count, first


def check_sample(where: str, X: object, *, min_samples: int = 2) -> torch.Tensor:
    """A DGSM sample: floating ``(N, d)`` with ``N >= min_samples``, ``d >= 1``, all finite."""
    t = check_floating_tensor(where, "X", X)
    if t.ndim != 2 or t.shape[1] == 0:
        raise ValueError(
            f"{where}: expected a sample X of shape (N, d) (one row per sample, one column per "
            f"input), got shape {tuple(t.shape)}. Reshape it, e.g. X.reshape(N, -1), or use "
            f"X[:, None] for a single input."
        )
    if t.shape[0] < min_samples:
        raise ValueError(
            f"{where}: expected at least {min_samples} samples (rows of X) to estimate means, "
            f"variances and standard errors, got {t.shape[0]}."
        )
    if not _all_finite(t):
        count, first = _first_bad(~torch.isfinite(t))
        raise ValueError(
            f"{where}: expected finite inputs, got {count} sample(s) with NaN or inf, the first "
            f"at row {first}: {t[first].tolist()}. Remove or resample them."
        )
    return t


def check_points(where: str, x: object) -> torch.Tensor:
    """Points for local sensitivity: floating ``(B, *in_shape)`` with ``B >= 1``, all finite."""
    t = check_floating_tensor(where, "x", x)
    if t.ndim == 0 or t.shape[0] == 0:
        raise ValueError(
            f"{where}: expected a batch of points x of shape (B, *in_shape) with B >= 1, got "
            f"shape {tuple(t.shape)}. For one point pass x[None]."
        )
    if not _all_finite(t):
        count, first = _first_bad(~torch.isfinite(t))
        raise ValueError(
            f"{where}: expected finite points, got {count} point(s) with NaN or inf, the first "
            f"at index {first}."
        )
    return t


def check_samples_per_call(where: str, batch_size: object) -> int | None:
    """``batch_size`` of the sensitivity functions: samples per call to jacobian."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(
            f"{where}: expected batch_size to be a positive int or None, got {batch_size!r}. "
            f"It is the number of samples per call to jacobian; None sends all at once."
        )
    return batch_size


def check_jacobian_kwargs(where: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Options forwarded to :func:`jacbatch.jacobian`; those the caller may not set are refused."""
    clash = [k for k in kwargs if k in SENSITIVITY_RESERVED_KWARGS]
    if clash:
        raise TypeError(
            f"{where}: expected only options that jacobian leaves to the caller (e.g. "
            f"chunk_size), got {', '.join(clash)}. {where} sets argnums, in_dims, vec and out "
            f"itself; choose the route with its own method= argument."
        )
    return kwargs


def check_names(where: str, name: str, names: object, n: int) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"{where}: expected {name} to be a sequence of {n} strings, got {type(names).__name__}."
        )
    out = tuple(str(s) for s in names)
    if len(out) != n:
        raise ValueError(f"{where}: expected {n} {name}, one per element, got {len(out)}: {out}.")
    return out


def check_zero_output(where: str, option: object) -> str:
    if option not in ZERO_OUTPUT_OPTIONS:
        raise ValueError(
            f"{where}: expected zero_output to be one of {_fmt_options(ZERO_OUTPUT_OPTIONS)}, "
            f"got {option!r}. 'nan' marks elasticities of zero outputs as NaN, 'raise' refuses."
        )
    return str(option)


def zero_output_error(where: str, count: int, first: int) -> NoReturn:
    raise ValueError(
        f"{where}: expected nonzero model outputs for elasticities x_j / y_i * dy_i/dx_j, got "
        f"{count} point(s) with some y_i == 0, the first at index {first}. Use "
        f"zero_output='nan' to get NaN there, or use the raw jacobian."
    )


def check_finite_outputs(where: str, y: torch.Tensor, offset: int) -> None:
    """Model outputs ``(c, ...)`` of samples ``offset .. offset + c``: all finite."""
    if not _all_finite(y):
        count, first = _first_bad(~torch.isfinite(y))
        raise ValueError(
            f"{where}: expected finite model outputs, got NaN or inf for {count} sample(s) of "
            f"rows {offset}..{offset + y.shape[0] - 1}, the first at row {offset + first}. "
            f"Restrict the inputs to the model's domain or fix the model there."
        )


def check_finite_jacobian(where: str, J: torch.Tensor, offset: int) -> None:
    """Jacobians ``(c, ...)`` of samples ``offset .. offset + c``: all finite."""
    if not _all_finite(J):
        count, first = _first_bad(~torch.isfinite(J))
        raise ValueError(
            f"{where}: expected finite derivatives, got NaN or inf for {count} sample(s) of rows "
            f"{offset}..{offset + J.shape[0] - 1}, the first at row {offset + first}. The model "
            f"is not differentiable there (e.g. sqrt or abs at 0); restrict the inputs."
        )


def as_bounds(
    where: str, bounds: object, d: int, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Uniform input ranges as a ``(d, 2)`` tensor of rows ``[a_j, b_j]`` with ``a_j < b_j``."""
    try:
        b = torch.as_tensor(bounds, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{where}: expected bounds as a (d, 2) tensor or nested sequence of [low, high] "
            f"rows, got {type(bounds).__name__}."
        ) from None
    if tuple(b.shape) != (d, 2):
        raise ValueError(
            f"{where}: expected bounds of shape ({d}, 2), one [low, high] row per input, got "
            f"shape {tuple(b.shape)}."
        )
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"{where}: expected finite bounds, got {b.tolist()}.")
    bad = (b[:, 0] >= b[:, 1]).nonzero().flatten().tolist()
    if bad:
        listing = ", ".join(f"input {j}: [{b[j, 0].item()}, {b[j, 1].item()}]" for j in bad)
        raise ValueError(
            f"{where}: expected low < high in every bounds row, got {listing}. Write each row "
            f"as [low, high]."
        )
    return b


def check_within_bounds(where: str, X: torch.Tensor, bounds: torch.Tensor) -> None:
    """The sample ``(N, d)`` lies in the box ``bounds (d, 2)`` it is said to be drawn from."""
    low, high = bounds[:, 0], bounds[:, 1]
    lo, hi = torch.aminmax(X, dim=0)
    if bool((lo < low).any()) or bool((hi > high).any()):
        outside = (low > X) | (high < X)
        count, first = _first_bad(outside)
        raise ValueError(
            f"{where}: expected a sample drawn from the uniform box given by bounds, got "
            f"{count} row(s) outside it, the first at row {first}: {X[first].tolist()}. The "
            f"Sobol-index bound holds only for inputs uniform on bounds; pass the bounds the "
            f"sample was drawn with (see sample_uniform)."
        )


def as_positive_vector(
    where: str, name: str, v: object, d: int | None, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A finite ``(d,)`` tensor of positive values (standard deviations)."""
    t = as_vector(where, name, v, d, dtype, device)
    if not bool((t > 0).all()):
        raise ValueError(f"{where}: expected {name} > 0 in every entry, got {t.tolist()}.")
    return t


def as_vector(
    where: str, name: str, v: object, d: int | None, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """A finite ``(d,)`` tensor (``d`` free when ``None``)."""
    try:
        t = torch.as_tensor(v, dtype=dtype, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"{where}: expected {name} as a 1-D tensor or sequence of numbers, got "
            f"{type(v).__name__}."
        ) from None
    if t.ndim != 1 or t.shape[0] == 0 or (d is not None and t.shape[0] != d):
        want = "(d,) with d >= 1" if d is None else f"({d},)"
        raise ValueError(f"{where}: expected {name} of shape {want}, got {tuple(t.shape)}.")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: expected finite {name}, got {t.tolist()}.")
    return t


def check_sample_count(where: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{where}: expected n to be a positive int (samples), got {n!r}.")
    return n


def check_input_distribution(where: str, bounds: object, std: object) -> None:
    if bounds is not None and std is not None:
        raise ValueError(
            f"{where}: expected at most one of bounds (uniform inputs) and std (normal inputs), "
            f"got both. The Sobol-index bound depends on the input distribution; give the one "
            f"the sample was drawn from."
        )


def check_seed(where: str, seed: object, generator: object) -> None:
    if seed is not None and generator is not None:
        raise ValueError(
            f"{where}: expected seed or generator, got both. Seed the generator yourself "
            f"(generator.manual_seed(seed)) or pass only seed."
        )
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{where}: expected seed to be an int, got {type(seed).__name__}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: expected generator to be a torch.Generator, got {type(generator).__name__}."
        )


def check_generator_device(where: str, generator: torch.Generator, device: torch.device) -> None:
    if generator.device.type != device.type:
        raise ValueError(
            f"{where}: expected a generator on the sampling device {device}, got one on "
            f"{generator.device}. Create it with torch.Generator(device={str(device)!r})."
        )


def check_choice(where: str, name: str, value: object, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(
            f"{where}: expected {name} to be one of {_fmt_options(options)}, got {value!r}."
        )
    return str(value)


def missing_optional_error(where: str, package: str, extra: str) -> NoReturn:
    raise ImportError(
        f"{where}: expected the optional package {package} to be installed, got none. Install "
        f"it with `pip install {package}` (or `pip install jacbatch[{extra}]`)."
    )


def no_total_index_bound_error(where: str) -> NoReturn:
    raise ValueError(
        f"{where}: expected a result with total-index bounds for measure='bound', got one "
        f"computed without an input distribution. Pass bounds= (uniform inputs) or std= (normal "
        f"inputs) to dgsm, or plot measure='nu' or 'mean_abs'."
    )


def check_output_indices(where: str, indices: Sequence[int], n: int) -> None:
    bad = [k for k in indices if not -n <= k < n]
    if bad:
        raise ValueError(
            f"{where}: expected output indices in range [-{n}, {n}), got {bad}. The result has "
            f"{n} output element(s)."
        )
