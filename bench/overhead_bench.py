"""What a call costs beyond its kernels: a prepared Jacobian and a repeated plain call against
the bare program they run.

    PYTHONPATH=$PWD python bench/overhead_bench.py [--rounds 9] [--json out.json]

Per case (float32, ``torch.set_num_threads(1)``), one process:

* ``program``: the signature's aten program called directly (``J._first.program``, with the
  tensors ``func`` reads as its extra inputs): the kernels and nothing else;
* ``prepare``: the :class:`jacbatch.PreparedJacobian` call ``J(X)`` (signature lookup,
  context check, program, the ``isfinite`` flag);
* ``hot key's program``: the program a hot plain key runs (auto's choice, over the captured
  graph), called directly;
* ``jacobian (hot)``: ``jacbatch.jacobian(f, X)`` with ``f`` defined once, after the key got
  hot (Dynamo's guard check, the program, the value check on one sample);
* ``jacobian (inline lambda)``: the same with ``lambda x: f(x)`` written in the call;
* ``jacobian (cold)``: the full path (validation, probe, plan, budget) with the repeated-call
  path switched off (``repeated.HOT_CALLS`` set past the loop), for scale.

Rounds interleave the runners (order rotating); a runner's figure is the median over rounds of
per-round medians of ``reps`` calls. The overheads in parentheses are differences from
``program`` (prepare, cold) or from the hot key's program (hot, inline lambda).
Orientation on a shared machine: differences of medians, in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jacbatch
from bench._timing import median_seconds
from jacbatch import capture, repeated


def _cases() -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / 4

    W1, b1, W2, b2 = rnd(64, 3), rnd(64), rnd(5, 64), rnd(5)

    def mlp_small(x: torch.Tensor) -> torch.Tensor:  # 3-64-5 tanh
        return torch.tanh(x @ W1.T + b1) @ W2.T + b2

    A = rnd(8, 8)

    def tiny(x: torch.Tensor) -> torch.Tensor:  # 8 -> 8, almost no kernel time
        return torch.sin(A @ x)

    return {
        "MLP 3-64-5, B=128": (mlp_small, rnd(128, 3)),
        "sin(A x), 8x8, B=16": (tiny, rnd(16, 8)),
    }


def run_case(
    f: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor, rounds: int
) -> dict[str, float]:
    J = jacbatch.prepare(f, X)
    entry = J._first
    assert entry is not None and entry.program is not None, J.program
    program, lifted = entry.program, entry.lifted
    for _ in range(repeated.HOT_CALLS + 1):
        jacbatch.jacobian(f, X)
        jacbatch.jacobian(lambda x: f(x), X)
    seen = next(iter(repeated._SEEN[repeated._owner(f)].values()))
    assert seen.entry is not None and seen.entry.program is not None, seen.refused
    hot_program = seen.entry.program
    hot_lifted = capture.capture(f, [tuple(X.shape[1:])], X.dtype, X.device, [True]).lifted

    def cold() -> None:
        hot = repeated.HOT_CALLS
        repeated.HOT_CALLS = 10**9
        try:
            jacbatch.jacobian(lambda x: torch.tanh(f(x)) * 1.0, X)
        finally:
            repeated.HOT_CALLS = hot

    runners: dict[str, Callable[[], Any]] = {
        "program": lambda: program(X, *lifted),
        "hot program": lambda: hot_program(X, *hot_lifted),
        "prepare": lambda: J(X),
        "jacobian (hot)": lambda: jacbatch.jacobian(f, X),
        "jacobian (inline lambda)": lambda: jacbatch.jacobian(lambda x: f(x), X),
        "jacobian (cold)": cold,
    }
    with torch.no_grad():
        for fn in runners.values():
            fn()
    per_round: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            reps = 20 if name == "jacobian (cold)" else 200
            with torch.no_grad():
                per_round[name].append(median_seconds(runners[name], reps) * 1e6)
    return {k: statistics.median(v) for k, v in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--json", type=Path, default=None)
    ns = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    print(
        "| case | program (µs) | prepare | hot key's program | jacobian hot | inline lambda "
        "| cold |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (f, X) in _cases().items():
        t = run_case(f, X, ns.rounds)
        results[name] = t
        p = t["program"]

        def over(k: str, t: dict[str, float] = t, p: float = p) -> str:
            return f"{t[k]:.0f} (+{t[k] - p:.0f})"

        hp = t["hot program"]

        def hot(k: str, t: dict[str, float] = t, hp: float = hp) -> str:
            return f"{t[k]:.0f} (+{t[k] - hp:.0f})"

        print(
            f"| {name} | {p:.0f} | {over('prepare')} | {hp:.0f} | {hot('jacobian (hot)')} | "
            f"{hot('jacobian (inline lambda)')} | {over('jacobian (cold)')} |"
        )
    if ns.json is not None:
        ns.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
