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
    Some meta kernels are Python decompositions that allocate temporaries the real kernels do
    not (forward-mode ``add`` under ``vmap``, for one), so the figure can err high: measured as
    the rise of peak resident memory in a fresh process (tests/test_memory.py), the closed form,
    jacrev and vjp came to 99-100% of the estimate, forward mode to about 68%.
    Functions that cannot run on meta tensors (``.item()``, closures over real tensors) get a
    conservative multiple of the output instead, marked ``exact=False``.
"""

from __future__ import annotations

import math
import os
import re
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

#: Peak working memory as a multiple of the output when a route cannot be simulated.
FALLBACK_MULTIPLE = {"closed_form": 0.1, "jacrev": 3.0, "jacfwd": 4.0, "vjp": 1.5}

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
    """``2048``, ``"512MiB"``, ``"2 GiB"``, ``"1.5GB"`` -> bytes."""
    if isinstance(value, bool):
        V.bad_memory_value(where, value)
    if isinstance(value, (int, float)):
        if value <= 0 or not math.isfinite(value):
            V.bad_memory_value(where, value)
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            n = float(m.group(1)) * _UNITS[m.group(2).lower()]
            if n > 0:
                return int(n)
    V.bad_memory_value(where, value)


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: ``1536 -> '1.5 KiB'``, ``2**29 -> '512 MiB'``."""
    value, units = float(n), ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    while abs(value) >= 1000 and len(units) > 1:  # 1000 (not 1024): no '1.02e+03 KiB'
        value, units = value / 1024, units[1:]
    if value == int(value):
        return f"{int(value)} {units[0]}"
    return f"{value:.3g} {units[0]}" if abs(value) >= 1 else f"{value:.2f} {units[0]}"


def available_memory(device: torch.device) -> int:
    """Bytes free right now: ``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 8 * 2**30


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
        method: the route(s) the call would run, e.g. ``"closed_form"`` or ``"jacrev"``.
        output_bytes: bytes of the result(s).
        peak_bytes: peak bytes the route allocates, the result included (inputs excluded).
        working_bytes: ``peak_bytes - output_bytes``: what the budget of ``max_memory`` bounds.
        batch_size: ``B`` (``None`` without a batch).
        exact: ``False`` when the function could not be simulated on meta tensors and the figures
            are conservative multiples of the output.
    """

    method: str
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
            f"MemoryEstimate({self.method}, {batch}: output {format_bytes(self.output_bytes)}, "
            f"peak {format_bytes(self.peak_bytes)}, working {format_bytes(self.working_bytes)}"
            f"{kind})"
        )


def simulate_peak(run: Callable[[], Any]) -> int:
    """Peak bytes allocated while ``run()`` executes (meant for meta tensors)."""
    with LiveBytes() as tracker:
        result = run()
        del result
    return tracker.peak
