"""Robot kinematics: the Jacobian of a KUKA iiwa's forward kinematics along a trajectory.

pytorch-kinematics computes forward kinematics for a whole batch of joint configurations at once,
so the function is declared ``batched=True``: jacbatch evaluates it on the batch instead of
vmapping a per-sample function (its in-place writes would stop ``vmap``). From the linear
Jacobian ``J (T, 3, 7)`` of the end-effector position at every point of a joint-space trajectory
follow the manipulability ``sqrt(det(J Jᵀ))`` (Yoshikawa) and the condition number of ``J``,
which say how well the arm can move its end effector in every direction there.

The chain is read from ``bench/data/kuka_iiwa.urdf`` (the benchmarks' KUKA workload). Run from
the repository root::

    PYTHONPATH=$PWD python examples/kinematics.py --size full --out docs/assets
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import jacbatch

URDF = Path(__file__).resolve().parent.parent / "bench" / "data" / "kuka_iiwa.urdf"
SIZES = {"small": {"points": 64}, "full": {"points": 600}}


def main(size: str = "small", out_dir: str | Path = ".") -> dict[str, float]:
    """Jacobians along a trajectory, checked against the library's analytic Jacobian.

    Saves ``kinematics.png`` in ``out_dir``.

    Returns:
        ``jacobian_error``: max abs. difference from ``chain.jacobian`` (pytorch-kinematics'
        geometric Jacobian, its linear rows), float64; ``min_manipulability`` and
        ``max_manipulability`` along the trajectory.
    """
    import pytorch_kinematics as pk

    dtype = torch.float64
    chain = pk.build_serial_chain_from_urdf(URDF.read_text(), "lbr_iiwa_link_7").to(dtype=dtype)

    def fk(th: torch.Tensor) -> torch.Tensor:
        """Joint angles ``(T, 7)`` -> end-effector positions ``(T, 3)``."""
        return chain.forward_kinematics(th).get_matrix()[:, :3, 3]

    # A smooth joint-space trajectory that passes near the stretched-out (singular) pose.
    T = SIZES[size]["points"]
    s = torch.linspace(0, 1, T, dtype=dtype).unsqueeze(-1)  # (T, 1)
    start = torch.tensor([0.0, 1.2, 0.0, -1.6, 0.0, 0.8, 0.0], dtype=dtype)
    phase = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0], dtype=dtype)
    TH = start * torch.cos(math.pi * s) + 0.3 * torch.sin(2 * math.pi * s + phase)  # (T, 7)

    J = jacbatch.jacobian(fk, TH, batched=True)  # (T, 3, 7)
    J_ref = chain.jacobian(TH)[:, :3]  # the library's analytic Jacobian, linear rows
    jacobian_error = (J - J_ref).abs().max().item()

    manipulability = torch.linalg.det(J @ J.mT).clamp_min(0).sqrt()  # (T,)
    svals = torch.linalg.svdvals(J)  # (T, 3)
    condition = svals[:, 0] / svals[:, -1]
    with torch.no_grad():
        P = fk(TH)  # (T, 3)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    sc = axes[0].scatter(P[:, 0].numpy(), P[:, 2].numpy(), c=manipulability.numpy(), s=12,
                         cmap="viridis")  # fmt: skip
    axes[0].set(title="end-effector path (x, z), coloured by manipulability",
                xlabel="x [m]", ylabel="z [m]", aspect="equal")  # fmt: skip
    fig.colorbar(sc, ax=axes[0], label=r"$\sqrt{\det(J J^T)}$")
    ax = axes[1]
    ax.plot(s.squeeze(-1).numpy(), manipulability.numpy(), label="manipulability")
    ax.set(xlabel="trajectory parameter s", ylabel=r"$\sqrt{\det(J J^T)}$",
           title=f"Jacobians of {T} poses (batched=True)")  # fmt: skip
    ax2 = ax.twinx()
    ax2.semilogy(s.squeeze(-1).numpy(), condition.numpy(), color="C1", label="condition of J")
    ax2.set_ylabel(r"$\sigma_{max} / \sigma_{min}$")
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="center left")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "kinematics.png", dpi=90)
    plt.close(fig)

    result = {
        "jacobian_error": jacobian_error,
        "min_manipulability": manipulability.min().item(),
        "max_manipulability": manipulability.max().item(),
    }
    print(", ".join(f"{k} = {v:.3g}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=".", help="directory for kinematics.png")
    args = parser.parse_args()
    main(args.size, args.out)
