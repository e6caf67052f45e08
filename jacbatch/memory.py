"""Memory: budgets, preflight estimates from shapes alone, and the numbers behind chunking.

NOTE [Estimating peak memory by running the route on meta tensors]
    A route's peak working memory depends on what autograd saves and what vmap materializes,
    which no closed formula captures for arbitrary functions. So the estimate runs the very
    route that would run, on ``meta`` tensors of the real shapes (no data, no compute, no
    memory), under a dispatch mode that sees every tensor the kernels allocate: bytes are added
    when an op returns a tensor on a new storage and released when the last tensor on that
    storage dies. Its running maximum is the peak. Meta tensors cost no compute, so a chunk of any
    size is simulated directly, and the largest chunk that fits a budget is found by bisection.
    The vjp route's peak is reached in its first backward passes, so only two are simulated.
    Outputs of ``prims`` ops are not counted: they appear only inside Python meta kernels, and
    there only where a real kernel computes shapes and dtypes on meta tensors. Forward mode's
    ``add`` of a tangent and a zero tangent, for one, runs ``add`` on meta tensors to find the
    broadcast shape and then allocates the real result with ``_to_copy``; in a simulation both
    are meta, and counting the ``prims.add`` of the shape computation put forward mode's
    estimate 47% above the measured peak. Measured as the rise of peak resident memory in a
    fresh process (tests/test_memory.py), every route comes to 99-100% of the estimate.
    Functions that cannot run on meta tensors (``.item()``, closures over real tensors) get a
    conservative multiple of the output instead, marked ``exact=False``.

NOTE [A chunk costs what it holds]
    A batch chunk is a narrow view of the caller's arguments, and forward-mode AD allocates a
    tangent the size of a view's whole storage: ``jacfwd`` w.r.t. a 4-sample view of a
    1024-sample tensor peaked at 4.1 GiB, on a copy of the 4 samples at 48 MiB. So a chunk's
    batched arguments are copied when they are views of a larger storage (:func:`compact`, a
    copy of the chunk's inputs only), and the simulation, which runs on fresh meta tensors of
    the chunk's shapes, then describes what really runs.

    Between chunks the memory the previous chunk freed is handed back to the OS
    (:func:`release_freed`, glibc's ``malloc_trim``). Without it glibc keeps freed blocks of the
    sizes a chunk allocates in its heap (its mmap threshold rises with every large block freed)
    and the next chunk's differently sized blocks land beside them: measured in a fresh process,
    ``vmap(jacrev)`` under a 64 MiB budget peaked at 181 MiB beyond the result without it.
    Within a chunk the same happens on a smaller scale: once the first chunk has freed a large
    block, glibc serves blocks below that size from its heap, where a freed block does not fit
    the next larger one and both stay resident. Forward mode w.r.t. ``A`` of
    ``tanh(A @ W + B)``, chunks of 16 samples simulated (and measured alone) at 62 MiB, peaked
    at 102 MiB from the second chunk on (1.65x). So on glibc a chunk aims at half the budget
    (:func:`chunk_target`), falling back to the whole budget when one sample needs more than
    half. Setting ``M_MMAP_THRESHOLD`` would avoid the fragmentation, but it is process-wide
    and would change the allocator for the caller's own code.
    A route that cannot write into the result (``vmap(jacrev)``, forward mode) returns each
    chunk's Jacobian as a temporary that is then copied into the result, so for those routes the
    chunk's own output counts against the budget as well.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import re
import sys
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import _validation as V

#: Fraction of currently free memory used as the default working budget.
DEFAULT_FRACTION = 0.5

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(where: str, value: object) -> int:
    """``2048``, ``"512MiB"``, ``"2 GiB"``, ``"1.5GB"`` -> bytes.

    A whole number of bytes, at least one: ``0.5`` or ``"1.5"`` (half bytes) are refused, while
    ``"0.5KiB"`` (512 bytes) is fine.
    """
    if isinstance(value, bool):
        V.bad_memory_value(where, value)
    n: float | None = None
    if isinstance(value, (int, float)):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if n is None or not math.isfinite(n) or n <= 0:
        V.bad_memory_value(where, value)
    if n < 1:
        V.bad_memory_value(where, value, f"{n:g} bytes is under one byte")
    if n != int(n):
        if isinstance(value, str) and abs(n - round(n)) < 1e-6 * n:  # "1.1GB": float rounding
            return round(n)
        V.bad_memory_value(where, value, f"{n:g} is not a whole number of bytes")
    return int(n)


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: ``1536 -> '1.5 KiB'``, ``2**29 -> '512 MiB'``."""
    value, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    while abs(value) >= 1000 and len(units) > 1:  # 1000 (not 1024): no '1.02e+03 KiB'
        value, units = value / 1024, units[1:]
    if value == int(value):
        return f"{int(value)} {units[0]}"
    return f"{value:.3g} {units[0]}" if abs(value) >= 1 else f"{value:.2f} {units[0]}"


#: What :func:`available_memory` assumes when free memory cannot be read at all.
FALLBACK_AVAILABLE = 1 * 2**30


def _read_available(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def available_memory(device: torch.device) -> int:
    """Bytes free right now: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on the CPU.

    A read that fails or says nothing is free (a transient reading under load, a sandbox
    without ``/proc``) is retried once; if it fails again the figure is
    :data:`FALLBACK_AVAILABLE` (1 GiB), never 0, so a small request is never refused for a
    reading that could not be taken, while a huge one still is.
    """
    readings = []
    for _ in range(2):
        try:
            readings.append(_read_available(device))
        except (OSError, ValueError, AttributeError, RuntimeError):
            continue
        if readings[-1] > 0:
            return readings[-1]
    return FALLBACK_AVAILABLE if not readings else max(max(readings), FALLBACK_AVAILABLE)


def default_budget(device: torch.device) -> int:
    """The working-memory budget when none is given: a safe fraction of what is free.

    Rounded down to a multiple of 64 MiB (at least 64 MiB), so that the chunking chosen for a
    shape stays cached while free memory drifts by a few pages between calls.
    """
    step = 64 * 2**20
    return max(step, int(DEFAULT_FRACTION * available_memory(device)) // step * step)


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of live tensor storages allocated under it, and their peak.

    Args:
        include_meta: count meta tensors (what a simulation needs); ``False`` counts only
            tensors with real memory behind them.
    """

    def __init__(self, include_meta: bool = True) -> None:
        super().__init__()
        self.include_meta = include_meta
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage key -> [tensor count, nbytes]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "namespace", None) == "prims":
            # Only Python meta kernels run prims; see NOTE [Estimating peak memory ...].
            return out
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or (not self.include_meta and t.is_meta):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            entry = self._refs.get(key)
            if entry is None:
                entry = self._refs[key] = [0, storage.nbytes()]
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


@dataclass(frozen=True)
class MemoryEstimate:
    """What a :func:`jacbatch.jacobian` call needs, from shapes alone.

    Attributes:
        route: the route(s) the call would run, e.g. ``"closed_form"`` or ``"jacrev"``.
        output_bytes: bytes of the result(s).
        peak_bytes: peak bytes the route allocates, the result included (inputs excluded).
        working_bytes: ``peak_bytes - output_bytes``: what the budget of ``max_memory`` bounds.
        batch_size: ``B`` (``None`` without a batch).
        exact: ``False`` when the function could not be simulated on meta tensors and the figures
            are conservative multiples of the output.
    """

    route: str
    output_bytes: int
    peak_bytes: int
    batch_size: int | None
    exact: bool = True

    @property
    def working_bytes(self) -> int:
        return max(0, self.peak_bytes - self.output_bytes)

    def __str__(self) -> str:
        batch = "no batch" if self.batch_size is None else f"B={self.batch_size}"
        kind = "" if self.exact else " (conservative: the function could not run on meta tensors)"
        return (
            f"MemoryEstimate({self.route}, {batch}: output {format_bytes(self.output_bytes)}, "
            f"peak {format_bytes(self.peak_bytes)}, working {format_bytes(self.working_bytes)}"
            f"{kind})"
        )


def simulate_peak(run: Callable[[], Any]) -> int:
    """Peak bytes allocated while ``run()`` executes (meant for meta tensors)."""
    with LiveBytes() as tracker:
        result = run()
        del result
    return tracker.peak


def compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a contiguous copy when it is a view of a larger storage.

    See NOTE [A chunk costs what it holds].
    """
    if t.is_sparse or t.layout != torch.strided or t.device.type == "meta":
        return t
    if torch._C._functorch.is_functorch_wrapped_tensor(t):
        return t  # a transform's wrapper: its storage is not ours to size
    try:
        nbytes = t.untyped_storage().nbytes()
    except (NotImplementedError, RuntimeError):  # no storage (fake tensors)
        return t
    if nbytes > t.numel() * t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


_TRIM: list[Callable[[int], int] | None] = []

#: Chunks of a batch aim at ``budget / CHUNK_SLACK`` of simulated working memory on glibc.
CHUNK_SLACK = 2


def chunk_target(budget: int, device: torch.device) -> int:
    """The working memory one batch chunk may simulate to, for a ``budget`` on ``device``.

    See NOTE [A chunk costs what it holds]: on glibc, resident memory within a chunk exceeds
    the live bytes by up to about 1.7x, so chunks aim at half the budget (on CUDA and other C
    libraries, the budget itself).
    """
    if device.type == "cpu" and _trim_function() is not None:
        return max(1, budget // CHUNK_SLACK)
    return budget


def _trim_function() -> Callable[[int], int] | None:
    if not _TRIM:
        fn = None
        if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
            try:
                fn = ctypes.CDLL(None).malloc_trim
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):  # pragma: no cover
                fn = None
        _TRIM.append(fn)
    return _TRIM[0]


def release_freed() -> None:
    """Hand memory freed by earlier chunks back to the OS (glibc's ``malloc_trim``).

    See NOTE [A chunk costs what it holds]. A no-op where the C library is not glibc.
    """
    trim = _trim_function()
    if trim is not None:
        trim(0)
