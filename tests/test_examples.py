"""The documentation's tutorials (scripts in examples/) run, draw their picture and keep their word.

Each tutorial script has ``main(size, out_dir)``; here it runs at ``size="small"`` in a temporary
directory. The test checks that the PNG the docs page shows was written (a real PNG, not tiny,
not one flat colour) and the tutorial's numerical claim: its Jacobians agree in float64 with an
independent computation (torch.func, the hand-written derivative, or the robot library's
analytic Jacobian) and the method it demonstrates reaches its goal.

The examples directory is not a package; each script is loaded from its file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXACT = 1e-12  # float64 agreement of two exact derivative computations


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_picture(path: Path) -> None:
    """A readable PNG of some size whose pixels are not all one colour."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    assert path.is_file(), f"{path} was not written"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """The scripts seed the global RNG; leave it, and the default dtype, as found."""
    state, dtype = torch.get_rng_state(), torch.get_default_dtype()
    yield
    torch.set_rng_state(state)
    torch.set_default_dtype(dtype)


def test_pinn(tmp_path: Path) -> None:
    res = load("pinn").main("small", tmp_path)
    assert_picture(tmp_path / "pinn.png")
    assert res["jacobian_error"] < EXACT
    assert res["hessian_error"] < EXACT
    assert res["residual_after"] < res["residual_before"]  # training through jacbatch's derivatives


def test_ntk(tmp_path: Path) -> None:
    res = load("ntk").main("small", tmp_path)
    assert_picture(tmp_path / "ntk.png")
    assert res["jacobian_error"] < EXACT
    assert res["ntk_symmetry"] < EXACT
    assert res["ntk_min_eigenvalue"] > -1e-10  # a Gram matrix: positive semi-definite
    if importlib.util.find_spec("laplace") is not None:
        assert res["laplace_jacobian_error"] < EXACT
        assert res["laplace_coverage"] > 0.8


def test_kinematics(tmp_path: Path) -> None:
    pytest.importorskip("pytorch_kinematics")
    res = load("kinematics").main("small", tmp_path)
    assert_picture(tmp_path / "kinematics.png")
    assert res["jacobian_error"] < EXACT
    assert 0 < res["min_manipulability"] < res["max_manipulability"]


def test_levenberg_marquardt(tmp_path: Path) -> None:
    lm = load("levenberg_marquardt")
    res = lm.main("small", tmp_path)
    assert_picture(tmp_path / "levenberg_marquardt.png")
    assert res["jacobian_error"] < EXACT
    assert res["rms_residual_max"] < 2 * lm.NOISE  # every curve fitted down to the noise
    assert res["median_relative_error"] < 0.02


def test_sparse(tmp_path: Path) -> None:
    sp = load("sparse")
    res = sp.main("small", tmp_path)
    assert_picture(tmp_path / "sparse.png")
    assert res["jacobian_error"] < EXACT  # sparse CSR == dense vmap(jacfwd), float64
    N = sp.SIZES["small"]["n"]  # 2 N² unknowns, 6 nonzeros per row (stencil + other species)
    assert res["nnz"] == 6 * 2 * N * N
    assert res["colors"] < 2 * N * N  # fewer passes than the dense route's
    assert res["newton_residual"] < 1e-10  # the implicit-Euler step solved with the sparse J


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo not available",
)
def test_distributed(tmp_path: Path) -> None:
    """The script as the docs run it: torchrun with two CPU processes."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(EXAMPLES.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        str(EXAMPLES / "distributed_jacobians.py"), "--size", "small", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_picture(tmp_path / "distributed.png")
    report = json.loads((tmp_path / "distributed.json").read_text())
    assert report["world_size"] == 2
    assert report["shards"] == [[0, 12], [12, 24]]
    assert report["gathered_equals_single"] and report["file_equals_single"]
    assert report["sum_of_squares_over_ranks"] == pytest.approx(
        report["sum_of_squares_single"], rel=1e-12
    )
