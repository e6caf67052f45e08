"""Benchmarks of traced closed forms (``method="auto"`` on plain torch code).

Run: ``PYTHONPATH=$PWD python -m pytest bench/test_bench_tracing.py --benchmark-only``
(add ``--benchmark-json=out.json`` and ``python bench/test_bench_tracing.py out.json`` prints the
ratios the issue asks for). Groups:

* ``tanh_affine``: ``lambda A, W, B: torch.tanh(A @ W + B)`` w.r.t. ``W`` at B=64, m=p=q=32,
  float32: ``auto`` vs ``vmap(jacrev)`` and an allocate-and-fill of the output's size (the write
  bound: every entry of the ``(64, 1024, 1024)`` result has to be written once).
* ``no_rules``: a function with an op that has no rule (``cumsum``): ``auto`` vs the autodiff
  routes it chooses between.
* ``overhead``: at a medium size (B=32, m=p=q=16), what tracing adds to a cached second call
  (the trace-cache and analysis lookup) and all of planning (``explain``: validation, output
  probe, lookup), each vs the whole ``jacobian`` call.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest
import torch
from torch.func import jacfwd, jacrev, vmap

import jacbatch


def tanh_affine(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.tanh(A @ W + B)


def no_rules(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(X @ W, 0).tanh()


def _args(b: int, m: int, p: int, q: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, m, p, generator=g),
        torch.randn(p, q, generator=g),
        torch.randn(q, generator=g),
    )


@pytest.fixture(autouse=True)
def _threads() -> Any:
    """``JACBATCH_BENCH_THREADS=n`` pins torch's intra-op threads (on a shared 2-core machine,
    2 threads make every small op wait for a busy core; 1 thread gives stable ratios)."""
    n = os.environ.get("JACBATCH_BENCH_THREADS")
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    yield
    torch.set_num_threads(old)


BIG = (64, 32, 32, 32)
MEDIUM = (32, 16, 16, 16)


@pytest.mark.benchmark(group="tanh_affine")
def test_tanh_affine_auto(benchmark: Any) -> None:
    A, W, B = _args(*BIG)
    J = benchmark(
        lambda: jacbatch.jacobian(tanh_affine, A, W, B, argnums=1, in_dims=(0, None, None))
    )
    assert J.shape == (64, 32, 32, 32, 32)


@pytest.mark.benchmark(group="tanh_affine")
def test_tanh_affine_vmap_jacrev(benchmark: Any) -> None:
    A, W, B = _args(*BIG)
    f = vmap(jacrev(tanh_affine, argnums=1), in_dims=(0, None, None))
    benchmark(lambda: f(A, W, B))


@pytest.mark.benchmark(group="tanh_affine")
def test_tanh_affine_write_bound(benchmark: Any) -> None:
    b, m, p, q = BIG
    benchmark(lambda: torch.empty(b, m, q, p, q).fill_(1.0))


@pytest.mark.benchmark(group="no_rules")
def test_no_rules_auto(benchmark: Any) -> None:
    X, W, _ = _args(*MEDIUM)
    benchmark(lambda: jacbatch.jacobian(no_rules, X, W, argnums=1, in_dims=(0, None)))


@pytest.mark.benchmark(group="no_rules")
def test_no_rules_jacbatch_jacrev(benchmark: Any) -> None:
    X, W, _ = _args(*MEDIUM)
    benchmark(
        lambda: jacbatch.jacobian(no_rules, X, W, argnums=1, in_dims=(0, None), method="jacrev")
    )


@pytest.mark.benchmark(group="no_rules")
def test_no_rules_vmap_jacrev(benchmark: Any) -> None:
    X, W, _ = _args(*MEDIUM)
    f = vmap(jacrev(no_rules, argnums=1), in_dims=(0, None))
    benchmark(lambda: f(X, W))


@pytest.mark.benchmark(group="no_rules")
def test_no_rules_vmap_jacfwd(benchmark: Any) -> None:
    X, W, _ = _args(*MEDIUM)
    f = vmap(jacfwd(no_rules, argnums=1), in_dims=(0, None))
    benchmark(lambda: f(X, W))


@pytest.mark.benchmark(group="overhead")
def test_overhead_jacobian(benchmark: Any) -> None:
    A, W, B = _args(*MEDIUM)
    benchmark(lambda: jacbatch.jacobian(tanh_affine, A, W, B, argnums=1, in_dims=(0, None, None)))


@pytest.mark.benchmark(group="overhead")
def test_overhead_trace_lookup(benchmark: Any) -> None:
    from jacbatch._validation import normalize_call
    from jacbatch.api import _traced_analyses

    A, W, B = _args(*MEDIUM)
    call = normalize_call("jacobian", tanh_affine, (A, W, B), 1, (0, None, None))
    jacbatch.jacobian(tanh_affine, A, W, B, argnums=1, in_dims=(0, None, None))  # trace once
    analyses = benchmark(lambda: _traced_analyses(call, (1,)))
    assert analyses[1].ok


@pytest.mark.benchmark(group="overhead")
def test_overhead_planning(benchmark: Any) -> None:
    A, W, B = _args(*MEDIUM)
    jacbatch.jacobian(tanh_affine, A, W, B, argnums=1, in_dims=(0, None, None))  # trace once
    plan = benchmark(
        lambda: jacbatch.explain(tanh_affine, A, W, B, argnums=1, in_dims=(0, None, None))
    )
    assert plan.steps[0].route == "traced"


def _ratios(path: str) -> None:  # pragma: no cover - a report helper
    with open(path) as fh:
        data = json.load(fh)
    med = {b["name"]: b["stats"]["median"] for b in data["benchmarks"]}
    for name, t in sorted(med.items()):
        print(f"{name:40s} {t * 1e3:10.2f} ms")
    auto = med["test_tanh_affine_auto"]
    print(f"jacrev / auto        {med['test_tanh_affine_vmap_jacrev'] / auto:.2f}x (target >= 3)")
    print(f"auto / write bound   {auto / med['test_tanh_affine_write_bound']:.2f}x (target <= 1.3)")
    best = min(med["test_no_rules_vmap_jacrev"], med["test_no_rules_vmap_jacfwd"])
    print(f"no rules auto / best {med['test_no_rules_auto'] / best:.2f}x (target <= 1.1)")
    same = med["test_no_rules_auto"] / med["test_no_rules_jacbatch_jacrev"]
    print(f"no rules auto / jacbatch jacrev route {same:.2f}x (the cost of trying to trace)")
    over = med["test_overhead_trace_lookup"] / med["test_overhead_jacobian"]
    print(f"cached trace lookup / jacobian {over * 100:.2f}% (target < 5%)")
    over = med["test_overhead_planning"] / med["test_overhead_jacobian"]
    print(f"all planning (explain) / jacobian {over * 100:.1f}%")


if __name__ == "__main__":  # pragma: no cover
    _ratios(sys.argv[1])
