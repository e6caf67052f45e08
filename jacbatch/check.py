"""Every route against every other (and a finite difference): :func:`check`, :class:`CheckReport`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _state
from ._table import format_table
from .methods import batched_args, by_method
from .methods import names as route_names
from .plan import normalize, probe_call, protection_of


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check`.

    Attributes:
        ok: whether every pair of routes agrees within the per-dtype tolerance (and every route
            agrees with the finite difference within its looser tolerance).
        routes: the routes that ran, ``"finite_difference"`` last when computed.
        max_diff: ``{(route_a, route_b): max |J_a - J_b|}`` over all argnums, for every pair.
        failures: the pairs that disagree.
        dtype: the dtype of the call.
        errors: ``{route: message}`` for routes that raised (they count as not agreeing).
        finite_difference_dtype: the dtype the finite difference ran in (``None``: none ran).
    """

    ok: bool
    routes: tuple[str, ...]
    max_diff: dict[tuple[str, str], float]
    failures: tuple[tuple[str, str], ...]
    dtype: torch.dtype
    errors: dict[str, str] = field(default_factory=dict)
    finite_difference_dtype: torch.dtype | None = None

    def __str__(self) -> str:
        fd = self.finite_difference_dtype
        where = "" if fd is None else f", finite difference in {fd}"
        lines = [f"jacbatch.check ({self.dtype}{where}): " + ("OK" if self.ok else "MISMATCH")]
        rows = []
        for a in self.routes:
            cells: list[str] = [a]
            for b in self.routes:
                if a == b:
                    cells.append("-")
                else:
                    d = self.max_diff.get((a, b), self.max_diff.get((b, a), float("nan")))
                    bad = (a, b) in self.failures or (b, a) in self.failures
                    cells.append(f"{d:.2e}" + ("*" if bad else " "))
            rows.append(cells)
        lines += format_table(["", *self.routes], rows)
        if self.failures:
            lines.append("* outside tolerance")
        lines.extend(f"{r} failed: {msg}" for r, msg in self.errors.items())
        return "\n".join(lines)


def check(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    finite_difference: bool = True,
    randomness: str = "error",
) -> CheckReport:
    """Run every applicable route (and a central finite difference) and compare them pairwise.

    Works on every call :func:`jacobian` accepts: closures and modules whose weights are in a
    different dtype than a float64 difference would need, shared arguments, tuple argnums.
    Routes that do not apply are left out: the closed form without rules, and jacrev/jacfwd for
    a ``func`` that writes into tensors it closes over (torch.func refuses that).

    Args:
        func, args, argnums, in_dims, randomness: as in :func:`jacobian`. For a random ``func``
            every route (and the difference) starts from the same generator state, so they
            differentiate the same realization.
        finite_difference: also compare with a central finite difference (costs two batched
            forward passes per input element), in float64 when ``func`` runs in float64 on
            float64 arguments, else in the call's dtype (see NOTE [Finite differences in the
            call's dtype] in :mod:`jacbatch.testing`).

    Returns:
        A :class:`CheckReport`; ``report.ok`` says whether all routes agree, ``str(report)`` is a
        table of pairwise max absolute differences.

    Example:
        >>> A, W, B = torch.randn(4, 2, 3), torch.randn(3, 2), torch.randn(2)
        >>> check(jacbatch.affine, A, W, B, argnums=1, in_dims=(0, None, None)).ok
        True
    """
    from . import testing
    from .api import jacobian

    where = "check"
    call = normalize(where, func, args, argnums, in_dims, randomness)
    probe = probe_call(call)
    protection = protection_of(call, probe)
    # Not applicable (each route's own ``applies``): a closed form without rules for every
    # op; torch.func for a state-writing func (it refuses writes into captured tensors).
    probed_call = dataclasses.replace(call, probe=probe)
    routes = [r for r in route_names() if (ap := by_method(r).applies) is None or ap(probed_call)]
    # Random functions: every route and the difference start from one generator state.
    rng = _state.rng_state(call.device) if probe.random else None
    jacs: dict[str, list[torch.Tensor]] = {}
    errors: dict[str, str] = {}
    for r in routes:
        if rng is not None:
            _state.set_rng_state(call.device, rng)
        try:
            res = jacobian(
                func,
                *args,
                argnums=call.argnums,
                in_dims=call.in_dims,
                method=r,
                vec="row",
                randomness=call.randomness,
            )
        except (RuntimeError, NotImplementedError) as err:  # e.g. no forward-mode formula
            errors[r] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            continue
        jacs[r] = [J.detach().to(torch.float64).reshape(-1, *J.shape[-2:]) for J in res]
    fd_dtype: torch.dtype | None = None
    if finite_difference:
        bargs, flags, B = batched_args(call)
        with _state.protect(call.func, protection, call.device) as f:
            fds, fd_dtype = [], call.dtype
            for a in call.argnums:
                xs = list(bargs)
                fl = list(flags)
                if not fl[a]:
                    xs[a], fl[a] = xs[a].unsqueeze(0).expand(B, *xs[a].shape), True
                J, fd_dtype = testing.finite_difference(
                    f, xs, fl, a, randomness=call.randomness, rng=rng
                )
                fds.append(J.detach().to(torch.float64))
        jacs["finite_difference"] = fds
    names = tuple(jacs)
    rtol, atol = testing.tolerance(call.dtype)
    frtol, fatol = testing.finite_difference_tolerance(fd_dtype or torch.float64)
    max_diff: dict[tuple[str, str], float] = {}
    failures = []
    for i, ra in enumerate(names):
        for rb in names[i + 1 :]:
            worst, bad = 0.0, False
            for Ja, Jb in zip(jacs[ra], jacs[rb], strict=True):
                if Ja.numel() == 0:
                    continue
                diff = (Ja - Jb).abs()
                worst = max(worst, float(diff.max()))
                if "finite_difference" in (ra, rb):
                    scale = max(1.0, float(Jb.abs().max()))
                    r_, t_ = max(rtol, frtol), max(atol, fatol * scale)
                else:
                    r_, t_ = rtol, atol
                bad |= bool((diff > t_ + r_ * Jb.abs()).any())
            max_diff[(ra, rb)] = worst
            if bad:
                failures.append((ra, rb))
    return CheckReport(
        not failures and not errors,
        names,
        max_diff,
        tuple(failures),
        call.dtype,
        errors,
        fd_dtype,
    )


__all__ = ["CheckReport", "check"]
