"""Two checkouts of jacbatch side by side: the same cases, interleaved rounds, medians.

    python bench/before_after.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 5] [--json out.json]

Every round runs one fresh process per checkout (their order alternating from round to round),
with ``torch.set_num_threads(1)``; each process warms every case up, then times it ``reps``
times and reports the median. The table gives, per case, the median over rounds of those
medians for each checkout and their ratio (new / old; below 1 is faster). Only public API is
used, so any two versions of the library can be compared.

The cases: the reference article's ``A @ W + B`` through ``jacbatch.affine`` (w.r.t. ``W``,
``A`` and ``B``, closed form and auto, the benchmark runner's sizes), the same as a plain
lambda, traced closed forms of ``tanh(A @ W + B)`` and a 2-layer MLP's per-sample weight
Jacobian, and the per-call overhead of tiny calls (an MLP 3-64-5 defined once and an inline
lambda).
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
import json, sys, time, statistics
import torch
torch.set_num_threads(1)
import jacbatch

def timed(fn, reps):
    fn(); fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

def rnd(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)

cases = {}
for name, B, m, p, q in [("small", 1024, 8, 8, 8), ("medium", 64, 32, 32, 32),
                         ("large", 8, 64, 64, 64), ("wide", 16, 16, 128, 16)]:
    A, W, Bias = rnd(B, m, p, seed=1), rnd(B, p, q, seed=2), rnd(B, q, seed=3)
    for argnum, wrt in ((1, "W"), (0, "A"), (2, "B")):
        if name != "medium" and wrt != "W":
            continue
        for method in ("closed_form", "auto"):
            cases[f"affine-{name} d/d{wrt} {method}"] = (
                lambda A=A, W=W, Bias=Bias, a=argnum, mt=method: jacbatch.jacobian(
                    jacbatch.affine, A, W, Bias, argnums=a, method=mt), 5)
A, W, Bias = rnd(1024, 8, 8, seed=1), rnd(1024, 8, 8, seed=2), rnd(1024, 8, seed=3)
plain = lambda a, w, b: a @ w + b
cases["a @ w + b lambda d/dW B=1024 8^3"] = (
    lambda A=A, W=W, Bias=Bias: jacbatch.jacobian(plain, A, W, Bias, argnums=1), 5)
for dt in (torch.float32, torch.float64):
    A, W, Bias = rnd(64, 32, 32, seed=1, dtype=dt), rnd(64, 32, 32, seed=2, dtype=dt), rnd(64, 32, seed=3, dtype=dt)
    tanh_affine = lambda a, w, b: torch.tanh(a @ w + b)
    cases[f"tanh(A@W+B) d/dW B=64 32^3 {str(dt)[6:]}"] = (
        lambda A=A, W=W, Bias=Bias: jacbatch.jacobian(tanh_affine, A, W, Bias, argnums=1), 5)
X = rnd(256, 20, seed=4)
W1, b1, W2, b2 = rnd(20, 64, seed=5), rnd(64, seed=6), rnd(64, 10, seed=7), rnd(10, seed=8)
mlp = lambda x, w1, c1, w2, c2: torch.tanh(x @ w1 + c1) @ w2 + c2
cases["MLP 20-64-10 per-sample d/dW1,W2 B=256"] = (
    lambda: jacbatch.jacobian(mlp, X, W1, b1, W2, b2, argnums=(1, 3), in_dims=(0, None, None, None, None)), 7)
Xs = rnd(128, 3, seed=9)
V1, c1, V2, c2 = rnd(3, 64, seed=10), rnd(64, seed=11), rnd(64, 5, seed=12), rnd(5, seed=13)
small = lambda x: torch.tanh(x @ V1 + c1) @ V2 + c2
cases["per call: MLP 3-64-5 B=128"] = (lambda: jacbatch.jacobian(small, Xs), 40)
cases["per call: inline lambda 3-64-5 B=128"] = (
    lambda: jacbatch.jacobian(lambda x: torch.tanh(x @ V1 + c1) @ V2 + c2, Xs), 40)
print(json.dumps({k: timed(f, reps) for k, (f, reps) in cases.items()}))
"""


def run(checkout: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(Path(checkout).resolve()), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for r in range(a.rounds):
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for which in order:
            runs[which].append(run(getattr(a, which)))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    rows = []
    for case in runs["old"][0]:
        old = statistics.median(x[case] for x in runs["old"])
        new = statistics.median(x[case] for x in runs["new"])
        rows.append((case, old * 1e3, new * 1e3, new / old))
    print("| case | old (ms) | new (ms) | new / old |")
    print("|---|---:|---:|---:|")
    for case, old, new, ratio in rows:
        print(f"| {case} | {old:.3f} | {new:.3f} | {ratio:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": a.rounds, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
