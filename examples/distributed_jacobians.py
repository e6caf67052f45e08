"""Jacobians of a batch sharded over processes (or GPUs) with torch.distributed.

Run on CPU with two processes:

    torchrun --nproc-per-node 2 examples/distributed_jacobians.py

On a machine with N GPUs, ``--nproc-per-node N`` puts one rank on each GPU (NCCL); across
machines, see docs/guide/distributed.md.

Every rank builds the same inputs (same seed), computes the Jacobians of its own slice of the
batch, and the shards are gathered; rank 0 checks the result against a single-process run.
With ``--out DIR`` rank 0 also writes ``distributed.json`` (the checks and every rank's
timings) and ``distributed.png`` (a picture of both) there; ``--size small`` runs a smaller
batch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import jacbatch
from jacbatch import distributed as jd

SIZES = {"small": {"batch": 24, "n": 8}, "full": {"batch": 64, "n": 16}}


def layer(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """One sample: ``tanh(A @ W + B)``, A ``(m, p)``, W ``(p, q)``, B ``(q,)`` -> ``(m, q)``."""
    return torch.tanh(A @ W + B)


def main(size: str = "full", out_dir: str | None = None) -> None:
    device = jd.init()  # gloo on CPU; NCCL and the GPU LOCAL_RANK when CUDA is available
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    # The same inputs on every rank: a batch of matrices A, shared W and B.
    g = torch.Generator().manual_seed(0)
    batch, n = SIZES[size]["batch"], SIZES[size]["n"]
    m = p = q = n
    A = torch.randn(batch, m, p, generator=g, dtype=torch.float64).to(device)
    W = torch.randn(p, q, generator=g, dtype=torch.float64).to(device)
    B = torch.randn(q, generator=g, dtype=torch.float64).to(device)
    in_dims = (0, None, None)
    seconds = {}

    # 1. The whole Jacobian d layer / dA on every rank: (batch, m, q, m, p).
    t = time.perf_counter()
    J = jd.jacobian(layer, A, W, B, argnums=0, in_dims=in_dims, method="jacrev")
    seconds["gather='all' (dA)"] = elapsed = time.perf_counter() - t
    start, stop = jd.shard_range(batch, world, rank)
    print(
        f"rank {rank}/{world}: samples {start}:{stop}, gathered {tuple(J.shape)} in {elapsed:.2f} s"
    )

    # 2. Only this rank's shard (no communication), e.g. to reduce it locally.
    t = time.perf_counter()
    shard = jd.jacobian(layer, A, W, B, argnums=1, in_dims=in_dims, gather=None)
    assert isinstance(shard, jd.Shard)
    local_norm = torch.linalg.vector_norm(shard.jacobian) ** 2
    seconds["gather=None (dW)"] = time.perf_counter() - t
    dist.all_reduce(local_norm)

    # 3. One .npy file on disk, each rank writing its own rows (the path must be shared).
    folder = out_dir if out_dir is not None else tempfile.gettempdir()
    path = os.path.join(folder, "jacbatch_example_dW.npy")
    t = time.perf_counter()
    jd.save_jacobian(path, layer, A, W, B, argnums=1, in_dims=in_dims)
    seconds["save_jacobian (dW)"] = time.perf_counter() - t

    timings: list[dict[str, float]] = [{} for _ in range(world)]
    dist.all_gather_object(timings, seconds)
    if rank == 0:
        single = jacbatch.jacobian(layer, A, W, B, argnums=0, in_dims=in_dims, method="jacrev")
        dW = jacbatch.jacobian(layer, A, W, B, argnums=1, in_dims=in_dims)
        on_disk = torch.from_numpy(np.load(path)).to(device)
        checks = {
            "gathered_equals_single": torch.equal(J, single),
            "file_equals_single": torch.equal(on_disk, dW),
            "sum_of_squares_over_ranks": local_norm.item(),
            "sum_of_squares_single": (dW**2).sum().item(),
        }
        print("gathered == single process:", checks["gathered_equals_single"])
        print(".npy file == single process:", checks["file_equals_single"])
        print(f"sum of squares of dZ/dW over ranks: {local_norm.item():.6f}")
        print(f"                    single process: {(dW**2).sum().item():.6f}")
        if out_dir is not None:
            shards = [jd.shard_range(batch, world, r) for r in range(world)]
            per_sample = torch.linalg.vector_norm(on_disk.flatten(1), dim=1).cpu()
            report = {"world_size": world, "batch": batch, "shards": shards,
                      "seconds": timings, **checks}  # fmt: skip
            Path(out_dir, "distributed.json").write_text(json.dumps(report, indent=2))
            plot(report, per_sample, Path(out_dir, "distributed.png"))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def plot(report: dict, per_sample: torch.Tensor, path: Path) -> None:
    """Per-rank timings of the three calls, and each sample's ‖dZ/dW‖ by the rank that wrote it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    stages = list(report["seconds"][0])
    width = 0.8 / report["world_size"]
    for r, secs in enumerate(report["seconds"]):
        xs = [i + r * width for i in range(len(stages))]
        axes[0].bar(xs, [secs[s] * 1e3 for s in stages], width, label=f"rank {r}")
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(stages))], stages)
    axes[0].set(ylabel="ms", title=f"each rank's time, {report['world_size']} ranks")
    axes[0].legend()
    for r, (start, stop) in enumerate(report["shards"]):
        idx = torch.arange(start, stop)
        axes[1].bar(idx.numpy(), per_sample[start:stop].numpy(), color=f"C{r}",
                    label=f"rank {r}: samples {start}:{stop}")  # fmt: skip
    axes[1].set(xlabel="sample", ylabel="‖dZ/dW‖ (from the .npy file)",
                title="one file, each rank's rows written in place")  # fmt: skip
    axes[1].set_ylim(0, per_sample.max().item() * 1.3)  # room for the legend above the bars
    axes[1].legend(loc="upper left", ncol=2)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--out", default=None, help="directory for distributed.json/.png")
    args = parser.parse_args()
    main(args.size, args.out)
