"""DGSM on the Ishigami function: exact derivatives (jacbatch.sensitivity) against forward finite
differences (the scheme of SALib's ``finite_diff`` sampler and ``dgsm`` analyzer).

Run from the repository root::

    PYTHONPATH=$PWD python bench/sensitivity_bench.py [--n 1000000] [--repeat 5] [--threads 1]

Prints Markdown tables: median wall time of each estimate of ν_j = E[(∂f/∂x_j)²] over the same
``N`` samples (cases timed round-robin after a warm-up), its largest relative error against the
closed form, and its largest deviation from the exact-derivative estimate on the same sample (the
finite-difference error alone, also in units of the Monte Carlo standard error); then the time
of ``jacobian()`` alone over the sample for each autodiff route.
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
from jacbatch.sensitivity import DEFAULT_BATCH_SIZE, DGSMResult, dgsm, sample_uniform

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine, OpenMP threads waiting "
        "for busy cores make multi-threaded timings erratic)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    N, bs = args.n, args.batch_size
    X = sample_uniform(BOUNDS, N, seed=2024)
    exact = nu_exact()

    cases: dict[str, Callable[[], object]] = {}
    for method in ("auto", "jacrev", "jacfwd", "vjp"):
        cases[f"dgsm, method={method!r}"] = lambda m=method: dgsm(
            ishigami, X, bounds=BOUNDS, method=m, batch_size=bs
        )
    for delta in (1e-2, 1e-3):
        cases[f"forward FD, SALib step delta={delta:g}·x_j"] = lambda dl=delta: (
            nu_forward_difference(X, salib_step(dl), bs)
        )
    for h in (1e-6, 1e-8):
        cases[f"forward FD, step {h:g}·(b-a)"] = lambda hh=h: nu_forward_difference(
            X, absolute_step(hh), bs
        )
    # Raw jacobian() over the sample per route (no statistics), to check method="auto".
    for method in ("jacrev", "jacfwd", "vjp"):
        cases[f"jacobian() only, method={method!r}"] = lambda m=method: [
            jacobian(ishigami, X[s : s + bs], method=m) for s in range(0, N, bs)
        ]

    # Warm up, then time the cases round-robin so that load on the machine hits all alike.
    results = {name: fn() for name, fn in cases.items()}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    ref = results["dgsm, method='auto'"]
    assert isinstance(ref, DGSMResult)
    print(
        f"Ishigami (a={A:g}, b={B:g}), N = {N:,} samples, float64, batch_size = {bs}, "
        f"median of {args.repeat} (round-robin); {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"method='auto' chose route {ref.route}\n"
    )
    print(
        "| estimate of ν | time (s) | vs dgsm auto | max rel. error vs closed form "
        "| max rel. diff vs exact derivatives, same sample | same, in standard errors |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    t_ref = med["dgsm, method='auto'"]
    for name, out in results.items():
        if name.startswith("jacobian()"):
            continue
        nu = (out.nu if isinstance(out, DGSMResult) else out).double()  # type: ignore[union-attr]
        rel = float(((nu - exact).abs() / exact).max())
        diff = float(((nu - ref.nu) / ref.nu).abs().max())
        bias = float(((nu - ref.nu) / ref.nu_se).abs().max())
        print(
            f"| {name} | {med[name]:.3f} | {med[name] / t_ref:.2f}x | {rel:.2e} | {diff:.1e} "
            f"| {bias:.2f} |"
        )
    print(f"\nMonte Carlo standard error of ν, relative: {(ref.nu_se / ref.nu).tolist()}\n")
    print("| jacobian() over the sample, no statistics | time (s) |")
    print("|---|---:|")
    for name in cases:
        if name.startswith("jacobian()"):
            print(f"| {name} | {med[name]:.3f} |")


if __name__ == "__main__":
    main()
