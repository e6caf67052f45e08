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
    assert "interleaved rounds after warm-up" in out


def test_interleaved_times_rounds_and_paired_ratios():
    calls = []

    def make(name):
        return lambda: calls.append(name)

    fns = {"a": make("a"), "b": make("b"), "c": make("c")}
    medians, ratios, rounds = demo.interleaved_times(
        fns, warmup=1, min_rounds=4, max_rounds=4, time_cap=0.0
    )
    assert rounds == 4
    assert calls[:3] == ["a", "b", "c"]  # the warm-up
    # every round calls each once, the order rotating
    assert calls[3:6] == ["a", "b", "c"] and calls[6:9] == ["b", "c", "a"]
    assert calls[9:12] == ["c", "a", "b"] and calls[12:15] == ["a", "b", "c"]
    assert set(medians) == set(ratios) == set(fns)
    assert ratios["a"] == 1.0 and all(m > 0 for m in medians.values())


def test_interleaved_times_stops_at_the_cap_after_min_rounds():
    _, _, rounds = demo.interleaved_times(
        {"a": lambda: None}, min_rounds=2, max_rounds=100, time_cap=0.0
    )
    assert rounds == 2


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
