"""Timing, memory and agreement: the runner of ``jacbatch bench`` (methodology in the package's
docstring, :mod:`jacbatch.benchmarks`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _progress, jacobian
from ..testing import tolerance
from .cases import METHOD_NAMES, METHODS, ROUTES, Case, NotApplicable, Runner, affine_tanh
from .report import environment, format_case
from .targets import Target, evaluate_targets, format_targets

SCHEMA = "jacbatch-bench/1"


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
    status: str  # "ok", "n/a" (does not apply; ``error`` says why), "error"
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
    for method in (*ROUTES, "auto"):
        jacobian(affine_tanh, A, W, Bias, argnums=1, method=method)


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
        except NotApplicable as why:
            results[m.name] = Result(m.name, m.group, "n/a", error=str(why))
            continue
        except Exception as err:  # an optional baseline failing to build is reported, not fatal
            results[m.name] = Result(m.name, m.group, "error", error=f"{type(err).__name__}: {err}")
            continue
        if fn is None:
            results[m.name] = Result(m.name, m.group, "n/a", error="does not apply to this case")
            continue
        meter = PeakMemory(dev)
        try:
            first, J = _time_once(fn, dev, meter)
        except NotImplementedError as err:  # a route that cannot serve this case: not an error
            results[m.name] = Result(m.name, m.group, "n/a", error=str(err))
            continue
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

    # Agreement with the closed form (or, when it was not run or does not apply, with jacrev).
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
# The run: every case, isolated in its own process by default
# ---------------------------------------------------------------------------------------------


def _run_isolated(
    case: Case, device: str, methods: Sequence[str] | None, quick: bool
) -> dict[str, Any]:
    """Run one case in a fresh interpreter (``python -m jacbatch.benchmarks``) and read back
    its record."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding jacbatch/
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
    """Print to stdout; a progress bar on the terminal (tqdm's) is cleared first and redrawn
    after, so that tables start on a line of their own."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(text, flush=True)
        return
    with tqdm.external_write_mode(file=sys.stdout):
        print(text, flush=True)


def run(
    cases: Sequence[Case],
    device: str = "cpu",
    methods: Sequence[str] | None = None,
    *,
    quick: bool = False,
    isolate: bool = True,
    progress: bool | None = True,
    echo: Callable[[str], None] | None = _print,
    targets: Sequence[Target | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the benchmark; the JSON-ready report ``{"schema", "environment", "config", "cases", "targets"}``.

    Args:
        cases: from :func:`~jacbatch.benchmarks.select_cases`.
        device: ``"cpu"`` or ``"cuda"``.
        methods: names from :data:`~jacbatch.benchmarks.METHOD_NAMES` (all when ``None``).
        quick: few repetitions (pair with the scaled-down ``QUICK_CASES``).
        isolate: run each case in a fresh process.
        progress: show a progress bar over cases, naming the case being run (``None``: a bar on
            an interactive stderr, else one plain line per case on stderr).
        echo: where each case's table (and the targets' table) goes (``None``: nowhere).
        targets: performance targets to evaluate on the records (:class:`Target` objects or
            their JSON form, see :mod:`jacbatch.benchmarks.targets`); the report's
            ``"targets"`` holds one row per (case, target), empty without targets.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "jacbatch bench: expected a CUDA device for --device cuda, got none "
            "(torch.cuda.is_available() is False). Use --device cpu."
        )
    records = []
    with _progress.progress(
        len(cases), progress, "jacbatch bench", unit="case", delay=0, plain_off_tty=True
    ) as advance:
        for case in cases:
            advance.status(case.id)
            if isolate:
                rec = _run_isolated(case, device, methods, quick)
            else:
                rec = run_case(case, device, methods, quick=quick)
            records.append(rec)
            advance(1)
            if echo is not None:
                echo(format_case(rec) + "\n")
    rows = evaluate_targets(records, targets) if targets else []
    if echo is not None and targets:
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


def worker(argv: Sequence[str]) -> None:
    """The worker process of an isolated case: ``python -m jacbatch.benchmarks SPEC PATH``
    runs the case described by the JSON ``SPEC`` and writes its record to ``PATH``."""
    spec, path = json.loads(argv[0]), argv[1]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    case = Case(**spec["case"])
    rec = run_case(case, spec["device"], spec["methods"], quick=spec["quick"])
    with open(path, "w") as fh:
        json.dump(rec, fh)
