"""Jacobians larger than memory: iterate over batch chunks, or stream them to a ``.npy`` file
(a directory of ``.npy`` files for a pytree call, NOTE [Pytree Jacobian files])."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch.utils import _pytree as pt

from . import _validation as V
from . import pytree
from .executor import chunks
from .request import Request, build_request


def iter_jacobian(
    func: Callable[..., Any],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    in_dims: Any = 0,
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
            as in :func:`jacbatch.jacobian`, pytrees included. At least one argument must be
            batched.
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
        For pytree arguments or outputs, ``J_chunk`` nests as :func:`jacbatch.jacobian`'s
        result does (``torch.func.jacrev``'s nesting), each leaf holding the chunk's samples.

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
    options = (
        method, vec, chunk_size, max_memory, batch_chunk, progress, randomness, create_graph,
        batched,
    )  # fmt: skip
    if pytree.is_tree_call(args, in_dims, False):  # NOTE [Pytree calls] in jacbatch.pytree
        return _tree_chunks(*_tree_prepare("iter_jacobian", func, args, argnums, in_dims, options))
    try:
        req = _prepare("iter_jacobian", func, args, argnums, in_dims, *options)
    except V.TreeOutput:  # a tuple, list or dict output
        return _tree_chunks(*_tree_prepare("iter_jacobian", func, args, argnums, in_dims, options))
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
    func: Callable[..., Any],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    in_dims: Any = 0,
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

    A pytree call (dict, tuple or list arguments or outputs, as :func:`jacbatch.jacobian`
    takes them) writes a directory instead: one ``.npy`` file per leaf of the result, which
    nests as :func:`jacbatch.jacobian`'s does, and an ``index.json``; it appears complete or
    not at all too. Read it back with :func:`load_jacobian` (NOTE [Pytree Jacobian files]).

    Args:
        path: the ``.npy`` file to create (replaced when complete); for a pytree call, the
            directory to create (an existing one is replaced only if it is such a result).
        func, args, argnums, in_dims, method, vec, chunk_size, max_memory, batch_chunk,
            progress, randomness, batched: as in :func:`iter_jacobian` (a single ``int``
            argnums for tensor calls; a tuple too for pytree calls).

    Returns:
        The shape written: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)``; for
        a pytree call, the result's tree with each leaf's shape (a ``tuple``) in its place.

    Raises:
        TypeError: for a dtype ``.npy`` files cannot hold (``bfloat16``: cast the arguments to
            ``float32``).
        OSError: ``ENOSPC`` before anything is computed when the file system has less room
            than the file needs (the message names both sizes).
    """
    where = "save_jacobian"
    options = (
        method, vec, chunk_size, max_memory, batch_chunk, progress, randomness, False, batched,
    )  # fmt: skip
    if pytree.is_tree_call(args, in_dims, False):  # NOTE [Pytree Jacobian files]
        return _save_tree(path, func, args, argnums, in_dims, options)
    if isinstance(argnums, tuple):
        V.single_argnum(where, argnums)
    try:
        with torch.no_grad():  # a file holds values only: no chunk needs a graph
            req = _prepare(where, func, args, argnums, in_dims, *options)
    except V.TreeOutput:  # a tuple, list or dict output
        return _save_tree(path, func, args, argnums, in_dims, options)
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


# ---------------------------------------------------------------------------------------------
# Pytree calls (NOTE [Pytree calls] in jacbatch.pytree)
# ---------------------------------------------------------------------------------------------

# NOTE [Pytree Jacobian files]
#     A pytree call's result is a tree of Jacobians that are written chunk by chunk side by
#     side, so it cannot be one ``.npz`` (a zip member is written in one stream, and a zipped
#     array cannot be memory-mapped). It is a directory: one ``.npy`` file per leaf, in the
#     result's leaf order (``000.npy``, ``001.npy``, ... plus the leaf's path, sanitized, for
#     the reader's eye), each streamed as a single ``.npy`` is, and ``index.json``: the tree
#     structure (``torch.utils._pytree.treespec_dumps``), each leaf's path
#     (``torch.utils._pytree.keystr``), file and shape. :func:`load_jacobian` rebuilds the tree
#     of memory-mapped arrays. The directory is built under a temporary name beside ``path``
#     (``.<name>.tmp-<random>``, as for files) and renamed onto ``path`` when every leaf is on
#     disk, so it is complete or absent. An existing directory at ``path`` is replaced only if
#     it is such a result (its ``index.json`` says so), and never emptied in place: it is
#     renamed aside first, the new one renamed in, then the old one removed (a crash between
#     the two renames leaves the old one under a hidden name, and ``path`` absent). Anything
#     else at ``path`` is refused before any work.

#: ``index.json``'s ``format`` entry: a directory written by :func:`save_jacobian`.
TREE_FORMAT = "jacbatch-jacobian-tree/1"


def _tree_prepare(
    where: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: object,
    in_dims: object,
    options: tuple[Any, ...],
) -> tuple[pytree.Flat, Request, str | None]:
    """The flat call of a pytree call and its chunked request (``options``: as
    :func:`_prepare` takes them after ``in_dims``)."""
    vec, batched = options[1], options[-1]
    flat = pytree.flatten(where, func, args, argnums, in_dims, vec=vec, batched=batched)
    req = _prepare(where, flat.func, flat.args, flat.argnums, flat.in_dims, *options)
    if flat.noted.spec is None:  # the output's structure, if no eager run of func noted it
        pytree.note_output(flat)
    return flat, req, vec


def _tree_chunks(flat: pytree.Flat, req: Request, vec: str | None) -> Iterator[tuple[slice, Any]]:
    """:func:`jacbatch.executor.chunks` with each chunk nested as the pytree call's result."""
    for sl, J in chunks(req):
        tree = pytree.nest(flat, J, vec)
        del J  # the tree's views hold the chunk; the caller's reference is the last one
        yield sl, tree
        del tree


def _is_tree_dir(path: str) -> bool:
    try:
        with open(os.path.join(path, "index.json")) as f:
            return bool(json.load(f).get("format") == TREE_FORMAT)
    except (OSError, ValueError, AttributeError):
        return False


def _save_tree(
    path: str | os.PathLike[str],
    func: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: object,
    in_dims: object,
    options: tuple[Any, ...],
) -> Any:
    """:func:`save_jacobian` for a pytree call (NOTE [Pytree Jacobian files])."""
    where = "save_jacobian"
    with torch.no_grad():
        flat, req, vec = _tree_prepare(where, func, args, argnums, in_dims, options)
    (target,) = V.check_npy_paths(where, path, 1, req.call.dtype)
    if os.path.lexists(target) and not _is_tree_dir(target):
        raise FileExistsError(
            errno.EEXIST,
            f"{where}: expected path to be new or a directory of Jacobian files written by "
            f"save_jacobian, got an existing {'directory' if os.path.isdir(target) else 'file'} "
            f"{target!r}. A pytree result is a directory (one .npy file per leaf); remove it "
            f"or choose another path",
        )
    dtype = npy_dtype(where, req.call.dtype)
    metas = [torch.empty(s, device="meta") for s in req.shapes]
    layout, spec = pt.tree_flatten_with_path(pytree.nest(flat, metas, vec))
    keys = [pt.keystr(k) for k, _ in layout]
    shapes = [tuple(x.shape) for _, x in layout]
    safe = [re.sub(r"[^A-Za-z0-9_.-]+", "_", key).strip("_.")[:80] for key in keys]
    names = [f"{k:03d}-{n}.npy" if n else f"{k:03d}.npy" for k, n in enumerate(safe)]
    total = sum(math.prod(s) * dtype.itemsize for s in shapes)
    directory = os.path.dirname(os.path.abspath(target))
    free = shutil.disk_usage(directory).free
    if total > free:
        V.disk_too_small(where, target, total, free)
    tmp = temp_name(target)
    os.mkdir(tmp)
    try:
        files = []
        for name, shape in zip(names, shapes, strict=True):
            files.append(create_npy(where, os.path.join(tmp, name), dtype, shape))
        rows = [math.prod(s[1:]) * dtype.itemsize for s in shapes]
        handles = [open(f, "r+b") for f, _ in files]  # noqa: SIM115 - closed below
        try:
            with torch.no_grad():
                for sl, J in _tree_chunks(flat, req, vec):
                    for h, (_, offset), row, leaf in zip(
                        handles, files, rows, pt.tree_leaves(J), strict=True
                    ):
                        h.seek(offset + sl.start * row)
                        h.write(leaf.detach().cpu().contiguous().numpy().data)
                    del J, leaf
            for h in handles:
                h.flush()
                os.fsync(h.fileno())
        finally:
            for h in handles:
                h.close()
        for (f, _), name in zip(files, names, strict=True):
            os.replace(f, os.path.join(tmp, name))
        index = {
            "format": TREE_FORMAT, "treespec": pt.treespec_dumps(spec), "keys": keys,
            "files": names, "shapes": [list(s) for s in shapes], "dtype": dtype.str,
        }  # fmt: skip
        with open(os.path.join(tmp, "index.json"), "w") as fi:
            json.dump(index, fi, indent=1)
            fi.flush()
            os.fsync(fi.fileno())
        _commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return pt.tree_unflatten(shapes, spec)


def _commit_dir(tmp: str, path: str) -> None:
    """Move the complete temporary directory onto ``path`` (an old result renamed aside first,
    then removed) and make the renames durable."""
    old = None
    if os.path.lexists(path):
        old = temp_name(path).replace(".tmp-", ".old-")
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_jacobian(
    path: str | os.PathLike[str], mmap_mode: Literal["r", "r+", "w+", "c"] | None = "r"
) -> Any:
    """Read what :func:`save_jacobian` wrote: a ``numpy`` array (a ``.npy`` file), or the
    result's tree of arrays (a pytree call's directory, NOTE [Pytree Jacobian files]).

    Args:
        path: the file or directory :func:`save_jacobian` wrote.
        mmap_mode: as in ``numpy.load``; the default ``"r"`` maps the files read-only, so a
            Jacobian larger than memory is read on demand.

    Returns:
        ``numpy.ndarray`` ``(B, ...)``, or the tree (dicts, tuples, lists) of them nested as
        :func:`jacbatch.jacobian`'s result.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return np.load(path, mmap_mode=mmap_mode)
    if not _is_tree_dir(path):
        raise ValueError(
            f"load_jacobian: expected a .npy file or a directory written by save_jacobian "
            f"(with an index.json), got the directory {path!r}."
        )
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    arrays = [np.load(os.path.join(path, n), mmap_mode=mmap_mode) for n in index["files"]]
    return pt.tree_unflatten(arrays, pt.treespec_loads(index["treespec"]))


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
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(directory: str) -> None:
    """Make a rename in ``directory`` durable (where directories can be opened)."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
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


__all__ = ["iter_jacobian", "load_jacobian", "save_jacobian"]
