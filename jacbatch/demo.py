"""``jacbatch demo``: the reference article's worked examples, then one batched Jacobian by
every route, with their agreement and timings."""

from __future__ import annotations

import functools
import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import affine, chain, jacobian, methods, testing, unvec, vec  # the public API
from ._table import format_table


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


@dataclass(frozen=True)
class Timings:
    """What :func:`interleaved_times` measured, per function name.

    Attributes:
        median_s: median seconds per call.
        ratio: median ratio to the first function's time in the same round.
        ratio_iqr: the interquartile range ``(q1, q3)`` of that ratio over rounds.
        rounds: how many rounds ran.
        settled: whether every ratio's interquartile range came within the requested spread
            (``False``: stopped by the time cap or the round limit, figures are rough).
    """

    median_s: dict[str, float]
    ratio: dict[str, float]
    ratio_iqr: dict[str, tuple[float, float]]
    rounds: int
    settled: bool


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int = 1,
    min_rounds: int = 3,
    max_rounds: int = 25,
    time_cap: float = 5.0,
    spread: float = 0.1,
    burst_s: float = 0.25,
    max_burst: int = 20,
    before: Callable[[], object] | None = None,
) -> Timings:
    """Median seconds of each function and its median ratio to the first one's, over
    interleaved rounds.

    NOTE [stable timings on a busy machine]
        Each function is called ``warmup`` times first (lazy initialization, tracing, the
        allocator's first pages). Then each round times every function in a short burst of
        calls (as many as fit in ``burst_s``, judged from its best time so far, at most
        ``max_burst``; one for slow functions) and keeps the burst's best: other processes only
        ever add time, so the best of a burst is the figure least disturbed by them. The order
        rotates every round, so a change of machine load hits all functions alike; a ratio is
        taken within a round (paired) before the median over rounds. After ``min_rounds``,
        rounds continue until every paired ratio's interquartile range is within ``spread`` of
        its median, ``max_rounds`` are done, or ``time_cap`` seconds have passed. ``before``
        runs untimed before every timed call (e.g. returning freed memory to the system, so
        that every call starts from the same allocator state instead of one its predecessor
        left).

    Returns:
        :class:`Timings` (``median_s``: the median over rounds of each round's best).
    """
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    rounds = 0
    settled = False
    best: dict[str, float] = {}
    while rounds < max_rounds:
        k = rounds % len(names)
        for name in names[k:] + names[:k]:
            reps = 1
            if name in best and burst_s > 0:
                reps = max(1, min(max_burst, int(burst_s / max(best[name], 1e-9))))
            burst = []
            for _ in range(reps):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fns[name]()
                burst.append(time.perf_counter() - t0)
            times[name].append(min(burst))
            best[name] = min(best.get(name, math.inf), times[name][-1])
        for name in names:
            ratios[name].append(times[name][-1] / max(times[names[0]][-1], 1e-12))
        rounds += 1
        if rounds < min_rounds:
            continue
        q = {n: _quartiles(r) for n, r in ratios.items()}
        settled = all(q3 - q1 <= spread * q2 for q1, q2, q3 in q.values())
        if settled or time.perf_counter() - start > time_cap:
            break
    quart = {n: _quartiles(r) for n, r in ratios.items()}
    return Timings(
        median_s={n: statistics.median(t) for n, t in times.items()},
        ratio={n: q[1] for n, q in quart.items()},
        ratio_iqr={n: (q[0], q[2]) for n, q in quart.items()},
        rounds=rounds,
        settled=settled,
    )


def _show(title: str, t: torch.Tensor) -> str:
    body = "\n".join(
        "    " + line for line in str(t.tolist()).replace("], [", "],\n [").splitlines()
    )
    return f"  {title}:\n{body}"


def article_examples() -> tuple[list[str], bool]:
    """The worked examples of the reference article. Returns the lines and whether all match."""
    A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    W = torch.tensor([[7.0, 8.0], [10.0, 11.0], [12.0, 13.0]])
    B = torch.tensor([13.0, 14.0])
    lines = ["Reference article: derivative of matrices (row-major vec)"]
    ok = True

    def expect(title: str, got: torch.Tensor, want: object) -> None:
        nonlocal ok
        match = torch.equal(got, torch.tensor(want, dtype=got.dtype))
        ok &= match
        lines.append(_show(title, got) + ("" if match else f"\n    MISMATCH, expected {want}"))

    grad = jacobian(lambda a: 2 * a.sum(), A, in_dims=None)
    expect("F(A) = 2 sum(A); dF/dA", grad, [[2.0] * 3] * 2)
    Z = affine(A, W, B)
    expect("Z = A @ W + B", Z, [[76.0, 83.0], [163.0, 179.0]])
    expect("S = sum(Z)", Z.sum(), 501.0)
    dZ_dW = jacobian(affine, A, W, B, argnums=1, in_dims=None, method="closed_form", vec="row")
    expect(
        "d vec(Z) / d vec(W) = A ⊗ I_2 (4 x 6)",
        dZ_dW,
        [[1, 0, 2, 0, 3, 0], [0, 1, 0, 2, 0, 3], [4, 0, 5, 0, 6, 0], [0, 4, 0, 5, 0, 6]],
    )
    dS_dZ = jacobian(lambda z: z.sum(), Z, in_dims=None)
    dS_dW = unvec(chain(vec(dS_dZ), dZ_dW), (3, 2))
    expect("dS/dW = dS/dZ · dZ/dW (chain rule)", dS_dW, [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]])
    return lines, ok


def _fresh_memory() -> None:
    """Return freed heap memory to the system: a route writing a 16 MiB result then pays the
    same fresh-page faults whichever route ran before it (a recycled block has none)."""
    from .benchmarks.runner import _malloc_trim

    gc.collect()
    _malloc_trim()


def route_table(
    batch: int = 64,
    size: int = 16,
    dtype: torch.dtype = torch.float32,
    repeats: int = 25,
    time_cap: float = 10.0,
) -> tuple[list[str], bool]:
    """One batched Jacobian of ``A @ W + B`` w.r.t. W by every route: agreement and time.

    Times are medians over at least 3 and at most ``repeats`` interleaved rounds, stopping when
    the ratios are stable or after ``time_cap`` seconds (see :func:`interleaved_times`); "vs
    closed form" is the median of paired ratios, with their interquartile range.
    """
    g = torch.Generator().manual_seed(0)
    A = torch.randn(batch, size, size, generator=g, dtype=dtype)
    W = torch.randn(size, size, generator=g, dtype=dtype)
    B = torch.randn(size, generator=g, dtype=dtype)

    def jac(method: str) -> torch.Tensor:
        J = jacobian(affine, A, W, B, argnums=1, in_dims=(0, None, None), method=method)
        assert isinstance(J, torch.Tensor)
        return J

    routes = ("closed_form", *(m for m in methods.names() if m != "closed_form"), "auto")
    Js = {m: jac(m) for m in routes}  # also the warm-up of the timings
    ref = Js["closed_form"]
    rtol, atol = testing.tolerance(dtype)
    n = ref.numel()
    tm = interleaved_times(
        {m: functools.partial(jac, m) for m in routes},
        warmup=0,
        before=_fresh_memory,
        min_rounds=min(3, repeats),
        max_rounds=repeats,
        time_cap=time_cap,
    )
    lines = [
        f"Batched Jacobian of A @ W + B w.r.t. W: B={batch}, m=p=q={size}, {dtype}, "
        f"result {tuple(ref.shape)} ({n * ref.element_size() / 2**20:.1f} MiB), "
        f"medians over {tm.rounds} interleaved rounds (each the best of a short burst)",
    ]
    ok = True
    rows = []
    for method in routes:
        J = Js[method]
        diff = float((J - ref).abs().max()) if n else 0.0
        agree = bool(torch.allclose(J, ref, rtol=rtol, atol=atol))
        ok &= agree
        rows.append(
            [
                method,
                f"{tm.median_s[method] * 1e3:.2f}",
                f"{tm.ratio[method]:.2g}x",
                "{:.2g}-{:.2g}x".format(*tm.ratio_iqr[method]),
                f"{diff:.1e}",
                "yes" if agree else "NO",
            ]
        )
    header = ["route", "time (ms)", "vs closed form", "(IQR)", "max |diff|", "agrees"]
    lines += format_table(header, rows, indent="  ")
    if not tm.settled:
        lines.append(
            f"  (timings did not settle within {time_cap:g} s: the ratios vary by more than 10 % "
            f"between rounds, the machine is busy; read them as rough)"
        )
    return lines, ok


def run() -> int:
    """Print the demo; return a process exit code (0 when everything agrees)."""
    torch.manual_seed(0)
    lines, ok1 = article_examples()
    print("\n".join(lines))
    print()
    lines, ok2 = route_table()
    print("\n".join(lines))
    print()
    print("All routes agree." if ok1 and ok2 else "MISMATCH: see above.")
    return 0 if ok1 and ok2 else 1
