"""Many small curve fits at once: a batched Levenberg–Marquardt with jacbatch Jacobians.

Each of ``B`` noisy data sets is fitted with a logistic curve
``y(t) = K / (1 + exp(-r (t - t0)))``, three parameters ``p = (K, r, t0)`` per curve. The
residual is written for ONE curve; ``jacbatch.jacobian`` gives the Jacobians of all ``B``
residuals w.r.t. their own parameters, ``(B, n_t, 3)``, in one call per iteration, and the
damped normal equations ``(JᵀJ + λ diag(JᵀJ)) δ = -Jᵀr`` are solved for every curve at once
with its own damping ``λ``. The call repeats with the same shapes, so from the third iteration
jacbatch runs its prepared program for the traced closed form.

Run from the repository root::

    PYTHONPATH=$PWD python examples/levenberg_marquardt.py --size full --out docs/assets
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import jacbatch

SIZES = {"small": {"curves": 64, "iterations": 15}, "full": {"curves": 2000, "iterations": 40}}
NOISE = 0.03
N_T = 40
t = torch.linspace(0, 10, N_T, dtype=torch.float64)


def residual(p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One curve: parameters ``p = (K, r, t0)`` ``(3,)``, data ``y (n_t,)`` -> ``(n_t,)``."""
    K, r, t0 = p[0], p[1], p[2]
    return K / (1 + torch.exp(-r * (t - t0))) - y


def closed_form(P: torch.Tensor) -> torch.Tensor:
    """The Jacobian of ``residual`` by hand, ``(B, n_t, 3)``, to check jacbatch's."""
    K, r, t0 = P[:, 0:1], P[:, 1:2], P[:, 2:3]
    e = torch.exp(-r * (t - t0))  # (B, n_t)
    s = 1 / (1 + e)
    return torch.stack([s, K * (t - t0) * e * s**2, -K * r * e * s**2], dim=-1)


def levenberg_marquardt(
    P: torch.Tensor, Y: torch.Tensor, iterations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every curve: ``P (B, 3)`` start, ``Y (B, n_t)`` data -> (fitted ``P``, costs ``(it+1, B)``)."""
    lam = torch.full((P.shape[0],), 1e-2, dtype=P.dtype)
    cost = residual_batch(P, Y).pow(2).sum(-1)
    history = [cost]
    for _ in range(iterations):
        J = jacbatch.jacobian(residual, P, Y, in_dims=(0, 0))  # (B, n_t, 3)
        r = residual_batch(P, Y)  # (B, n_t)
        A = J.mT @ J  # (B, 3, 3)
        g = (J.mT @ r.unsqueeze(-1)).squeeze(-1)  # (B, 3)
        damped = A + lam[:, None, None] * torch.diag_embed(A.diagonal(dim1=-2, dim2=-1))
        step = torch.linalg.solve(damped, -g)
        new_cost = residual_batch(P + step, Y).pow(2).sum(-1)
        better = new_cost < cost  # per curve: accept the step, trust the model more
        P = torch.where(better[:, None], P + step, P)
        cost = torch.where(better, new_cost, cost)
        lam = torch.where(better, lam * 0.3, lam * 10).clamp(1e-9, 1e9)
        history.append(cost)
    return P, torch.stack(history)


def residual_batch(P: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.func.vmap(residual)(P, Y)


def main(size: str = "small", out_dir: str | Path = ".") -> dict[str, float]:
    """Fit ``B`` curves, check the Jacobian against the closed form, save ``levenberg_marquardt.png``.

    Returns:
        ``jacobian_error`` (max abs. difference from the hand-written Jacobian at the start,
        float64), ``rms_residual_max`` (the worst curve's final RMS residual; the noise is
        ``NOISE``), ``median_relative_error`` and ``max_relative_error`` of the fitted
        parameters against the true ones.
    """
    cfg = SIZES[size]
    g = torch.Generator().manual_seed(0)
    B = cfg["curves"]
    lo = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)
    hi = torch.tensor([3.0, 2.0, 7.0], dtype=torch.float64)
    P_true = lo + (hi - lo) * torch.rand(B, 3, generator=g, dtype=torch.float64)
    Y = residual_batch(P_true, torch.zeros(B, N_T, dtype=torch.float64))
    Y = Y + NOISE * torch.randn(B, N_T, generator=g, dtype=torch.float64)

    # One starting guess for all: the largest value seen, unit rate, the middle of the window.
    P0 = torch.stack([Y.max(-1).values, torch.ones(B, dtype=torch.float64),
                      torch.full((B,), 5.0, dtype=torch.float64)], -1)  # fmt: skip
    J0 = jacbatch.jacobian(residual, P0, Y, in_dims=(0, 0))
    jacobian_error = (J0 - closed_form(P0)).abs().max().item()

    P, history = levenberg_marquardt(P0, Y, cfg["iterations"])
    rms = (history[-1] / N_T).sqrt()
    rel = ((P - P_true) / P_true).abs()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    tf = torch.linspace(0, 10, 200, dtype=torch.float64)
    for k in range(6):
        K, r, t0 = P[k].tolist()
        (line,) = axes[0].plot(t.numpy(), Y[k].numpy(), "o", ms=3)
        fit = K / (1 + torch.exp(-r * (tf - t0)))
        axes[0].plot(tf.numpy(), fit.numpy(), color=line.get_color())
    axes[0].set(title=f"6 of {B} logistic fits (points: data, lines: fit)", xlabel="t", ylabel="y")
    its = torch.arange(history.shape[0])
    axes[1].semilogy(its.numpy(), (history / N_T).sqrt().numpy()[:, :200], color="C0", alpha=0.15, lw=0.8)  # fmt: skip
    axes[1].semilogy(its.numpy(), (history / N_T).sqrt().median(-1).values.numpy(), color="k",
                     lw=2, label="median over curves")  # fmt: skip
    axes[1].axhline(NOISE, color="C3", ls="--", label=f"noise level {NOISE}")
    axes[1].set(title="RMS residual per curve by iteration", xlabel="LM iteration",
                ylabel="RMS residual")  # fmt: skip
    axes[1].legend()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "levenberg_marquardt.png", dpi=90)
    plt.close(fig)

    result = {
        "jacobian_error": jacobian_error,
        "rms_residual_max": rms.max().item(),
        "median_relative_error": rel.median().item(),
        "max_relative_error": rel.max().item(),
    }
    print(", ".join(f"{k} = {v:.3g}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=".", help="directory for levenberg_marquardt.png")
    args = parser.parse_args()
    main(args.size, args.out)
