"""Shard a batch of Jacobians over the ranks of a ``torch.distributed`` process group.

Every rank calls the same function with the same full-batch arguments (as a script launched by
``torchrun`` or Slurm does); each rank computes the Jacobians of its own contiguous slice of the
batch with :func:`jacbatch.jacobian` (any route, every option passed through), then the shards
are either gathered to every rank, gathered to one rank, written into one shared ``.npy`` file,
or simply returned with their batch slice.

NOTE [No rank is left waiting]
    A collective blocks until every rank of the group has entered it, so a rank that raises
    before a collective leaves the others waiting until the process-group timeout (minutes), and
    ranks called with different shapes deadlock or exchange garbage. Every call here therefore
    runs in stages, and each stage ends with one small ``all_gather_object`` of a status: the
    validation stage also exchanges a signature of the call (function, argument shapes, dtypes,
    in_dims, argnums, method, ... and a hash of the argument values). Only when every rank
    reports success and the signatures agree does any rank move on to the heavy collectives on
    the Jacobians. A rank that failed re-raises its own exception; the others raise
    :class:`RankFailedError` naming it. A rank that dies outright (killed, out of memory) is
    caught by the process group's timeout, set in :func:`init`.

Split: rank ``r`` of ``n`` gets ``B // n`` samples, and the first ``B % n`` ranks one more
(:func:`shard_range`); ranks beyond ``B`` get an empty shard and still take part in every stage.

Backends: gloo (CPU tensors; CUDA tensors are staged through host memory) and NCCL (CUDA
tensors, one GPU per rank, chosen from ``LOCAL_RANK`` by :func:`init`).

Size: about 800 lines in one module on purpose: every public function here runs the same
staged protocol (NOTE [No rank is left waiting], NOTE [A rank that dies]) with the private
helpers ``_agree``/``_settle``/``_exchange`` it rests on, and splitting the functions from that
protocol would make the invariant (no collective before every rank agreed) harder to check.
Argument checks live in :mod:`jacbatch._distributed_checks`, the DGSM statistics in
:mod:`jacbatch.sensitivity` (:class:`~jacbatch.sensitivity.DGSMAccumulator`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from . import _distributed_checks as D
from . import _validation as V
from . import memory
from .api import jacobian as _jacobian
from .call import Call
from .errors import RankFailedError
from .request import build_request

__all__ = [
    "Moments",
    "RankFailedError",
    "Shard",
    "dgsm",
    "init",
    "jacobian",
    "local_device",
    "reduce_moments",
    "save_jacobian",
    "shard_range",
]

Group = Any  # torch.distributed.ProcessGroup or None for the default group


@dataclass(frozen=True)
class Shard:
    """This rank's part of a sharded Jacobian.

    Attributes:
        jacobian: ``(stop - start, *out_shape, *in_shape)`` (or ``(stop - start, out_numel,
            in_numel)`` with ``vec``); a tuple of those for tuple ``argnums``.
        start: first sample of the batch in this shard.
        stop: one past the last sample.
        batch_size: ``B``, the size of the whole batch.
    """

    jacobian: torch.Tensor | tuple[torch.Tensor, ...]
    start: int
    stop: int
    batch_size: int

    @property
    def rows(self) -> slice:
        """``slice(start, stop)``: where this shard sits in the full result."""
        return slice(self.start, self.stop)


def shard_range(batch_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s samples: an even split, the remainder to the first ranks.

    Example:
        >>> [shard_range(5, 3, r) for r in range(3)]
        [(0, 2), (2, 4), (4, 5)]
        >>> shard_range(1, 2, 1)
        (1, 1)
    """
    where = "shard_range"
    V.check_nonneg_int(where, "batch_size", batch_size)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{where}: expected world_size to be a positive int, got {world_size!r}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"{where}: expected rank in [0, {world_size}), got {rank!r}.")
    base, extra = divmod(batch_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init(backend: str | None = None, timeout: timedelta = timedelta(minutes=10)) -> torch.device:
    """Initialize the default process group from torchrun's environment, once; return the device.

    With NCCL (the default when CUDA is available) each rank uses the GPU ``LOCAL_RANK`` and makes
    it the current device, as NCCL collectives require. Already initialized: returns the device
    and changes nothing. ``timeout`` bounds every collective, so a rank that dies cannot hang the
    others for longer than that.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` (NCCL with CUDA, else gloo).
        timeout: the process group's timeout for collectives.

    Returns:
        The device this rank should put its tensors on.
    """
    if dist.is_initialized():
        backend = dist.get_backend()
    elif backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    device = local_device() if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    return device


# ---------------------------------------------------------------------------------------------
# Stages: every rank reports, then every rank decides the same way
# ---------------------------------------------------------------------------------------------


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


# NOTE [A rank that dies]
#     A rank that raises reports its exception at the end of the stage (any ``BaseException``:
#     ``SystemExit`` and ``KeyboardInterrupt`` too), so the others raise ``RankFailedError``
#     naming it. A rank that dies outright (``os._exit``, a signal, the OOM killer) reports
#     nothing, and the others' collective fails with the backend's "Connection reset by peer".
#     So every rank's host name and process id travel with the validation exchange, and when a
#     collective fails, the ranks on this host whose processes are gone (or zombies) are named in
#     a ``RankFailedError``; ranks on other hosts cannot be checked from here.

_PEERS: dict[int, list[tuple[str, int]]] = {}  # id of the group -> (host, pid) per rank


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass
    return False


def _exchange(group: Group, payload: object, where: str = "", stage: str = "") -> list[Any]:
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, payload, group=group)
    except RuntimeError as err:  # see NOTE [A rank that dies]
        host = socket.gethostname()
        peers = _PEERS.get(id(group), [])
        dead = [
            (r, f"its process {pid} exited without reporting an error")
            for r, (h, pid) in enumerate(peers)
            if h == host and _process_gone(pid)
        ]
        where, stage = where or "jacbatch.distributed", stage or "communicating"
        if not dead:
            raise RankFailedError(
                f"{where}: expected every rank to succeed {stage}, got a rank that could not be "
                f"reached (on another host, or it died before its process id was known): "
                f"{str(err).splitlines()[0]}"
            ) from err
        D.rank_failed_error(where, dead, world, stage)
    return gathered


def _settle(where: str, group: Group, err: BaseException | None, stage: str) -> None:
    """End a stage: raise on every rank if any rank failed (see NOTE [No rank is left waiting])."""
    statuses = _exchange(group, None if err is None else _describe(err), where, stage)
    failures = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if not failures:
        return
    if err is not None:
        raise err
    D.rank_failed_error(where, failures, len(statuses), stage)


def _agree(where: str, group: Group, err: BaseException | None, sig: list[tuple[str, Any]]) -> None:
    """The validation stage: statuses and call signatures from every rank, compared to rank 0's."""
    me = (socket.gethostname(), os.getpid())
    gathered = _exchange(
        group, (None if err is None else _describe(err), sig, me), where, "validating its arguments"
    )
    _PEERS[id(group)] = [g[2] for g in gathered]
    failures = [(r, s) for r, (s, _, _) in enumerate(gathered) if s is not None]
    if failures:
        if err is not None:
            raise err
        D.rank_failed_error(where, failures, len(gathered), "validating its arguments")
    ref = gathered[0][1]
    for r, (_, other, _) in enumerate(gathered[1:], start=1):
        for (field, mine), (_, theirs) in zip(other, ref, strict=False):
            if mine != theirs:
                D.rank_disagreement_error(where, r, field, mine, theirs)


def _fingerprint(t: torch.Tensor) -> str:
    data = t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(data.data, digest_size=16).hexdigest()


def _global(group: Group, r: int) -> int:
    return r if group is None else dist.get_global_rank(group, r)


@dataclass(frozen=True)
class _Setup:
    call: Call
    rank: int
    world: int
    start: int
    stop: int
    shapes: tuple[tuple[int, ...], ...]  # full result shape per argnum, batch first
    comm_device: torch.device

    def local_args(self) -> list[torch.Tensor]:
        c = self.call
        return [
            a if d is None else a.narrow(d, self.start, self.stop - self.start)
            for a, d in zip(c.args, c.in_dims, strict=True)
        ]


def _validate(
    where: str,
    func: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    argnums: int | tuple[int, ...],
    in_dims: int | tuple[int | None, ...] | None,
    method: str,
    vec: str | None,
    chunk_size: int | None,
    group: Group,
    check_values: bool,
    extra: list[tuple[str, Any]],
    more_checks: Callable[[Call], None] | None = None,
) -> _Setup:
    D.check_process_group(where, dist.is_available() and dist.is_initialized())
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    err: BaseException | None = None
    sig: list[tuple[str, Any]] = []
    setup = None
    try:
        backend = str(dist.get_backend(group))

        def checks(call: Call) -> None:
            D.check_distributed_call(where, call, backend)
            if more_checks is not None:
                more_checks(call)

        # Validated and probed only: each rank plans its own shard (NOTE [One request per call]).
        req = build_request(
            where, func, args, argnums, in_dims, method=method, vec=vec, chunk_size=chunk_size,
            fit=None, plan=False, checks=checks,
        )  # fmt: skip
        call, out_shape, shapes = req.call, req.out_shape, req.shapes
        B = call.batch_size
        assert B is not None  # checked above
        start, stop = shard_range(B, world, rank)
        comm = call.device if backend == "nccl" else torch.device("cpu")
        setup = _Setup(call, rank, world, start, stop, tuple(shapes), comm)
        sig = [
            ("func", getattr(func, "__qualname__", type(func).__name__)),
            ("the number of arguments", len(args)),
            *((f"args[{i}].shape", tuple(a.shape)) for i, a in enumerate(args)),
            ("dtype", str(call.dtype)),
            ("device type", call.device.type),
            ("in_dims", call.in_dims),
            ("argnums", argnums),
            ("method", method),
            ("vec", vec),
            ("chunk_size", chunk_size),
            ("check_values", check_values),
            ("the output shape of func", out_shape),
            *extra,
        ]
        if check_values:
            sig.extend(
                (f"args[{i}] (hash of its values)", _fingerprint(a)) for i, a in enumerate(args)
            )
    except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
        err = e
    _agree(where, group, err, sig)
    assert setup is not None
    return setup


def _with_randomness(where: str, s: _Setup, randomness: object) -> _Setup:
    call = dataclasses.replace(s.call, randomness=V.check_randomness(where, randomness))
    return dataclasses.replace(s, call=call)


# NOTE [Memory of ranks on one host]
#     torchrun starts ``LOCAL_WORLD_SIZE`` ranks on a host, and each reads the same free memory.
#     With ``gather="all"`` every one of them allocates the whole Jacobian, so two ranks of a
#     16 GiB Jacobian on a 24 GiB host each saw 23 GiB free and were OOM-killed together. So
#     each rank counts what it will hold (the gathered copy, plus its shard where the shard is
#     not computed into that copy) against ``free / LOCAL_WORLD_SIZE`` before allocating, and
#     the working budget of its local computation is the default budget divided the same way.
#     GPU ranks each have their own device memory and count alone.


def ranks_on_this_host(device: torch.device, world: int) -> int:
    """How many ranks share this host's memory for ``device`` (see NOTE [Memory of ranks on
    one host]): ``LOCAL_WORLD_SIZE`` (set by torchrun) for CPU tensors, 1 for a GPU."""
    if device.type != "cpu":
        return 1
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        local = world
    return max(1, min(local, world))


def _check_fits(where: str, s: _Setup, holds_all: bool, in_place: bool) -> None:
    """Refuse, before allocating, what this rank would hold beyond its share of free memory."""
    itemsize = torch.empty((), dtype=s.call.dtype).element_size()
    total = sum(math.prod(sh) for sh in s.shapes) * itemsize
    B = s.call.batch_size or 1
    shard = total * (s.stop - s.start) // B
    gathered = total if holds_all and s.world > 1 else 0
    need = gathered + (0 if in_place else shard)
    local = ranks_on_this_host(s.call.device, s.world)
    free = memory.available_memory(s.call.device)
    if need > free // local:
        D.distributed_too_large(where, need, gathered, shard, free, local)


def _local_budget(s: _Setup) -> int:
    """This rank's working budget: the default budget shared by the ranks on this host."""
    local = ranks_on_this_host(s.call.device, s.world)
    return max(1, memory.default_budget(s.call.device) // local)


def _compute(
    s: _Setup,
    method: str,
    vec: str | None,
    chunk_size: int | None,
    outs: Sequence[torch.Tensor] | None,
) -> tuple[torch.Tensor, ...]:
    c = s.call
    res = _jacobian(
        c.func,
        *s.local_args(),
        argnums=c.argnums,
        in_dims=c.in_dims,
        method=method,
        vec=vec,
        chunk_size=chunk_size,
        out=None if outs is None else tuple(outs),
        randomness=c.randomness,
        max_memory=_local_budget(s),
    )
    return res if isinstance(res, tuple) else (res,)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    gather: str | None = "all",
    dst: int = 0,
    group: Group = None,
    check_values: bool = True,
    randomness: str = "error",
) -> torch.Tensor | tuple[torch.Tensor, ...] | Shard | None:
    """:func:`jacbatch.jacobian` with the batch sharded over the ranks of a process group.

    Call it on every rank with the same full-batch arguments and options. Each rank computes the
    Jacobians of its samples ``shard_range(B, world_size, rank)`` by the route ``method`` picks,
    exactly as :func:`jacbatch.jacobian` would; gathered results equal the single-process result.
    Ranks first check that they agree on the call (shapes, dtype, in_dims, argnums, method, ...,
    and with ``check_values`` a hash of every argument's values), and an error on any rank is
    raised on every rank instead of leaving the others waiting.

    Args:
        func, args, argnums, in_dims, method, vec, chunk_size, randomness: as in
            :func:`jacbatch.jacobian`; a batched argument holds the whole batch of ``B`` samples
            at ``in_dims[i]``. At least one argument must be batched. With
            ``randomness="different"`` each rank draws for its own samples.
        gather: ``"all"`` returns the whole Jacobian on every rank; ``"dst"`` on rank ``dst``
            only (``None`` elsewhere), so only that rank holds all of it; ``None`` returns this
            rank's :class:`Shard` and communicates no Jacobian at all.
        dst: the receiving rank (in ``group``) for ``gather="dst"``.
        group: the process group; ``None`` for the default one.
        check_values: also compare a hash of the argument values across ranks, which catches
            ranks that built their inputs from different seeds (costs one pass over the inputs).

    Returns:
        ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` with ``vec`` (a tuple of
        those for tuple ``argnums``) for ``gather="all"`` and on rank ``dst``; ``None`` on the
        other ranks with ``gather="dst"``; a :class:`Shard` for ``gather=None``.

    Raises:
        RankFailedError: on every rank that did not fail itself, when another rank failed.
        ValueError: on every rank, when ranks were called with different arguments or options;
            the message names the first rank that disagrees with rank 0 and how.
    """
    where = "distributed.jacobian"
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    mode = "?"

    def checks(call: Call) -> None:
        nonlocal mode
        m = D.check_gather(where, gather, dst, world)
        mode = "none" if m is None else m

    s = _validate(
        where,
        func,
        args,
        argnums,
        in_dims,
        method,
        vec,
        chunk_size,
        group,
        check_values,
        [("gather", gather), ("dst", dst), ("randomness", randomness)],
        checks,
    )
    s = _with_randomness(where, s, randomness)
    c = s.call
    holds_all = mode == "all" or (mode == "dst" and s.rank == dst)

    # Stage 2: this rank's shard, written straight into the full result where it can be.
    err: BaseException | None = None
    full: list[torch.Tensor] = []
    local: tuple[torch.Tensor, ...] = ()
    try:
        in_place = (holds_all and s.comm_device == c.device) or (holds_all and s.world == 1)
        _check_fits(where, s, holds_all, in_place)
        if holds_all and s.world > 1:
            full = [torch.empty(sh, dtype=c.dtype, device=s.comm_device) for sh in s.shapes]
        if holds_all and s.world == 1:  # the shard is the whole result: no copy
            local = _compute(s, method, vec, chunk_size, None)
        elif holds_all and s.comm_device == c.device:
            local = _compute(s, method, vec, chunk_size, [f[s.start : s.stop] for f in full])
        else:
            local = _compute(s, method, vec, chunk_size, None)
            for f, j in zip(full, local, strict=False):
                f[s.start : s.stop].copy_(j)
    except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
        err = e
    _settle(where, group, err, "computing its shard")

    # Stage 3: communicate the Jacobians (skipping empty shards, which every rank can tell).
    if mode == "none":
        jac = local if c.tuple_argnums else local[0]
        return Shard(jac, s.start, s.stop, c.batch_size or 0)
    if s.world == 1:
        return local if c.tuple_argnums else local[0]
    B = c.batch_size or 0
    ranges = [shard_range(B, s.world, r) for r in range(s.world)]
    if mode == "all":
        for r, (a, b) in enumerate(ranges):
            if b > a:
                for f in full:
                    dist.broadcast(f[a:b], src=_global(group, r), group=group)
    else:
        if s.rank == dst:
            for r, (a, b) in enumerate(ranges):
                if r != dst and b > a:
                    for f in full:
                        dist.recv(f[a:b], src=_global(group, r), group=group)
        elif s.stop > s.start:
            for j in local:
                dist.send(j.to(s.comm_device).contiguous(), dst=_global(group, dst), group=group)
            return None
        else:
            return None
    result = tuple(f.to(c.device) for f in full)
    return result if c.tuple_argnums else result[0]


def save_jacobian(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    group: Group = None,
    check_values: bool = True,
    randomness: str = "error",
) -> slice:
    """Write the sharded Jacobian into one ``.npy`` file, each rank writing its own rows.

    Rank 0 creates a temporary file beside ``path`` with the full shape (checking free disk space
    and reserving it); every rank opens it and writes its rows in place (CPU shards are computed
    straight into the file's pages, so no rank ever holds more than its shard); once every rank
    has finished, rank 0 replaces ``path`` with it. On any rank's error the temporary file is
    removed and an existing ``path`` is left untouched. Read it back with ``numpy.load(path, mmap_mode="r")``. With several
    machines, ``path`` must be on a file system all of them see.

    Args:
        path: the ``.npy`` file (a tuple of paths, one per argnum, for tuple ``argnums``).
        func, args, argnums, in_dims, method, vec, chunk_size, group, check_values,
            randomness: as in :func:`jacobian`.

    Returns:
        ``slice(start, stop)``: the rows of the ``(B, ...)`` array this rank wrote.
    """
    from numpy.lib.format import open_memmap

    from .streaming import commit_npy, create_npy, discard, npy_dtype

    where = "distributed.save_jacobian"
    paths: tuple[str, ...] = ()

    def checks(call: Call) -> None:
        nonlocal paths
        paths = V.check_npy_paths(where, path, len(call.argnums), call.dtype)

    raw = path if isinstance(path, (tuple, list)) else (path,)
    s = _validate(
        where,
        func,
        args,
        argnums,
        in_dims,
        method,
        vec,
        chunk_size,
        group,
        check_values,
        [
            ("path", tuple(os.fspath(p) if isinstance(p, (str, os.PathLike)) else p for p in raw)),
            ("randomness", randomness),
        ],
        checks,
    )
    s = _with_randomness(where, s, randomness)
    c = s.call
    np_dtype = npy_dtype(where, c.dtype)

    # See NOTE [Jacobian files are never half-written]: rank 0 creates temporary files beside
    # the targets, every rank writes its rows there, and rank 0 renames them once all finished.
    err: BaseException | None = None
    temps: list[str] = []
    if s.rank == 0:
        try:
            for p, sh in zip(paths, s.shapes, strict=True):
                temps.append(create_npy(where, p, np_dtype, sh)[0])
        except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
            err = e
    try:
        _settle(where, group, err, "creating the .npy file(s)")
        temps = _exchange(group, temps)[0]

        try:
            if s.stop > s.start:
                maps = [open_memmap(t, mode="r+") for t in temps]
                rows = [torch.from_numpy(m[s.start : s.stop]) for m in maps]
                if c.device.type == "cpu":
                    _compute(s, method, vec, chunk_size, rows)
                else:
                    for r, j in zip(rows, _compute(s, method, vec, chunk_size, None), strict=True):
                        r.copy_(j)
                for m in maps:
                    m.flush()
                del rows, maps
        except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
            err = e
        _settle(where, group, err, "writing its rows")
        if s.rank == 0:
            try:
                for t, p in zip(temps, paths, strict=True):
                    commit_npy(t, p)
            except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
                err = e
        _settle(where, group, err, "replacing the .npy file(s)")
    except BaseException:
        if s.rank == 0:
            for t in temps:
                discard(t)
        raise
    return slice(s.start, s.stop)


# ---------------------------------------------------------------------------------------------
# Sums over ranks, for estimators built on per-sample quantities
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of per-sample values, over every rank.

    Attributes:
        count: the number of samples over all ranks.
        sum: ``(*shape)``, float64.
        sum_sq: ``(*shape)``, float64: the sum of squares.
    """

    count: int
    sum: torch.Tensor
    sum_sq: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        """``(*shape)``: the mean over all samples."""
        return self.sum / self.count

    @property
    def var(self) -> torch.Tensor:
        """``(*shape)``: the unbiased sample variance (needs two or more samples)."""
        n = self.count
        return (self.sum_sq - self.sum * self.sum / n) / (n - 1)


def reduce_moments(values: torch.Tensor, group: Group = None) -> Moments:
    """Sum per-sample values and their squares over the ranks (one ``all_reduce``, float64).

    For Monte Carlo estimators over a sample sharded across ranks: each rank passes its own
    samples; every rank gets the totals, equal to those of the whole sample up to float64
    summation order.

    Args:
        values: ``(n_local, *shape)``: this rank's per-sample values (``n_local`` may be 0).
        group: the process group; ``None`` for the default one.

    Returns:
        :class:`Moments` with ``sum`` and ``sum_sq`` of shape ``(*shape)`` on ``values``' device.
    """
    where = "distributed.reduce_moments"
    D.check_process_group(where, dist.is_available() and dist.is_initialized())
    err: BaseException | None = None
    sig: list[tuple[str, Any]] = []
    try:
        V.check_tensor(where, "values", values)
        if values.ndim == 0:
            raise ValueError(
                f"{where}: expected values of shape (n_local, *shape), got a 0-dim tensor. "
                f"Add the sample dimension, e.g. values.reshape(1)."
            )
        sig = [("values.shape[1:]", tuple(values.shape[1:]))]
    except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
        err = e
    _agree(where, group, err, sig)
    if dist.get_backend(group) == "nccl":
        comm = torch.device("cuda", torch.cuda.current_device())
    else:
        comm = torch.device("cpu")
    x = values.detach().to(device=comm, dtype=torch.float64)
    packed = torch.cat(
        [x.new_full((1,), float(x.shape[0])), x.sum(0).reshape(-1), (x * x).sum(0).reshape(-1)]
    )
    dist.all_reduce(packed, group=group)
    k = math.prod(values.shape[1:])
    shape = tuple(values.shape[1:])
    return Moments(
        count=round(packed[0].item()),
        sum=packed[1 : 1 + k].reshape(shape).to(values.device),
        sum_sq=packed[1 + k :].reshape(shape).to(values.device),
    )


# ---------------------------------------------------------------------------------------------
# Sensitivity analysis over ranks
# ---------------------------------------------------------------------------------------------


def dgsm(
    func: Callable[[torch.Tensor], torch.Tensor],
    X: torch.Tensor,
    *,
    bounds: torch.Tensor | Sequence[Sequence[float]] | None = None,
    std: torch.Tensor | Sequence[float] | None = None,
    method: str = "auto",
    batch_size: int | None = 65536,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    group: Group = None,
    **jacobian_kwargs: Any,
) -> Any:
    """:func:`jacbatch.sensitivity.dgsm` with the sample sharded over the ranks of ``group``.

    Every rank passes the same sample ``X (N, d)`` (e.g. :func:`~jacbatch.sensitivity.sample_uniform`
    with one seed; a hash of it is compared across ranks), differentiates its own rows
    (:func:`shard_range`), and the counts, sums and sums of squares of ``J²``, ``|J|`` and ``y``
    are added over the ranks with one ``all_reduce`` (float64). Every rank returns the same
    :class:`~jacbatch.sensitivity.DGSMResult`, equal to the single-process one up to float64
    summation order.

    Args:
        func, X, bounds, std, method, batch_size, input_names, output_names, jacobian_kwargs:
            as in :func:`jacbatch.sensitivity.dgsm`.
        group: the process group; ``None`` for the default one.

    Returns:
        A :class:`~jacbatch.sensitivity.DGSMResult` over the whole sample, on every rank.
    """
    from . import sensitivity as S

    where = "distributed.dgsm"
    D.check_process_group(where, dist.is_available() and dist.is_initialized())
    err: BaseException | None = None
    sig: list[tuple[str, Any]] = []
    setup = None
    try:
        setup = S._dgsm_setup(
            where, X, bounds, std, method, batch_size, jacobian_kwargs, input_names
        )
        sig = [
            ("func", getattr(func, "__qualname__", repr(func))),
            ("X.shape", tuple(setup.X.shape)),
            ("X.dtype", setup.X.dtype),
            ("X values", _fingerprint(setup.X)),
            ("method", setup.method),
            ("distribution", None if setup.poincare is None else _fingerprint(setup.poincare)),
        ]
    except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
        err = e
    _agree(where, group, err, sig)
    assert setup is not None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start, stop = shard_range(setup.X.shape[0], world, rank)
    local = None
    try:
        local = S._dgsm_accumulate(where, func, setup, slice(start, stop))
    except BaseException as e:  # SystemExit too: NOTE [A rank that dies]
        err = e
    _settle(where, group, err, "computing its shard")
    assert local is not None and local.out_shape is not None
    comm = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    d = setup.X.shape[1]
    packed = local.sums(local.out_shape, d, comm)  # counts, sums and sums of squares
    dist.all_reduce(packed, group=group)
    total = S.DGSMAccumulator.from_sums(packed.to(setup.X.device), local.out_shape, d)
    return S._dgsm_result(where, func, setup, total, output_names)
