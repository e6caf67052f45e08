"""jacbatch.integrations.salib: SALib's DGSM with exact derivatives.

References, none of them the code under test: SALib 1.6's own ``finite_diff.sample`` and
``dgsm.analyze`` (skipped without SALib), closed forms of the Ishigami function's DGSM derived
below (and checked by Gauss-Legendre quadrature), and hand-written numpy derivatives.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jacbatch.integrations import salib as js
from jacbatch.sensitivity import dgsm as jacbatch_dgsm

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Models: torch for one sample (what jacbatch differentiates), numpy for a batch (what SALib
# evaluates), and numpy gradients written out by hand.
# ---------------------------------------------------------------------------------------------

A_ISH, B_ISH = 7.0, 0.1
ISHIGAMI = {"num_vars": 3, "names": ["x1", "x2", "x3"], "bounds": [[-math.pi, math.pi]] * 3}


def ishigami(x):
    return torch.sin(x[0]) + A_ISH * torch.sin(x[1]) ** 2 + B_ISH * x[2] ** 4 * torch.sin(x[0])


def ishigami_np(X):
    return np.sin(X[:, 0]) + A_ISH * np.sin(X[:, 1]) ** 2 + B_ISH * X[:, 2] ** 4 * np.sin(X[:, 0])


def ishigami_grad_np(X):
    x1, x2, x3 = X.T
    return np.stack(
        [
            np.cos(x1) * (1 + B_ISH * x3**4),
            2 * A_ISH * np.sin(x2) * np.cos(x2),
            4 * B_ISH * x3**3 * np.sin(x1),
        ],
        axis=1,
    )


# NOTE [the Ishigami DGSM in closed form]
#     f = sin x1 + a sin² x2 + b x3⁴ sin x1 with x_i ~ U[-π, π] independent, so
#     ∂f/∂x1 = cos x1 (1 + b x3⁴), ∂f/∂x2 = a sin 2x2, ∂f/∂x3 = 4 b x3³ sin x1, and with
#     E[cos² x] = E[sin² x] = 1/2 and E[x^{2k}] = π^{2k} / (2k + 1):
#     ν1 = (1 + 2b π⁴/5 + b² π⁸/9) / 2,  ν2 = a² / 2,  ν3 = 16 b² (π⁶/7) / 2 = 8 b² π⁶ / 7,
#     and Var f = a²/8 + b π⁴/5 + b² π⁸/18 + 1/2 (Ishigami & Homma 1990). SALib's dgsm index is
#     ν_j (2π)² / (π² Var f) = 4 ν_j / Var f.
NU_ISH = np.array(
    [
        (1 + 2 * B_ISH * math.pi**4 / 5 + B_ISH**2 * math.pi**8 / 9) / 2,
        A_ISH**2 / 2,
        8 * B_ISH**2 * math.pi**6 / 7,
    ]
)
VAR_ISH = A_ISH**2 / 8 + B_ISH * math.pi**4 / 5 + B_ISH**2 * math.pi**8 / 18 + 0.5

BOREHOLE = {
    "num_vars": 8,
    "names": ["r_w", "r", "T_u", "H_u", "T_l", "H_l", "L", "K_w"],
    "bounds": [
        [0.05, 0.15],
        [100.0, 50_000.0],
        [63_070.0, 115_600.0],
        [990.0, 1_110.0],
        [63.1, 116.0],
        [700.0, 820.0],
        [1_120.0, 1_680.0],
        [9_855.0, 12_045.0],
    ],
}


def borehole(x):
    r_w, r, T_u, H_u, T_l, H_l, L, K_w = x.unbind()
    log_ratio = torch.log(r / r_w)
    return (2 * math.pi * T_u * (H_u - H_l)) / (
        log_ratio * (1 + 2 * L * T_u / (log_ratio * r_w**2 * K_w) + T_u / T_l)
    )


def borehole_np(X):
    r_w, r, T_u, H_u, T_l, H_l, L, K_w = X.T
    log_ratio = np.log(r / r_w)
    return (2 * math.pi * T_u * (H_u - H_l)) / (
        log_ratio * (1 + 2 * L * T_u / (log_ratio * r_w**2 * K_w) + T_u / T_l)
    )


@pytest.fixture(scope="module")
def salib():
    return pytest.importorskip("SALib")


def salib_fd(problem, func_np, N, delta, seed=1, num_resamples=100):
    from SALib.analyze import dgsm
    from SALib.sample import finite_diff

    X = finite_diff.sample(problem, N, delta=delta)
    return X, dgsm.analyze(problem, X, func_np(X), seed=seed, num_resamples=num_resamples)


# ---------------------------------------------------------------------------------------------
# The closed forms themselves
# ---------------------------------------------------------------------------------------------


def test_ishigami_closed_forms_by_quadrature():
    # 1-D Gauss-Legendre on [-π, π] (exact for these polynomial / trigonometric integrands to
    # rounding with 64 nodes); the expectations factor over independent inputs.
    t, w = np.polynomial.legendre.leggauss(64)
    x, w = math.pi * t, w / 2  # E[h(X)] = sum(w h(x)) for X ~ U[-π, π]

    def E(h):
        return float(np.sum(w * h(x)))

    nu1 = E(lambda s: np.cos(s) ** 2) * E(lambda s: (1 + B_ISH * s**4) ** 2)
    nu2 = E(lambda s: (A_ISH * np.sin(2 * s)) ** 2)
    nu3 = E(lambda s: (4 * B_ISH * s**3) ** 2) * E(lambda s: np.sin(s) ** 2)
    np.testing.assert_allclose([nu1, nu2, nu3], NU_ISH, rtol=1e-12)
    mean = E(np.sin) + A_ISH * E(lambda s: np.sin(s) ** 2) + B_ISH * E(lambda s: s**4) * E(np.sin)
    second = (
        E(lambda s: np.sin(s) ** 2) * E(lambda s: (1 + B_ISH * s**4) ** 2)
        + A_ISH**2 * E(lambda s: np.sin(s) ** 4)
        + 2 * A_ISH * E(lambda s: np.sin(s) ** 2) * E(lambda s: np.sin(s) * (1 + B_ISH * s**4))
    )
    np.testing.assert_allclose(second - mean**2, VAR_ISH, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Against SALib
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", [ISHIGAMI, BOREHOLE], ids=["ishigami", "borehole"])
def test_sample_is_salib_finite_diff_base_points(salib, problem):
    from SALib.sample import finite_diff

    N, D = 300, problem["num_vars"]
    X_fd = finite_diff.sample(problem, N)
    X = js.sample(problem, N)
    assert X.shape == (N, D) and X.dtype == torch.float64
    np.testing.assert_array_equal(X.numpy(), X_fd[:: D + 1])


def test_sample_maps_every_distribution_as_salib(salib):
    from SALib.sample import sobol_sequence
    from SALib.util import scale_samples

    problem = {
        "num_vars": 4,
        "names": ["u", "n", "ln", "tri"],
        "bounds": [[-1.0, 3.0], [2.0, 0.5], [0.1, 0.3], [1.0, 4.0, 0.25]],
        "dists": ["unif", "norm", "lognorm", "triang"],
    }
    N = 256
    U = sobol_sequence.sample(N + 1024, 4)[1024:]
    want = scale_samples(U, dict(problem))
    got = js.sample(problem, N).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [1, 12345])
def test_every_key_matches_salib_on_exact_differences(salib, seed):
    # SALib's estimator fed "finite differences" that are exact: the perturbed outputs are
    # f(x) + ∂f/∂x_j(x) · Δx_j with the hand-written gradient. Its vi, vi_std, dgsm and dgsm_conf
    # (same seed: the same bootstrap rows) must then be ours, to rounding.
    from SALib.analyze import dgsm
    from SALib.sample import finite_diff

    N, D = 512, 3
    X_fd = finite_diff.sample(ISHIGAMI, N)
    base = X_fd[:: D + 1]
    Y = np.empty(len(X_fd))
    Y[:: D + 1] = ishigami_np(base)
    grad = ishigami_grad_np(base)
    for j in range(D):
        step = X_fd[j + 1 :: D + 1, j] - base[:, j]
        Y[j + 1 :: D + 1] = Y[:: D + 1] + grad[:, j] * step
    want = dgsm.analyze(ISHIGAMI, X_fd, Y, seed=seed, num_resamples=50, conf_level=0.9)
    got = js.analyze(ISHIGAMI, ishigami, js.sample(ISHIGAMI, N), seed=seed, num_resamples=50,
                     conf_level=0.9)  # fmt: skip
    assert type(got) is type(want)
    assert list(got) == list(want)
    assert got["names"] == want["names"]
    for key in ("vi", "vi_std", "dgsm", "dgsm_conf"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, err_msg=key)
    assert list(got.to_df().columns) == ["vi", "vi_std", "dgsm", "dgsm_conf"]
    assert list(got.to_df().index) == ["x1", "x2", "x3"]


def test_ishigami_exact_values_match_the_closed_forms():
    N = 4096
    Si = js.analyze(ISHIGAMI, ishigami, N=N, seed=0)
    # Monte Carlo tolerance: 4 standard errors (the Sobol' points do far better).
    se = Si["vi_std"] / math.sqrt(N)
    assert np.all(np.abs(Si["vi"] - NU_ISH) <= 4 * se)
    np.testing.assert_allclose(Si["vi"], NU_ISH, rtol=1e-3)
    np.testing.assert_allclose(Si["dgsm"], 4 * NU_ISH / VAR_ISH, rtol=1e-2)


@pytest.mark.parametrize(
    ("problem", "func", "func_np"),
    [(ISHIGAMI, ishigami, ishigami_np), (BOREHOLE, borehole, borehole_np)],
    ids=["ishigami", "borehole"],
)
def test_salib_finite_differences_converge_to_the_exact_values(salib, problem, func, func_np):
    N = 256
    exact = js.analyze(problem, func, N=N, seed=1)
    errors = []
    for delta in (1e-2, 1e-3, 1e-4, 1e-5):
        _, fd = salib_fd(problem, func_np, N, delta)
        errors.append(float(np.max(np.abs(fd["vi"] - exact["vi"]) / exact["vi"])))
    # forward differences: error O(delta), down about tenfold per step until rounding
    assert all(b < a / 5 for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < 1e-3, errors
    assert errors[0] > 1e-4, errors  # SALib's default step is visibly biased


def test_dgsm_key_is_the_projects_total_index_bound():
    N = 512
    X = js.sample(BOREHOLE, N)
    Si = js.analyze(BOREHOLE, borehole, X, num_resamples=None)
    res = jacbatch_dgsm(borehole, X, bounds=BOREHOLE["bounds"])
    np.testing.assert_allclose(Si["vi"], res.nu.numpy(), rtol=1e-12)
    # SALib divides by the population variance (ddof=0), the project by the unbiased one
    assert res.total_index_bound is not None
    np.testing.assert_allclose(Si["dgsm"], res.total_index_bound.numpy() * N / (N - 1), rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# Distributions, options, errors
# ---------------------------------------------------------------------------------------------


def test_scaling_by_distribution():
    problem = {
        "num_vars": 4,
        "names": ["u", "n", "ln", "tri"],
        "bounds": [[-1.0, 3.0], [2.0, 0.5], [0.1, 0.3], [1.0, 4.0, 0.25]],
        "dists": ["unif", "norm", "lognorm", "triang"],
    }

    def f(x):  # linear: ∂f/∂x = (1, 2, 3, 4) everywhere
        return x[0] + 2 * x[1] + 3 * x[2] + 4 * x[3]

    X = js.sample(problem, 256)
    Si = js.analyze(problem, f, X, seed=3)
    np.testing.assert_allclose(Si["vi"], [1, 4, 9, 16], rtol=1e-12)
    np.testing.assert_allclose(Si["vi_std"], 0, atol=1e-12)
    var = float(f(X.T).var(unbiased=False))
    poincare = [16 / math.pi**2, 0.25, math.nan, 9 / math.pi**2]  # NOTE in the module
    np.testing.assert_allclose(Si["dgsm"], np.array([1, 4, 9, 16]) * poincare / var, rtol=1e-12)
    assert np.isnan(Si["dgsm"][2]) and np.isnan(Si["dgsm_conf"][2])
    assert np.all(Si["dgsm_conf"][[0, 1, 3]] == 0)


def test_normal_approximation_of_the_interval():
    N = 2048
    X = js.sample(ISHIGAMI, N)
    boot = js.analyze(ISHIGAMI, ishigami, X, seed=5, num_resamples=200)
    approx = js.analyze(ISHIGAMI, ishigami, X, num_resamples=None)
    np.testing.assert_allclose(approx["dgsm_conf"], 1.96 * approx["vi_std"] / math.sqrt(N),
                               rtol=1e-3)  # fmt: skip
    np.testing.assert_allclose(approx["dgsm_conf"], boot["dgsm_conf"], rtol=0.25)
    np.testing.assert_array_equal(approx["vi"], boot["vi"])


def test_seed_makes_the_bootstrap_reproducible():
    X = js.sample(ISHIGAMI, 128)
    a = js.analyze(ISHIGAMI, ishigami, X, seed=7)
    b = js.analyze(ISHIGAMI, ishigami, X, seed=7)
    np.testing.assert_array_equal(a["dgsm_conf"], b["dgsm_conf"])


def test_numpy_sample_and_print(capsys):
    pytest.importorskip("pandas")  # to_df()
    X = js.sample(ISHIGAMI, 64).numpy()
    Si = js.analyze(ISHIGAMI, ishigami, X, seed=1, print_to_console=True)
    assert Si["vi"].shape == (3,)
    assert "dgsm_conf" in capsys.readouterr().out


def test_fallback_result_dict_has_to_df():
    pd = pytest.importorskip("pandas")
    S = js._FallbackResultDict(vi=np.array([1.0, 2.0]), dgsm=np.array([0.5, 0.25]))
    S["names"] = ["a", "b"]
    df = S.to_df()
    assert isinstance(df, pd.DataFrame)
    assert list(df.index) == ["a", "b"] and list(df.columns) == ["vi", "dgsm"]


def test_scrambled_sample():
    a = js.sample(ISHIGAMI, 64, scramble=True, seed=3)
    b = js.sample(ISHIGAMI, 64, scramble=True, seed=3)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, js.sample(ISHIGAMI, 64))
    assert bool((a.abs() <= math.pi).all())


@pytest.mark.parametrize(
    ("problem", "error", "needle"),
    [
        ([1, 2], TypeError, "expected a SALib problem dict"),
        ({"num_vars": 2, "names": ["a", "b"]}, ValueError, "without 'bounds'"),
        ({"num_vars": 0, "names": [], "bounds": []}, ValueError, "positive int"),
        ({"num_vars": 2, "names": ["a"], "bounds": [[0, 1]] * 2}, ValueError, "2 entries"),
        ({"num_vars": 1, "names": ["a"], "bounds": [[1, 0]]}, ValueError, "valid bounds"),
        (
            {"num_vars": 1, "names": ["a"], "bounds": [[0, 1]], "dists": ["logunif"]},
            ValueError,
            "'logunif'",
        ),
        (
            {"num_vars": 1, "names": ["a"], "bounds": [[0, 1, 2, 3]], "dists": ["truncnorm"]},
            ValueError,
            "'unif'",
        ),
        (
            {"num_vars": 1, "names": ["a"], "bounds": [[3.0, 0.5]], "dists": ["triang"]},
            ValueError,
            "two-value form",
        ),
        (
            {"num_vars": 1, "names": ["a"], "bounds": [[0.0, -1.0]], "dists": ["norm"]},
            ValueError,
            "valid bounds",
        ),
    ],
)
def test_bad_problem(problem, error, needle):
    with pytest.raises(error, match=needle):
        js.sample(problem, 4)
    with pytest.raises(error, match=needle):
        js.analyze(problem, ishigami, N=4)


def test_bad_calls():
    X = js.sample(ISHIGAMI, 16)
    with pytest.raises(ValueError, match="expected a sample X or a number of points N"):
        js.analyze(ISHIGAMI, ishigami)
    with pytest.raises(ValueError, match="got both"):
        js.analyze(ISHIGAMI, ishigami, X, N=16)
    with pytest.raises(ValueError, match=r"X\[::4\]"):
        js.analyze(ISHIGAMI, ishigami, torch.zeros(16, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="support of its distribution"):
        js.analyze(ISHIGAMI, ishigami, X * 2)
    with pytest.raises(ValueError, match="one output per sample"):
        js.analyze(ISHIGAMI, lambda x: torch.stack([ishigami(x), x[0]]), X)
    with pytest.raises(ValueError, match="conf_level"):
        js.analyze(ISHIGAMI, ishigami, X, conf_level=1.5)
    with pytest.raises(ValueError, match="num_resamples"):
        js.analyze(ISHIGAMI, ishigami, X, num_resamples=1)
    with pytest.raises(ValueError, match="finite model outputs"):
        js.analyze(ISHIGAMI, lambda x: torch.log(x[0]), X)
    with pytest.raises(TypeError, match="argnums"):
        js.analyze(ISHIGAMI, ishigami, X, argnums=0)


# ---------------------------------------------------------------------------------------------
# The tutorial script
# ---------------------------------------------------------------------------------------------


def test_tutorial_script_writes_table_and_chart(salib, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = tmp_path / "dgsm.png"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "sensitivity.py"),
            "--n",
            "256",
            "--png",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SALib finite differences" in proc.stdout and "analytic" in proc.stdout
    assert out.stat().st_size > 5_000
    pixels = image.imread(str(out))
    assert float(np.var(pixels)) > 0
