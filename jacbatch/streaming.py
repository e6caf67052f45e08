"""Jacobians larger than memory: iterate over batch chunks, or stream them to a ``.npy`` file."""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from . import _validation as V
from .executor import chunks
from .request import Request, build_request


def iter_jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    batch_chunk: int | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    create_graph: bool = False,
    batched: bool = False,
    sparse: Any = False,
) -> Iterator[tuple[slice, Any]]:
    """Yield the batched Jacobian chunk by chunk, never holding all of it.

    Each chunk has as many samples as fit in ``max_memory`` together with the route's working
    memory (or exactly ``batch_chunk`` samples). Arguments are validated, and the chunking
    planned, when this is called, before the first chunk is computed. The budget covers one
    chunk: drop your reference to a chunk (``del J``) before the loop asks for the next one.

    Args:
        func, args, argnums, in_dims, method, vec, chunk_size, progress, randomness, batched:
            as in :func:`jacbatch.jacobian`. At least one argument must be batched.
        max_memory: budget for one chunk's result plus its working memory (bytes or a string
            like ``"512MiB"``). Default: half of the memory free now.
        batch_chunk: samples per chunk, overriding the budget.
        create_graph: as in :func:`jacbatch.jacobian`: every chunk is differentiable when asked
            for, or when grad mode is on and an argument (or a tensor ``func`` closes over)
            requires grad, or inside a torch.func transform. Decided when this is called.
        sparse: as in :func:`jacbatch.jacobian`: ``True`` or a
            :class:`~jacbatch.sparse.SparsityPattern` yields sparse CSR chunks ``(n,
            out_numel, in_numel)``; the budget covers one chunk's values and working memory.

    Yields:
        ``(batch_slice, J_chunk)``: the samples ``batch_slice`` covers and their Jacobian,
        ``(n, *out_shape, *in_shape)`` (or flattened with ``vec``; a tuple for tuple argnums).

    Example:
        >>> X = torch.randn(10, 3, dtype=torch.float64)
        >>> [(s.start, s.stop, J.shape) for s, J in iter_jacobian(torch.sin, X, batch_chunk=4)]
        [(0, 4, torch.Size([4, 3, 3])), (4, 8, torch.Size([4, 3, 3])), (8, 10, torch.Size([2, 3, 3]))]
    """
    if sparse is not False:  # NOTE [Sparse Jacobians: what a call does]
        from .sparse.engine import iter_jacobian as sparse_chunks

        return sparse_chunks(
            func, args, batch_chunk, argnums=argnums, in_dims=in_dims, sparse=sparse,
            method=method, vec=vec, chunk_size=chunk_size, max_memory=max_memory,
            progress=progress, randomness=randomness, create_graph=create_graph, batched=batched,
        )  # fmt: skip
    req = _prepare(
        "iter_jacobian", func, args, argnums, in_dims, method, vec, chunk_size,
        max_memory, batch_chunk, progress, randomness, create_graph, batched,
    )  # fmt: skip
    return chunks(req)


def _prepare(
    where: str,
    func: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    argnums: int | tuple[int, ...],
    in_dims: int | tuple[int | None, ...] | None,
    method: str,
    vec: str | None,
    chunk_size: int | None,
    max_memory: int | str | None,
    batch_chunk: int | None,
    progress: bool | None,
    randomness: str = "error",
    create_graph: bool = False,
    batched: object = False,
) -> Request:
    """Validate and plan a chunked run once (the budget covers one chunk's result too)."""
    return build_request(
        where, func, args, argnums, in_dims, method=method, vec=vec, chunk_size=chunk_size,
        randomness=randomness, create_graph=create_graph, max_memory=max_memory,
        progress=progress, batch_chunk=batch_chunk, chunked=True, fit="chunk", batched=batched,
    )  # fmt: skip


def save_jacobian(
    path: str | os.PathLike[str],
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    batch_chunk: int | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    batched: bool = False,
) -> tuple[int, ...]:
    """Stream a batched Jacobian into a ``.npy`` file, chunk by chunk, within ``max_memory``.

    Each chunk is written with plain file writes, so resident memory stays near the budget
    even when the file is many times larger than memory. Read it back with
    ``numpy.load(path, mmap_mode="r")``. The file appears complete or not at all (see NOTE
    [Jacobian files are never half-written]): chunks go to a temporary file beside ``path``
    (``.<name>.tmp-<random>``) that replaces ``path`` only once every chunk is on disk; on any
    error it is removed and an existing file at ``path`` is left untouched.
    A file holds values only: no autograd graph is built, whatever the arguments require
    (there is no ``create_graph``).

    Args:
        path: the ``.npy`` file to create (replaced when complete).
        func, args, argnums, in_dims, method, vec, chunk_size, max_memory, batch_chunk,
            progress, randomness, batched: as in :func:`iter_jacobian` (a single ``int``
            argnums).

    Returns:
        The shape written: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)``.

    Raises:
        TypeError: for a dtype ``.npy`` files cannot hold (``bfloat16``: cast the arguments to
            ``float32``).
        OSError: ``ENOSPC`` before anything is computed when the file system has less room
            than the file needs (the message names both sizes).
    """
    where = "save_jacobian"
    if isinstance(argnums, tuple):
        V.single_argnum(where, argnums)
    with torch.no_grad():  # a file holds values only: no chunk needs a graph
        req = _prepare(
            where, func, args, argnums, in_dims, method, vec, chunk_size,
            max_memory, batch_chunk, progress, randomness, False, batched,
        )  # fmt: skip
    it = chunks(req)
    (target,) = V.check_npy_paths(where, path, 1, req.call.dtype)
    shape = req.shapes[0]
    dtype = npy_dtype(where, req.call.dtype)
    tmp, offset = create_npy(where, target, dtype, shape)
    try:
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        with open(tmp, "r+b") as f, torch.no_grad():
            for sl, J in it:
                f.seek(offset + sl.start * row_bytes)
                f.write(J.detach().cpu().contiguous().numpy().data)  # no bytes copy of the chunk
                del J  # free this chunk before the next one is computed
            f.flush()
            os.fsync(f.fileno())
        commit_npy(tmp, target)
    except BaseException:
        discard(tmp)
        raise
    return shape


# NOTE [Jacobian files are never half-written]
#     A ``.npy`` file is valid as soon as its header is written, so a writer killed part-way
#     used to leave a file that ``numpy.load`` read without complaint with zeros where chunks
#     were missing, and overwriting an existing file truncated it first. So the writers build
#     the file under a temporary name in the target directory (same file system, so the final
#     rename is atomic), ``.<name>.tmp-<random>``, which no reader takes for the result; flush
#     and fsync it; and only then ``os.replace`` it onto the final name (and fsync the directory
#     so the rename survives a crash). Any exception removes the temporary file; ``kill -9``
#     cannot, but then the final name still holds its old content (or nothing). Before any work,
#     the file's full size is checked against the free space and reserved with
#     ``posix_fallocate``, so a full disk is a clear ``ENOSPC`` up front instead of a raw error
#     part-way, a sparse file left behind, or a SIGBUS for a reader of a memory map whose pages
#     could not be allocated.


def npy_dtype(where: str, dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype of a ``.npy`` file holding ``dtype``, or a clear ``TypeError``."""
    try:
        return np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
    except TypeError:
        raise TypeError(
            f"{where}: expected a dtype that .npy files can hold, got {dtype}. Cast the "
            f"arguments to float32 or float64 (or use jacbatch.iter_jacobian and convert each "
            f"chunk as you write it)."
        ) from None


def temp_name(path: str) -> str:
    """``dir/.name.tmp-<random>``: beside ``path``, hidden, never mistaken for the result."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{tail}.tmp-{secrets.token_hex(4)}")


def create_npy(
    where: str, path: str, dtype: np.dtype[Any], shape: tuple[int, ...]
) -> tuple[str, int]:
    """Create the temporary file for ``path`` with the ``.npy`` header and its full size
    reserved on disk; returns its name and the data offset (see NOTE [Jacobian files are never
    half-written])."""
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": tuple(shape)}
    )  # fmt: skip
    offset = header.tell()
    total = offset + math.prod(shape) * dtype.itemsize
    directory = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(directory).free
    if total > free:
        V.disk_too_small(where, path, total, free)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "r+b") as f:
            f.write(header.getvalue())
            if total > offset:
                try:
                    os.posix_fallocate(f.fileno(), 0, total)
                except OSError as err:
                    if err.errno == errno.ENOSPC:
                        V.disk_too_small(where, path, total, shutil.disk_usage(directory).free)
                    if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    f.truncate(total)
                except AttributeError:  # pragma: no cover - no posix_fallocate (macOS)
                    f.truncate(total)
    except BaseException:
        discard(tmp)
        raise
    return tmp, offset


def commit_npy(tmp: str, path: str) -> None:
    """Move the complete temporary file onto ``path`` atomically and make the rename durable."""
    with open(tmp, "r+b") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:  # pragma: no cover - directories cannot be opened on some platforms
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


def discard(tmp: str) -> None:
    """Remove a temporary file; quietly if it is already gone."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


__all__ = ["iter_jacobian", "save_jacobian"]
