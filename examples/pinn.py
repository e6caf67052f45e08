"""A physics-informed network for the heat equation, its input derivatives from jacbatch.

The heat equation ``u_t = ν u_xx`` on ``x ∈ [-1, 1]``, ``t ∈ [0, 1]``, with ``u(x, 0) = sin(πx)``
and ``u(±1, t) = 0``, has the solution ``exp(-ν π² t) sin(πx)``. A small MLP ``N(x, t)`` is
trained so that

    u(x, t) = sin(πx) + t (1 - x²) N(x, t)

(which meets the initial and boundary conditions by construction) makes the residual
``r = u_t - ν u_xx`` small at random collocation points. ``u_t`` comes from
``jacbatch.jacobian`` (the per-sample gradient ``(B, 2)``) and ``u_xx`` from ``jacbatch.hessian``
(``(B, 2, 2)``); both stay differentiable w.r.t. the network's parameters, so the loss
``mean(r²)`` trains the network through them.

Run from the repository root::

    PYTHONPATH=$PWD python examples/pinn.py --size full --out docs/assets
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import jacbatch

NU = 0.1  # diffusivity
SIZES = {"small": {"points": 32, "steps": 10, "grid": 16}, "full": {"points": 256, "steps": 800, "grid": 80}}  # fmt: skip


def make_u(net: torch.nn.Module):
    """The per-sample solution ``u(z)``: ``z = (x, t)`` of shape ``(2,)`` -> a scalar."""

    def u(z: torch.Tensor) -> torch.Tensor:
        x, t = z[0], z[1]
        return torch.sin(math.pi * x) + t * (1 - x**2) * net(z).squeeze(-1)

    return u


def residual(u, Z: torch.Tensor) -> torch.Tensor:
    """``r = u_t - ν u_xx`` at the points ``Z (B, 2)``; differentiable w.r.t. ``u``'s parameters."""
    grad = jacbatch.jacobian(u, Z)  # (B, 2): (u_x, u_t) per point
    hess = jacbatch.hessian(u, Z)  # (B, 2, 2): [[u_xx, u_xt], [u_tx, u_tt]] per point
    return grad[:, 1] - NU * hess[:, 0, 0]


def main(size: str = "small", out_dir: str | Path = ".") -> dict[str, float]:
    """Train the PINN, check jacbatch against torch.func, save ``pinn.png`` in ``out_dir``.

    Returns:
        ``jacobian_error`` and ``hessian_error`` (max abs. difference from
        ``vmap(jacrev(u))`` and ``vmap(hessian(u))``, float64), ``residual_before`` and
        ``residual_after`` (RMS residual on the plotting grid), ``solution_error`` (max abs. error
        against the exact solution on the plotting grid).
    """
    cfg = SIZES[size]
    torch.manual_seed(0)
    dtype = torch.float64
    net = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    ).to(dtype)  # fmt: skip
    u = make_u(net)

    def sample(n: int) -> torch.Tensor:
        return torch.stack([torch.rand(n, dtype=dtype) * 2 - 1, torch.rand(n, dtype=dtype)], -1)

    # The derivatives are those of torch.func, to rounding.
    Z = sample(cfg["points"])
    with torch.no_grad():
        J, H = jacbatch.jacobian(u, Z), jacbatch.hessian(u, Z)
        J_ref = torch.func.vmap(torch.func.jacrev(u))(Z)
        H_ref = torch.func.vmap(torch.func.hessian(u))(Z)
    jacobian_error = (J - J_ref).abs().max().item()
    hessian_error = (H - H_ref).abs().max().item()

    n = cfg["grid"]
    xs, ts = torch.linspace(-1, 1, n, dtype=dtype), torch.linspace(0, 1, n, dtype=dtype)
    XX, TT = torch.meshgrid(xs, ts, indexing="xy")
    grid = torch.stack([XX.reshape(-1), TT.reshape(-1)], -1)  # (n², 2), t along rows
    with torch.no_grad():
        before = residual(u, grid).pow(2).mean().sqrt().item()

    # Training: the loss is built from jacbatch's derivatives, which carry the graph.
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(cfg["steps"]):
        loss = residual(u, sample(cfg["points"])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        R = residual(u, grid).reshape(n, n)
        after = R.pow(2).mean().sqrt().item()
        U = torch.func.vmap(u)(grid).reshape(n, n)
        exact = torch.exp(-NU * math.pi**2 * TT) * torch.sin(math.pi * XX)
    solution_error = (U - exact).abs().max().item()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    extent = (-1.0, 1.0, 0.0, 1.0)
    panels = [
        (U, "u(x, t) from the PINN", "viridis"),
        (U - exact, "u - exact solution", "RdBu_r"),
        (R, "residual u_t - ν u_xx (jacbatch)", "RdBu_r"),
    ]
    for ax, (img, title, cmap) in zip(axes, panels, strict=True):
        lim = img.abs().max().item() if cmap == "RdBu_r" else None
        im = ax.imshow(img.numpy(), origin="lower", extent=extent, aspect="auto", cmap=cmap,
                       vmin=-lim if lim else None, vmax=lim)  # fmt: skip
        ax.set(xlabel="x", ylabel="t", title=title)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"heat equation, ν = {NU}: RMS residual {before:.3f} -> {after:.4f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "pinn.png", dpi=90)
    plt.close(fig)

    result = {
        "jacobian_error": jacobian_error,
        "hessian_error": hessian_error,
        "residual_before": before,
        "residual_after": after,
        "solution_error": solution_error,
    }
    print(", ".join(f"{k} = {v:.3g}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=".", help="directory for pinn.png")
    args = parser.parse_args()
    main(args.size, args.out)
