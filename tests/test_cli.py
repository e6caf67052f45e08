"""The command line: ``jacbatch demo`` shows the article's examples and agreeing routes."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jacbatch
from jacbatch import cli, demo


def test_demo_prints_the_article_values_and_agrees(capsys, monkeypatch):
    small = functools.partial(demo.route_table, batch=4, size=3, repeats=1)
    monkeypatch.setattr(demo, "route_table", small)
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    for text in (
        "[[76.0, 83.0],\n     [163.0, 179.0]]",
        "501.0",
        "[[1.0, 0.0, 2.0, 0.0, 3.0, 0.0],",
        "[[5.0, 5.0],\n     [7.0, 7.0],\n     [9.0, 9.0]]",
        "[[2.0, 2.0, 2.0],",
        "All routes agree.",
    ):
        assert text in out
    for method in (*jacbatch.methods.names(), "auto"):
        assert method in out
    assert "NO" not in out.split("agrees", 1)[1]
    assert "interleaved rounds (each the best of a short burst)" in out


def test_interleaved_times_rounds_and_paired_ratios():
    calls = []

    def make(name):
        return lambda: calls.append(name)

    fns = {"a": make("a"), "b": make("b"), "c": make("c")}
    tm = demo.interleaved_times(
        fns, warmup=1, min_rounds=4, max_rounds=4, time_cap=0.0, burst_s=0.0
    )
    assert tm.rounds == 4
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    # every round calls each once, the order rotating
    assert calls[3:6] == ["a", "b", "c"] and calls[6:9] == ["b", "c", "a"]
    assert calls[9:12] == ["c", "a", "b"] and calls[12:15] == ["a", "b", "c"]
    assert set(tm.median_s) == set(tm.ratio) == set(tm.ratio_iqr) == set(fns)
    assert tm.ratio["a"] == 1.0 and tm.ratio_iqr["a"] == (1.0, 1.0)
    assert all(m > 0 for m in tm.median_s.values())
    for name in fns:
        low, high = tm.ratio_iqr[name]
        assert low <= tm.ratio[name] <= high


def test_interleaved_times_bursts_fast_functions():
    calls = {"fast": 0}

    def fast():
        calls["fast"] += 1

    tm = demo.interleaved_times({"fast": fast}, warmup=0, min_rounds=2, max_rounds=2, max_burst=7)
    assert calls["fast"] == 1 + 7  # round 1: one call (no time known yet); round 2: a burst
    assert tm.rounds == 2


def test_interleaved_times_stops_once_settled():
    tm = demo.interleaved_times({"a": lambda: None}, min_rounds=2, max_rounds=100, time_cap=1e9)
    assert tm.rounds == 2 and tm.settled  # one function: its ratio to itself is exactly 1


@pytest.mark.parametrize(("time_cap", "rounds"), [(0.0, 3), (1e9, 7)])
def test_interleaved_times_unsettled_stops_at_the_cap_or_round_limit(monkeypatch, time_cap, rounds):
    # a fake clock: "a" takes 1 tick, "b" alternately 1 and 10, so b's ratio never settles
    clock = [0.0]
    flip = [False]

    def b():
        flip[0] = not flip[0]
        clock[0] += 10.0 if flip[0] else 1.0

    def a():
        clock[0] += 1.0

    monkeypatch.setattr(demo.time, "perf_counter", lambda: clock[0])
    tm = demo.interleaved_times(
        {"a": a, "b": b}, warmup=0, min_rounds=3, max_rounds=7, time_cap=time_cap, burst_s=0.0
    )
    assert tm.rounds == rounds and not tm.settled
    assert tm.ratio_iqr["b"][0] < tm.ratio["b"] or tm.ratio["b"] < tm.ratio_iqr["b"][1]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"jacbatch {cli.version()}"
    assert cli.version() in (jacbatch.__version__, importlib.metadata.version("jacbatch"))


def test_version_falls_back_to_the_module(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == jacbatch.__version__


def test_route_table_flags_disagreement(monkeypatch):
    real = demo.jacobian

    def broken(*args, method="auto", **kwargs):
        J = real(*args, method=method, **kwargs)
        return J + 1 if method == "vjp" else J

    monkeypatch.setattr(demo, "jacobian", broken)
    lines, ok = demo.route_table(batch=2, size=2, repeats=1)
    assert not ok
    assert any(line.strip().startswith("vjp") and line.endswith("NO") for line in lines)


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as exc:
        cli.main(["frobnicate"])
    assert exc.value.code == 2


def test_python_dash_m_runs():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    res = subprocess.run(
        [sys.executable, "-m", "jacbatch", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0
    assert "demo" in res.stdout
