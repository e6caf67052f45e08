"""The ``jacbatch`` command line: argument errors and a tiny ``bench`` run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

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


def test_bench_targets_file(tmp_path, capsys):
    targets = tmp_path / "targets.json"
    targets.write_text(
        json.dumps(
            {
                "targets": [
                    {"numerator": "vjp", "denominator": "closed_form", "op": ">=", "limit": 0}
                ]
            }
        )
    )
    path = tmp_path / "out.json"
    argv = ["bench", "--quick", "--in-process", "--no-progress", "--cases", "sum-medium"]
    argv += ["--dtype", "float64", "--methods", "closed_form", "vjp"]
    assert main([*argv, "--targets", str(targets), "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "targets:" in out and "vjp / closed_form" in out and "met" in out
    rows = json.loads(path.read_text())["targets"]
    assert [(r["target"], r["case"], r["met"]) for r in rows] == [
        ("vjp / closed_form", "sum-medium/float64", True)
    ]


def test_bench_bad_targets_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"numerator": "vjp", "op": "<="}]')
    code, err = run_main(capsys, "bench", "--quick", "--targets", str(bad))
    assert code == 2
    assert "missing 'denominator'" in err
