"""The laplace-torch backend (jacbatch.integrations.laplace) against laplace's own backends.

laplace's references are independent of jacbatch: ``CurvatureInterface.jacobians`` (torch.func
``jacrev`` over ``functional_call``, inherited by ``CurvlinopsGGN``), BackPACK's per-output
``BatchGrad`` passes, its closed-form ``last_layer_jacobians``, and curvlinops' GGN
matrix-vector products for the full curvature. A per-sample autograd loop checks one case too.
Skipped where laplace-torch is not installed (``pip install laplace-torch``, see ``.ci/run``).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("laplace")

from laplace import Laplace
from laplace.curvature import BackPackGGN, CurvatureInterface, CurvlinopsGGN
from laplace.utils import FeatureExtractor

from jacbatch.integrations.laplace import JacbatchGGN

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64, different summation orders

# BackPACK's module hooks warn when the input does not require grad; nothing is wrong.
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def _cnn() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 4, 4),
    ).double()


def _inputs(name: str, batch: int = 6) -> torch.Tensor:
    torch.manual_seed(2)
    shape = (batch, 5) if name == "mlp" else (batch, 2, 6, 6)
    return torch.randn(shape, dtype=torch.float64)


MODELS = {"mlp": _mlp, "cnn": _cnn}


def _autograd_reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, K, P)`` from one ``torch.autograd.functional.jacobian`` per sample."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach() for n, p in model.named_parameters() if p.requires_grad)
    rows = []
    for x_i in x:

        def f(*ps, x_i=x_i):
            given = dict(zip(names, ps, strict=True))
            return torch.func.functional_call(model, given, (x_i.unsqueeze(0),))[0]

        blocks = torch.autograd.functional.jacobian(f, params)
        rows.append(torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=-1))
    return torch.stack(rows)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_jacobians_match_laplace_backends(name):
    model, x = MODELS[name](), _inputs(name)
    Js, f = JacbatchGGN(model, "regression").jacobians(x)
    Js_func, f_func = CurvlinopsGGN(model, "regression").jacobians(x)
    assert (
        Js.shape
        == Js_func.shape
        == (x.shape[0], f.shape[1], sum(p.numel() for p in model.parameters()))
    )
    torch.testing.assert_close(Js, Js_func, **TOL)
    torch.testing.assert_close(f, f_func, **TOL)
    torch.testing.assert_close(Js, _autograd_reference(model, x), **TOL)
    assert not Js.requires_grad and not f.requires_grad

    # BackPACK extends the modules it sees (hooks, attributes): give it its own copy.
    bp_model = copy.deepcopy(model)
    bp_model.output_size = f.shape[1]
    Js_bp, f_bp = BackPackGGN(bp_model, "regression").jacobians(x)
    torch.testing.assert_close(Js, Js_bp, **TOL)
    torch.testing.assert_close(f, f_bp, **TOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_frozen_parameters_and_subnetwork(name):
    model, x = MODELS[name](), _inputs(name)
    first = next(model.parameters())
    first.requires_grad_(False)  # laplace drops frozen parameters from Js
    Js, _ = JacbatchGGN(model, "regression").jacobians(x)
    Js_func, _ = CurvatureInterface(model, "regression").jacobians(x)
    assert Js.shape[-1] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(Js, Js_func, **TOL)

    indices = torch.tensor([0, 3, Js.shape[-1] - 1])
    Js_sub, _ = JacbatchGGN(model, "regression", subnetwork_indices=indices).jacobians(x)
    torch.testing.assert_close(Js_sub, Js_func[:, :, indices], **TOL)


class _Tied(torch.nn.Module):
    """``W2 tanh(W1 x)`` with ``W2 = W1ᵀ`` (one parameter used twice) and a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = torch.nn.Linear(4, 6, bias=False)
        self.bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.inner(x)) @ self.inner.weight + self.bias


def _batchnorm_eval() -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    )
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model.double().eval()


@pytest.mark.parametrize("build", [_Tied, _batchnorm_eval], ids=["tied", "batchnorm-eval"])
def test_tied_weights_and_buffers(build):
    torch.manual_seed(5)
    model = build().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    Js, f = JacbatchGGN(model, "regression").jacobians(x)
    Js_func, f_func = CurvatureInterface(model, "regression").jacobians(x)
    torch.testing.assert_close(Js, Js_func, **TOL)
    torch.testing.assert_close(f, f_func, **TOL)
    torch.testing.assert_close(Js, _autograd_reference(model, x), **TOL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_enable_backprop_is_differentiable(name):
    model, x = MODELS[name](), _inputs(name)
    x_mine = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    Js, f = JacbatchGGN(model, "regression").jacobians(x_mine, enable_backprop=True)
    Js_ref, f_ref = CurvatureInterface(model, "regression").jacobians(x_ref, enable_backprop=True)
    assert Js.requires_grad and f.requires_grad

    params = [p for p in model.parameters() if p.requires_grad]

    def loss(J, y):
        return (J.sin() ** 2).sum() + (y**3).sum()

    grads = torch.autograd.grad(loss(Js, f), [x_mine, *params])
    grads_ref = torch.autograd.grad(loss(Js_ref, f_ref), [x_ref, *params])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **TOL)


def _feature_extractor(name: str) -> FeatureExtractor:
    model = MODELS[name]()
    return FeatureExtractor(model, last_layer_name=str(len(model) - 1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_last_layer_jacobians(name):
    x = _inputs(name)
    mine = JacbatchGGN(_feature_extractor(name), "regression", last_layer=True)
    ref = CurvatureInterface(_feature_extractor(name), "regression", last_layer=True)
    Js, f = mine.last_layer_jacobians(x)
    Js_ref, f_ref = ref.last_layer_jacobians(x)
    torch.testing.assert_close(Js, Js_ref, **TOL)
    torch.testing.assert_close(f, f_ref, **TOL)
    assert not Js.requires_grad and not f.requires_grad

    x_mine, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    Js, f = mine.last_layer_jacobians(x_mine, enable_backprop=True)
    Js_ref, f_ref = ref.last_layer_jacobians(x_ref, enable_backprop=True)
    (g,) = torch.autograd.grad((Js**2).sum() + f.sum(), x_mine)
    (g_ref,) = torch.autograd.grad((Js_ref**2).sum() + f_ref.sum(), x_ref)
    torch.testing.assert_close(g, g_ref, **TOL)


def _toy_regression() -> tuple[torch.utils.data.DataLoader, torch.Tensor, torch.nn.Module]:
    torch.manual_seed(3)
    X = torch.rand(64, 1, dtype=torch.float64) * 8 - 4
    y = torch.sin(X) + 0.1 * torch.randn_like(X)
    model = torch.nn.Sequential(
        torch.nn.Linear(1, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    ).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        optimizer.step()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    X_test = torch.linspace(-5, 5, 11, dtype=torch.float64).unsqueeze(-1)
    return loader, X_test, model


# Reference backends for the fit: BackPACK's GGN is float64-exact (its ``full`` contracts its own
# Jacobians, its ``diag`` is DiagGGNExact); curvlinops' ``full`` multiplies a float32 identity, so
# it is used only for ``kron``, which JacbatchGGN inherits from it (the predictive then differs by
# the Jacobians alone).
FITS = [
    ("all", "full", BackPackGGN),
    ("all", "diag", BackPackGGN),
    ("last_layer", "full", BackPackGGN),
    ("last_layer", "kron", CurvlinopsGGN),
]


@pytest.mark.parametrize(("subset", "structure", "reference"), FITS)
def test_laplace_fit_and_predictive_match_reference(subset, structure, reference):
    loader, X_test, model = _toy_regression()
    fitted = []
    for backend in (JacbatchGGN, reference):
        la = Laplace(
            copy.deepcopy(model),
            "regression",
            subset_of_weights=subset,
            hessian_structure=structure,
            backend=backend,
        )
        la.fit(loader)
        la.prior_precision = 0.5
        f_mu, f_var = la(X_test, pred_type="glm")
        fitted.append((la, f_mu, f_var))
    (la, f_mu, f_var), (la_ref, f_mu_ref, f_var_ref) = fitted
    assert isinstance(la.backend, JacbatchGGN)
    assert f_var.shape == (X_test.shape[0], 1, 1)
    torch.testing.assert_close(la.loss, la_ref.loss, **TOL)
    if structure != "kron":
        torch.testing.assert_close(la.posterior_precision, la_ref.posterior_precision, **TOL)
    torch.testing.assert_close(f_mu, f_mu_ref, **TOL)
    torch.testing.assert_close(f_var, f_var_ref, **TOL)
    torch.testing.assert_close(
        la.log_marginal_likelihood(), la_ref.log_marginal_likelihood(), **TOL
    )


def test_subnetwork_laplace_takes_the_backend():
    """``SubnetLaplace`` (``subset_of_weights="subnetwork"``) accepts JacbatchGGN: its backend
    gets the subnetwork's indices, and the fit and predictive match BackPACK's."""
    loader, X_test, model = _toy_regression()
    n = sum(p.numel() for p in model.parameters())
    indices = torch.tensor([0, 2, n // 2, n - 1])
    fitted = []
    for backend in (JacbatchGGN, BackPackGGN):
        la = Laplace(
            copy.deepcopy(model), "regression", subset_of_weights="subnetwork",
            hessian_structure="full", subnetwork_indices=indices, backend=backend,
        )  # fmt: skip
        la.fit(loader)
        fitted.append((la, *la(X_test, pred_type="glm")))
    (la, f_mu, f_var), (la_ref, f_mu_ref, f_var_ref) = fitted
    assert isinstance(la.backend, JacbatchGGN) and la.H.shape == (4, 4)
    torch.testing.assert_close(la.H, la_ref.H, **TOL)
    torch.testing.assert_close(f_mu, f_mu_ref, **TOL)
    torch.testing.assert_close(f_var, f_var_ref, **TOL)


def test_predictive_with_enable_backprop_is_differentiable():
    loader, X_test, model = _toy_regression()
    la = Laplace(
        model, "regression", subset_of_weights="all", hessian_structure="full",
        backend=JacbatchGGN, enable_backprop=True,
    )  # fmt: skip
    la.fit(loader)
    X = X_test.clone().requires_grad_()
    f_mu, f_var = la(X, pred_type="glm")
    (g,) = torch.autograd.grad(f_mu.sum() + f_var.sum(), X)

    # The same posterior, with laplace's torch.func Jacobians in the predictive.
    X_ref = X_test.clone().requires_grad_()
    Js_ref, f_ref = CurvatureInterface.jacobians(la.backend, X_ref, enable_backprop=True)
    f_var_ref = la.functional_variance(Js_ref)
    (g_ref,) = torch.autograd.grad(f_ref.sum() + f_var_ref.sum(), X_ref)
    torch.testing.assert_close(f_var, f_var_ref, **TOL)
    torch.testing.assert_close(g, g_ref, **TOL)


def test_classification_full_ggn_matches_backpack():
    torch.manual_seed(4)
    X = torch.randn(40, 4, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=20)
    fitted = []
    for backend in (JacbatchGGN, BackPackGGN):
        la = Laplace(
            copy.deepcopy(model), "classification", subset_of_weights="all",
            hessian_structure="full", backend=backend,
        )  # fmt: skip
        la.fit(loader)
        fitted.append((la, la(X[:7], pred_type="glm", link_approx="probit")))
    (la, probs), (la_ref, probs_ref) = fitted
    torch.testing.assert_close(la.posterior_precision, la_ref.posterior_precision, **TOL)
    torch.testing.assert_close(probs, probs_ref, **TOL)
