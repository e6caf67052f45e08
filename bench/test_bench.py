"""pytest-benchmark suite over the cases and methods of :mod:`jacbatch.benchmarks.cases`.

    pytest bench/ --benchmark-only -o addopts=""            # full sizes, CPU
    JACBATCH_BENCH_QUICK=1 pytest bench/ --benchmark-only -o addopts=""
    JACBATCH_BENCH_DEVICE=cuda pytest bench/ --benchmark-only -o addopts=""

(``-o addopts=""`` drops the test configuration in pyproject.toml, which ignores bench/.)
Groups are cases, so each table compares every method on one case. ``jacbatch bench`` runs the
same cases and methods with one fresh process per case, peak memory and agreement checks, and
with ``--targets bench/targets.json`` the project's target ratios; use it for reported figures.
"""

from __future__ import annotations

import os

import pytest
import torch

from jacbatch import benchmarks as bm

QUICK = os.environ.get("JACBATCH_BENCH_QUICK") == "1"
DEVICE = torch.device(os.environ.get("JACBATCH_BENCH_DEVICE", "cpu"))
if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.skip("JACBATCH_BENCH_DEVICE=cuda but CUDA is not available", allow_module_level=True)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


@pytest.mark.parametrize("method", bm.METHODS, ids=lambda m: m.name.replace(" ", "_"))
@pytest.mark.parametrize("case", bm.select_cases(quick=QUICK), ids=lambda c: c.id)
def test_bench(benchmark, case, method):
    fn = method.build(case, case.inputs(DEVICE), DEVICE)
    if fn is None:
        pytest.skip(f"{method.name} does not apply to {case.id}")
    benchmark.group = case.id
    benchmark.extra_info["jacobian_bytes"] = case.jacobian_bytes()
    benchmark.extra_info["method_group"] = method.group

    def call() -> None:
        fn()
        _sync()

    if method.slow:  # per-sample Python loops: seconds per call at full size
        benchmark.pedantic(call, rounds=2, iterations=1, warmup_rounds=0)
    else:
        benchmark(call)
