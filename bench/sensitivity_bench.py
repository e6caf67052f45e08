"""DGSM on the Ishigami function: exact derivatives (jacbatch.sensitivity) against forward finite
differences (the scheme of SALib's ``finite_diff`` sampler and ``dgsm`` analyzer).

Run from the repository root::

    PYTHONPATH=$PWD python bench/sensitivity_bench.py [--n 1000000] [--repeat 5]

Prints a Markdown table: median wall time of each estimate of ν_j = E[(∂f/∂x_j)²] over the same
``N`` samples, its largest relative error against the closed form, and its largest deviation from
the exact-derivative estimate on the same sample (the finite-difference bias, in units of the
Monte Carlo standard error).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable

import torch

from jacbatch import jacobian
from jacbatch.sensitivity import DEFAULT_BATCH_SIZE, dgsm, sample_uniform

A, B = 7.0, 0.1
PI = math.pi
BOUNDS = [[-PI, PI]] * 3


def ishigami(x: torch.Tensor) -> torch.Tensor:
    """Per sample: ``x (3,) -> scalar``."""
    return torch.sin(x[0]) + A * torch.sin(x[1]) ** 2 + B * x[2] ** 4 * torch.sin(x[0])


def ishigami_rows(X: torch.Tensor) -> torch.Tensor:
    """The same model written for a whole sample ``X (N, 3) -> (N,)`` (what a FD code evaluates)."""
    return torch.sin(X[:, 0]) + A * torch.sin(X[:, 1]) ** 2 + B * X[:, 2] ** 4 * torch.sin(X[:, 0])


def nu_exact() -> torch.Tensor:
    return torch.tensor(
        [0.5 * (1 + 2 * B * PI**4 / 5 + B**2 * PI**8 / 9), A**2 / 2, 8 * B**2 * PI**6 / 7],
        dtype=torch.float64,
    )


def nu_forward_difference(
    X: torch.Tensor, step: Callable[[torch.Tensor, int], torch.Tensor], batch_size: int
) -> torch.Tensor:
    """ν by forward differences: d + 1 model evaluations per sample, batched like dgsm.

    ``step(x, j)`` gives the perturbed column ``j`` (already clipped to the bounds).
    """
    N, d = X.shape
    total = torch.zeros(d, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, N, batch_size):
            x = X[s : s + batch_size]
            y0 = ishigami_rows(x)
            for j in range(d):
                xp = x.clone()
                xp[:, j] = step(x, j)
                g = (ishigami_rows(xp) - y0) / (xp[:, j] - x[:, j])
                total[j] += (g * g).sum()
    return total / N


def salib_step(delta: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """SALib's finite_diff: x_j + delta * x_j, clipped to [a_j, b_j] (a relative step)."""
    return lambda x, j: torch.clamp(x[:, j] + delta * x[:, j], -PI, PI)


def absolute_step(h: float) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """x_j + h (h relative to the range b_j - a_j), stepping back at the upper bound."""
    hh = h * 2 * PI

    def step(x: torch.Tensor, j: int) -> torch.Tensor:
        up = x[:, j] + hh
        return torch.where(up > PI, x[:, j] - hh, up)

    return step


def median_time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    fn()  # warm-up (vmap tracing, allocator)
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args()
    N, bs = args.n, args.batch_size
    X = sample_uniform(BOUNDS, N, seed=2024)
    exact = nu_exact()

    rows: list[tuple[str, float, torch.Tensor]] = []
    ref = None
    for method in ("auto", "jacrev", "jacfwd", "vjp"):
        t, res = median_time(
            lambda m=method: dgsm(ishigami, X, bounds=BOUNDS, method=m, batch_size=bs),
            args.repeat,
        )
        label = f"dgsm, method={method!r}" + (f" (route {res.route})" if method == "auto" else "")
        rows.append((label, t, res.nu))
        if ref is None:
            ref = res
    assert ref is not None
    for delta in (1e-2, 1e-3):
        t, nu = median_time(
            lambda dl=delta: nu_forward_difference(X, salib_step(dl), bs), args.repeat
        )
        rows.append((f"forward FD, SALib step delta={delta:g}·x_j", t, nu))
    for h in (1e-6, 1e-8):
        t, nu = median_time(
            lambda hh=h: nu_forward_difference(X, absolute_step(hh), bs), args.repeat
        )
        rows.append((f"forward FD, step {h:g}·(b-a)", t, nu))

    # Raw jacobian() over the whole sample per route (no statistics), to check method="auto".
    jac_rows = []
    for method in ("jacrev", "jacfwd", "vjp"):
        t, _ = median_time(
            lambda m=method: [jacobian(ishigami, X[s : s + bs], method=m) for s in range(0, N, bs)],
            args.repeat,
        )
        jac_rows.append((method, t))

    print(
        f"Ishigami (a={A:g}, b={B:g}), N = {N:,} samples, float64, batch_size = {bs}, "
        f"median of {args.repeat}; {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| estimate of ν | time (s) | max rel. error vs closed form | max |ν − ν_exact-deriv| / SE |"
    )
    print("|---|---:|---:|---:|")
    for label, t, nu in rows:
        nu = nu.double()
        rel = float(((nu - exact).abs() / exact).max())
        bias = float(((nu - ref.nu) / ref.nu_se).abs().max())
        print(f"| {label} | {t:.3f} | {rel:.2e} | {bias:.2f} |")
    print(f"\nMonte Carlo standard error of ν (relative): {(ref.nu_se / ref.nu).tolist()}\n")
    print("| jacobian() over the sample, route | time (s) |")
    print("|---|---:|")
    for method, t in jac_rows:
        print(f"| {method} | {t:.3f} |")


if __name__ == "__main__":
    main()
