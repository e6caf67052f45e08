"""One rank of the gloo process groups started by tests/test_distributed.py.

Started by the tests through :func:`run_rank`, or by hand as
``torchrun --nproc-per-node 3 tests/_distributed_worker.py OUT_DIR``. Runs every scenario inside one process group (so
the tests need only one launch per world size), records each outcome, and saves them to
``OUT_DIR/rank{RANK}.pt`` for the test process to check. A scenario that raises is recorded, not
fatal: scenarios after a failure also show that the group is still usable.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import jacbatch
from jacbatch import distributed as jd

TIMEOUT = timedelta(seconds=30)
DEVICE = torch.device("cpu")  # cuda:LOCAL_RANK with the nccl backend


def tanh_affine(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return torch.tanh(A @ W + B)


def sample(batch: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """A ``(batch, 3, 4)``, W ``(4, 2)``, B ``(2,)``: the same on every rank for one seed."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(batch, 3, 4, generator=g, dtype=torch.float64)
    W = torch.randn(4, 2, generator=g, dtype=torch.float64)
    B = torch.randn(2, generator=g, dtype=torch.float64)
    return [A.to(DEVICE, dtype), W.to(DEVICE, dtype), B.to(DEVICE, dtype)]


def as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def main(out_dir: str, backend: str = "gloo") -> None:
    global DEVICE
    torch.set_num_threads(1)
    DEVICE = jd.init(backend=backend, timeout=TIMEOUT)
    assert DEVICE.type == ("cuda" if backend == "nccl" else "cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict[str, dict[str, Any]] = {}

    def run(name: str, fn: Callable[[], Any]) -> None:
        try:
            results[name] = {"ok": True, "value": fn()}
        except Exception as e:
            results[name] = {
                "ok": False,
                "type": type(e).__name__,
                "msg": str(e),
                "trace": traceback.format_exc(),
            }

    def gathered(name: str, func: Any, args: list[torch.Tensor], **kw: Any) -> None:
        """Sharded and single-process results of the same call (rank ``dst`` or every rank)."""

        def fn() -> dict[str, Any]:
            opts = {k: v for k, v in kw.items() if k not in ("gather", "dst", "group")}
            single = as_tuple(jacbatch.jacobian(func, *args, **opts))
            got = jd.jacobian(func, *args, **kw)
            return {"got": None if got is None else as_tuple(got), "single": single}

        run(name, fn)

    # Every route, uneven split (B=5 over 2 or 3 ranks), tuple argnums, gathered to all ranks.
    for method in ("closed_form", "jacrev", "jacfwd", "vjp", "auto"):
        func = jacbatch.affine if method == "closed_form" else tanh_affine
        gathered(
            f"route_{method}",
            func,
            sample(5),
            argnums=(0, 1),
            in_dims=(0, None, None),
            method=method,
        )
    # Batch at dim 1, two batched arguments, vec="col", chunking, fewer samples than ranks
    # (empty shards), gathered to the last rank only.
    A, W, B = sample(2, seed=1)
    W2 = torch.stack([W, 2 * W])
    gathered(
        "jacrev_dst_col_empty_shards",
        tanh_affine,
        [A.movedim(0, 1).contiguous(), W2, B],
        argnums=(0, 1),
        in_dims=(1, 0, None),
        method="jacrev",
        vec="col",
        chunk_size=3,
        gather="dst",
        dst=world - 1,
    )
    gathered(
        "jacfwd_float32",
        tanh_affine,
        sample(7, seed=2, dtype=torch.float32),
        argnums=1,
        in_dims=(0, None, None),
        method="jacfwd",
        vec="row",
    )

    # Local shards, no communication of Jacobians.
    def local_shard() -> dict[str, Any]:
        args = sample(5, seed=3)
        s = jd.jacobian(
            tanh_affine, *args, argnums=0, in_dims=(0, None, None), method="vjp", gather=None
        )
        assert isinstance(s, jd.Shard)
        single = jacbatch.jacobian(
            tanh_affine, *args, argnums=0, in_dims=(0, None, None), method="vjp"
        )
        return {
            "start": s.start,
            "stop": s.stop,
            "B": s.batch_size,
            "shard": s.jacobian,
            "single": single,
        }

    run("local_shard", local_shard)

    # One shared .npy file per argnum, each rank writing its rows.
    def npy() -> dict[str, Any]:
        args = sample(5, seed=4)
        paths = (os.path.join(out_dir, "J_A.npy"), os.path.join(out_dir, "J_W.npy"))
        rows = jd.save_jacobian(paths, tanh_affine, *args, argnums=(0, 1), in_dims=(0, None, None))
        single = jacbatch.jacobian(tanh_affine, *args, argnums=(0, 1), in_dims=(0, None, None))
        return {"rows": (rows.start, rows.stop), "paths": paths, "single": single}

    run("npy", npy)

    if world > 1:  # failures and mismatches need a second rank
        # A failure on one rank while computing: every rank must raise, none may hang.
        def fails_on_rank_1(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
            if dist.get_rank() == 1 and A.device.type != "meta":
                raise ArithmeticError("boom on rank 1")
            return tanh_affine(A, W, B)

        run(
            "fail_compute",
            lambda: jd.jacobian(fails_on_rank_1, *sample(5), in_dims=(0, None, None), method="vjp"),
        )
        # A failure on the last rank while validating (an unknown method there only).
        run(
            "fail_validation",
            lambda: jd.jacobian(
                tanh_affine,
                *sample(5),
                in_dims=(0, None, None),
                method="bogus" if rank == world - 1 else "auto",
            ),
        )
        # rank 0 cannot create the file: every rank raises.
        run(
            "fail_npy_create",
            lambda: jd.save_jacobian(
                os.path.join(out_dir, "missing_dir", "J.npy"),
                tanh_affine,
                *sample(5),
                in_dims=(0, None, None),
            ),
        )

        # A failure on rank 1 while writing rows: the old file stays, no temporary file remains.
        old_path = os.path.join(out_dir, "old.npy")
        if rank == 0:
            np.save(old_path, np.arange(6.0))
        dist.barrier()

        def fail_npy_write_outcome() -> dict[str, Any]:
            kind, msg = None, ""
            try:
                jd.save_jacobian(old_path, fails_on_rank_1, *sample(5), in_dims=(0, None, None))
            except Exception as e:
                kind, msg = type(e).__name__, str(e)
            dist.barrier()  # every rank has cleaned up before the directory is looked at
            listing = sorted(os.listdir(out_dir))
            return {"type": kind, "msg": msg, "listing": listing,
                    "content": np.load(old_path).tolist()}  # fmt: skip

        run("fail_npy_write", fail_npy_write_outcome)

        # Ranks on one host share its memory: the gathered copies must fit together.
        def shared_host() -> Any:
            from jacbatch import memory

            args = sample(8, seed=5)  # dZ/dA: 8 samples * 6 * 12 * 8 B = 4.5 KiB
            real = memory.available_memory
            os.environ["LOCAL_WORLD_SIZE"] = str(world)
            memory.available_memory = lambda device: 8 * 1024  # 8 KiB free on the host
            try:
                return jd.jacobian(tanh_affine, *args, in_dims=(0, None, None), method="vjp")
            finally:
                memory.available_memory = real
                del os.environ["LOCAL_WORLD_SIZE"]

        run("shared_host", shared_host)

        # SystemExit (not an Exception) on rank 1 while computing: reported like any error.
        def exits_on_rank_1(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
            if dist.get_rank() == 1 and A.device.type != "meta":
                raise SystemExit(4)
            return tanh_affine(A, W, B)

        def system_exit() -> Any:
            try:
                return jd.jacobian(exits_on_rank_1, *sample(5), in_dims=(0, None, None))
            except SystemExit as e:
                return f"SystemExit {e.code}"

        run("system_exit", system_exit)

        # Mismatched calls: every rank gets the same clear error naming the rank that disagrees.
        run(
            "mismatch_shape",
            lambda: jd.jacobian(
                tanh_affine, *sample(5 if rank != 1 else 4), in_dims=(0, None, None)
            ),
        )
        run(
            "mismatch_values",
            lambda: jd.jacobian(
                tanh_affine, *sample(5, seed=0 if rank != world - 1 else 9), in_dims=(0, None, None)
            ),
        )
        run(
            "mismatch_dtype",
            lambda: jd.jacobian(
                tanh_affine,
                *sample(5, dtype=torch.float32 if rank == 1 else torch.float64),
                in_dims=(0, None, None),
            ),
        )
        run(
            "mismatch_in_dims",
            lambda: jd.jacobian(
                tanh_affine, *sample(5), in_dims=(0, None, None) if rank != 1 else (1, None, None)
            ),
        )
        run(
            "mismatch_argnums",
            lambda: jd.jacobian(
                tanh_affine, *sample(5), argnums=0 if rank != 1 else 1, in_dims=(0, None, None)
            ),
        )
        run(
            "mismatch_method",
            lambda: jd.jacobian(
                tanh_affine,
                *sample(5),
                in_dims=(0, None, None),
                method="jacrev" if rank != 1 else "vjp",
            ),
        )

    # Still usable after all of the above.
    gathered("after_failures", tanh_affine, sample(4, seed=5), argnums=2, in_dims=(0, None, None))

    # A subgroup of global ranks (1, 2): ranks are group ranks; one sample, so one empty shard.
    if world >= 3:
        sub = dist.new_group([1, 2])
        if rank in (1, 2):
            gathered(
                "subgroup_all", tanh_affine, sample(1, seed=7), in_dims=(0, None, None), group=sub
            )
            gathered(
                "subgroup_dst",
                tanh_affine,
                sample(3, seed=7),
                in_dims=(0, None, None),
                group=sub,
                gather="dst",
                dst=1,
            )

    # Sums over ranks of per-sample values.
    def moments() -> dict[str, Any]:
        x = torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        x = x.to(DEVICE)
        a, b = jd.shard_range(7, world, rank)
        m = jd.reduce_moments(x[a:b])
        return {
            "count": m.count,
            "sum": m.sum,
            "sum_sq": m.sum_sq,
            "mean": m.mean,
            "var": m.var,
            "x": x,
        }

    run("moments", moments)

    # DGSM over ranks equals the single-process estimate.
    def sharded_dgsm() -> dict[str, Any]:
        from jacbatch.sensitivity import dgsm, sample_uniform

        def ishigami(x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x[0]) + 7 * torch.sin(x[1]) ** 2 + 0.1 * x[2] ** 4 * torch.sin(x[0])

        bounds = [[-3.14159, 3.14159]] * 3
        X = sample_uniform(bounds, 1001, seed=5).to(DEVICE)
        got = jd.dgsm(ishigami, X, bounds=bounds, batch_size=97)
        single = dgsm(ishigami, X, bounds=bounds, batch_size=97)
        fields = ("nu", "nu_se", "mean_abs", "mean_abs_se", "mean", "variance", "total_index_bound")
        return {f: (getattr(got, f), getattr(single, f)) for f in fields} | {
            "n": (got.n_samples, single.n_samples)
        }

    run("dgsm", sharded_dgsm)

    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def run_rank(rank: int, world: int, port: int, out_dir: str, backend: str = "gloo") -> None:
    """Entry point of a test-started process: torchrun's environment on loopback, then main."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    main(out_dir, backend)


if __name__ == "__main__":
    main(sys.argv[1])
