"""Traced closed forms against ``vmap(jacrev)`` on the cases the accumulation order is about.

    python bench/accumulation_bench.py [CHECKOUT ...] [--rounds 5] [--json out.json]

Each CHECKOUT (default: this one) is a directory holding a ``jacbatch`` package; comparing the
checkout before a change with the one after gives a before/after table. Every round runs one
fresh process per checkout (order alternating between rounds) with ``torch.set_num_threads(1)``;
each process warms every case up, then times jacbatch ``method="closed_form"`` and
``torch.func.vmap(torch.func.jacrev)`` interleaved, ``reps`` times each, and reports medians of
wall-clock time and of the calling thread's CPU time (``time.thread_time``; with one torch
thread it is the work itself, less sensitive to other processes on a loaded machine). The table
gives the median over rounds. Orientation only: on a shared machine the spread is large.

The cases (float32):

* MLP 20-64-10 (tanh), per-sample Jacobian w.r.t. all weights and biases, ``B = 256`` (a
  parameter Jacobian with a small output: reverse accumulation);
* PINN MLP 2-64-64-64-1 (tanh) w.r.t. its input ``x``, ``B = 1024``;
* ``a @ w + b`` as a plain lambda w.r.t. ``w``, ``B = 1024``, ``8 x 8 x 8``;
* attention ``softmax(Q Kᵀ / √d) V`` with ``Q, K, V = X Wq, X Wk, X Wv`` w.r.t. ``X``,
  ``B = 64``, 16 tokens of width 32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, math, time, statistics
import torch
torch.set_num_threads(1)
import jacbatch
from torch.func import jacrev, vmap

def rnd(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) / 4

cases = {}
# MLP 20-64-10 w.r.t. all weights
X = rnd(256, 20, seed=1)
P = (rnd(20, 64, seed=2), rnd(64, seed=3), rnd(64, 10, seed=4), rnd(10, seed=5))
mlp = lambda x, w1, c1, w2, c2: torch.tanh(x @ w1 + c1) @ w2 + c2
cases["MLP 20-64-10 d/d(all weights) B=256"] = (
    lambda: jacbatch.jacobian(mlp, X, *P, argnums=(1, 2, 3, 4),
                              in_dims=(0, None, None, None, None), method="closed_form"),
    lambda: vmap(jacrev(mlp, argnums=(1, 2, 3, 4)), in_dims=(0, None, None, None, None))(X, *P),
    7)
# PINN 2-64-64-64-1 w.r.t. x
Xp = rnd(1024, 2, seed=6)
Ws = [(rnd(a, b, seed=10 + k), rnd(b, seed=20 + k))
      for k, (a, b) in enumerate([(2, 64), (64, 64), (64, 64), (64, 1)])]
def pinn(x):
    h = x
    for k, (w, c) in enumerate(Ws):
        h = h @ w + c
        if k < len(Ws) - 1:
            h = torch.tanh(h)
    return h
cases["PINN 2-64-64-64-1 d/dx B=1024"] = (
    lambda: jacbatch.jacobian(pinn, Xp, method="closed_form"),
    lambda: vmap(jacrev(pinn))(Xp), 9)
# a @ w + b, plain code
A, W, Bi = rnd(1024, 8, 8, seed=30), rnd(1024, 8, 8, seed=31), rnd(1024, 8, seed=32)
plain = lambda a, w, b: a @ w + b
cases["a @ w + b d/dW B=1024 8^3"] = (
    lambda: jacbatch.jacobian(plain, A, W, Bi, argnums=1, method="closed_form"),
    lambda: vmap(jacrev(plain, argnums=1))(A, W, Bi), 9)
# attention w.r.t. X
Xa = rnd(64, 16, 32, seed=40)
Wq, Wk, Wv = rnd(32, 32, seed=41), rnd(32, 32, seed=42), rnd(32, 32, seed=43)
def attention(x):
    q, k, v = x @ Wq, x @ Wk, x @ Wv
    return torch.softmax(q @ k.T / math.sqrt(32), dim=-1) @ v
cases["attention d/dX B=64 16x32"] = (
    lambda: jacbatch.jacobian(attention, Xa, method="closed_form"),
    lambda: vmap(jacrev(attention))(Xa), 3)

res = {}
for name, (ours, theirs, reps) in cases.items():
    ours(); ours(); theirs(); theirs()
    got = {"jacbatch": [], "vmap(jacrev)": [], "jacbatch cpu": [], "vmap(jacrev) cpu": []}
    for _ in range(reps):
        for key, fn in (("jacbatch", ours), ("vmap(jacrev)", theirs)):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            c1, t1 = time.thread_time(), time.perf_counter()
            got[key].append(t1 - t0)
            got[key + " cpu"].append(c1 - c0)
    res[name] = {k: statistics.median(v) for k, v in got.items()}
print(json.dumps(res))
"""


def run(checkout: str) -> dict[str, dict[str, float]]:
    env = dict(os.environ, PYTHONPATH=checkout, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, check=True, capture_output=True, text=True
    )
    result: dict[str, dict[str, float]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkouts", nargs="*", default=[str(Path(__file__).resolve().parents[1])])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    runs: dict[str, list[dict[str, dict[str, float]]]] = {c: [] for c in a.checkouts}
    for r in range(a.rounds):
        order = a.checkouts if r % 2 == 0 else list(reversed(a.checkouts))
        for c in order:
            runs[c].append(run(c))
    cases = list(runs[a.checkouts[0]][0])
    table: dict[str, dict[str, dict[str, float]]] = {}
    keys = ("jacbatch", "vmap(jacrev)", "jacbatch cpu", "vmap(jacrev) cpu")
    head = "| case | " + " | ".join(f"{Path(c).name} {k} ms" for c in a.checkouts for k in keys)
    print(head + " |")
    print("|---|" + "---:|" * (len(keys) * len(a.checkouts)))
    for case in cases:
        cells = []
        for c in a.checkouts:
            med = {k: statistics.median(run_[case][k] for run_ in runs[c]) for k in keys}
            table.setdefault(case, {})[c] = med
            cells += [f"{1e3 * med[k]:.2f}" for k in keys]
        print(f"| {case} | " + " | ".join(cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"runs": runs, "medians": table}, indent=1))


if __name__ == "__main__":
    main()
