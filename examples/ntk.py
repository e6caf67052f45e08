"""Per-sample parameter Jacobians: the empirical NTK of an MLP, and a Laplace approximation.

The Jacobian of a network's output w.r.t. all its parameters, one per input, ``Js (B, K, P)``,
is what the empirical neural tangent kernel ``Θ(x, x') = J(x) J(x')ᵀ`` and the generalized
Gauss-Newton curvature of laplace-torch are made of. jacbatch gives it from the parameter dict
through ``torch.func.functional_call``, as torch.func code would, with the parameters shared by
the batch (``in_dims=None``) and the inputs batched.

The second part fits a Laplace approximation with ``jacbatch.integrations.laplace.JacbatchGGN``
as laplace-torch's curvature backend; it is skipped when laplace-torch is not installed.

Run from the repository root::

    PYTHONPATH=$PWD python examples/ntk.py --size full --out docs/assets
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from torch.func import functional_call

import jacbatch

SIZES = {
    "small": {"points": 48, "width": 16, "steps": 150, "prior_steps": 5},
    "full": {"points": 128, "width": 48, "steps": 2000, "prior_steps": 100},
}


def parameter_jacobians(model: torch.nn.Module, X: torch.Tensor) -> torch.Tensor:
    """``Js (B, K, P)``: d model(x_b) / d parameters for every input ``x_b`` of ``X (B, d)``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x,))  # one sample: (d,) -> (K,)

    J = jacbatch.jacobian(f, params, X, in_dims=(None, 0))  # {name: (B, K, *shape)}
    return torch.cat([j.flatten(2) for j in J.values()], dim=2)


def main(size: str = "small", out_dir: str | Path = ".") -> dict[str, float]:
    """Compute the NTK (and a Laplace fit), check against torch.func, save ``ntk.png``.

    Returns:
        ``jacobian_error`` (max abs. difference of ``Js`` from ``vmap(jacrev(...))``, float64),
        ``ntk_symmetry`` and ``ntk_min_eigenvalue`` (the NTK is a Gram matrix), and, with
        laplace-torch, ``laplace_jacobian_error`` (``la.backend.jacobians`` against the same
        reference) and ``laplace_coverage`` (the fraction of training targets inside the 2σ
        predictive band); ``NaN`` without laplace-torch.
    """
    cfg = SIZES[size]
    torch.manual_seed(0)
    dtype = torch.float64
    X = torch.linspace(-3, 3, cfg["points"], dtype=dtype).unsqueeze(-1)  # (B, 1), sorted
    y = torch.sin(X) + 0.1 * torch.randn_like(X)
    w = cfg["width"]
    model = torch.nn.Sequential(
        torch.nn.Linear(1, w), torch.nn.Tanh(), torch.nn.Linear(w, w), torch.nn.Tanh(),
        torch.nn.Linear(w, 1),
    ).to(dtype)  # fmt: skip

    # 1. The empirical NTK at initialization, from per-sample parameter Jacobians.
    Js = parameter_jacobians(model, X)  # (B, 1, P)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref = torch.func.vmap(
        torch.func.jacrev(lambda p, x: functional_call(model, p, (x,))), in_dims=(None, 0)
    )(params, X)
    Js_ref = torch.cat([j.flatten(2) for j in ref.values()], dim=2)
    jacobian_error = (Js - Js_ref).abs().max().item()
    ntk = torch.einsum("akp,bkp->ab", Js, Js)  # (B, B): Θ(x_a, x_b), one output
    result = {
        "jacobian_error": jacobian_error,
        "ntk_symmetry": (ntk - ntk.T).abs().max().item(),
        "ntk_min_eigenvalue": torch.linalg.eigvalsh(ntk).min().item(),
    }

    # 2. Train the network, then a Laplace approximation whose Jacobians come from jacbatch.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(cfg["steps"]):
        loss = (model(X) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    laplace = None
    if importlib.util.find_spec("laplace") is not None:
        from laplace import Laplace

        from jacbatch.integrations.laplace import JacbatchGGN

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32)
        la = Laplace(
            model, "regression", subset_of_weights="all", hessian_structure="full",
            backend=JacbatchGGN, sigma_noise=0.1,  # the data's noise level, known here
        )  # fmt: skip
        la.fit(loader)
        la.optimize_prior_precision(n_steps=cfg["prior_steps"])  # marginal likelihood
        Xp = torch.linspace(-4.5, 4.5, 200, dtype=dtype).unsqueeze(-1)
        f_mu, f_var = la(Xp, pred_type="glm")  # (200, 1), (200, 1, 1)
        sd = (f_var.squeeze(-1) + la.sigma_noise.detach() ** 2).sqrt()
        Js_la, _ = la.backend.jacobians(X)  # (B, 1, P) from jacbatch
        Js_trained = torch.cat(
            [
                j.flatten(2)
                for j in torch.func.vmap(
                    torch.func.jacrev(lambda p, x: functional_call(model, p, (x,))),
                    in_dims=(None, 0),
                )({k: v.detach() for k, v in model.named_parameters()}, X).values()
            ],
            dim=2,
        )
        mu_train, var_train = la(X, pred_type="glm")
        sd_train = (var_train.squeeze(-1) + la.sigma_noise.detach() ** 2).sqrt()
        inside = ((y - mu_train).abs() <= 2 * sd_train).to(dtype).mean().item()
        result["laplace_jacobian_error"] = (Js_la - Js_trained).abs().max().item()
        result["laplace_coverage"] = inside
        laplace = (Xp, f_mu.detach(), sd.detach())
    else:
        result["laplace_jacobian_error"] = float("nan")
        result["laplace_coverage"] = float("nan")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    x = X.squeeze(-1).numpy()
    im = axes[0].imshow(ntk.numpy(), extent=(x[0], x[-1], x[-1], x[0]), cmap="magma")
    axes[0].set(title=f"empirical NTK Θ(x, x') at initialization, P = {Js.shape[-1]}",
                xlabel="x'", ylabel="x")  # fmt: skip
    fig.colorbar(im, ax=axes[0])
    ax = axes[1]
    ax.scatter(x, y.squeeze(-1).numpy(), s=10, color="k", label="training data")
    if laplace is not None:
        xp, mu, sd = (t.squeeze(-1).numpy() for t in laplace)
        ax.plot(xp, mu, label="MAP network")
        ax.fill_between(xp, mu - 2 * sd, mu + 2 * sd, alpha=0.3, label="± 2σ (GLM predictive)")
        ax.set_title("Laplace (full GGN, backend=JacbatchGGN)")
    else:
        with torch.no_grad():
            ax.plot(x, model(X).squeeze(-1).numpy(), label="trained network")
        ax.set_title("trained network (laplace-torch not installed)")
    ax.set(xlabel="x", ylabel="y")
    ax.legend(loc="lower right")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "ntk.png", dpi=90)
    plt.close(fig)

    print(", ".join(f"{k} = {v:.3g}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=".", help="directory for ntk.png")
    args = parser.parse_args()
    main(args.size, args.out)
