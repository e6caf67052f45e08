"""Per-sample Hessians: ``jacbatch.hessian`` against torch.func and hand-written closed forms.

    PYTHONPATH=$PWD python bench/hessian_bench.py [--rounds 7] [--reps 5] [--clock wall|cpu]
        [--json out.json]

Cases (float64, ``torch.set_num_threads(1)``, one process, B=256):

* ``mlp``: the squared-error loss of an MLP 32-64-10 (tanh) w.r.t. its input ``x (32,)``:
  Hessians ``(256, 32, 32)``;
* ``logdet``: ``logdet(XᵀX + λI)`` w.r.t. ``X (16, 8)``: Hessians ``(256, 16, 8, 16, 8)``;
* ``logdet-small``: the same with ``X (8, 4)`` (32 inputs, as the MLP): ``(256, 8, 4, 8, 4)``.

Runners:

* ``jacbatch.hessian``: the public call, method ``"auto"`` (the second-order closed form for
  both cases), after its one-off build (reported separately as ``build``);
* ``vmap(torch.func.hessian)``: the torch.func idiom (forward over reverse). For ``logdet``
  it is WRONG in torch 2.13 (LU-based ops, see ``jacbatch._torch_bugs``); timed anyway, marked;
* ``vmap(jacfwd(jacrev))`` for ``mlp`` (the same transform spelled out), and
  ``vmap(jacrev(jacrev))`` for ``logdet`` (the correct autodiff there);
* ``hand``: the closed form written by hand with batched torch ops (the floor to aim at).

Rounds interleave the runners (order rotating); a runner's figure is the median over rounds of
per-round medians of ``reps`` calls. The speed-up of ``jacbatch.hessian`` over
``vmap(torch.func.hessian)`` is also given per round (both measured under the same load).
``--clock cpu`` times with the process's CPU time (``time.process_time``) instead of the wall
clock: with one thread, time spent descheduled by other processes on a shared machine is not
counted (their effect on caches still is). Every runner's result is checked against a per-sample
``torch.autograd.functional.hessian`` loop on the first 4 samples before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jacbatch
from bench._timing import median_seconds

Case = tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, dict[str, Callable[[], Any]]]


def _mlp() -> Case:
    g = torch.Generator().manual_seed(0)
    d, h, k, B = 32, 64, 10, 256
    W1 = torch.randn(h, d, generator=g, dtype=torch.float64) / d**0.5
    b1 = torch.randn(h, generator=g, dtype=torch.float64)
    W2 = torch.randn(k, h, generator=g, dtype=torch.float64) / h**0.5
    y = torch.randn(k, generator=g, dtype=torch.float64)
    X = torch.randn(B, d, generator=g, dtype=torch.float64)

    def loss(x: torch.Tensor) -> torch.Tensor:
        return ((W2 @ torch.tanh(W1 @ x + b1) - y) ** 2).sum()

    def hand() -> torch.Tensor:
        # f = |W2 t - y|², t = tanh(z), z = W1 x + b1; with r = W2 t - y, t' = 1 - t²,
        # t'' = -2 t t': H = 2 W1ᵀ diag(t'' ⊙ W2ᵀ r) W1 + 2 UᵀU, U = W2 diag(t') W1
        t = torch.tanh(X @ W1.T + b1)  # (B, h)
        dt = 1 - t * t
        c = -2 * t * dt * ((t @ W2.T - y) @ W2)  # (B, h)
        U = (W2 * dt[:, None, :]) @ W1  # (B, k, d)
        return 2 * ((W1.T * c[:, None, :]) @ W1 + U.mT @ U)

    hess = torch.func.vmap(torch.func.hessian(loss))
    fwdrev = torch.func.vmap(torch.func.jacfwd(torch.func.jacrev(loss)))
    runners = {
        "jacbatch.hessian": lambda: jacbatch.hessian(loss, X),
        "vmap(torch.func.hessian)": lambda: hess(X),
        "vmap(jacfwd(jacrev))": lambda: fwdrev(X),
        "hand": hand,
    }
    return loss, X, runners


def _logdet(n: int = 16, p: int = 8) -> Case:
    g = torch.Generator().manual_seed(1)
    B, lam = 256, 0.5
    X = torch.randn(B, n, p, generator=g, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.logdet(x.T @ x + lam * torch.eye(p, dtype=x.dtype))

    def hand() -> torch.Tensor:
        # g = 2 X A⁻¹ (A = XᵀX + λI); dg = 2 dX A⁻¹ - 2 M dXᵀ M - 2 P dX A⁻¹ with
        # M = X A⁻¹, P = M Xᵀ: H[i,j,k,l] = 2 (δ_ik - P_ik) A⁻¹_lj - 2 M_il M_kj
        Ainv = torch.linalg.inv(X.mT @ X + lam * torch.eye(p, dtype=X.dtype))
        M = X @ Ainv
        Q = torch.eye(n, dtype=X.dtype) - M @ X.mT
        H = Q[:, :, None, :, None] * Ainv[:, None, :, None, :]
        H -= M[:, :, None, None, :] * M.mT[:, None, :, :, None]
        return 2 * H

    hess = torch.func.vmap(torch.func.hessian(f))
    revrev = torch.func.vmap(torch.func.jacrev(torch.func.jacrev(f)))
    runners = {
        "jacbatch.hessian": lambda: jacbatch.hessian(f, X),
        "vmap(torch.func.hessian)": lambda: hess(X),
        "vmap(jacrev(jacrev))": lambda: revrev(X),
        "hand": hand,
    }
    return f, X, runners


CASES: dict[str, Callable[[], Case]] = {
    "mlp: MLP 32-64-10 loss, d/dx, B=256": _mlp,
    "logdet: logdet(XᵀX + λI), X (16, 8), B=256": _logdet,
    "logdet-small: logdet(XᵀX + λI), X (8, 4), B=256": lambda: _logdet(8, 4),
}


CLOCK: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def run_case(
    name: str, make: Callable[[], Case], rounds: int, reps: int, clock: str = "wall"
) -> dict[str, Any]:
    f, X, runners = make()
    start = time.perf_counter()
    jacbatch.hessian(f, X)  # the one-off build of the closed-form program
    build = time.perf_counter() - start
    ref = torch.stack([torch.autograd.functional.hessian(f, x) for x in X[:4]])
    agrees = {}
    for k, fn in runners.items():
        agrees[k] = bool(torch.allclose(fn()[:4], ref, rtol=1e-10, atol=1e-10))
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            per_round[k].append(median_seconds(runners[k], reps, CLOCK[clock]))
    times = {k: statistics.median(v) for k, v in per_round.items()}
    base, ours = per_round["vmap(torch.func.hessian)"], per_round["jacbatch.hessian"]
    ratios = [b / a for a, b in zip(ours, base, strict=True)]  # per round, same load
    return {
        "build_s": build, "times_s": times, "agrees": agrees, "ratio_per_round": ratios,
        "clock": clock,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name, make in CASES.items():
        res = run_case(name, make, ns.rounds, ns.reps, ns.clock)
        results[name] = res
        t = res["times_s"]
        base = t["vmap(torch.func.hessian)"]
        print(f"\n{name} (first call, with the build: {res['build_s']:.2f} s)")
        print("| runner | median (ms) | vs vmap(torch.func.hessian) | agrees with the loop |")
        print("|---|---|---|---|")
        for k, v in t.items():
            print(f"| {k} | {v * 1e3:.2f} | {base / v:.2f}x | {res['agrees'][k]} |")
        ratios = ", ".join(f"{r:.2f}" for r in res["ratio_per_round"])
        print(f"jacbatch.hessian vs vmap(torch.func.hessian), per round: {ratios}")
    if ns.json is not None:
        ns.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
