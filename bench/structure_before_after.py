"""Before/after timings of the Jacobian-structure rewrite: old code against this tree.

Runs every case with the old code (``--old``, default ``/work/main``) and with this tree, each in
its own subprocess (``PYTHONPATH`` decides which ``jacbatch`` is imported), in interleaved rounds,
one thread, and prints the medians::

    python bench/structure_before_after.py [--old /path/to/old/tree] [--rounds 5]

Cases: ``jacbatch.affine`` (argnums 0, 1, 2; ``method="closed_form"`` and ``"auto"``) at the
``affine-small`` (B=1024, 8³) and ``affine-medium`` (B=64, 32³) sizes of ``bench/README.md``,
``tanh(A @ W + B)`` d/dW (B=64, 32³, float32 and float64), a 2-layer MLP 20-64-10 per-sample
weight Jacobian (B=256) and ``a @ w + b`` as a plain lambda d/dW (B=1024, 8³).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

CASES = [
    ("affine W closed_form B1024 8^3 f32", "affine", 1, "closed_form", "float32", (1024, 8, 8, 8)),
    ("affine A closed_form B1024 8^3 f32", "affine", 0, "closed_form", "float32", (1024, 8, 8, 8)),
    ("affine B closed_form B1024 8^3 f32", "affine", 2, "closed_form", "float32", (1024, 8, 8, 8)),
    ("affine W auto B1024 8^3 f32", "affine", 1, "auto", "float32", (1024, 8, 8, 8)),
    ("affine W closed_form B1024 8^3 f64", "affine", 1, "closed_form", "float64", (1024, 8, 8, 8)),
    ("affine W closed_form B64 32^3 f32", "affine", 1, "closed_form", "float32", (64, 32, 32, 32)),
    ("affine A closed_form B64 32^3 f32", "affine", 0, "closed_form", "float32", (64, 32, 32, 32)),
    ("affine B closed_form B64 32^3 f32", "affine", 2, "closed_form", "float32", (64, 32, 32, 32)),
    ("affine W auto B64 32^3 f32", "affine", 1, "auto", "float32", (64, 32, 32, 32)),
    ("tanh(A@W+B) W B64 32^3 f32", "tanh", 1, "auto", "float32", (64, 32, 32, 32)),
    ("tanh(A@W+B) W B64 32^3 f64", "tanh", 1, "auto", "float64", (64, 32, 32, 32)),
    ("mlp 20-64-10 W1 B256 f32", "mlp", 1, "auto", "float32", (256, 20, 64, 10)),
    ("lambda a@w+b W B1024 8^3 f32", "lambda", 1, "auto", "float32", (1024, 8, 8, 8)),
]

WORKER = r"""
import json, sys, time, statistics
import torch
torch.set_num_threads(1)
import jacbatch
kind, argnum, method, dtype, size, reps = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
B, m, p, q = size
def r(*s):
    return torch.randn(*s, generator=g, dtype=dtype)
if kind == "affine":
    func, args, dims = jacbatch.affine, (r(B, m, p), r(B, p, q), r(q)), (0, 0, None)
elif kind == "tanh":
    func, args, dims = (lambda A, W, b: torch.tanh(A @ W + b)), (r(B, m, p), r(B, p, q), r(q)), (0, 0, None)
elif kind == "lambda":
    func, args, dims = (lambda a, w, b: a @ w + b), (r(B, m, p), r(B, p, q), r(q)), (0, 0, None)
else:  # mlp: x (n_in,), W1 (n_in, h), W2 (h, n_out); per-sample weights
    n_in, h, n_out = m, p, q
    func = lambda x, W1, W2: torch.tanh(x @ W1) @ W2
    args, dims = (r(B, n_in), r(B, n_in, h), r(B, h, n_out)), (0, 0, 0)
def once():
    return jacbatch.jacobian(func, *args, argnums=argnum, in_dims=dims, method=method)
for _ in range(3):
    once()
ts = []
for _ in range(reps):
    t0 = time.perf_counter(); J = once(); ts.append(time.perf_counter() - t0); del J
print(json.dumps(statistics.median(ts)))
"""


def run(tree: str, case: tuple, reps: int) -> float:
    _, kind, argnum, method, dtype, size = case
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps([kind, argnum, method, dtype, size, reps])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", default="/work/main")
    ap.add_argument("--new", default=str(HERE))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default=None, help="substring of the case names to run")
    a = ap.parse_args()
    cases = [c for c in CASES if a.only is None or a.only in c[0]]
    times: dict[tuple[str, str], list[float]] = {}
    for k in range(a.rounds):
        for case in cases:
            order = [("old", a.old), ("new", a.new)]
            if k % 2:
                order.reverse()
            for label, tree in order:
                times.setdefault((case[0], label), []).append(run(tree, case, a.reps))
    print(f"{'case':<40} {'old ms':>9} {'new ms':>9} {'new/old':>8}")
    for case in cases:
        old = statistics.median(times[(case[0], "old")]) * 1e3
        new = statistics.median(times[(case[0], "new")]) * 1e3
        print(f"{case[0]:<40} {old:9.3f} {new:9.3f} {new / old:8.3f}")


if __name__ == "__main__":
    main()
