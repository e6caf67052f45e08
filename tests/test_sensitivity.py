"""jacbatch.sensitivity: DGSM against hand-derived Ishigami values, local sensitivities against
analytic derivatives, batching, sampling and bad input."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from jacbatch import api
from jacbatch.sensitivity import (
    DGSMResult,
    dgsm,
    local_sensitivity,
    sample_normal,
    sample_uniform,
)
from jacbatch.testing import tolerance
from tests.conftest import DEVICES, reference_jacobian

#: a deliberate subset: "auto" and the autodiff routes, which differentiate any function
#: (closed_form, which needs a rule for every op, is not asked for here)
AUTODIFF_ROUTES = ["auto", "jacrev", "jacfwd", "vjp"]

# ---------------------------------------------------------------------------------------------
# Ishigami: f(x) = sin x1 + a sin² x2 + b x3⁴ sin x1, x_j ~ U[-π, π] independent
# ---------------------------------------------------------------------------------------------

A, B = 7.0, 0.1
PI = math.pi
ISHIGAMI_BOUNDS = [[-PI, PI]] * 3


def ishigami(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x[0]) + A * torch.sin(x[1]) ** 2 + B * x[2] ** 4 * torch.sin(x[0])


def ishigami_exact() -> dict[str, list[float] | float]:
    """Closed forms, derived by hand from E[x^(2k)] = π^(2k) / (2k + 1) for U[-π, π].

    ∂f/∂x1 = cos x1 (1 + b x3⁴)      ν1 = E[cos² x1] E[(1 + b x3⁴)²] = ½ (1 + 2bπ⁴/5 + b²π⁸/9)
    ∂f/∂x2 = a sin 2x2                ν2 = a² E[sin² 2x2] = a²/2
    ∂f/∂x3 = 4b x3³ sin x1            ν3 = 16 b² E[x3⁶] E[sin² x1] = 8 b² π⁶ / 7
    E|∂f/∂x1| = E|cos x1| E[1 + b x3⁴] = (2/π)(1 + bπ⁴/5)
    E|∂f/∂x2| = a E|sin 2x2| = 2a/π
    E|∂f/∂x3| = 4b E|x3|³ E|sin x1| = 4b (π³/4)(2/π) = 2bπ²
    Variance decomposition: V1 = ½ (1 + bπ⁴/5)², V2 = a²/8, V3 = 0,
    V13 = b² π⁸ (1/18 − 1/50) = 8 b² π⁸ / 225, V = V1 + V2 + V13 = a²/8 + bπ⁴/5 + b²π⁸/18 + ½.
    Total indices: S_T1 = (V1 + V13)/V, S_T2 = V2/V, S_T3 = V13/V.
    """
    nu = [
        0.5 * (1 + 2 * B * PI**4 / 5 + B**2 * PI**8 / 9),
        A**2 / 2,
        8 * B**2 * PI**6 / 7,
    ]
    mean_abs = [(2 / PI) * (1 + B * PI**4 / 5), 2 * A / PI, 2 * B * PI**2]
    V1, V2, V13 = 0.5 * (1 + B * PI**4 / 5) ** 2, A**2 / 8, 8 * B**2 * PI**8 / 225
    V = A**2 / 8 + B * PI**4 / 5 + B**2 * PI**8 / 18 + 0.5
    assert math.isclose(V, V1 + V2 + V13, rel_tol=1e-14)  # the decomposition is consistent
    return {
        "nu": nu,
        "mean_abs": mean_abs,
        "V": V,
        "S_T": [(V1 + V13) / V, V2 / V, V13 / V],
    }


@pytest.fixture(scope="module")
def ishigami_study() -> tuple[torch.Tensor, DGSMResult]:
    X = sample_uniform(ISHIGAMI_BOUNDS, 100_000, seed=1234)
    return X, dgsm(ishigami, X, bounds=ISHIGAMI_BOUNDS, input_names=["x1", "x2", "x3"])


def test_ishigami_dgsm_matches_closed_form(ishigami_study):
    _, res = ishigami_study
    exact = ishigami_exact()
    nu_exact = torch.tensor(exact["nu"], dtype=torch.float64)
    ma_exact = torch.tensor(exact["mean_abs"], dtype=torch.float64)
    assert res.n_samples == 100_000
    assert res.nu.shape == res.nu_se.shape == res.mean_abs.shape == (3,)
    # Monte Carlo: within 4 standard errors, and the standard errors are small (0.2-1 %).
    assert ((res.nu - nu_exact).abs() <= 4 * res.nu_se).all(), (res.nu, nu_exact, res.nu_se)
    assert ((res.mean_abs - ma_exact).abs() <= 4 * res.mean_abs_se).all()
    assert (res.nu_se / nu_exact < 0.01).all() and (res.mean_abs_se / ma_exact < 0.01).all()


def test_ishigami_dgsm_statistics_equal_direct_sample_formulas(ishigami_study):
    X, res = ishigami_study
    # Analytic gradient per sample, written out here (independent of autodiff).
    x1, x2, x3 = X.unbind(1)
    G = torch.stack(
        [torch.cos(x1) * (1 + B * x3**4), A * torch.sin(2 * x2), 4 * B * x3**3 * torch.sin(x1)],
        dim=1,
    )
    N = X.shape[0]
    torch.testing.assert_close(res.nu, (G**2).mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.nu_se, (G**2).std(0) / math.sqrt(N), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.mean_abs, G.abs().mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.mean_abs_se, G.abs().std(0) / math.sqrt(N), rtol=1e-10, atol=0)
    y = torch.sin(x1) + A * torch.sin(x2) ** 2 + B * x3**4 * torch.sin(x1)
    torch.testing.assert_close(res.variance, y.var(), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.mean, y.mean(), rtol=1e-12, atol=1e-12)
    # The sample variance agrees with the closed form to its own standard error.
    m4 = ((y - y.mean()) ** 4).mean()
    se_var = math.sqrt((float(m4) - float(y.var()) ** 2) / N)
    assert abs(float(res.variance) - ishigami_exact()["V"]) <= 4 * se_var


def test_ishigami_total_index_bounds_hold(ishigami_study):
    _, res = ishigami_study
    exact = ishigami_exact()
    S_T = torch.tensor(exact["S_T"], dtype=torch.float64)
    assert res.total_index_bound is not None
    # (b - a)² ν / (π² V) = 4 ν / V for U[-π, π]
    torch.testing.assert_close(res.total_index_bound, 4 * res.nu / res.variance, rtol=1e-12, atol=0)
    assert (res.total_index_bound >= S_T).all(), (res.total_index_bound, S_T)
    # The same with the exact ν and V: the inequality itself, not just the estimate.
    exact_bound = 4 * torch.tensor(exact["nu"], dtype=torch.float64) / exact["V"]
    assert (exact_bound >= S_T).all()
    # and the estimate sits near the exact bound
    torch.testing.assert_close(res.total_index_bound, exact_bound, rtol=0.02, atol=0)


def test_linear_model_normal_inputs_bound_is_tight():
    # f = c·x with x_j ~ N(μ_j, σ_j²): ∂f/∂x_j = c_j, so ν_j = c_j² exactly with zero standard
    # error, S_T,j = c_j² σ_j² / V and the bound σ_j² ν_j / V is attained.
    c = torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)
    sigma = [0.5, 2.0, 1.0]
    X = sample_normal([1.0, -2.0, 0.0], sigma, 50_000, seed=7)
    res = dgsm(lambda x: (c * x).sum(), X, std=sigma)
    torch.testing.assert_close(res.nu, c**2, rtol=1e-12, atol=1e-12)
    assert (res.nu_se == 0).all()
    s2 = torch.tensor(sigma, dtype=torch.float64) ** 2
    V_exact = float((c**2 * s2).sum())
    assert res.total_index_bound is not None
    torch.testing.assert_close(res.total_index_bound, s2 * c**2 / res.variance, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.total_index_bound, s2 * c**2 / V_exact, rtol=0.03, atol=0)


def test_linear_model_uniform_inputs_bound_ratio():
    # f = c·x, x_j ~ U[a_j, b_j]: S_T,j = c_j² (b_j − a_j)²/12 / V, bound = c_j² (b_j − a_j)²/π² / V
    c = torch.tensor([2.0, 1.0], dtype=torch.float64)
    bounds = [[0.0, 1.0], [-3.0, 3.0]]
    X = sample_uniform(bounds, 20_000, seed=3)
    res = dgsm(lambda x: (c * x).sum(), X, bounds=bounds)
    w2 = torch.tensor([1.0, 36.0], dtype=torch.float64)
    S_T = c**2 * w2 / 12 / (c**2 * w2 / 12).sum()
    assert res.total_index_bound is not None
    torch.testing.assert_close(
        res.total_index_bound / S_T, torch.full((2,), 12 / PI**2).double(), rtol=0.03, atol=0
    )


# ---------------------------------------------------------------------------------------------
# Local sensitivity against analytic derivatives
# ---------------------------------------------------------------------------------------------


def model(x: torch.Tensor) -> torch.Tensor:
    """y = [x0² x1, exp(x2) sin x0, x0 x1 x2] for one point x (3,)."""
    return torch.stack([x[0] ** 2 * x[1], torch.exp(x[2]) * torch.sin(x[0]), x[0] * x[1] * x[2]])


def model_jacobian(x: torch.Tensor) -> torch.Tensor:
    """Hand-derived ∂y_i/∂x_j for a batch (B, 3) -> (B, 3, 3)."""
    x0, x1, x2 = x.unbind(-1)
    z = torch.zeros_like(x0)
    e = torch.exp(x2)
    return torch.stack(
        [
            torch.stack([2 * x0 * x1, x0**2, z], -1),
            torch.stack([e * torch.cos(x0), z, e * torch.sin(x0)], -1),
            torch.stack([x1 * x2, x0 * x2, x0 * x1], -1),
        ],
        -2,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", AUTODIFF_ROUTES)
def test_local_sensitivity_equals_analytic_derivatives(method, device):
    x = torch.randn(17, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(
        device
    )
    res = local_sensitivity(model, x, method=method, batch_size=5)
    J = model_jacobian(x)
    torch.testing.assert_close(res.jacobian, J, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(res.outputs, torch.stack([model(p) for p in x]), rtol=0, atol=0)
    x0, _, x2 = x.unbind(-1)
    # elasticities by hand: x0² x1 -> (2, 1, 0); exp(x2) sin x0 -> (x0 cot x0, 0, x2);
    # x0 x1 x2 -> (1, 1, 1)
    one, zero = torch.ones_like(x0), torch.zeros_like(x0)
    E = torch.stack(
        [
            torch.stack([2 * one, one, zero], -1),
            torch.stack([x0 * torch.cos(x0) / torch.sin(x0), zero, x2], -1),
            torch.stack([one, one, one], -1),
        ],
        -2,
    )
    torch.testing.assert_close(res.elasticity, E, rtol=1e-10, atol=1e-12)
    if method != "auto":
        assert res.route == method


def test_local_sensitivity_matrix_input_shapes_against_autograd_loop():
    # in_shape (2, 3), out_shape (2,): layout (B, *out_shape, *in_shape) as jacobian's.
    Wt = torch.randn(3, 2, dtype=torch.float64)

    def f(X: torch.Tensor) -> torch.Tensor:
        return torch.tanh(X @ Wt).sum(0)

    x = torch.randn(6, 2, 3, dtype=torch.float64)
    res = local_sensitivity(f, x, batch_size=4)
    ref = reference_jacobian(f, (x,))
    assert res.jacobian.shape == (6, 2, 2, 3) and res.elasticity.shape == (6, 2, 2, 3)
    torch.testing.assert_close(res.jacobian, ref, rtol=1e-12, atol=1e-12)
    y = torch.stack([f(p) for p in x])
    E_ref = ref * x[:, None] / y[:, :, None, None]
    torch.testing.assert_close(res.elasticity, E_ref, rtol=1e-12, atol=1e-12)


def test_local_sensitivity_zero_outputs():
    # y = x0 x1: y = 0 where x1 = 0; elasticity (1, 1) elsewhere.
    x = torch.tensor([[2.0, 3.0], [2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    res = local_sensitivity(lambda p: p[0] * p[1], x)
    torch.testing.assert_close(res.elasticity[0], torch.ones(2, dtype=torch.float64))
    assert torch.isnan(res.elasticity[1:]).all()
    torch.testing.assert_close(res.jacobian[1], torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert "NaN" in str(res)
    with pytest.raises(ValueError, match=r"nonzero model outputs.*2 point\(s\).*index 1"):
        local_sensitivity(lambda p: p[0] * p[1], x, zero_output="raise")


def test_local_batched_equals_per_point():
    x = torch.randn(11, 3, dtype=torch.float64)
    whole = local_sensitivity(model, x, batch_size=None)
    chunked = local_sensitivity(model, x, batch_size=4)
    for res in (chunked,):
        torch.testing.assert_close(res.jacobian, whole.jacobian, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.elasticity, whole.elasticity, rtol=1e-12, atol=1e-12)
    for b in range(11):
        one = local_sensitivity(model, x[b : b + 1])
        torch.testing.assert_close(one.jacobian[0], whole.jacobian[b], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(one.elasticity[0], whole.elasticity[b], rtol=1e-12, atol=1e-12)


def test_local_table_names():
    x = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    res = local_sensitivity(model, x, input_names=["m", "k", "c"], output_names=["a", "b", "e"])
    text = str(res)
    assert "point 0" in text and "m" in text and "e elast." in text
    assert f"{float(res.jacobian[0, 0, 0]):.4g}" in text


# ---------------------------------------------------------------------------------------------
# DGSM: batching, routes, vector outputs, reference loop
# ---------------------------------------------------------------------------------------------


def _reference_dgsm(func, X: torch.Tensor):
    """The reference Jacobian (tests/_reference.py) and plain sample statistics."""
    G = reference_jacobian(func, (X,)).reshape(X.shape[0], -1, X.shape[1])
    y = torch.stack([func(x).reshape(-1) for x in X])
    N = X.shape[0]
    return {
        "nu": (G**2).mean(0),
        "nu_se": (G**2).std(0) / math.sqrt(N),
        "mean_abs": G.abs().mean(0),
        "variance": y.var(0),
    }


@pytest.mark.parametrize("method", AUTODIFF_ROUTES)
def test_dgsm_vector_output_matches_reference_loop(method):
    X = sample_uniform([[0.5, 2.0]] * 3, 40, seed=5)
    ref = _reference_dgsm(model, X)
    res = dgsm(model, X, bounds=[[0.5, 2.0]] * 3, method=method, batch_size=16)
    assert res.nu.shape == (3, 3) and res.variance.shape == (3,)
    for key in ("nu", "nu_se", "mean_abs", "variance"):
        torch.testing.assert_close(getattr(res, key), ref[key], rtol=1e-11, atol=1e-12)
    assert res.total_index_bound is not None
    torch.testing.assert_close(
        res.total_index_bound,
        (1.5 / PI) ** 2 * ref["nu"] / ref["variance"][:, None],
        rtol=1e-11,
        atol=0,
    )


def test_dgsm_batched_equals_unbatched_and_passes_jacobian_options():
    X = sample_uniform(ISHIGAMI_BOUNDS, 400, seed=11)
    whole = dgsm(ishigami, X, batch_size=None)
    for kwargs in ({"batch_size": 7}, {"batch_size": 150, "chunk_size": 1}):
        part = dgsm(ishigami, X, **kwargs)
        for key in ("nu", "nu_se", "mean_abs", "mean_abs_se", "mean", "variance"):
            torch.testing.assert_close(
                getattr(part, key), getattr(whole, key), rtol=1e-12, atol=1e-13
            )


def test_dgsm_vmap_rejected_model_falls_back():
    # .item() makes vmap refuse; auto falls back to the vjp route and the numbers are the same.
    def piecewise(x: torch.Tensor) -> torch.Tensor:
        return x[0] ** 2 if x[1].item() > 0 else 3 * x[0] * x[1]

    X = sample_uniform([[-1.0, 1.0], [-1.0, 1.0]], 30, seed=2)
    ref = _reference_dgsm(piecewise, X)
    res = dgsm(piecewise, X)
    torch.testing.assert_close(res.nu, ref["nu"].reshape(2), rtol=1e-12, atol=1e-12)
    assert res.route == "vjp"


@pytest.mark.parametrize("device", DEVICES)
def test_dgsm_float32_close_to_float64(device):
    X = sample_uniform(ISHIGAMI_BOUNDS, 5000, seed=9, device=device)
    r64 = dgsm(ishigami, X, bounds=ISHIGAMI_BOUNDS)
    r32 = dgsm(ishigami, X.float(), bounds=ISHIGAMI_BOUNDS)
    assert r32.nu.dtype == torch.float32 and r32.nu.device == X.device
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(r32.nu, r64.nu.float(), rtol=10 * rtol, atol=atol)
    torch.testing.assert_close(r32.variance, r64.variance.float(), rtol=10 * rtol, atol=atol)


def test_dgsm_route_is_autodiff_or_closed_form():
    X = sample_uniform(ISHIGAMI_BOUNDS, 10, seed=0)
    assert dgsm(ishigami, X).route in (*api.ROUTES, "traced")  # plain torch code traces
    assert dgsm(ishigami, X, method="jacfwd").route == "jacfwd"


def test_dgsm_table_and_plot(tmp_path, ishigami_study):
    _, res = ishigami_study
    text = str(res)
    assert "N = 100000" in text and "x2" in text and "S_T bound" in text
    assert f"{float(res.nu[1]):.6g}" in text
    pytest.importorskip("matplotlib")
    path = tmp_path / "dgsm.png"
    fig = res.plot(str(path), measure="bound")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["x1", "x2", "x3"]
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx(res.total_index_bound.tolist())


def test_dgsm_plot_without_matplotlib(monkeypatch, ishigami_study):
    _, res = ishigami_study
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        ImportError, match=r"DGSMResult.plot: expected the optional package matplotlib"
    ):
        res.plot()


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_seeded_on_device(device):
    bounds = [[0.0, 1.0], [-5.0, -4.0]]
    X1 = sample_uniform(bounds, 2000, seed=42, device=device, dtype=torch.float32)
    X2 = sample_uniform(bounds, 2000, seed=42, device=device, dtype=torch.float32)
    assert X1.shape == (2000, 2) and X1.dtype == torch.float32 and X1.device.type == device
    assert torch.equal(X1, X2)
    assert (X1[:, 0] >= 0).all() and (X1[:, 0] <= 1).all()
    assert (X1[:, 1] >= -5).all() and (X1[:, 1] <= -4).all()
    g = torch.Generator(device=device).manual_seed(42)
    torch.testing.assert_close(sample_uniform(bounds, 2000, generator=g, dtype=torch.float32), X1)
    Z = sample_normal([1.0, -3.0], [2.0, 0.1], 20_000, seed=1, device=device)
    assert Z.device.type == device
    # sample moments within 5 standard errors
    assert abs(float(Z[:, 0].mean()) - 1.0) < 5 * 2.0 / math.sqrt(20_000)
    assert abs(float(Z[:, 1].std()) - 0.1) < 5 * 0.1 / math.sqrt(2 * 20_000)


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors, never a silent wrong number
# ---------------------------------------------------------------------------------------------


def test_non_finite_model_outputs_raise():
    X = sample_uniform([[-1.0, 1.0]], 100, seed=0)
    with pytest.raises(ValueError, match=r"dgsm: expected finite model outputs.*first at row"):
        dgsm(lambda x: torch.log(x[0]), X)  # log of negative numbers
    with pytest.raises(ValueError, match="local_sensitivity: expected finite model outputs"):
        local_sensitivity(lambda x: 1 / x[0], torch.tensor([[1.0], [0.0]]))


def test_non_finite_derivatives_raise():
    X = torch.tensor([[1.0], [0.0], [4.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"expected finite derivatives.*first at row 1"):
        dgsm(lambda x: torch.sqrt(x[0]), X)


def test_zero_variance_output_gives_nan_bound_not_a_number():
    X = sample_uniform([[0.0, 1.0], [0.0, 1.0]], 500, seed=0)

    def f(x):
        return torch.stack([x[0] + 2 * x[1], torch.ones_like(x[0])])

    res = dgsm(f, X, bounds=[[0.0, 1.0], [0.0, 1.0]])
    assert res.variance[1] == 0
    assert res.total_index_bound is not None
    assert torch.isnan(res.total_index_bound[1]).all()
    assert torch.isfinite(res.total_index_bound[0]).all()
    torch.testing.assert_close(res.nu[1], torch.zeros(2, dtype=torch.float64))
    assert "constant on the sample" in str(res) and "n/a" in str(res)


@pytest.mark.parametrize(
    "bounds, match",
    [
        ([[0.0, 1.0], [2.0, 2.0]], r"low < high.*input 1"),
        ([[1.0, 0.0], [0.0, 1.0]], r"low < high.*input 0"),
        ([[0.0, 1.0]], r"shape \(2, 2\)"),
        ([[0.0, math.inf], [0.0, 1.0]], "finite bounds"),
    ],
)
def test_bad_bounds_raise(bounds, match):
    X = torch.rand(10, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        dgsm(lambda x: x.sum(), X, bounds=bounds)
    if len(bounds) == 2:
        with pytest.raises(ValueError, match=match):
            sample_uniform(bounds, 10)


def test_sample_outside_bounds_raises():
    X = torch.tensor([[0.5, 0.5], [0.5, 1.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"outside it, the first at row 1"):
        dgsm(lambda x: x.sum(), X, bounds=[[0.0, 1.0], [0.0, 1.0]])


@pytest.mark.parametrize(
    "X, match",
    [
        (torch.rand(10, dtype=torch.float64), r"shape \(N, d\)"),
        (torch.rand(10, 2, 2, dtype=torch.float64), r"shape \(N, d\)"),
        (torch.rand(10, 0, dtype=torch.float64), r"shape \(N, d\)"),
        (torch.rand(1, 3, dtype=torch.float64), "at least 2 samples"),
        (torch.tensor([[0.0, 1.0], [math.nan, 0.0]]), "finite inputs.*row 1"),
    ],
)
def test_bad_sample_shape_raises(X, match):
    with pytest.raises(ValueError, match=match):
        dgsm(lambda x: x.sum(), X)


def test_bad_arguments_raise():
    X = torch.rand(10, 2, dtype=torch.float64)
    f = lambda x: x.sum()  # noqa: E731
    with pytest.raises(TypeError, match="floating-point"):
        dgsm(f, torch.ones(10, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"sets argnums, in_dims, vec and out"):
        dgsm(f, X, vec="row")
    with pytest.raises(ValueError, match="batch_size"):
        dgsm(f, X, batch_size=0)
    with pytest.raises(ValueError, match="method"):
        dgsm(f, X, method="finite_difference")
    with pytest.raises(ValueError, match="at most one of bounds"):
        dgsm(f, X, bounds=[[0, 1], [0, 1]], std=[1.0, 1.0])
    with pytest.raises(ValueError, match="std > 0"):
        dgsm(f, X, std=[1.0, 0.0])
    with pytest.raises(ValueError, match="2 input_names"):
        dgsm(f, X, input_names=["a"])
    with pytest.raises(TypeError, match=r"single torch\.Tensor"):
        dgsm(lambda x: (x, x), X)
    with pytest.raises(ValueError, match="seed or generator"):
        sample_uniform([[0, 1]], 3, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="positive int"):
        sample_normal([0.0], [1.0], 0)
    with pytest.raises(ValueError, match="zero_output"):
        local_sensitivity(f, X, zero_output="zero")
    with pytest.raises(ValueError, match=r"B >= 1"):
        local_sensitivity(f, torch.zeros(0, 2))
    with pytest.raises(ValueError, match="measure"):
        dgsm(f, X).plot(measure="sobol")
    with pytest.raises(ValueError, match="without an input distribution"):
        dgsm(f, X).plot(measure="bound")
    with pytest.raises(ValueError, match="3 output_names"):
        dgsm(model, torch.rand(5, 3, dtype=torch.float64), output_names=["a"])


def test_finite_check_survives_overflowing_sums():
    # Derivatives near the float64 maximum: their sum overflows, yet every entry is finite.
    x = torch.ones(3, 1, dtype=torch.float64)
    res = local_sensitivity(lambda p: 1.5e308 * p[0], x)
    assert (res.jacobian == 1.5e308).all()
    torch.testing.assert_close(res.elasticity, torch.ones(3, 1, dtype=torch.float64))


def test_dgsm_accumulator_merges_batches_as_one_sample():
    """update() per batch, merge() of partial accumulators and sums()/from_sums() (what the
    ranks add up) all give the statistics of the whole sample, computed directly."""
    from jacbatch.sensitivity import DGSMAccumulator

    def f(x):
        return torch.stack([torch.sin(x[0]) * x[1], x[0] ** 2 + torch.tanh(x[2])])

    X = torch.rand(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    J = reference_jacobian(f, (X,))  # (50, 2, 3)
    y = torch.stack([f(x) for x in X])
    parts = []
    for s in (slice(0, 7), slice(7, 30), slice(30, 50)):
        acc = DGSMAccumulator()
        acc.update(J[s], y[s])
        parts.append(acc)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    packed = sum(p.sums((2,), 3, torch.device("cpu")) for p in parts)
    summed = DGSMAccumulator.from_sums(packed, (2,), 3)
    for acc in (merged, summed):
        res = acc.result()
        assert res.n_samples == 50
        torch.testing.assert_close(res.nu, (J * J).mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res.mean_abs, J.abs().mean(0), rtol=1e-12, atol=1e-12)
        se = (J * J).std(0) / 50**0.5
        torch.testing.assert_close(res.nu_se, se, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.variance, y.var(0), rtol=1e-12, atol=1e-12)
