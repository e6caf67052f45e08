"""Eight real workloads, every route side by side: jacbatch, torch.func, the sum trick, the hand
closed form and JAX, checked against each other and timed in interleaved rounds.

    PYTHONPATH=$PWD python bench/workloads.py [--rounds N] [--only NAME[,NAME]] [--quick]
                                              [--no-jax] [--write] [--json PATH]
    PYTHONPATH=$PWD python bench/workloads.py --render bench/results/workloads.json [--write]

(``--quick``: 2 rounds and few repetitions, for development; ``--render``: the tables again from
a saved run.) Names: pinn, mlp-small, per-sample-params, attention, planar-arm, kuka,
lm-residual, affine-plain.

The workloads (per-sample function, inputs, batched version, closed form, JAX version) are in
``bench/workload_defs.py``. Per workload, in one process with ``torch.set_num_threads(1)``:

1. the closed form is checked against the float64 per-sample autograd reference
   (``tests/_reference.py``) at B=4;
2. every runner is called once and its Jacobian compared with the closed form (float32: every
   entry within 1e-3 × the largest entry, or 1e-3 if that is below 1); a runner that raises or
   disagrees is reported with its error, never timed;
3. every runner is warmed up; then ``--rounds`` rounds, the runners' order rotating each round,
   each runner called ``reps`` times per round (``reps`` sized from the warm-up so a round costs
   it about 50 ms; at least once). A runner's figure is the median over rounds of the per-round
   medians; IQR is over the rounds (the range with fewer than 4). A runner whose warm-up call
   took over a second (``SLOW``) is timed once in the first, middle and last rounds only.

JAX (``jit(vmap(jacrev))``, ``jit(vmap(jacfwd))``) runs in a separate process pinned to one core
with ``taskset -c 1`` (XLA's thread pool ignores torch's setting; its flags alone did not pin it),
kept alive for the whole workload and asked for one round at its place in each round's order, so
its rounds interleave with torch's. Compile time is excluded from the timings and reported
separately; results are taken with ``block_until_ready``.

The ratio column is the time over the fastest plain torch route (torch.func ``vmap(jacrev)`` /
``vmap(jacfwd)``, the sum tricks) that agrees. ``--write`` writes
``bench/results/workloads.json`` and the "Eight workloads" section of ``bench/README.md``.
Each table also gives the route ``jacbatch.explain`` says ``method="auto"`` takes (its
``Plan.routes``, with the reason in the per-workload tables). Runners of APIs that may not
exist yet (``jacbatch.prepare``, ``jacobian(..., batched=True)``) are added only when
``jacbatch`` has them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import jacbatch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workload_defs import WORKLOADS, Jac, Workload, make, missing  # noqa: E402

METHODS = ("closed_form", "jacrev", "jacfwd", "vjp")
#: Runners whose warm-up call takes longer (seconds) are timed in three rounds (first, middle,
#: last; one with --quick).
SLOW = 1.0
JAX_ROUTES = ("JAX jit(vmap(jacrev))", "JAX jit(vmap(jacfwd))")


@dataclass
class Runner:
    """One way of computing a workload's Jacobian; ``fn()`` returns it."""

    name: str
    kind: str  # "jacbatch", "torch" (plain torch baselines), "closed", "jax"
    fn: Callable[[], Jac] | None
    error: str | None = None
    rounds: list[float] = field(default_factory=list)  # per-round medians, seconds
    reps: int = 1


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _sum_trick_shape(J: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(*out, B, *in)`` of the batch-summed function to ``(B, *out, *in)``."""
    return J.movedim(J.ndim - x.ndim, 0)


def _bind(fn: Callable[..., Any], args: tuple[Any, ...], **kw: Any) -> Callable[[], Any]:
    """``fn(*args, **kw)`` as a function of nothing (a loop's values bound now)."""
    return lambda: fn(*args, **kw)


def runners_for(w: Workload) -> list[Runner]:
    """Every runner that applies to ``w`` (JAX's come from its own process)."""
    f, args, an, dims = w.func, w.args, w.argnums, w.in_dims
    rs = [
        Runner(
            "jacbatch auto",
            "jacbatch",
            lambda: jacbatch.jacobian(f, *args, argnums=an, in_dims=dims),
        ),
        Runner(
            "jacbatch auto (inline lambda)",
            "jacbatch",
            lambda: jacbatch.jacobian(lambda *a: f(*a), *args, argnums=an, in_dims=dims),
        ),
    ]
    batch_arg = isinstance(an, int) and dims[an] == 0 and w.batched is not None
    params = inspect.signature(jacbatch.jacobian).parameters
    if batch_arg and "batched" in params:
        bf = w.batched
        rs.append(
            Runner(
                "jacbatch batched=True",
                "jacbatch",
                lambda: jacbatch.jacobian(bf, *args, argnums=an, in_dims=dims, batched=True),  # type: ignore[call-overload]
            )
        )
    if hasattr(jacbatch, "prepare"):
        variants: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
            ("jacbatch prepare", f, {}),
            ("jacbatch prepare(compile=True)", f, {"compile": True}),
        ]
        if batch_arg:
            variants.append(("jacbatch prepare(batched=True)", w.batched, {"batched": True}))  # type: ignore[arg-type]
        for name, fn, kw in variants:
            try:
                J = jacbatch.prepare(fn, *args, argnums=an, in_dims=dims, **kw)
                rs.append(Runner(name, "jacbatch", _bind(J, args)))
            except Exception as e:
                rs.append(Runner(name, "jacbatch", None, _short(e)))
    for m in METHODS:
        rs.append(
            Runner(
                f"jacbatch {m}",
                "jacbatch",
                _bind(jacbatch.jacobian, (f, *args), argnums=an, in_dims=dims, method=m),
            )
        )
    vm = torch.func.vmap
    rs.append(Runner("vmap(jacrev)", "torch", lambda: vm(torch.func.jacrev(f, an), dims)(*args)))
    rs.append(Runner("vmap(jacfwd)", "torch", lambda: vm(torch.func.jacfwd(f, an), dims)(*args)))
    if batch_arg:
        assert isinstance(an, int) and w.batched is not None
        bf, x = w.batched, args[an]

        def summed(xx: torch.Tensor) -> torch.Tensor:
            return bf(*args[:an], xx, *args[an + 1 :]).sum(0)

        rs.append(
            Runner(
                "sum trick (autograd.functional, vectorize)",
                "torch",
                lambda: _sum_trick_shape(
                    torch.autograd.functional.jacobian(summed, x, vectorize=True), x
                ),
            )
        )
        rs.append(
            Runner(
                "sum trick (func.jacrev)",
                "torch",
                lambda: _sum_trick_shape(torch.func.jacrev(summed)(x), x),
            )
        )
    rs.append(Runner(w.closed_label, "closed", lambda: w.closed_form(*args)))
    return rs


def agree(J: Any, R: Any, dtype: torch.dtype) -> str | None:
    """``None`` when ``J`` matches the reference ``R`` (tensor or tuple), else what differs."""
    if isinstance(R, tuple):
        if not isinstance(J, tuple | list) or len(J) != len(R):
            return f"expected a tuple of {len(R)} Jacobians, got {type(J).__name__}"
        for k, (a, b) in enumerate(zip(J, R, strict=True)):
            if (err := agree(a, b, dtype)) is not None:
                return f"argnum {k}: {err}"
        return None
    J = torch.as_tensor(J)
    if tuple(J.shape) != tuple(R.shape):
        return f"shape {tuple(J.shape)}, expected {tuple(R.shape)}"
    # every entry within tol × the largest entry (at least 1): float32 sums over up to a few
    # hundred terms stay well inside 1e-3; float64 routes agree to ~1e-13
    tol = (1e-10 if dtype == torch.float64 else 1e-3) * max(R.abs().max().item(), 1.0)
    err = (J.to(R.dtype) - R).abs().max().item()
    return None if err <= tol else f"WRONG: max |error| {err:.3g} (tolerance {tol:.3g})"


# --- the JAX process -------------------------------------------------------------------------


def jax_worker(name: str, outdir: str, target: float, max_reps: int) -> None:
    """Run in the pinned subprocess: compile, save the Jacobians, then time on request."""
    import jax
    import numpy as np

    w = make(name)
    assert w.jax is not None
    fn, args, argnums, in_axes = w.jax()
    compiled: dict[str, Any] = {}
    info: dict[str, Any] = {"compile_s": {}, "errors": {}}
    for k, (label, tr) in enumerate(zip(JAX_ROUTES, (jax.jacrev, jax.jacfwd), strict=True)):
        try:
            t0 = time.perf_counter()
            c = jax.jit(jax.vmap(tr(fn, argnums=argnums), in_axes=in_axes)).lower(*args).compile()
            info["compile_s"][label] = time.perf_counter() - t0
            out = jax.block_until_ready(c(*args))
            outs = out if isinstance(out, tuple) else (out,)
            np.savez(Path(outdir) / f"jax{k}.npz", *[np.asarray(o) for o in outs])
            compiled[label] = c
        except Exception as e:
            info["errors"][label] = _short(e)

    def once(c: Any) -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(c(*args))
        return time.perf_counter() - t0

    reps, slow = {}, set()
    for label, c in compiled.items():
        t = min(once(c) for _ in range(2))
        reps[label] = max(1, min(max_reps, int(target / max(t, 1e-6))))
        if t > SLOW:
            slow.add(label)
    info["reps"] = reps
    print(json.dumps(info), flush=True)
    for line in sys.stdin:  # "round 1": every route; "round 0": the slow ones left out
        if not line.startswith("round"):
            break
        everything = line.split()[1] == "1"
        res = {
            lb: statistics.median(once(c) for _ in range(reps[lb]))
            for lb, c in compiled.items()
            if everything or lb not in slow
        }
        print(json.dumps(res), flush=True)


class JaxProcess:
    """The pinned JAX process of one workload, asked for one round at a time."""

    def __init__(self, name: str, outdir: str, target: float, max_reps: int) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
        env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--jax-worker", name]
        cmd += ["--tmp", outdir, "--target", str(target), "--max-reps", str(max_reps)]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            cmd = ["taskset", "-c", "1", *cmd]
        self.p = subprocess.Popen(
            cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            if line.startswith("{"):
                return dict(json.loads(line))
        raise RuntimeError(f"the JAX process ended (exit code {self.p.wait()})")

    def round(self, slow: bool) -> dict[str, float]:
        """One round's median per route; the slow routes only with ``slow``."""
        assert self.p.stdin is not None
        self.p.stdin.write(f"round {int(slow)}\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.p.stdin is not None:
            self.p.stdin.close()
        self.p.wait(timeout=60)


# --- one workload ------------------------------------------------------------------------------


def check_closed_form(name: str) -> str | None:
    """The closed form against the float64 per-sample autograd reference at B=4."""
    root = str(HERE.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests._reference import reference_jacobian

    w = make(name, batch=4, dtype=torch.float64)
    R = reference_jacobian(w.func, w.args, w.argnums, w.in_dims)
    return agree(w.closed_form(*w.args), R, torch.float64)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_workload(name: str, rounds: int, quick: bool, use_jax: bool) -> dict[str, Any]:
    """Check and time every runner on one workload; the JSON entry of the result."""
    target, max_reps = (0.01, 3) if quick else (0.05, 20)
    w = make(name)
    print(f"[{name}] {w.title}", file=sys.stderr, flush=True)
    entry: dict[str, Any] = {"title": w.title, "batch": w.batch_size}
    entry["closed_form_vs_reference"] = check_closed_form(name) or "agrees (float64, B=4)"
    try:
        plan = jacbatch.explain(w.func, *w.args, argnums=w.argnums, in_dims=w.in_dims)
        entry["explain"], entry["explain_text"] = plan.routes, str(plan)
        entry["explain_reason"] = "; ".join(f"{st.route}: {st.reason}" for st in plan.steps)
    except Exception as e:
        entry["explain"] = entry["explain_text"] = f"error: {_short(e)}"
    ref = w.closed_form(*w.args)
    runners = runners_for(w)
    first: dict[str, float] = {}
    for r in runners:  # first call: correctness
        if r.fn is None:
            continue
        try:
            t0 = time.perf_counter()
            J = r.fn()
            first[r.name] = time.perf_counter() - t0
            r.error = agree(J, ref, torch.float32)
        except Exception as e:
            r.error = _short(e)
    jaxp = None
    tmp = tempfile.mkdtemp(prefix="jacbatch-workloads-")
    jax_runners = [Runner(lb, "jax", None) for lb in JAX_ROUTES] if w.jax and use_jax else []
    if jax_runners:
        try:
            jaxp = JaxProcess(name, tmp, target, max_reps)
            entry["jax_compile_s"] = jaxp.info["compile_s"]
            for k, jr in enumerate(jax_runners):
                if jr.name in jaxp.info["errors"]:
                    jr.error = jaxp.info["errors"][jr.name]
                    continue
                import numpy as np

                with np.load(Path(tmp) / f"jax{k}.npz") as z:
                    outs = tuple(torch.from_numpy(z[f"arr_{i}"]) for i in range(len(z.files)))
                jr.error = agree(outs if isinstance(ref, tuple) else outs[0], ref, torch.float32)
                jr.reps = jaxp.info["reps"][jr.name]
        except Exception as e:
            for jr in jax_runners:
                jr.error = jr.error or f"JAX process: {_short(e)}"
    active = [r for r in runners if r.fn is not None and r.error is None]
    slow = set()
    for r in active:  # warm-up, and reps sized so a round costs ~target per runner
        assert r.fn is not None
        # the first call may have compiled or traced: the second says whether it is slow
        t = _timed(r.fn) if first[r.name] > target else first[r.name]
        if t > SLOW:
            slow.add(r.name)
        elif not quick:
            t = min(t, _timed(r.fn))
        r.reps = max(1, min(max_reps, int(target / max(t, 1e-6))))
    units: list[Any] = [*active]
    if jaxp is not None and any(jr.error is None for jr in jax_runners):
        units.append("jax")
    slow_rounds = {0} if quick else {0, rounds // 2, rounds - 1}
    for k in range(rounds):
        if not units:
            break
        gc.collect()
        order = units[k % len(units) :] + units[: k % len(units)]
        for u in order:
            if u == "jax":
                try:
                    res = jaxp.round(k in slow_rounds)  # type: ignore[union-attr]
                except Exception as e:  # the process died: its routes report it, no more rounds
                    for jr in jax_runners:
                        jr.error, jr.rounds = f"JAX process: {_short(e)}", []
                    units.remove("jax")
                    jaxp = None
                    continue
                for jr in jax_runners:
                    if jr.name in res and jr.error is None:
                        jr.rounds.append(res[jr.name])
            elif k in slow_rounds or u.name not in slow:
                u.rounds.append(statistics.median(_timed(u.fn) for _ in range(u.reps)))
        print(f"[{name}] round {k + 1}/{rounds}", file=sys.stderr, flush=True)
    if jaxp is not None:
        jaxp.close()
    shutil.rmtree(tmp, ignore_errors=True)
    entry["runners"] = {}
    for r in [*runners, *jax_runners]:
        rec: dict[str, Any] = {"kind": r.kind, "reps": r.reps, "error": r.error}
        if r.rounds:
            ms = sorted(x * 1e3 for x in r.rounds)
            rec["ms"] = statistics.median(ms)
            rec["iqr_ms"] = (
                statistics.quantiles(ms, n=4)[2] - statistics.quantiles(ms, n=4)[0]
                if len(ms) >= 4
                else ms[-1] - ms[0]
            )
            rec["rounds_ms"] = [x * 1e3 for x in r.rounds]
        entry["runners"][r.name] = rec
    timed_torch = {
        n: e["ms"] for n, e in entry["runners"].items() if e["kind"] == "torch" and "ms" in e
    }
    entry["baseline"] = min(timed_torch, key=timed_torch.__getitem__) if timed_torch else None
    return entry


# --- report ------------------------------------------------------------------------------------


def _fmt(ms: float | None) -> str:
    if ms is None:
        return "—"
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(name: str, entry: dict[str, Any]) -> str:
    """The markdown table of one workload."""
    base = entry["runners"][entry["baseline"]]["ms"] if entry["baseline"] else None
    lines = [
        f"### {name}: {entry['title']}",
        "",
        f"`jacbatch.explain` route: **{entry['explain']}**"
        + (f" ({entry['explain_reason']})" if entry.get("explain_reason") else "")
        + f". Closed form vs float64 reference: "
        f"{entry['closed_form_vs_reference']}."
        + (
            " JAX compile (excluded): "
            + ", ".join(f"{k[4:]} {v:.2f} s" for k, v in entry["jax_compile_s"].items())
            if entry.get("jax_compile_s")
            else ""
        ),
        "",
        "| runner | ms | IQR | × fastest torch | note |",
        "|---|---:|---:|---:|---|",
    ]
    for rn, e in entry["runners"].items():
        ms = e.get("ms")
        ratio = f"{ms / base:.2f}" if ms is not None and base else "—"
        note = e["error"] or ("fastest torch" if rn == entry["baseline"] else "")
        note = note if len(note) <= 110 else note[:109] + "…"  # the whole message is in the JSON
        iqr = _fmt(e.get("iqr_ms")) if ms is not None else "—"
        lines.append(f"| {rn} | {_fmt(ms)} | {iqr} | {ratio} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def summary(results: dict[str, Any]) -> str:
    """One row per workload: jacbatch auto against the best of each kind."""
    lines = [
        "| workload | jacbatch auto (ms) | explain route | fastest torch (ms) | auto / torch "
        "| closed form (ms) | best JAX (ms) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, entry in results.items():
        rs = entry["runners"]
        auto = rs["jacbatch auto"].get("ms")
        base = rs[entry["baseline"]]["ms"] if entry["baseline"] else None
        closed = next((e.get("ms") for e in rs.values() if e["kind"] == "closed"), None)
        jx = [e["ms"] for e in rs.values() if e["kind"] == "jax" and "ms" in e]
        ratio = f"{auto / base:.2f}" if auto and base else "—"
        btxt = f"{_fmt(base)} ({entry['baseline']})" if base else "—"
        lines.append(
            f"| {name} | {_fmt(auto)} | {entry['explain']} | {btxt} | {ratio} | {_fmt(closed)} "
            f"| {_fmt(min(jx)) if jx else '—'} |"
        )
    return "\n".join(lines)


def environment(load_before: tuple[float, ...]) -> dict[str, Any]:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "jacbatch": jacbatch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    try:
        import jax

        env["jax"] = jax.__version__
    except ImportError:
        env["jax"] = None
    return env


def write_readme(text: str) -> None:
    """Replace (or append) the "Eight workloads" section of bench/README.md."""
    path = HERE / "README.md"
    old = path.read_text()
    head = "## Eight workloads"
    start = old.find(head)
    if start < 0:
        path.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
        return
    end = old.find("\n## ", start + len(head))
    tail = old[end:] if end >= 0 else "\n"
    path.write_text(old[:start] + text + "\n" + tail)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 7; 2 with --quick)")
    p.add_argument("--only", default=None, help="comma-separated workload names")
    p.add_argument("--quick", action="store_true", help="few rounds and reps, for development")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX process")
    p.add_argument("--write", action="store_true", help="write results JSON and README section")
    p.add_argument(
        "--json", default=None, help="write the results JSON here (also without --write)"
    )
    p.add_argument(
        "--render", default=None, help="print (with --write: put in README) a saved results JSON"
    )
    p.add_argument("--jax-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--target", type=float, default=0.05, help=argparse.SUPPRESS)
    p.add_argument("--max-reps", type=int, default=20, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.render:
        text = render(json.loads(Path(a.render).read_text()))
        print(text)
        if a.write:
            write_readme(text)
        return
    if a.jax_worker:
        jax_worker(a.jax_worker, a.tmp, a.target, a.max_reps)
        return
    torch.set_num_threads(1)
    names = a.only.split(",") if a.only else list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    rounds = a.rounds or (2 if a.quick else 7)
    load = os.getloadavg()
    for n in [n for n in names if missing(n)]:
        print(f"[{n}] skipped: {missing(n)}", file=sys.stderr)
        names.remove(n)
    results = {n: run_workload(n, rounds, a.quick, not a.no_jax) for n in names}
    data = {
        "schema": "jacbatch-workloads/1",
        "rounds": rounds,
        "quick": a.quick,
        "environment": environment(load),
        "workloads": results,
    }
    text = render(data)
    print(text)
    if a.json:
        Path(a.json).write_text(json.dumps(data, indent=1) + "\n")
    if a.write:
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "workloads.json").write_text(json.dumps(data, indent=1) + "\n")
        write_readme(text)


def render(data: dict[str, Any]) -> str:
    """The markdown section of a results JSON (``--render`` redoes it from a saved file)."""
    env, results = data["environment"], data["workloads"]
    before, after = env["load_average_before"][0], env["load_average_after"][0]
    loaded = (
        " Other processes were running (the run itself adds about 1 to the load): these are "
        "orientation figures, ratios more than absolute times."
        if max(before, after) > 1.5
        else ""
    )
    out = [
        "## Eight workloads",
        "",
        "`PYTHONPATH=$PWD python bench/workloads.py --write` (definitions: "
        "`bench/workload_defs.py`; method: the docstring of `bench/workloads.py`). "
        f"Measured {env['date']}, {data['rounds']} interleaved rounds"
        + (" (--quick)" if data["quick"] else "")
        + f", torch {env['torch']} on 1 thread, JAX {env['jax']} pinned to one core; "
        f"load average {before:.1f} before, {after:.1f} after.{loaded} "
        "Medians in ms; × fastest torch = time / the fastest plain torch route; "
        '`jacbatch.explain` route = what `explain` says `method="auto"` runs. Every Jacobian is '
        "checked against the closed form before timing (a runner that raises or disagrees shows "
        'its error instead of a time); `pytest bench/test_workloads.py -o addopts=""` checks '
        "them all in float64. Raw data: `bench/results/workloads.json`.",
        "",
        summary(results),
        "",
        *(table(n, e) + "\n" for n, e in results.items()),
    ]
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    main()
