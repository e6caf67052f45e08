"""The benchmark runner in its smallest configuration: JSON schema, and every method's Jacobian
agreeing with the closed form. No timing assertions (speed is shown in bench/, never tested)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from jacbatch import benchmarks as bm
from jacbatch.benchmarks import runner

#: The project's own performance targets (kept in bench/, outside the installed package).
PROJECT_TARGETS = Path(__file__).resolve().parents[1] / "bench" / "targets.json"
TARGETS = [
    {"numerator": "closed_form", "denominator": "alloc+fill", "op": "<=", "limit": 1.1,
     "limits": {"affine-wide": 1e9}, "kinds": ["affine"]},
    {"numerator": "auto", "denominator": "fastest route", "op": "<=", "limit": 1e9},
    {"name": "peak over output", "numerator": "peak(vjp)", "denominator": "output", "op": ">=",
     "limit": 0.0, "cases": ["sum-medium"]},
]  # fmt: skip

RESULT_KEYS = {
    "method",
    "group",
    "status",
    "median_s",
    "iqr_s",
    "min_s",
    "times_s",
    "peak_bytes",
    "peak_over_output",
    "max_abs_diff",
    "agrees",
    "ratio_to_closed_form",
    "ratio_to_write_bound",
    "ratio_to_alloc_fill",
    "error",
}


@pytest.fixture(scope="module")
def report():
    cases = bm.select_cases(["affine-wide", "sum-medium"], ["float64"], quick=True)
    return bm.run(
        cases, "cpu", quick=True, isolate=False, progress=False, echo=None, targets=TARGETS
    )


def test_report_schema(report):
    assert report["schema"] == bm.SCHEMA
    env = report["environment"]
    for key in ("torch", "jax", "python", "cpu", "cpu_count", "torch_threads", "gpu", "device"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert report["config"]["cases"] == ["affine-wide/float64", "sum-medium/float64"]
    json.dumps(report)  # serializable as is
    for rec in report["cases"]:
        assert rec["jacobian_bytes"] == math.prod(rec["jacobian_shape"]) * 8
        assert [r["method"] for r in rec["results"]] == list(bm.METHOD_NAMES)
        for r in rec["results"]:
            assert set(r) == RESULT_KEYS
            if r["status"] == "ok":
                assert len(r["times_s"]) >= 1 and all(t > 0 for t in r["times_s"])
                assert r["median_s"] == statistics.median(r["times_s"])
                assert r["ratio_to_write_bound"] is not None


def test_bandwidth_fields(report):
    rec = report["cases"][0]
    by = {r["method"]: r for r in rec["results"]}
    bw = rec["bandwidth"]
    nbytes = rec["jacobian_bytes"]
    assert bw["closed_form_write_GBps"] == nbytes / by["closed_form"]["median_s"] / 1e9
    assert bw["copy_GBps"] == 2 * nbytes / by["copy existing"]["median_s"] / 1e9
    assert math.isclose(
        bw["closed_form_fraction_of_copy"],
        bw["closed_form_write_GBps"] / bw["copy_GBps"],
        rel_tol=1e-12,
    )
    assert report["cases"][1]["bandwidth"]["closed_form_write_GBps"] > 0  # a traced closed form


def test_every_method_agrees_with_the_closed_form(report):
    affine_rec = report["cases"][0]
    assert affine_rec["reference_method"] == "closed_form"
    ok = [r for r in affine_rec["results"] if r["status"] == "ok" and r["group"] != "reference"]
    names = {r["method"] for r in ok}
    assert {"closed_form", "closed_form(out=)", "jacrev", "jacfwd", "vjp", "auto"} <= names
    assert {"torch.func vmap(jacrev)", "autograd.functional loop", "one-hot vjp loop"} <= names
    for r in ok:
        assert r["agrees"] is True, r
        assert r["max_abs_diff"] <= 1e-12


def test_non_affine_case_has_a_traced_closed_form(report):
    # (A @ W + B).sum(): the op rules compose its closed form from the traced torch code.
    rec = report["cases"][1]
    by = {r["method"]: r for r in rec["results"]}
    assert by["closed_form"]["status"] == "ok"
    assert rec["reference_method"] == "closed_form"
    assert all(
        r["agrees"] for r in rec["results"] if r["status"] == "ok" and r["group"] != "reference"
    )


def test_route_that_does_not_apply_is_reported_not_failed(monkeypatch):
    def unsupported(case, args, device):
        def call():
            raise NotImplementedError("no closed form for this function")

        return call

    methods = (bm.Method("closed_form", "jacbatch", unsupported), *bm.METHODS[2:4])
    monkeypatch.setattr(runner, "METHODS", methods)
    case = bm.select_cases(["tanh-medium"], ["float64"], quick=True)[0]
    rec = bm.run_case(case, "cpu", quick=True)
    by = {r["method"]: r for r in rec["results"]}
    assert by["closed_form"]["status"] == "n/a"
    assert "no closed form" in by["closed_form"]["error"]
    assert rec["reference_method"] == "jacrev"
    assert by[bm.METHODS[3].name]["agrees"] is True


def test_jax_baselines_skip_cleanly_when_absent(report):
    by = {r["method"]: r for r in report["cases"][0]["results"]}
    for name in ("jax closed form", "jax jit(vmap(jacrev))", "jax jit(vmap(jacfwd))"):
        assert by[name]["status"] == ("ok" if bm.jax_available() else "n/a")


def test_targets_are_evaluated(report):
    rows = report["targets"]
    assert [(r["target"], r["case"]) for r in rows] == [
        ("closed_form / alloc+fill", "affine-wide/float64"),
        ("auto / fastest route", "affine-wide/float64"),
        ("auto / fastest route", "sum-medium/float64"),
        ("peak over output", "sum-medium/float64"),
    ]
    by = {r["method"]: r for r in report["cases"][0]["results"]}
    first = rows[0]
    assert first["value"] == by["closed_form"]["median_s"] / by["alloc+fill"]["median_s"]
    assert first["limit"] == 1e9 and first["op"] == "<=" and first["met"] is True
    fastest = min(by[n]["median_s"] for n in bm.ROUTES)
    assert rows[1]["value"] == by["auto"]["median_s"] / fastest
    for r in rows:
        assert isinstance(r["met"], bool) and r["value"] >= 0
    assert "auto / fastest route" in bm.format_targets(rows)


def test_no_targets_no_rows():
    case = bm.select_cases(["affine-small"], ["float32"], quick=True)[0]
    rep = bm.run([case], methods=["closed_form"], quick=True, isolate=False, echo=None)
    assert rep["targets"] == []


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"numerator": "auto", "denominator": "vjp", "op": "<", "limit": 1}, "expected op"),
        ({"numerator": "auto", "op": "<=", "limit": 1}, "missing 'denominator'"),
        ({"numerator": "auto", "denominator": "vjp", "op": "<=", "limit": 1, "x": 0}, "unknown"),
        ("auto <= 1", "expected a target object"),
    ],
)
def test_bad_target_is_rejected(bad, needle):
    with pytest.raises(ValueError, match=needle):
        bm.parse_targets([bad])


def test_project_targets_file_parses():
    if not PROJECT_TARGETS.exists():
        pytest.skip("not a source checkout")
    targets = bm.load_targets(PROJECT_TARGETS)
    quantities = {"output", "fastest route", *bm.METHOD_NAMES}
    quantities |= {f"peak({n})" for n in bm.METHOD_NAMES}
    for t in targets:
        assert {t.numerator, t.denominator} <= quantities, t
        assert set(t.cases or ()) | set(t.limits) <= set(bm.CASE_NAMES), t
        assert set(t.kinds or ()) <= set(bm.FUNCTIONS), t


def test_table_lists_every_method(report):
    text = bm.format_case(report["cases"][0])
    for name in bm.METHOD_NAMES:
        assert name in text


def test_closed_form_ratio_is_one(report):
    by = {r["method"]: r for r in report["cases"][0]["results"]}
    assert by["closed_form"]["ratio_to_closed_form"] == 1.0


def test_case_table_matches_issue():
    full = {c.id: c for c in bm.CASES}
    assert (full["affine-small/float32"].B, full["affine-small/float32"].q) == (1024, 8)
    assert full["affine-large/float64"].jacobian_shape == (8, 64, 64, 64, 64)
    assert full["affine-wide/float32"].jacobian_shape == (16, 16, 16, 128, 16)
    assert full["sum-medium/float32"].jacobian_shape == (64, 32, 32)
    assert [c.id for c in bm.QUICK_CASES] == [c.id for c in bm.CASES]


def test_select_cases():
    got = bm.select_cases(["affine-small"], ["float64"])
    assert [c.id for c in got] == ["affine-small/float64"]
    assert len(bm.select_cases()) == len(bm.CASES)


def test_isolated_case_runs_in_a_fresh_process():
    case = bm.select_cases(["affine-small"], ["float32"], quick=True)[0]
    rep = bm.run(
        [case], methods=["closed_form", "fill existing"], quick=True, progress=False, echo=None
    )
    rec = rep["cases"][0]
    assert rep["config"]["isolate"] is True
    assert [r["status"] for r in rec["results"]] == ["ok", "ok"]


def test_plot_writes_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    bm.plot(report["cases"], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_case_reports_cuda_memory():
    case = bm.select_cases(["affine-small"], ["float32"], quick=True)[0]
    rec = bm.run_case(case, "cuda", ["closed_form", "fill existing"], quick=True)
    by = {r["method"]: r for r in rec["results"]}
    assert by["closed_form"]["agrees"] is True
    assert by["closed_form"]["peak_bytes"] >= rec["jacobian_bytes"]
