"""The sparse benchmark at tiny sizes: every case runs, its pattern is exact, the sparse values
agree with the dense ones (and with asdex's where JAX and asdex are installed), and the colors
are within 10% of the independent greedy. No timing assertions.

    PYTHONPATH=$PWD python -m pytest bench/test_sparse_bench.py -o addopts=""
"""

from __future__ import annotations

import importlib.util

import pytest
import sparse_bench as sb

HAVE_ASDEX = importlib.util.find_spec("asdex") is not None


@pytest.mark.parametrize("case", sb.cases(tiny=True), ids=lambda c: c["name"])
def test_tiny_case(case: dict[str, object]) -> None:
    entry = sb.run_case(case, rounds=1, use_jax=HAVE_ASDEX)
    colors = entry["colors"]
    assert colors["column"] <= 1.1 * colors["independent_natural_column"]
    assert colors["row"] <= 1.1 * colors["independent_natural_row"]
    if case["dense"]:
        assert entry["pattern_exact"]
        assert entry["max_abs_diff_vs_dense"] < 1e-4  # float32: reverse vs forward rounding
    if HAVE_ASDEX:
        assert entry["asdex"]["pattern_equals_ours"]
        assert entry["asdex"]["max_abs_diff_vs_ours"] < 1e-5
    assert set(entry["times_s"]) >= {"jacbatch sparse"}
