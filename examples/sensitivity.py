"""DGSM with SALib's conventions: finite differences (SALib) against exact derivatives (jacbatch).

For the Ishigami function, whose DGSM has closed forms, and the eight-input borehole model, this
script computes SALib's derivative-based global sensitivity measures twice on the same base
points: with SALib's forward finite differences (``SALib.sample.finite_diff`` and
``SALib.analyze.dgsm``, at its default step and a smaller one), and with exact derivatives from
``jacbatch.integrations.salib``. It prints Markdown tables (FD vs exact vs analytic) and saves a
bar chart of the exact indices with their confidence intervals.

Run from the repository root (needs ``pip install "jacbatch[salib,plot]"``)::

    PYTHONPATH=$PWD python examples/sensitivity.py --png docs/tutorials/sensitivity_dgsm.png
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
from SALib.analyze import dgsm
from SALib.sample import finite_diff

from jacbatch.integrations import salib

# --- the models: torch for one sample (jacbatch), numpy for SALib's batch of rows -------------

A, B = 7.0, 0.1
ISHIGAMI = {"num_vars": 3, "names": ["x1", "x2", "x3"], "bounds": [[-math.pi, math.pi]] * 3}


def ishigami(x: torch.Tensor) -> torch.Tensor:
    """``x (3,) -> scalar``."""
    return torch.sin(x[0]) + A * torch.sin(x[1]) ** 2 + B * x[2] ** 4 * torch.sin(x[0])


def ishigami_np(X: np.ndarray) -> np.ndarray:
    """``X (n, 3) -> (n,)``."""
    return np.sin(X[:, 0]) + A * np.sin(X[:, 1]) ** 2 + B * X[:, 2] ** 4 * np.sin(X[:, 0])


# ν_j = E[(∂f/∂x_j)²] and Var f in closed form for x ~ U[-π, π]³ (derived in tests/test_salib.py)
ISHIGAMI_NU = np.array(
    [(1 + 2 * B * math.pi**4 / 5 + B**2 * math.pi**8 / 9) / 2, A**2 / 2, 8 * B**2 * math.pi**6 / 7]
)
ISHIGAMI_VAR = A**2 / 8 + B * math.pi**4 / 5 + B**2 * math.pi**8 / 18 + 0.5
ISHIGAMI_DGSM = ISHIGAMI_NU * (2 * math.pi) ** 2 / (math.pi**2 * ISHIGAMI_VAR)

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


def borehole(x: torch.Tensor) -> torch.Tensor:
    """Water flow through a borehole, ``x (8,) -> scalar`` (m³/yr)."""
    r_w, r, T_u, H_u, T_l, H_l, L, K_w = x.unbind()
    log_ratio = torch.log(r / r_w)
    return (2 * math.pi * T_u * (H_u - H_l)) / (
        log_ratio * (1 + 2 * L * T_u / (log_ratio * r_w**2 * K_w) + T_u / T_l)
    )


def borehole_np(X: np.ndarray) -> np.ndarray:
    r_w, r, T_u, H_u, T_l, H_l, L, K_w = X.T
    log_ratio = np.log(r / r_w)
    return (2 * math.pi * T_u * (H_u - H_l)) / (
        log_ratio * (1 + 2 * L * T_u / (log_ratio * r_w**2 * K_w) + T_u / T_l)
    )


# --- the two ways ----------------------------------------------------------------------------


def finite_differences(problem, model_np, n, delta):
    """SALib as documented: N (D + 1) model runs, forward differences with relative step delta."""
    X = finite_diff.sample(problem, n, delta=delta)
    return dgsm.analyze(problem, X, model_np(X), seed=1)


def exact(problem, model, n):
    """jacbatch: N model runs and their exact gradients, on the same N base points."""
    X = salib.sample(problem, n)
    return salib.analyze(problem, model, X, seed=1)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def compare(title, problem, model, model_np, n, analytic=None):
    fd = finite_differences(problem, model_np, n, 1e-2)
    fd_small = finite_differences(problem, model_np, n, 1e-5)
    ex = exact(problem, model, n)
    print(f"### {title}: N = {n} base points\n")
    header = ["input", "index", "SALib finite differences, δ = 1e-2", "δ = 1e-5", "jacbatch exact"]
    if analytic is not None:
        header.append("analytic")
    rows = []
    for key in ("vi", "dgsm"):
        for j, name in enumerate(problem["names"]):
            row = [name, key, f"{fd[key][j]:.6g}", f"{fd_small[key][j]:.6g}", f"{ex[key][j]:.6g}"]
            if analytic is not None:
                row.append(f"{analytic[key][j]:.6g}")
            rows.append(row)
    print(markdown_table(header, rows))
    runs = n * (problem["num_vars"] + 1)
    print(f"\nSALib: {runs} model runs per step δ; jacbatch: {n} runs and their gradients.\n")
    return fd, ex


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4))
    for ax, (title, problem, fd, Si, analytic, log) in zip(axes, results, strict=True):
        names = problem["names"]
        pos = np.arange(len(names))
        # dgsm_conf is the half-width of vi's interval (SALib's convention): rescaled to dgsm
        err = Si["dgsm_conf"] * Si["dgsm"] / Si["vi"]
        fd_err = fd["dgsm_conf"] * fd["dgsm"] / fd["vi"]
        ax.bar(pos - 0.2, fd["dgsm"], 0.4, yerr=fd_err, capsize=3, color="tab:orange",
               label="SALib finite differences (δ = 1e-2)")  # fmt: skip
        ax.bar(pos + 0.2, Si["dgsm"], 0.4, yerr=err, capsize=3, color="tab:blue",
               label="jacbatch exact")  # fmt: skip
        if analytic is not None:
            ax.plot(pos + 0.2, analytic, "k_", markersize=18, mew=2, label="analytic")
        ax.set_xticks(pos)
        ax.set_xticklabels(names)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("dgsm (upper bound on S_T)")
        ax.set_title(f"{title}, 95 % intervals")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="base points (default 4096)")
    parser.add_argument("--png", default="sensitivity_dgsm.png", help="bar chart to write")
    args = parser.parse_args()
    analytic = {"vi": ISHIGAMI_NU, "dgsm": ISHIGAMI_DGSM}
    ish_fd, ish = compare("Ishigami", ISHIGAMI, ishigami, ishigami_np, args.n, analytic)
    bore_fd, bore = compare("Borehole", BOREHOLE, borehole, borehole_np, args.n)
    plot(
        [
            ("Ishigami", ISHIGAMI, ish_fd, ish, ISHIGAMI_DGSM, False),
            ("Borehole", BOREHOLE, bore_fd, bore, None, True),
        ],
        args.png,
    )
    print(f"bar chart written to {args.png}")


if __name__ == "__main__":
    main()
