"""The ``jacbatch`` command line: argument errors and a tiny ``bench`` run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from jacbatch import benchmarks as bm
from jacbatch import cli
from jacbatch.cli import main


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return exc.value.code, capsys.readouterr().err


def test_no_command(capsys):
    code, err = run_main(capsys)
    assert code == 2
    assert "COMMAND" in err


def test_unknown_command(capsys):
    code, err = run_main(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--cases", "affine-huge"], "invalid choice: 'affine-huge'"),
        (["--dtype", "float16"], "invalid choice: 'float16'"),
        (["--device", "tpu"], "invalid choice: 'tpu'"),
        (["--methods", "magic"], "invalid choice: 'magic'"),
        (["--json"], "expected one argument"),
        (["--targets", "/nonexistent/targets.json"], "--targets: expected a readable JSON"),
    ],
)
def test_bench_argument_errors(capsys, argv, needle):
    code, err = run_main(capsys, "bench", *argv)
    assert code == 2
    assert needle in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the error without CUDA")
def test_bench_cuda_without_device(capsys):
    code, err = run_main(capsys, "bench", "--device", "cuda", "--quick")
    assert code == 2
    assert "--device: expected a CUDA device, got none" in err


def test_bench_quick_writes_json(tmp_path, capsys):
    path = tmp_path / "out.json"
    code = main(
        [
            "bench",
            "--quick",
            "--in-process",
            "--no-progress",
            "--cases",
            "affine-small",
            "--dtype",
            "float32",
            "--methods",
            "closed_form",
            "vjp",
            "fill existing",
            "alloc+fill",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "affine-small/float32" in out and "closed_form" in out
    report = json.loads(path.read_text())
    assert report["config"]["cases"] == ["affine-small/float32"]
    methods = [r["method"] for r in report["cases"][0]["results"]]
    assert methods == ["closed_form", "vjp", "alloc+fill", "fill existing"]
    assert all(r["agrees"] for r in report["cases"][0]["results"] if r["group"] == "jacbatch")


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "jacbatch", "bench", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "--quick" in proc.stdout and "--plot" in proc.stdout


def write_targets(tmp_path):
    targets = tmp_path / "targets.json"
    target = {"numerator": "vjp", "denominator": "closed_form", "op": ">=", "limit": 0}
    targets.write_text(json.dumps({"targets": [target]}))
    return targets


def test_bench_targets_file(tmp_path, capsys):
    # full sizes (targets apply there); sum-medium's Jacobian is small, two routes only
    path = tmp_path / "out.json"
    argv = ["bench", "--in-process", "--no-progress", "--cases", "sum-medium"]
    argv += ["--dtype", "float64", "--methods", "closed_form", "vjp"]
    assert main([*argv, "--targets", str(write_targets(tmp_path)), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "targets:" in out and "vjp / closed_form" in out and "met" in out
    assert "--quick" not in out
    rows = json.loads(path.read_text())["targets"]
    assert [(r["target"], r["case"], r["met"]) for r in rows] == [
        ("vjp / closed_form", "sum-medium/float64", True)
    ]


def test_bench_quick_does_not_evaluate_targets(tmp_path, capsys):
    path = tmp_path / "out.json"
    argv = ["bench", "--quick", "--in-process", "--no-progress", "--cases", "sum-medium"]
    argv += ["--dtype", "float64", "--methods", "closed_form", "vjp"]
    assert main([*argv, "--targets", str(write_targets(tmp_path)), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(cli.QUICK_NOTE)
    assert cli.QUICK_TARGETS_NOTE in out
    assert "MISSED" not in out and " met" not in out
    assert json.loads(path.read_text())["targets"] == []


def test_bench_explains_methods_that_do_not_apply(capsys):
    argv = ["bench", "--quick", "--in-process", "--no-progress", "--cases", "tanh-medium"]
    argv += ["--dtype", "float32", "--methods", "closed_form", "jax closed form"]
    argv += ["jax jit(vmap(jacrev))"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    if bm.jax_available():
        assert "n/a: jax closed form: the hand-written JAX closed form covers A @ W + B only" in out
    else:
        assert f"n/a: jax closed form, jax jit(vmap(jacrev)): {bm.JAX_MISSING}" in out
    assert "pip install" in bm.JAX_MISSING


def test_bench_progress_lines_off_a_terminal(capsys):
    # stderr captured: not a terminal, so the default progress is one plain line per case
    argv = ["bench", "--quick", "--in-process", "--cases", "affine-small", "sum-medium"]
    argv += ["--dtype", "float64", "--methods", "closed_form"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "jacbatch bench: case 1/2: affine-small/float64" in err
    assert "jacbatch bench: case 2/2: sum-medium/float64" in err


def test_bench_no_progress(capsys):
    argv = ["bench", "--quick", "--in-process", "--no-progress", "--cases", "affine-small"]
    argv += ["--dtype", "float64", "--methods", "closed_form"]
    assert main(argv) == 0
    assert "jacbatch bench" not in capsys.readouterr().err


def test_bench_bad_targets_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"numerator": "vjp", "op": "<="}]')
    code, err = run_main(capsys, "bench", "--quick", "--targets", str(bad))
    assert code == 2
    assert "missing 'denominator'" in err


def test_bench_without_jax_says_how_to_install_it(monkeypatch, capsys):
    from jacbatch.benchmarks import cases

    monkeypatch.setattr(cases, "jax_available", lambda: False)
    argv = ["bench", "--quick", "--in-process", "--no-progress", "--cases", "affine-small"]
    argv += ["--dtype", "float32", "--methods", "closed_form", "jax closed form"]
    argv += ["jax jit(vmap(jacrev))", "jax jit(vmap(jacfwd))"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    names = "jax closed form, jax jit(vmap(jacrev)), jax jit(vmap(jacfwd))"
    assert f"n/a: {names}: JAX not installed (pip install 'jacbatch[jax]')" in out
