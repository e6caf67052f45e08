"""Structured Jacobians against the dense Jacobian: jvp / vjp through ``A ⊗ I_q`` versus
through the materialized ``(B, m·q, p·q)`` matrix, and versus building it.

Run as a pytest-benchmark suite::

    PYTHONPATH=$PWD python -m pytest bench/test_bench_structured.py --benchmark-only

or print the side-by-side table of medians (the figures in bench/README.md)::

    PYTHONPATH=$PWD python bench/test_bench_structured.py [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from jacbatch import affine, jacobian, structured_jacobian
from jacbatch.memory import format_bytes

SMALL = dict(B=8, n=64)  # the dense Jacobian is 512 MiB in float32
HUGE = dict(B=8, n=512)  # the dense Jacobian would be 2 TiB


def make_case(B: int, n: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``affine(A, W, b)`` with ``m = p = q = n``, a batch of ``B``, a tangent and a cotangent."""
    g = torch.Generator().manual_seed(seed)
    A, W = (torch.randn(B, n, n, generator=g, dtype=dtype) for _ in range(2))
    b = torch.randn(B, n, generator=g, dtype=dtype)
    t = torch.randn(B, n, n, generator=g, dtype=dtype)  # like W
    c = torch.randn(B, n, n, generator=g, dtype=dtype)  # like Z
    return A, W, b, t, c


def dense_jvp(J: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``J t`` through a dense ``(B, o, i)`` Jacobian.

    One ``torch.mv`` per sample: on CPU it is several times faster than ``bmm`` with a single
    column, so the dense baseline is the fastest one found, not a strawman.
    """
    tf = t.reshape(t.shape[0], -1)
    return torch.stack([torch.mv(J[k], tf[k]) for k in range(J.shape[0])]).reshape(t.shape)


def dense_vjp(J: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``cᵀ J`` through a dense ``(B, o, i)`` Jacobian (``bmm`` of one row: the fastest found)."""
    return torch.bmm(c.reshape(c.shape[0], 1, -1), J).reshape(c.shape)


def build_dense(A, W, b) -> torch.Tensor:
    return jacobian(affine, A, W, b, argnums=1, method="closed_form", vec="row")


# ---------------------------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    A, W, b, t, c = make_case(**SMALL)
    op = structured_jacobian(affine, A, W, b, argnums=1)
    return op, A, W, b, t, c


@pytest.fixture(scope="module")
def small_dense(small):
    _, A, W, b, _, _ = small
    return build_dense(A, W, b)


@pytest.mark.benchmark(group="structured-64")
def test_structured_jvp(benchmark, small):
    op, *_, t, _ = small
    benchmark(op.jvp, t)


@pytest.mark.benchmark(group="structured-64")
def test_structured_vjp(benchmark, small):
    op, *_, c = small
    benchmark(op.vjp, c)


@pytest.mark.benchmark(group="structured-64")
def test_dense_jvp(benchmark, small, small_dense):
    *_, t, _ = small
    benchmark(dense_jvp, small_dense, t)


@pytest.mark.benchmark(group="structured-64")
def test_dense_vjp(benchmark, small, small_dense):
    *_, c = small
    benchmark(dense_vjp, small_dense, c)


@pytest.mark.benchmark(group="structured-64")
def test_dense_build(benchmark, small):
    _, A, W, b, _, _ = small
    benchmark.pedantic(build_dense, args=(A, W, b), rounds=5, warmup_rounds=1)


@pytest.fixture(scope="module")
def small_traced():
    """``tanh(A @ W + b)`` w.r.t. ``W`` traced: a diagonal times ``A ⊗ I`` (TermJacobian)."""
    A, W, b, t, c = make_case(**SMALL)
    op = structured_jacobian(lambda A, W, b: torch.tanh(A @ W + b), A, W, b, argnums=1)
    return op, t, c


@pytest.mark.benchmark(group="structured-traced-64")
def test_traced_structured_jvp(benchmark, small_traced):
    op, t, _ = small_traced
    benchmark(op.jvp, t)


@pytest.mark.benchmark(group="structured-traced-64")
def test_traced_structured_vjp(benchmark, small_traced):
    op, _, c = small_traced
    benchmark(op.vjp, c)


@pytest.mark.benchmark(group="structured-512")
def test_structured_jvp_unmaterializable(benchmark):
    A, W, b, t, _ = make_case(**HUGE)
    op = structured_jacobian(affine, A, W, b, argnums=1)
    benchmark(op.jvp, t)


@pytest.mark.benchmark(group="structured-512")
def test_structured_vjp_unmaterializable(benchmark):
    A, W, b, _, c = make_case(**HUGE)
    op = structured_jacobian(affine, A, W, b, argnums=1)
    benchmark(op.vjp, c)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _dense_timings(op, A, W, b, t, c) -> tuple[float, float, float]:
    """Build the dense Jacobian, time products through it, check them against the operator."""
    s_build = median_seconds(lambda: build_dense(A, W, b), 7, warmup=1)
    J = build_dense(A, W, b)
    d_jvp = median_seconds(lambda: dense_jvp(J, t), 15)
    d_vjp = median_seconds(lambda: dense_vjp(J, c), 15)
    torch.testing.assert_close(op.jvp(t), dense_jvp(J, t), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(op.vjp(c), dense_vjp(J, c), rtol=1e-4, atol=1e-3)
    return s_build, d_jvp, d_vjp


def report() -> str:
    """Medians measured side by side in one run; returns the markdown table."""
    rows = []
    A, W, b, t, c = make_case(**SMALL)
    op = structured_jacobian(affine, A, W, b, argnums=1)
    s_jvp = median_seconds(lambda: op.jvp(t), 200)
    s_vjp = median_seconds(lambda: op.vjp(c), 200)
    s_build, d_jvp, d_vjp = _dense_timings(op, A, W, b, t, c)  # frees the 512 MiB on return
    factor_bytes = A.numel() * A.element_size()
    n64 = "B=8, m=p=q=64"
    rows.append((n64, "structured jvp", _fmt_time(s_jvp), "1x"))
    rows.append((n64, "dense jvp (J prebuilt)", _fmt_time(d_jvp), f"{d_jvp / s_jvp:.0f}x"))
    rows.append((n64, "structured vjp", _fmt_time(s_vjp), "1x"))
    rows.append((n64, "dense vjp (J prebuilt)", _fmt_time(d_vjp), f"{d_vjp / s_vjp:.0f}x"))
    rows.append(
        (
            n64,
            "build dense J (closed form)",
            _fmt_time(s_build),
            f"{s_build / s_jvp:.0f}x jvp, {s_build / s_vjp:.0f}x vjp",
        )
    )
    mem = (
        f"nbytes {format_bytes(op.nbytes)} = {op.nbytes / factor_bytes:.2f}x the factor A "
        f"({format_bytes(factor_bytes)}); dense {format_bytes(op.dense_nbytes)}"
    )

    A, W, b, t, c = make_case(**HUGE)
    big = structured_jacobian(affine, A, W, b, argnums=1)
    h_jvp = median_seconds(lambda: big.jvp(t), 15)
    h_vjp = median_seconds(lambda: big.vjp(c), 15)
    n512 = "B=8, m=p=q=512"
    rows.append((n512, "structured jvp", _fmt_time(h_jvp), "dense: cannot be built"))
    rows.append((n512, "structured vjp", _fmt_time(h_vjp), "dense: cannot be built"))
    big_mem = f"nbytes {format_bytes(big.nbytes)}; dense would be {format_bytes(big.dense_nbytes)}"

    lines = [
        f"float32, CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"medians of repeated runs, side by side in one process.",
        "",
        "| case | what | median | structured is faster by |",
        "|---|---|---|---|",
        *(f"| {a} | {b_} | {c_} | {d} |" for a, b_, c_, d in rows),
        "",
        f"- {n64}: {mem}",
        f"- {n512}: {big_mem}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(report())


if __name__ == "__main__":
    main()
