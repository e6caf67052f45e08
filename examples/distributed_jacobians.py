"""Jacobians of a batch sharded over processes (or GPUs) with torch.distributed.

Run on CPU with two processes:

    torchrun --nproc-per-node 2 examples/distributed_jacobians.py

On a machine with N GPUs, ``--nproc-per-node N`` puts one rank on each GPU (NCCL); across
machines, see the README section "Scaling out with torch.distributed".

Every rank builds the same inputs (same seed), computes the Jacobians of its own slice of the
batch, and the shards are gathered; rank 0 checks the result against a single-process run.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

import jacbatch
from jacbatch import distributed as jd


def layer(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """One sample: ``tanh(A @ W + B)``, A ``(m, p)``, W ``(p, q)``, B ``(q,)`` -> ``(m, q)``."""
    return torch.tanh(A @ W + B)


def main() -> None:
    device = jd.init()  # gloo on CPU; NCCL and the GPU LOCAL_RANK when CUDA is available
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    # The same inputs on every rank: a batch of 64 matrices A, shared W and B.
    g = torch.Generator().manual_seed(0)
    batch, m, p, q = 64, 16, 16, 16
    A = torch.randn(batch, m, p, generator=g, dtype=torch.float64).to(device)
    W = torch.randn(p, q, generator=g, dtype=torch.float64).to(device)
    B = torch.randn(q, generator=g, dtype=torch.float64).to(device)
    in_dims = (0, None, None)

    # 1. The whole Jacobian d layer / dA on every rank: (64, m, q, m, p).
    t = time.perf_counter()
    J = jd.jacobian(layer, A, W, B, argnums=0, in_dims=in_dims, method="jacrev")
    elapsed = time.perf_counter() - t
    start, stop = jd.shard_range(batch, world, rank)
    print(
        f"rank {rank}/{world}: samples {start}:{stop}, gathered {tuple(J.shape)} in {elapsed:.2f} s"
    )

    # 2. Only this rank's shard (no communication), e.g. to reduce it locally.
    shard = jd.jacobian(layer, A, W, B, argnums=1, in_dims=in_dims, gather=None)
    assert isinstance(shard, jd.Shard)
    local_norm = torch.linalg.vector_norm(shard.jacobian) ** 2
    dist.all_reduce(local_norm)

    # 3. One .npy file on disk, each rank writing its own rows (the path must be shared).
    path = os.path.join(tempfile.gettempdir(), "jacbatch_example_dW.npy")
    jd.save_jacobian(path, layer, A, W, B, argnums=1, in_dims=in_dims)

    if rank == 0:
        single = jacbatch.jacobian(layer, A, W, B, argnums=0, in_dims=in_dims, method="jacrev")
        dW = jacbatch.jacobian(layer, A, W, B, argnums=1, in_dims=in_dims)
        on_disk = torch.from_numpy(np.load(path)).to(device)
        print("gathered == single process:", torch.equal(J, single))
        print(".npy file == single process:", torch.equal(on_disk, dW))
        print(f"sum of squares of dZ/dW over ranks: {local_norm.item():.6f}")
        print(f"                    single process: {(dW**2).sum().item():.6f}")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
