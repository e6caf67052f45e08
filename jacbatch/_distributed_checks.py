"""Checks and errors of :mod:`jacbatch.distributed` (its only user); messages read as in
:mod:`jacbatch._validation`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NoReturn

from ._validation import _fmt_bytes, _fmt_options
from .call import Call
from .errors import JacobianMemoryError, RankFailedError

GATHER_MODES: tuple[str | None, ...] = ("all", "dst", None)


def check_process_group(where: str, initialized: bool) -> None:
    if not initialized:
        raise RuntimeError(
            f"{where}: expected an initialized torch.distributed process group, got none. "
            f"Launch with torchrun and call jacbatch.distributed.init() (or "
            f"torch.distributed.init_process_group) first."
        )


def check_gather(where: str, gather: object, dst: object, world_size: int) -> str | None:
    if gather not in GATHER_MODES:
        raise ValueError(
            f"{where}: expected gather to be one of {_fmt_options(GATHER_MODES)}, got {gather!r}. "
            f"'all' returns the whole Jacobian on every rank, 'dst' on rank dst only, None "
            f"returns each rank's own shard."
        )
    if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world_size:
        raise ValueError(f"{where}: expected dst to be a rank in [0, {world_size}), got {dst!r}.")
    return None if gather is None else str(gather)


def check_distributed_call(where: str, call: Call, backend: str) -> None:
    """What sharding needs beyond what :func:`normalize_call` checks."""
    if not call.batched:
        raise ValueError(
            f"{where}: expected at least one batched argument to shard over ranks, got in_dims "
            f"{call.in_dims}. Mark the batch dimension in in_dims, or call jacbatch.jacobian "
            f"on one rank."
        )
    if backend == "nccl" and call.device.type != "cuda":
        raise ValueError(
            f"{where}: expected CUDA tensors with the nccl backend, got tensors on "
            f"{call.device}. Move the arguments to jacbatch.distributed.local_device(), or "
            f"use the gloo backend for CPU tensors."
        )


def rank_disagreement_error(
    where: str, rank: int, field: str, mine: object, ref: object
) -> NoReturn:
    raise ValueError(
        f"{where}: expected every rank to be called with the same arguments and options, got "
        f"rank {rank} with {field} = {mine!r} where rank 0 has {ref!r}. Build the same inputs on "
        f"every rank (same data, seed and shapes) and pass the same options."
    )


def distributed_too_large(
    where: str, need: int, gathered: int, shard: int, free: int, local: int
) -> NoReturn:
    parts = []
    if gathered:
        parts.append(f"the gathered Jacobian ({_fmt_bytes(gathered)}) on every rank")
    if shard and need > gathered:
        parts.append(f"its shard ({_fmt_bytes(shard)})")
    raise JacobianMemoryError(
        f"{where}: expected each rank's result to fit in its share of free memory, got "
        f"{_fmt_bytes(need)} per rank ({' plus '.join(parts)}) with {_fmt_bytes(free)} free "
        f"shared by {local} rank(s) on this host ({_fmt_bytes(free // local)} each). Ways out: "
        f"gather='dst' (only one rank holds the whole Jacobian), gather=None (each rank keeps "
        f"its shard), jacbatch.distributed.save_jacobian(path, ...) to write it to disk, or a "
        f"smaller batch."
    )


def rank_failed_error(
    where: str, failures: Sequence[tuple[int, str]], world_size: int, stage: str
) -> NoReturn:
    listing = "; ".join(f"rank {r}: {msg}" for r, msg in failures)
    raise RankFailedError(
        f"{where}: expected every rank to succeed {stage}, got a failure on {len(failures)} of "
        f"{world_size} rank(s); this rank stopped instead of waiting for it. {listing}"
    )
