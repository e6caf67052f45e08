"""Sparse Jacobians (``jacbatch.jacobian(..., sparse=...)``) against dense ones and JAX's asdex.

Cases (float32; the float64 agreement with the per-sample autograd reference is in
tests/test_sparse_jacobian.py):

* ``diff_1`` / ``diff_4``: ``f(x) = (x[1:] - x[:-1])**2``, ``n = 10,000``, B = 1 and 4;
* ``brusselator_32``: the 2-D Brusselator residual on a periodic 32 x 32 grid (2,048
  unknowns, SciML's benchmark), B = 64;
* ``heat_2048``: a tridiagonal heat-equation residual with a cubic source, n = 2,048, B = 64.

Per case: the pattern (built from the known structure; checked against the nonzeros of a dense
Jacobian at a random point, against asdex's detected pattern, and against
``jacbatch.sparse.detect`` where it exists), the colors (ours per mode; an independent
distance-2 greedy in natural order; networkx's ``greedy_color`` on the conflict graph with
largest-first and smallest-last; asdex's), the coloring time (ours uncached, networkx with the
conflict graph built by scipy), and the times of: jacbatch sparse (the pattern passed; a
repeated call, NOTE [Repeated sparse calls] in jacbatch.sparse._hot), the same on the full path
(``jacbatch.sparse._hot.ENABLED = False``: probe and pattern check on every call), jacbatch
sparse with ``sparse=True`` (when detection exists; detection included), ``torch.func``
``vmap(jacfwd)`` and ``jacbatch.jacobian`` dense (where the dense result fits: not ``diff_4``),
and asdex's jitted ``vmap`` of compressed Jacobian + ``decompress_data`` (the values, as ours).
The peak memory of the sparse call is the peak of live torch allocations during the call, over
the bytes of its values: for the full path by ``jacbatch.memory.LiveBytes(include_meta=False)``
(a dispatch mode), for a repeated call (its kept program) from ``torch.profiler``'s memory events
(Dynamo cannot capture under a dispatch mode), also over the values plus the CSR index tensors.

The whole process is pinned to one core (``taskset -c 1``, re-executing itself), torch runs one
thread, XLA one thread; runners interleave within each round (order rotating), each timed
``reps`` times per round (sized from the warm-up to about 50 ms); a figure is the median over
rounds of the per-round medians. JAX compile time is excluded (warm-up); so is Inductor's for
``jacbatch sparse, compiled`` (``jacbatch.sparse.compile_repeated``; its compile time is
reported apart, ``--no-compile`` skips it).

    PYTHONPATH=$PWD python bench/sparse_bench.py [--quick] [--write]

``--write`` stores ``bench/results/sparse.json``; ``--tiny`` runs tiny sizes (the test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _pin() -> None:
    """Re-execute under ``taskset -c 1`` with one-thread XLA (before torch or jax load)."""
    if os.environ.get("JACBATCH_SPARSE_BENCH_PINNED") or not shutil.which("taskset"):
        return
    if (os.cpu_count() or 1) < 2:
        return
    env = dict(os.environ, JACBATCH_SPARSE_BENCH_PINNED="1", OMP_NUM_THREADS="1")
    env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env.setdefault("JAX_PLATFORMS", "cpu")
    os.execvpe("taskset", ["taskset", "-c", "1", sys.executable, *sys.argv], env)


# --- the functions ------------------------------------------------------------------------------


def torch_funcs() -> dict[str, Callable[..., Any]]:
    import torch
    import torch.nn.functional as F

    def diff(x: torch.Tensor) -> torch.Tensor:
        return (x[1:] - x[:-1]) ** 2

    def brusselator(u: torch.Tensor) -> torch.Tensor:
        a, b, alpha = 3.4, 1.0, 10.0
        U, V = u[0], u[1]

        def lap(z: torch.Tensor) -> torch.Tensor:
            return z.roll(1, 0) + z.roll(-1, 0) + z.roll(1, 1) + z.roll(-1, 1) - 4 * z

        du = alpha * lap(U) + b + U**2 * V - (a + 1) * U
        dv = alpha * lap(V) + a * U - U**2 * V
        return torch.stack([du, dv])

    def heat(x: torch.Tensor) -> torch.Tensor:
        lap = -2 * x + F.pad(x[:-1], (1, 0)) + F.pad(x[1:], (0, 1))
        return lap + 0.1 * x**3

    return {"diff": diff, "brusselator": brusselator, "heat": heat}


def jax_funcs() -> dict[str, Callable[..., Any]]:
    import jax.numpy as jnp

    def diff(x: Any) -> Any:
        return (x[1:] - x[:-1]) ** 2

    def brusselator(u: Any) -> Any:
        a, b, alpha = 3.4, 1.0, 10.0
        U, V = u[0], u[1]

        def lap(z: Any) -> Any:
            return (
                jnp.roll(z, 1, 0) + jnp.roll(z, -1, 0) + jnp.roll(z, 1, 1) + jnp.roll(z, -1, 1)
            ) - 4 * z

        du = alpha * lap(U) + b + U**2 * V - (a + 1) * U
        dv = alpha * lap(V) + a * U - U**2 * V
        return jnp.stack([du, dv])

    def heat(x: Any) -> Any:
        lap = -2 * x + jnp.pad(x[:-1], (1, 0)) + jnp.pad(x[1:], (0, 1))
        return lap + 0.1 * x**3

    return {"diff": diff, "brusselator": brusselator, "heat": heat}


def known_pattern(kind: str, size: int) -> Any:
    """The pattern from the known structure (COO, no dense mask)."""
    import torch

    from jacbatch.sparse import SparsityPattern

    if kind == "diff":
        r = torch.arange(size - 1)
        return SparsityPattern.from_coo(
            torch.cat([r, r]), torch.cat([r, r + 1]), (size - 1,), (size,)
        )
    if kind == "heat":
        r = torch.arange(size)
        rows = torch.cat([r, r[1:], r[:-1]])
        cols = torch.cat([r, r[1:] - 1, r[:-1] + 1])
        return SparsityPattern.from_coo(rows, cols, (size,), (size,))
    N = size
    idx = torch.arange(N * N).reshape(N, N)
    rows, cols = [], []
    for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        nb = torch.roll(idx, (di, dj), (0, 1)).reshape(-1)
        for s in (0, 1):
            rows.append(s * N * N + idx.reshape(-1))
            cols.append(s * N * N + nb)
    for s, t in ((0, 1), (1, 0)):
        rows.append(s * N * N + idx.reshape(-1))
        cols.append(t * N * N + idx.reshape(-1))
    return SparsityPattern.from_coo(torch.cat(rows), torch.cat(cols), (2, N, N), (2, N, N))


def cases(tiny: bool) -> list[dict[str, Any]]:
    if tiny:
        return [
            dict(name="diff_1", kind="diff", size=50, shape=(50,), batch=1, dense=True),
            dict(name="diff_4", kind="diff", size=50, shape=(50,), batch=4, dense=False),
            dict(name="brusselator_4", kind="brusselator", size=4, shape=(2, 4, 4), batch=3,
                 dense=True),
            dict(name="heat_20", kind="heat", size=20, shape=(20,), batch=3, dense=True),
        ]  # fmt: skip
    return [
        dict(name="diff_1", kind="diff", size=10_000, shape=(10_000,), batch=1, dense=True),
        dict(name="diff_4", kind="diff", size=10_000, shape=(10_000,), batch=4, dense=False),
        dict(name="brusselator_32", kind="brusselator", size=32, shape=(2, 32, 32), batch=64,
             dense=True),
        dict(name="heat_2048", kind="heat", size=2048, shape=(2048,), batch=64, dense=True),
    ]  # fmt: skip


# --- coloring comparisons ------------------------------------------------------------------------


def natural_greedy(crow: Any, col: Any, n: int) -> int:
    """An independent distance-2 greedy (natural order, Python sets via the CSC lists)."""
    import numpy as np

    m = len(crow) - 1
    rows_of: list[list[int]] = [[] for _ in range(n)]
    cols_of = [col[crow[i] : crow[i + 1]].tolist() for i in range(m)]
    for i, cs in enumerate(cols_of):
        for j in cs:
            rows_of[j].append(i)
    colors = np.full(n, -1)
    for j in range(n):
        taken = {colors[k] for i in rows_of[j] for k in cols_of[i]}
        c = 0
        while c in taken:
            c += 1
        colors[j] = c
    return int(colors.max()) + 1 if n else 0


def networkx_colors(crow: Any, col: Any, m: int, n: int) -> dict[str, Any]:
    """networkx's greedy_color on the conflict graph PᵀP (built with scipy), and its time."""
    try:
        import networkx as nx
        import numpy as np
        import scipy.sparse as sp
    except ImportError as e:
        return {"error": str(e)}
    out: dict[str, Any] = {}
    for strategy in ("largest_first", "smallest_last"):
        t0 = time.perf_counter()
        P = sp.csr_matrix((np.ones(len(col)), col, crow), shape=(m, n))
        G = nx.from_scipy_sparse_array((P.T @ P).tocoo())
        G.remove_edges_from(nx.selfloop_edges(G))
        c = nx.greedy_color(G, strategy=strategy)
        out[strategy] = max(c.values(), default=-1) + 1
        out[f"{strategy}_s"] = time.perf_counter() - t0
    return out


def coloring_report(pattern: Any) -> dict[str, Any]:
    import numpy as np

    from jacbatch.sparse.coloring import _transpose, color, greedy_columns

    m, n = pattern.shape
    crow = pattern.crow_indices.numpy().astype(np.int64)
    col = pattern.col_indices.numpy().astype(np.int64)
    t0 = time.perf_counter()
    greedy_columns(crow, col, n)  # uncached: both orders
    ours_s = time.perf_counter() - t0
    c = color(pattern)
    tcrow, tcol = _transpose(crow, col, n)
    return {
        "column": c.column_colors,
        "row": c.row_colors,
        "chosen": f"{c.mode} ({c.n_colors})",
        "independent_natural_column": natural_greedy(crow, col, n),
        "independent_natural_row": natural_greedy(tcrow, tcol, m),
        "networkx_column": networkx_colors(crow, col, m, n),
        "ours_column_s": ours_s,
    }


# --- timing --------------------------------------------------------------------------------------


#: A runner whose warm-up call took longer (seconds) is timed once, in the first and the last
#: round only (the dense Jacobians of the big cases).
SLOW = 2.0


def timed_rounds(runners: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median over rounds of per-round medians; runners interleaved, order rotating."""
    reps, slow = {}, set()
    for name, fn in runners.items():  # warm-up (JAX compiles here)
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        if first > SLOW:
            reps[name] = 1
            slow.add(name)
            continue
        t0 = time.perf_counter()
        fn()
        reps[name] = max(1, min(20, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    per: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if name in slow and r not in (0, rounds - 1):
                continue
            ts = []
            for _ in range(reps[name]):
                t0 = time.perf_counter()
                runners[name]()
                ts.append(time.perf_counter() - t0)
            per[name].append(statistics.median(ts))
    return {name: statistics.median(v) for name, v in per.items()}


def sparse_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes of live torch allocations while ``fn()`` runs (strided tensors: the CSR
    result wraps the values and index tensors, which are counted where they are made)."""
    import torch
    from torch.utils._pytree import tree_flatten

    from jacbatch.memory import LiveBytes

    class Strided(LiveBytes):
        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                    continue
                key = t.untyped_storage()._cdata
                entry = self._refs.get(key)
                if entry is None:
                    entry = self._refs[key] = [0, t.untyped_storage().nbytes()]
                    self.live += entry[1]
                    self.peak = max(self.peak, self.live)
                entry[0] += 1
                weakref.finalize(t, self._release, key)
            return out

    with Strided(include_meta=False) as tracker:
        J = fn()
        del J
    return tracker.peak


def profiled_peak(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU allocations while ``fn()`` runs, from ``torch.profiler``'s memory
    events: each op's own allocations counted from its start, each free at its time (so an
    upper bound). Unlike :func:`sparse_peak` (a dispatch mode, under which Dynamo cannot
    capture, so a repeated call takes the full path) it sees a repeated call's kept program."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        J = fn()
        del J
    timeline = sorted(
        (
            e.time_range.start,
            e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage,
        )
        for e in prof.events()
        if (e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
    )
    live = peak = 0
    for _, change in timeline:
        live += change
        peak = max(peak, live)
    return peak


def run_case(
    case: dict[str, Any], rounds: int, use_jax: bool, compiled: bool = False
) -> dict[str, Any]:
    import importlib.util

    import numpy as np
    import torch

    import jacbatch

    name, kind, B = case["name"], case["kind"], case["batch"]
    dtype = torch.float32
    f = torch_funcs()[kind]
    P = known_pattern(kind, case["size"])
    gen = torch.Generator().manual_seed(0)
    X = torch.rand(B, *case["shape"], generator=gen, dtype=dtype) + 0.5
    print(f"[{name}] B={B}, {P.shape[0]} x {P.shape[1]}, nnz {P.nnz}", file=sys.stderr, flush=True)
    entry: dict[str, Any] = {"batch": B, "shape": list(P.shape), "nnz": P.nnz}
    entry["colors"] = coloring_report(P)
    from jacbatch.sparse import _hot

    def full_path() -> Any:
        _hot.ENABLED = False
        try:
            return jacbatch.jacobian(f, X, sparse=P)
        finally:
            _hot.ENABLED = True

    values_bytes = B * P.nnz * X.element_size()
    entry["values_bytes"] = values_bytes
    full_path()  # the coloring and layout are built once per pattern, not per call
    entry["peak_bytes_full_path"] = sparse_peak(full_path)
    entry["peak_over_values_full_path"] = entry["peak_bytes_full_path"] / values_bytes
    for _ in range(_hot.HOT_CALLS + 1):  # a repeated call: NOTE [Repeated sparse calls]
        J = jacbatch.jacobian(f, X, sparse=P)
    entry["peak_bytes"] = sparse_peak(lambda: jacbatch.jacobian(f, X, sparse=P))
    entry["peak_over_values"] = entry["peak_bytes"] / values_bytes
    entry["peak_bytes_repeated"] = profiled_peak(lambda: jacbatch.jacobian(f, X, sparse=P))
    entry["peak_over_values_repeated"] = entry["peak_bytes_repeated"] / values_bytes
    index_bytes = (P.shape[0] + 1 + P.nnz) * 8
    entry["peak_over_values_and_index_repeated"] = entry["peak_bytes_repeated"] / (
        values_bytes + index_bytes
    )

    runners: dict[str, Callable[[], Any]] = {
        "jacbatch sparse": lambda: jacbatch.jacobian(f, X, sparse=P),
        "jacbatch sparse, full path": full_path,
    }
    try:  # the traced closed form written at the nonzeros, where the rules cover func
        jacbatch.jacobian(f, X, sparse=P, method="closed_form")
    except NotImplementedError as err:
        entry["closed_form"] = str(err).split("cannot run here: ")[-1].split(". Use")[0]
    else:
        entry["closed_form"] = "applies"

        def closed_path() -> Any:  # the full path, the closed form writing the values
            _hot.ENABLED = False
            try:
                return jacbatch.jacobian(f, X, sparse=P, method="closed_form")
            finally:
                _hot.ENABLED = True

        runners["jacbatch sparse, closed form"] = closed_path
    if compiled:  # its own function object and code, so its own hot key
        fc = lambda x: f(x)  # noqa: E731
        before = jacbatch.sparse.compile_repeated(True)
        try:
            for _ in range(_hot.HOT_CALLS - 1):
                jacbatch.jacobian(fc, X, sparse=P)
            t0 = time.perf_counter()
            jacbatch.jacobian(fc, X, sparse=P)  # the call that keeps and compiles the program
            entry["compile_s"] = time.perf_counter() - t0
        finally:
            jacbatch.sparse.compile_repeated(before)
        Jc = jacbatch.jacobian(fc, X, sparse=P)
        entry["compiled_equals_eager"] = bool(
            torch.equal(Jc.values(), jacbatch.jacobian(f, X, sparse=P).values())
        )
        runners["jacbatch sparse, compiled"] = lambda: jacbatch.jacobian(fc, X, sparse=P)
    detect = importlib.util.find_spec("jacbatch.sparse.detect") is not None
    if detect:
        from jacbatch.sparse.detect import detect as detect_pattern

        D = detect_pattern(f, (X,), 0, (0,))
        entry["detected_equals_known"] = bool(
            D.nnz == P.nnz
            and torch.equal(D.crow_indices, P.crow_indices)
            and torch.equal(D.col_indices, P.col_indices)
        )
        runners["jacbatch sparse=True"] = lambda: jacbatch.jacobian(f, X, sparse=True)
    if case["dense"]:
        dense = torch.func.vmap(torch.func.jacfwd(f))
        Jd = dense(X).reshape(B, P.shape[0], P.shape[1])
        mask = (Jd[0] != 0).cpu()
        entry["pattern_exact"] = bool(torch.equal(mask, P.to_mask()))
        entry["max_abs_diff_vs_dense"] = float((J.to_dense() - Jd).abs().max())
        del Jd, mask
        runners["torch.func vmap(jacfwd)"] = lambda: dense(X)
        runners["jacbatch dense"] = lambda: jacbatch.jacobian(f, X)
    if use_jax:
        jax_entry, jax_runner = asdex_runner(kind, X.numpy(), P, J.values().reshape(B, -1))
        entry["asdex"] = jax_entry
        if jax_runner is not None:
            runners["asdex (jit)"] = jax_runner
    del J
    entry["times_s"] = timed_rounds(runners, rounds)
    t = entry["times_s"]
    sp = t["jacbatch sparse"]
    entry["speedup_vs_vmap_jacfwd"] = t.get("torch.func vmap(jacfwd)", float("nan")) / sp
    entry["speedup_vs_jacbatch_dense"] = t.get("jacbatch dense", float("nan")) / sp
    entry["jacbatch_over_asdex"] = sp / t.get("asdex (jit)", float("nan"))
    entry["full_path_over_asdex"] = t["jacbatch sparse, full path"] / t.get(
        "asdex (jit)", float("nan")
    )
    if "jacbatch sparse, compiled" in t:
        entry["compiled_over_asdex"] = t["jacbatch sparse, compiled"] / t.get(
            "asdex (jit)", float("nan")
        )
    del np
    return entry


def asdex_runner(
    kind: str, X: Any, P: Any, ours: Any
) -> tuple[dict[str, Any], Callable[[], Any] | None]:
    """asdex's jitted vmap of (compressed Jacobian + decompress_data) on the same function."""
    try:
        import asdex
        import jax
        import numpy as np
    except ImportError as e:
        return {"error": f"not installed: {e}"}, None
    fj = jax_funcs()[kind]
    x0 = X[0]
    coloring = asdex.jacobian_coloring(fj, x0)
    comp = asdex.compressed_jacobian_from_coloring(fj, coloring)
    values = jax.jit(jax.vmap(lambda x: asdex.decompress_data(comp(x), coloring)))
    Xj = jax.numpy.asarray(X)
    V = np.asarray(values(Xj))
    sparsity = coloring.sparsity
    n = P.shape[1]
    theirs = np.asarray(sparsity.rows, np.int64) * n + np.asarray(sparsity.cols, np.int64)
    mine = (P.row_indices() * n + P.col_indices).numpy()
    same = theirs.shape == mine.shape and bool((np.sort(theirs) == mine).all())
    info: dict[str, Any] = {
        "version": getattr(asdex, "__version__", "?"),
        "jax": jax.__version__,
        "nnz": int(sparsity.nnz),
        "pattern_equals_ours": same,
        "colors": int(coloring.num_colors),
        "mode": str(coloring.mode),
    }
    if same:
        order = np.argsort(theirs)
        info["max_abs_diff_vs_ours"] = float(np.abs(V[:, order] - ours.numpy()).max())
    return info, lambda: values(Xj).block_until_ready()


def markdown(data: dict[str, Any]) -> str:
    """The tables of bench/README.md, "Sparse Jacobians", from the JSON of a run."""

    nan = float("nan")

    def ms(t: float | None) -> str:
        return "-" if t is None else f"{1e3 * t:.2f}"

    lines = [
        "| case | B | m x n | nnz | colors (col / row) | jacbatch sparse (ms) | full path (ms) "
        "| sparse=True (ms) | vmap(jacfwd) (ms) | jacbatch dense (ms) | asdex jit (ms) | vs "
        "vmap(jacfwd) | vs jacbatch dense | jacbatch / asdex | full path / asdex |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in data["cases"].items():
        t = e["times_s"]
        c = e["colors"]
        m, n = e["shape"]

        def x(v: float) -> str:
            return "-" if v != v else f"{v:.3g}x"  # NaN: not measured

        lines.append(
            f"| {name} | {e['batch']} | {m} x {n} | {e['nnz']} | {c['column']} / {c['row']} | "
            f"{ms(t.get('jacbatch sparse'))} | {ms(t.get('jacbatch sparse, full path'))} | "
            f"{ms(t.get('jacbatch sparse=True'))} | "
            f"{ms(t.get('torch.func vmap(jacfwd)'))} | "
            f"{ms(t.get('jacbatch dense'))} | {ms(t.get('asdex (jit)'))} | "
            f"{x(e['speedup_vs_vmap_jacfwd'])} | {x(e['speedup_vs_jacbatch_dense'])} | "
            f"{x(e['jacbatch_over_asdex'])} | {x(e.get('full_path_over_asdex', nan))} |"
        )
    lines += [
        "",
        "| case | ours: column / row (chosen) | independent greedy, natural: column / row | "
        "networkx largest-first / smallest-last | asdex | ours uncached (ms) | networkx "
        "largest-first / smallest-last (ms) | full path: peak / values | repeated call: peak / "
        "values | repeated: peak / (values + CSR indices) |",
        "|---|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for name, e in data["cases"].items():
        c, nx = e["colors"], e["colors"]["networkx_column"]
        a = e.get("asdex", {})
        lines.append(
            f"| {name} | {c['column']} / {c['row']} ({c['chosen']}) | "
            f"{c['independent_natural_column']} / {c['independent_natural_row']} | "
            f"{nx.get('largest_first', '-')} / {nx.get('smallest_last', '-')} | "
            f"{a.get('colors', '-')} ({a.get('mode', '-')}) | {ms(c['ours_column_s'])} | "
            f"{ms(nx.get('largest_first_s'))} / {ms(nx.get('smallest_last_s'))} | "
            f"{e.get('peak_over_values_full_path', nan):.2f} | "
            f"{e.get('peak_over_values_repeated', nan):.2f} | "
            f"{e.get('peak_over_values_and_index_repeated', nan):.2f} |"
        )
    lines += [
        "",
        "| case | method='closed_form' | full path, passes (ms) | full path, closed form (ms) |",
        "|---|---|---:|---:|",
    ]
    for name, e in data["cases"].items():
        t = e["times_s"]
        lines.append(
            f"| {name} | {e.get('closed_form', '-')} | {ms(t.get('jacbatch sparse, full path'))} "
            f"| {ms(t.get('jacbatch sparse, closed form'))} |"
        )
    compiled = {n: e for n, e in data["cases"].items() if "compiled_over_asdex" in e}
    if compiled:
        lines += [
            "",
            "| case | jacbatch sparse (ms) | compiled (ms) | asdex jit (ms) | jacbatch / asdex | "
            "compiled / asdex | compile (s) | compiled values equal |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, e in compiled.items():
            t = e["times_s"]
            lines.append(
                f"| {name} | {ms(t.get('jacbatch sparse'))} | "
                f"{ms(t.get('jacbatch sparse, compiled'))} | {ms(t.get('asdex (jit)'))} | "
                f"{e['jacbatch_over_asdex']:.3g}x | {e['compiled_over_asdex']:.3g}x | "
                f"{e['compile_s']:.1f} | {e['compiled_equals_eager']} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument(
        "--no-compile", action="store_true", help="skip jacbatch.sparse.compile_repeated's runner"
    )
    ap.add_argument("--case", nargs="*", default=None, help="only these cases, by name")
    ap.add_argument("--write", action="store_true", help="write bench/results/sparse.json")
    ap.add_argument("--out", type=str, default=None, help="write the JSON here")
    ap.add_argument("--report", type=str, default=None, help="print the tables of a JSON run")
    a = ap.parse_args()
    if a.report:
        print(markdown(json.loads(Path(a.report).read_text())))
        return
    if not a.tiny:
        _pin()
    import torch

    torch.set_num_threads(1)
    rounds = 2 if (a.quick or a.tiny) else a.rounds
    data: dict[str, Any] = {
        "env": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "pinned": bool(os.environ.get("JACBATCH_SPARSE_BENCH_PINNED")),
            "torch_threads": torch.get_num_threads(),
            "dtype": "float32",
        },
        "rounds": rounds,
        "cases": {},
    }
    targets = [HERE / "results" / "sparse.json"] if a.write else []
    targets += [Path(a.out)] if a.out else []
    chosen = [c for c in cases(a.tiny) if not a.case or c["name"] in a.case]
    for case in chosen:
        data["cases"][case["name"]] = run_case(
            case, rounds, not a.no_jax, compiled=not (a.no_compile or a.tiny)
        )
        text = json.dumps(data, indent=1, default=str)
        for t in targets:  # after every case: a long run keeps what it measured
            t.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
