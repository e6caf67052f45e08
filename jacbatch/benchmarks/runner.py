"""The benchmark runner behind ``jacbatch bench`` (and the cases shared with ``bench/``).

Every route of :func:`jacbatch.jacobian` is timed side by side with the code a user would
otherwise write (``vmap(jacrev)`` called directly, a per-sample
``torch.autograd.functional.jacobian`` loop, a per-sample one-hot VJP loop, JAX when installed)
and with two physical references of the Jacobian's size: allocating and filling a fresh tensor,
and filling an existing buffer (the write bound). Ratios to these references say how close a
route is to the memory-write limit on this machine.

Methodology:

* Each case runs in a fresh Python process (``isolate=True``): on CPU, fresh-page faults
  dominate the time of writing a large new tensor, and how many a call pays depends on the
  allocator's history. Inside a case the methods are timed round-robin (one repetition of
  each in turn, the order rotating every round), so drifts in machine load hit all methods
  alike.
* Times are wall-clock medians; the spread is the interquartile range. On CUDA every
  repetition is bracketed by CUDA events after a synchronize.
* Peak memory over the inputs: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
  allocated before the call; on Linux CPUs the growth of the resident set (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``, with freed heap returned by ``malloc_trim``
  first); ``None`` elsewhere.
* Every method's Jacobian is compared with the closed form (or, without one, with ``jacrev``)
  within :func:`jacbatch.testing.tolerance`.

Optional extras: ``tqdm`` (progress bar; plain lines without it), ``matplotlib`` (``--plot``),
``jax`` (JAX baselines; skipped when absent).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from .api import jacobian
from .functions import affine
from .testing import tolerance

SCHEMA = "jacbatch-bench/1"
ARGNUM = 1  # every case differentiates w.r.t. W


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def affine_tanh(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``tanh(A @ W + B)`` for one sample: ``A (m, p)``, ``W (p, q)``, ``B (q,)`` -> ``(m, q)``."""
    return torch.tanh(affine(A, W, B))


def affine_sum(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(A @ W + B).sum()`` for one sample: a scalar, so its Jacobian is the gradient ``(p, q)``."""
    return affine(A, W, B).sum()


FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "affine": affine,
    "tanh": affine_tanh,
    "sum": affine_sum,
}


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``func(A, W, B)`` for a batch, differentiated w.r.t. ``W``.

    Attributes:
        name: e.g. ``"affine-small"``; with the dtype, ``"affine-small/float64"``.
        kind: ``"affine"``, ``"tanh"`` or ``"sum"`` (see :data:`FUNCTIONS`).
        B, m, p, q: batch size and ``A (m, p)``, ``W (p, q)``, ``B (q,)``.
        dtype: ``"float32"`` or ``"float64"``.
    """

    name: str
    kind: str
    B: int
    m: int
    p: int
    q: int
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.name}/{self.dtype}"

    @property
    def func(self) -> Callable[..., torch.Tensor]:
        return FUNCTIONS[self.kind]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return () if self.kind == "sum" else (self.m, self.q)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.p, self.q)

    @property
    def jacobian_shape(self) -> tuple[int, ...]:
        return (self.B, *self.out_shape, *self.in_shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def jacobian_bytes(self) -> int:
        return math.prod(self.jacobian_shape) * self.torch_dtype.itemsize

    def inputs(self, device: str | torch.device = "cpu", seed: int = 0) -> list[torch.Tensor]:
        """``[A (B, m, p), W (B, p, q), Bias (B, q)]``, reproducible."""
        g = torch.Generator().manual_seed(seed)
        shapes = [(self.B, self.m, self.p), (self.B, self.p, self.q), (self.B, self.q)]
        return [torch.randn(s, generator=g, dtype=self.torch_dtype).to(device) for s in shapes]


def _full_cases() -> list[Case]:
    base = [
        Case("affine-small", "affine", 1024, 8, 8, 8),
        Case("affine-medium", "affine", 64, 32, 32, 32),
        Case("affine-large", "affine", 8, 64, 64, 64),
        Case("affine-wide", "affine", 16, 16, 128, 16),
        Case("tanh-medium", "tanh", 64, 32, 32, 32),
        Case("sum-medium", "sum", 64, 32, 32, 32),
    ]
    return base + [Case(c.name, c.kind, c.B, c.m, c.p, c.q, "float64") for c in base]


def _quick_cases() -> list[Case]:
    # Same names and shapes' character (wide stays wide), sizes small enough for a smoke test.
    base = [
        Case("affine-small", "affine", 16, 3, 3, 3),
        Case("affine-medium", "affine", 4, 5, 5, 5),
        Case("affine-large", "affine", 2, 6, 6, 6),
        Case("affine-wide", "affine", 2, 3, 9, 3),
        Case("tanh-medium", "tanh", 4, 5, 5, 5),
        Case("sum-medium", "sum", 4, 5, 5, 5),
    ]
    return base + [Case(c.name, c.kind, c.B, c.m, c.p, c.q, "float64") for c in base]


#: The cases of a full run (``jacbatch bench``), float32 then float64.
CASES: tuple[Case, ...] = tuple(_full_cases())
#: The same cases, scaled down (``jacbatch bench --quick`` and the smoke tests).
QUICK_CASES: tuple[Case, ...] = tuple(_quick_cases())
CASE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(c.name for c in CASES))
DTYPES: tuple[str, ...] = ("float32", "float64")


def select_cases(
    names: Sequence[str] | None = None, dtypes: Sequence[str] | None = None, quick: bool = False
) -> list[Case]:
    """The cases named (all when ``None``) in the dtypes given (all when ``None``)."""
    pool = QUICK_CASES if quick else CASES
    return [
        c
        for c in pool
        if (names is None or c.name in names) and (dtypes is None or c.dtype in dtypes)
    ]


# ---------------------------------------------------------------------------------------------
# Methods: each builds a zero-argument callable for one case (or None when it does not apply)
# ---------------------------------------------------------------------------------------------

Runner = Callable[[], Any]


@dataclass(frozen=True)
class Method:
    """A way to get the case's Jacobian (or a physical reference of its size).

    Attributes:
        name: as shown in tables and JSON.
        group: ``"jacbatch"`` (a route of :func:`jacbatch.jacobian`), ``"baseline"`` (what a
            user would otherwise write) or ``"reference"`` (memory traffic of the output's size).
        build: ``(case, args, device) -> runner or None``; the runner returns the Jacobian
            ``(B, *out_shape, *in_shape)`` (a reference returns its buffer).
        slow: a per-sample Python loop; fewer repetitions.
    """

    name: str
    group: str
    build: Callable[[Case, list[torch.Tensor], torch.device], Runner | None]
    slow: bool = False


def _route(method: str, with_out: bool = False) -> Callable[..., Runner | None]:
    def build(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner | None:
        if method == "closed_form" and case.kind != "affine":
            return None  # no closed-form rule for this function
        call = partial(jacobian, case.func, *args, argnums=ARGNUM, method=method)
        if not with_out:
            return call
        buf = torch.empty(case.jacobian_shape, dtype=case.torch_dtype, device=device)
        return partial(call, out=buf)

    return build


def _vmap_jacrev(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    f = torch.func.vmap(torch.func.jacrev(case.func, argnums=ARGNUM))
    return lambda: f(*args)


def _functional_loop(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    A, W, Bias = args

    def run() -> torch.Tensor:
        out = []
        for b in range(case.B):
            f = partial(lambda w, a, c: case.func(a, w, c), a=A[b], c=Bias[b])
            out.append(torch.autograd.functional.jacobian(f, W[b], vectorize=True))
        return torch.stack(out)

    return run


def _onehot_loop(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    A, W, Bias = args
    o = math.prod(case.out_shape)
    basis = torch.eye(o, dtype=case.torch_dtype, device=device)

    def run() -> torch.Tensor:
        J = torch.empty(case.B, o, *case.in_shape, dtype=case.torch_dtype, device=device)
        for b in range(case.B):
            w = W[b].detach().requires_grad_(True)
            with torch.enable_grad():
                y = case.func(A[b], w, Bias[b])
            for k in range(o):
                (J[b, k],) = torch.autograd.grad(
                    y, w, basis[k].view(y.shape), retain_graph=k < o - 1
                )
        return J.view(case.jacobian_shape)

    return run


def _alloc_fill(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    shape, dtype = case.jacobian_shape, case.torch_dtype
    return lambda: torch.empty(shape, dtype=dtype, device=device).fill_(1.0)


def _fill_existing(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    buf = torch.empty(case.jacobian_shape, dtype=case.torch_dtype, device=device)
    return lambda: buf.fill_(1.0)


def _copy_existing(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    src = torch.ones(case.jacobian_shape, dtype=case.torch_dtype, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def jax_available() -> bool:
    """Whether JAX can be imported (the JAX baselines run only then)."""
    try:
        import jax  # noqa: F401
    except Exception:
        return False
    return True


def _jax(kind: str) -> Callable[..., Runner | None]:
    def build(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner | None:
        if not jax_available() or (kind == "closed_form" and case.kind != "affine"):
            return None
        import jax
        import jax.numpy as jnp

        if case.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        platform_name = "gpu" if device.type == "cuda" else "cpu"
        jdev = jax.devices(platform_name)[0]
        A, W, Bias = (jax.device_put(a.detach().cpu().numpy(), jdev) for a in args)

        def f(a: Any, w: Any, c: Any) -> Any:
            z = a @ w + c
            if case.kind == "tanh":
                return jnp.tanh(z)
            if case.kind == "sum":
                return z.sum()
            return z

        if kind == "closed_form":  # J[b, i, j, k, l] = A[b, i, k] δ(j, l)
            eye = jnp.eye(case.q, dtype=A.dtype)
            fn = jax.jit(lambda a, w, c: jnp.einsum("bik,jl->bijkl", a, eye))
        else:
            transform = jax.jacrev if kind == "jacrev" else jax.jacfwd
            fn = jax.jit(jax.vmap(transform(f, argnums=ARGNUM)))
        return lambda: fn(A, W, Bias).block_until_ready()

    return build


METHODS: tuple[Method, ...] = (
    Method("closed_form", "jacbatch", _route("closed_form")),
    Method("closed_form(out=)", "jacbatch", _route("closed_form", with_out=True)),
    Method("jacrev", "jacbatch", _route("jacrev")),
    Method("jacfwd", "jacbatch", _route("jacfwd")),
    Method("vjp", "jacbatch", _route("vjp")),
    Method("auto", "jacbatch", _route("auto")),
    Method("torch.func vmap(jacrev)", "baseline", _vmap_jacrev),
    Method("autograd.functional loop", "baseline", _functional_loop, slow=True),
    Method("one-hot vjp loop", "baseline", _onehot_loop, slow=True),
    Method("jax closed form", "baseline", _jax("closed_form")),
    Method("jax jit(vmap(jacrev))", "baseline", _jax("jacrev")),
    Method("jax jit(vmap(jacfwd))", "baseline", _jax("jacfwd")),
    Method("alloc+fill", "reference", _alloc_fill),
    Method("fill existing", "reference", _fill_existing),
    Method("copy existing", "reference", _copy_existing),
)
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
#: The jacbatch routes ``auto`` is compared with.
ROUTES: tuple[str, ...] = ("closed_form", "jacrev", "jacfwd", "vjp")


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_LIBC: Any = None


def _malloc_trim() -> None:
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Bytes allocated at the peak of a call beyond what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. Linux CPU: resident-set growth (``VmHWM`` reset
    through ``/proc/self/clear_refs``, after ``malloc_trim`` returned freed heap pages).
    ``peak`` stays ``None`` where neither is available.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before: int | None = None
        self.peak: int | None = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            _sync(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            self.before = None
            return
        kib = _proc_status_kib("VmRSS")
        self.before = None if kib is None else kib * 1024

    def stop(self) -> None:
        """Call while the result is still alive."""
        if self.before is None:
            return
        if self.device.type == "cuda":
            _sync(self.device)
            self.peak = int(torch.cuda.max_memory_allocated(self.device) - self.before)
            return
        kib = _proc_status_kib("VmHWM")
        self.peak = None if kib is None else max(0, kib * 1024 - self.before)


def _time_once(
    fn: Runner, device: torch.device, meter: PeakMemory | None = None
) -> tuple[float, Any]:
    """Seconds for one call (CUDA events on CUDA, ``perf_counter`` on CPU) and its result.

    With ``meter``, the call's peak memory is measured too (outside the timed region).
    """
    if meter is not None:
        meter.start()
    if device.type == "cuda":
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        result = fn()
        t = time.perf_counter() - t0
    if meter is not None:
        meter.stop()
    return t, result


def _iqr(times: Sequence[float]) -> float:
    if len(times) < 4:
        return max(times) - min(times)
    q = statistics.quantiles(times, n=4)
    return q[2] - q[0]


def _as_torch(J: Any) -> torch.Tensor:
    if isinstance(J, torch.Tensor):
        return J.detach()
    import numpy as np

    return torch.from_numpy(np.array(J))  # a writable copy of the JAX result


@dataclass
class Result:
    """One method on one case (times in seconds, memory in bytes)."""

    method: str
    group: str
    status: str  # "ok", "n/a" (does not apply), "error"
    median_s: float | None = None
    iqr_s: float | None = None
    min_s: float | None = None
    times_s: list[float] | None = None
    peak_bytes: int | None = None
    peak_over_output: float | None = None
    max_abs_diff: float | None = None
    agrees: bool | None = None
    ratio_to_closed_form: float | None = None
    ratio_to_write_bound: float | None = None
    ratio_to_alloc_fill: float | None = None
    error: str | None = None


def run_case(
    case: Case,
    device: str | torch.device = "cpu",
    methods: Sequence[str] | None = None,
    *,
    quick: bool = False,
    budget_s: float | None = None,
    max_reps: int | None = None,
) -> dict[str, Any]:
    """Time every method on one case in this process; the JSON record of the case.

    Args:
        case: the case.
        device: ``"cpu"`` or ``"cuda"``.
        methods: names from :data:`METHOD_NAMES` (all when ``None``).
        quick: few repetitions.
        budget_s: time budget per method for choosing its repetitions.
        max_reps: at most this many repetitions per method.
    """
    gc.collect()
    gc.freeze()  # everything alive now is long-lived: later collections stay cheap
    try:
        return _run_case(case, torch.device(device), methods, quick, budget_s, max_reps)
    finally:
        gc.unfreeze()


_WARM: set[str] = set()


def _warm_up(dev: torch.device) -> None:
    """Pay one-time costs (lazy imports, dispatcher and torch.func initialization) up front,
    once per process and device type."""
    if dev.type in _WARM:
        return
    _WARM.add(dev.type)
    tiny = Case("warm-up", "tanh", 2, 2, 2, 2)
    A, W, Bias = tiny.inputs(dev)
    for method in ("closed_form", "jacrev", "jacfwd", "vjp", "auto"):
        jacobian(
            affine if method == "closed_form" else affine_tanh, A, W, Bias, argnums=1, method=method
        )


def _run_case(
    case: Case,
    dev: torch.device,
    methods: Sequence[str] | None,
    quick: bool,
    budget_s: float | None,
    max_reps: int | None,
) -> dict[str, Any]:
    budget = budget_s if budget_s is not None else (0.02 if quick else 1.0)
    cap = max_reps if max_reps is not None else (3 if quick else 25)
    _warm_up(dev)
    args = case.inputs(dev)
    chosen = [m for m in METHODS if methods is None or m.name in methods]
    results: dict[str, Result] = {}
    runners: dict[str, Runner] = {}
    reps: dict[str, int] = {}
    jacs: dict[str, torch.Tensor] = {}
    out_bytes = case.jacobian_bytes()

    # Build and warm up (the first call also yields the Jacobian to check and a first peak
    # memory figure), then choose each method's repetitions from its first time.
    for m in chosen:
        try:
            fn = m.build(case, args, dev)
        except Exception as err:  # an optional baseline failing to build is reported, not fatal
            results[m.name] = Result(m.name, m.group, "error", error=f"{type(err).__name__}: {err}")
            continue
        if fn is None:
            results[m.name] = Result(m.name, m.group, "n/a")
            continue
        meter = PeakMemory(dev)
        try:
            first, J = _time_once(fn, dev, meter)
        except Exception as err:
            results[m.name] = Result(m.name, m.group, "error", error=f"{type(err).__name__}: {err}")
            continue
        if m.group != "reference":
            jacs[m.name] = _as_torch(J).to("cpu").reshape(case.jacobian_shape)
        del J
        if first >= budget and not m.slow:
            # A first call can carry one-time costs (lazy initialization, JIT compilation):
            # time a second one before deciding how often to repeat it.
            meter = PeakMemory(dev)
            first, J = _time_once(fn, dev, meter)
            del J
        runners[m.name] = fn
        res = Result(m.name, m.group, "ok", times_s=[], peak_bytes=meter.peak)
        if first >= budget:
            # Seconds-long calls: warm-up effects are negligible, so the first call counts;
            # per-sample loops (tens of seconds at full size) get no other call.
            res.times_s = [first]
            reps[m.name] = 0 if m.slow else min(cap - 1, 2 if first < 2 * budget else 1)
        else:
            reps[m.name] = max(min(3, cap), min(cap, int(budget / max(first, 1e-6))))
        results[m.name] = res

    # Round-robin repetitions: every method sees the same machine load and allocator history,
    # and the order rotates each round so that no method always runs first (or after the same
    # neighbour). The first timed repetition also measures peak memory (warm, unlike the first
    # call).
    order = list(runners.items())
    for r in range(max(reps.values(), default=0)):
        shift = r % len(order)
        for name, fn in order[shift:] + order[:shift]:
            if r < reps[name]:
                res = results[name]
                rep_meter = PeakMemory(dev) if r == 0 else None
                t, result = _time_once(fn, dev, rep_meter)
                del result
                res.times_s.append(t)  # type: ignore[union-attr]
                if rep_meter is not None and rep_meter.peak is not None:
                    res.peak_bytes = rep_meter.peak

    for name in runners:
        res = results[name]
        times = res.times_s or []
        res.median_s = statistics.median(times)
        res.iqr_s = _iqr(times)
        res.min_s = min(times)
        if res.peak_bytes is not None and out_bytes:
            res.peak_over_output = res.peak_bytes / out_bytes

    # Agreement with the closed form (or, without one, with jacrev).
    ref_name: str | None = next((n for n in ("closed_form", "jacrev") if n in jacs), None)
    if ref_name is None and jacs:
        ref_name = next(iter(jacs.keys()))
    if ref_name is not None:
        ref = jacs[ref_name]
        rtol, atol = tolerance(case.torch_dtype)
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        for name, J in jacs.items():
            diff = float((J.to(ref.dtype) - ref).abs().max()) if ref.numel() else 0.0
            results[name].max_abs_diff = diff
            results[name].agrees = diff <= atol + rtol * scale

    def med(name: str) -> float | None:
        res = results.get(name)
        return res.median_s if res is not None and res.status == "ok" else None

    cf, wb, af = med("closed_form"), med("fill existing"), med("alloc+fill")
    for res in results.values():
        if res.median_s is None:
            continue
        res.ratio_to_closed_form = res.median_s / cf if cf else None
        res.ratio_to_write_bound = res.median_s / wb if wb else None
        res.ratio_to_alloc_fill = res.median_s / af if af else None

    # Bandwidths: the closed form writes the Jacobian once; a copy reads and writes it.
    cp = med("copy existing")
    bandwidth = {
        "closed_form_write_GBps": out_bytes / cf / 1e9 if cf else None,
        "copy_GBps": 2 * out_bytes / cp / 1e9 if cp else None,
        "fill_GBps": out_bytes / wb / 1e9 if wb else None,
    }
    bandwidth["closed_form_fraction_of_copy"] = (
        cp / (2 * cf) if cf and cp else None  # (bytes / t_cf) / (2 bytes / t_copy)
    )

    return {
        **asdict(case),
        "id": case.id,
        "jacobian_shape": list(case.jacobian_shape),
        "jacobian_bytes": out_bytes,
        "input_bytes": sum(a.numel() * a.element_size() for a in args),
        "reference_method": ref_name,
        "bandwidth": bandwidth,
        "results": [asdict(results[m.name]) for m in chosen if m.name in results],
    }


# ---------------------------------------------------------------------------------------------
# Environment, targets, report
# ---------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware: torch, jax (or ``None``), Python, threads, CPU and GPU names."""
    jax_version = None
    if jax_available():
        import jax

        jax_version = jax.__version__
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "torch": torch.__version__,
        "jax": jax_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "device": device,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _by_method(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in record["results"] if r["status"] == "ok"}


def targets(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's performance targets evaluated on these records: one row per (target, case)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, case_id: str, value: float | None, limit: float, higher: bool) -> None:
        if value is None:
            return
        met = value >= limit if higher else value <= limit
        rows.append({"target": name, "case": case_id, "value": value, "limit": limit, "met": met})

    for rec in records:
        r = _by_method(rec)
        cid = rec["id"]

        def t(name: str, r: dict[str, dict[str, Any]] = r) -> float | None:
            return r[name]["median_s"] if name in r else None

        cf, af, wb = t("closed_form"), t("alloc+fill"), t("fill existing")
        if rec["kind"] == "affine" and cf and af:
            limit = 1.3 if rec["name"] == "affine-small" else 1.1
            add("closed_form / alloc+fill", cid, cf / af, limit, False)
        cfo = t("closed_form(out=)")
        if rec["kind"] == "affine" and cfo and wb:
            add("closed_form(out=) / fill existing", cid, cfo / wb, 1.3, False)
        vj = t("torch.func vmap(jacrev)")
        if cf and vj and rec["name"] in ("affine-small", "affine-large"):
            limit = 15.0 if rec["name"] == "affine-small" else 4.0
            add("vmap(jacrev) / closed_form", cid, vj / cf, limit, True)
        for jname in ("jax closed form", "jax jit(vmap(jacrev))"):
            tj = t(jname)
            if cf and tj:
                add(f"{jname} / closed_form", cid, tj / cf, 1.0, True)
        vp, loop = t("vjp"), t("one-hot vjp loop")
        if vp and loop:
            add("one-hot vjp loop / vjp", cid, loop / vp, 10.0, True)
        out_bytes = rec["jacobian_bytes"]
        for name in ("closed_form", "vjp"):
            if name in r and r[name]["peak_bytes"] is not None and out_bytes:
                add(f"peak({name}) / output", cid, r[name]["peak_bytes"] / out_bytes, 1.1, False)
        routes = [x for x in (t(n) for n in ROUTES) if x]
        au = t("auto")
        if au and routes:
            add("auto / fastest route", cid, au / min(routes), 1.1, False)
    return rows


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_case(record: dict[str, Any]) -> str:
    """A plain-text table for one case."""
    mib = record["jacobian_bytes"] / 2**20
    head = (
        f"{record['id']}: B={record['B']} m={record['m']} p={record['p']} q={record['q']}, "
        f"Jacobian {tuple(record['jacobian_shape'])} = {mib:.1f} MiB "
        f"(agreement vs {record['reference_method']})"
    )
    bw = record.get("bandwidth") or {}
    if bw.get("closed_form_fraction_of_copy") is not None:
        head += (
            f"\nclosed form writes {bw['closed_form_write_GBps']:.1f} GB/s = "
            f"{bw['closed_form_fraction_of_copy']:.2f} of the copy bandwidth "
            f"({bw['copy_GBps']:.1f} GB/s read + write)"
        )
    cols = [
        "method",
        "median",
        "IQR",
        "x closed",
        "x write",
        "x alloc",
        "peak MiB",
        "peak/out",
        "ok",
    ]
    rows = []
    for r in record["results"]:
        if r["status"] != "ok":
            note = "n/a" if r["status"] == "n/a" else f"error: {r['error']}"[:60]
            rows.append([r["method"], note, "", "", "", "", "", "", ""])
            continue
        peak = r["peak_bytes"]
        agrees = {True: "yes", False: "NO", None: ""}[r["agrees"]]
        rows.append(
            [
                r["method"],
                _fmt_time(r["median_s"]),
                _fmt_time(r["iqr_s"]),
                _fmt_ratio(r["ratio_to_closed_form"]),
                _fmt_ratio(r["ratio_to_write_bound"]),
                _fmt_ratio(r["ratio_to_alloc_fill"]),
                "-" if peak is None else f"{peak / 2**20:.1f}",
                _fmt_ratio(r["peak_over_output"]),
                agrees,
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=False)]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return "\n".join([head, line(cols), line(["-" * w for w in widths]), *map(line, rows)])


def format_targets(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "targets: none evaluated"
    lines = ["targets:"]
    for r in rows:
        op = ">=" if r["target"].startswith(("vmap", "jax", "one-hot")) else "<="
        mark = "met" if r["met"] else "MISSED"
        lines.append(
            f"  {r['target']:<36} {r['case']:<24} {r['value']:8.2f} {op} {r['limit']:<5} {mark}"
        )
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: str) -> None:
    """Log-log PNG of time against Jacobian size over the affine cases (the size sweep), one
    line per method, one panel per dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError(
            "jacbatch bench: expected matplotlib for --plot, got ImportError. "
            "Install the optional extra: pip install 'jacbatch[plot]'."
        ) from err
    dtypes = sorted({r["dtype"] for r in records})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        recs = sorted(
            (r for r in records if r["dtype"] == dtype and r["kind"] == "affine"),
            key=lambda r: r["jacobian_bytes"],
        )
        cmap = plt.get_cmap("tab20")
        colors = [cmap(i) for i in range(20)]
        for k, name in enumerate(METHOD_NAMES):
            pts = [
                (rec["jacobian_bytes"], _by_method(rec)[name]["median_s"])
                for rec in recs
                if name in _by_method(rec)
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                style = "--" if name in ("alloc+fill", "fill existing", "copy existing") else "-o"
                ax.plot(xs, ys, style, label=name, markersize=4, color=colors[k % len(colors)])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Jacobian size (bytes)")
        ax.set_ylabel("median time (s)")
        ax.set_title(f"A @ W + B w.r.t. W, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------------------------


class _Progress:
    """tqdm when installed, else one plain line per step on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="case", file=sys.stderr)

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_isolated(
    case: Case, device: str, methods: Sequence[str] | None, quick: bool
) -> dict[str, Any]:
    """Run one case in a fresh interpreter and read back its record."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "case.json")
        spec = {
            "case": asdict(case),
            "device": device,
            "methods": methods,
            "quick": quick,
            "threads": torch.get_num_threads(),
        }
        cmd = [sys.executable, "-m", "jacbatch.benchmarks", json.dumps(spec), path]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(
                f"jacbatch bench: case {case.id} failed in its worker process "
                f"(exit {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        with open(path) as fh:
            record: dict[str, Any] = json.load(fh)
        return record


def _print(text: str) -> None:
    print(text, flush=True)


def run(
    cases: Sequence[Case],
    device: str = "cpu",
    methods: Sequence[str] | None = None,
    *,
    quick: bool = False,
    isolate: bool = True,
    progress: bool = True,
    echo: Callable[[str], None] | None = _print,
) -> dict[str, Any]:
    """Run the benchmark; the JSON-ready report ``{"schema", "environment", "config", "cases", "targets"}``.

    Args:
        cases: from :func:`select_cases`.
        device: ``"cpu"`` or ``"cuda"``.
        methods: names from :data:`METHOD_NAMES` (all when ``None``).
        quick: few repetitions (pair with the scaled-down :data:`QUICK_CASES`).
        isolate: run each case in a fresh process.
        progress: show a progress bar over cases.
        echo: where each case's table goes (``None``: nowhere).
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "jacbatch bench: expected a CUDA device for --device cuda, got none "
            "(torch.cuda.is_available() is False). Use --device cpu."
        )
    records = []
    bar = _Progress(len(cases), progress)
    try:
        for case in cases:
            bar.step(case.id)
            if isolate:
                rec = _run_isolated(case, device, methods, quick)
            else:
                rec = run_case(case, device, methods, quick=quick)
            records.append(rec)
            bar.advance()
            if echo is not None:
                echo(format_case(rec) + "\n")
    finally:
        bar.close()
    rows = targets(records)
    if echo is not None:
        echo(format_targets(rows))
    return {
        "schema": SCHEMA,
        "environment": environment(device),
        "config": {
            "quick": quick,
            "device": device,
            "isolate": isolate,
            "cases": [c.id for c in cases],
            "methods": list(methods) if methods is not None else list(METHOD_NAMES),
        },
        "cases": records,
        "targets": rows,
    }


def _worker(argv: Sequence[str]) -> None:
    spec, path = json.loads(argv[0]), argv[1]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    rec = run_case(case, spec["device"], spec["methods"], quick=spec["quick"])
    with open(path, "w") as fh:
        json.dump(rec, fh)


if __name__ == "__main__":
    _worker(sys.argv[1:])
