"""The command line: ``jacbatch demo`` shows the article's examples and agreeing routes."""

from __future__ import annotations

import functools
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
