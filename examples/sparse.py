"""Sparse Jacobians of a PDE residual: the 2-D Brusselator, detected, colored and solved with.

The Brusselator reaction-diffusion system (the example of SciML's sparse automatic
differentiation) on a periodic ``N x N`` grid, two species ``U`` and ``V``::

    dU/dt = alpha ΔU + b + U² V - (a + 1) U
    dV/dt = alpha ΔV + a U - U² V

with the 5-point Laplacian ``Δ``. The residual ``f(u)`` is written for ONE state ``u (2, N, N)``;
its Jacobian ``(2 N², 2 N²)`` has at most 6 nonzeros per row. The script

1. detects the pattern from the traced residual (``jacbatch.sparsity``),
2. prints the plan (``jacbatch.explain(..., sparse=True)``: colors per mode, chosen mode),
3. computes the sparse Jacobians of a batch of ``B`` states and checks them against the dense
   ``torch.func.vmap(torch.func.jacfwd(f))``,
4. times the sparse and the dense computation (median of a few runs),
5. takes one implicit-Euler step ``u_new - u - dt f(u_new) = 0`` for every state with Newton's
   method, each Newton system ``(I - dt J) δ = -G`` solved with the sparse Jacobian
   (``scipy.sparse.linalg.spsolve`` where SciPy is installed, else a dense solve),
6. draws the pattern with its color classes, the timings and the Newton convergence.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python examples/sparse.py --size full --out docs/assets

(One torch thread, as in bench/sparse_bench.py: the sparse route runs many small operations,
and on a busy 2-core machine two threads slow them down several-fold.)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import jacbatch
from jacbatch.sparse.coloring import color

SIZES = {
    "small": {"n": 6, "batch": 4, "repeats": 3},
    "full": {"n": 32, "batch": 16, "repeats": 3},
}
A, B_, ALPHA = 3.4, 1.0, 10.0  # the steady state is U = B_, V = A / B_
DT = 0.01  # the implicit-Euler time step
NEWTON_STEPS = 4


def brusselator(u: torch.Tensor) -> torch.Tensor:
    """One state ``u (2, N, N)`` (``U = u[0]``, ``V = u[1]``) -> ``du/dt (2, N, N)``."""
    U, V = u[0], u[1]

    def lap(z: torch.Tensor) -> torch.Tensor:  # periodic 5-point Laplacian (grid step 1)
        return z.roll(1, 0) + z.roll(-1, 0) + z.roll(1, 1) + z.roll(-1, 1) - 4 * z

    du = ALPHA * lap(U) + B_ + U**2 * V - (A + 1) * U
    dv = ALPHA * lap(V) + A * U - U**2 * V
    return torch.stack([du, dv])


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after one warm-up run (seconds)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def solve(J: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``(I - DT J) x = rhs`` for every sample: ``J`` batched CSR ``(B, n, n)``, ``rhs (B, n)``.

    ``torch.sparse.spsolve`` has no CPU kernel for CSR in torch 2.13 (NotImplementedError on
    the SparseCsrCPU backend; ``torch.linalg.solve`` dispatches to it), so each sample's matrix
    goes to ``scipy.sparse`` (its CSR arrays are jacbatch's, unchanged) where SciPy is
    installed, and to a dense ``torch.linalg.solve`` otherwise.
    """
    n = rhs.shape[1]
    try:
        import scipy.sparse
        import scipy.sparse.linalg
    except ImportError:
        dense = torch.eye(n, dtype=rhs.dtype) - DT * J.to_dense()
        return torch.linalg.solve(dense, rhs)
    crow = J.crow_indices()[0].numpy()  # the pattern's, shared by every sample
    col = J.col_indices()[0].numpy()
    eye = scipy.sparse.identity(n, format="csr")
    out = []
    for b in range(rhs.shape[0]):
        Jb = scipy.sparse.csr_matrix((J.values()[b].numpy(), col, crow), shape=(n, n))
        system = (eye - DT * Jb).tocsc()  # spsolve factorizes CSC
        out.append(torch.from_numpy(scipy.sparse.linalg.spsolve(system, rhs[b].numpy())))
    return torch.stack(out)


def implicit_euler(
    u: torch.Tensor, pattern: jacbatch.SparsityPattern
) -> tuple[torch.Tensor, list[float]]:
    """One implicit-Euler step of every state ``u (B, 2, N, N)`` by Newton's method.

    Returns:
        ``u_new (B, 2, N, N)`` and the largest residual norm ``max_b |G_b|`` before each
        Newton step and after the last (``NEWTON_STEPS + 1`` numbers).
    """
    f = torch.func.vmap(brusselator)
    Bn = u.shape[0]
    x = u.clone()
    history = []
    for k in range(NEWTON_STEPS + 1):
        G = (x - u - DT * f(x)).reshape(Bn, -1)  # (B, 2 N²)
        history.append(G.norm(dim=1).max().item())
        if k == NEWTON_STEPS:
            break
        J = jacbatch.jacobian(brusselator, x, sparse=pattern)  # CSR (B, 2 N², 2 N²)
        x = x - solve(J, G).reshape(x.shape)
    return x, history


def main(size: str = "small", out_dir: str | Path = ".") -> dict[str, float]:
    """Detect, color, compute, check, time and use the Brusselator's sparse Jacobians; save ``sparse.png``.

    Returns:
        ``jacobian_error`` (max abs. difference of the sparse Jacobians from the dense
        ``vmap(jacfwd)`` ones, float64), ``nnz``, ``density``, ``colors`` (passes per sample of
        the chosen mode), ``sparse_seconds``, ``dense_seconds``, ``speedup`` (dense / sparse)
        and ``newton_residual`` (the largest Newton residual norm after ``NEWTON_STEPS`` steps).
    """
    cfg = SIZES[size]
    N, Bn = cfg["n"], cfg["batch"]
    g = torch.Generator().manual_seed(0)
    # B states near the steady state (U, V) = (B_, A / B_), each with its own perturbation.
    steady = torch.tensor([B_, A / B_], dtype=torch.float64)[:, None, None]
    X = steady + 0.5 * torch.randn(Bn, 2, N, N, generator=g, dtype=torch.float64)

    # (1) the pattern, from the traced residual: structural, the same for every state.
    P = jacbatch.sparsity(brusselator, X)
    print(P)
    # (2) the plan: colors per mode and the mode taken.
    print(jacbatch.explain(brusselator, X, sparse=True))
    coloring = color(P)

    # (3) the sparse Jacobians of the batch, against the dense ones.
    J = jacbatch.jacobian(brusselator, X, sparse=P)  # sparse CSR (B, 2 N², 2 N²)
    dense_jac = torch.func.vmap(torch.func.jacfwd(brusselator))
    D = dense_jac(X).reshape(Bn, 2 * N * N, 2 * N * N)
    jacobian_error = (J.to_dense() - D).abs().max().item()
    del D

    # (4) sparse vs dense time for the same batch.
    t_sparse = median_time(lambda: jacbatch.jacobian(brusselator, X, sparse=P), cfg["repeats"])
    t_dense = median_time(lambda: dense_jac(X), cfg["repeats"])
    threads = torch.get_num_threads()
    print(f"sparse {t_sparse * 1e3:.1f} ms, dense vmap(jacfwd) {t_dense * 1e3:.1f} ms: "
          f"{t_dense / t_sparse:.1f}x ({threads} torch thread(s))")  # fmt: skip

    # (5) one implicit-Euler step of every state, Newton systems solved with the sparse Jacobian.
    _, history = implicit_euler(X, P)
    print("Newton residual (max over the batch):", ", ".join(f"{h:.2e}" for h in history))

    # (6) the picture.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = P.row_indices(), P.col_indices
    cls = coloring.colors[cols] if coloring.mode == "column" else coloring.colors[rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6), constrained_layout=True)
    zoom = min(P.shape[0], P.shape[1], 96)  # the top-left corner, where the colors can be seen
    for ax, w in ((axes[0], max(P.shape)), (axes[1], zoom)):
        keep = (rows < w) & (cols < w)
        ax.scatter(cols[keep].numpy(), rows[keep].numpy(), c=cls[keep].numpy(), cmap="tab20",
                   vmin=0, vmax=19, s=max(200 / w, 0.8) ** 2, marker="s", linewidths=0)  # fmt: skip
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(w - 0.5, -0.5)
        ax.set_aspect("equal")
    axes[0].set(title=f"pattern {P.shape[0]} x {P.shape[1]}, nnz {P.nnz}",
                xlabel="input (U then V, row-major)", ylabel="output (dU then dV)")  # fmt: skip
    axes[1].set(title=f"top-left {zoom} x {zoom}: {coloring.n_colors} {coloring.mode} colors",
                xlabel="input", ylabel=f"output (an entry: its {coloring.mode}'s color)")  # fmt: skip
    axes[2].bar(["sparse (jacbatch)", "dense vmap(jacfwd)"], [t_sparse * 1e3, t_dense * 1e3],
                color=["C2", "C7"])  # fmt: skip
    axes[2].set_yscale("log")
    axes[2].set_ylim(min(t_sparse, t_dense) * 1e3 / 3, max(t_sparse, t_dense) * 1e3 * 2)
    axes[2].set(title=f"B = {Bn}: dense / sparse time {t_dense / t_sparse:.1f}x",
                ylabel=f"ms (median, {threads} thread(s))")  # fmt: skip
    axes[3].semilogy(range(len(history)), history, "o-", color="C0")
    axes[3].set_xticks(range(len(history)))
    axes[3].set(title=f"implicit Euler, dt = {DT}: Newton, sparse J",
                xlabel="Newton step", ylabel="max residual norm over the batch")  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "sparse.png", dpi=90)
    plt.close(fig)

    result = {
        "jacobian_error": jacobian_error,
        "nnz": float(P.nnz),
        "density": P.density,
        "colors": float(coloring.n_colors),
        "sparse_seconds": t_sparse,
        "dense_seconds": t_dense,
        "speedup": t_dense / t_sparse,
        "newton_residual": history[-1],
    }
    print(", ".join(f"{k} = {v:.3g}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=".", help="directory for sparse.png")
    args = parser.parse_args()
    main(args.size, args.out)
