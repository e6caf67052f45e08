"""laplace-torch's ``jacobians`` by backend: jacbatch's :class:`JacbatchGGN` against laplace's own.

    PYTHONPATH=$PWD python bench/laplace_bench.py [--rounds 7] [--case MLP] [--json out.json]

Needs laplace-torch (``pip install -c constraints.txt laplace-torch`` with ``torch==<installed>``
in ``constraints.txt``; see ``.ci/run``). Per case (float32, eval mode, ``torch.set_num_threads(1)``),
one process, each backend on its own copy of the same network (BackPACK extends its modules):

* ``JacbatchGGN``: :class:`jacbatch.integrations.laplace.JacbatchGGN` (``method="auto"``);
* ``torch.func``: laplace's ``CurvatureInterface.jacobians`` (``jacrev`` over
  ``functional_call``), what its default ``CurvlinopsGGN`` backend runs;
* ``BackPACK``: ``BackPackGGN.jacobians`` (one ``BatchGrad`` backward pass per output);
* ``ASDL``: ``AsdlGGN.jacobians`` (one ``batch_gradient`` pass per output);

each for ``jacobians(x)`` and ``jacobians(x, enable_backprop=True)`` (the graph is built, no
backward pass is timed). A ``full`` row times the whole-batch GGN ``(P, P)``: JacbatchGGN and
BackPACK contract their Jacobians (``GGNInterface.full``), curvlinops multiplies its GGN operator
with a ``P x P`` identity. Every backend's ``Js`` is checked against torch.func's first.

Rounds interleave the runners (order rotating); a runner's figure is the median over rounds of
per-round medians of ``reps`` calls, after warm-up calls (jacbatch traces and plans on its first
calls). Orientation on a shared machine, not a contract.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from laplace.curvature import (
    AsdlGGN,
    BackPackGGN,
    CurvatureInterface,
    CurvlinopsGGN,
)

from bench._timing import median_seconds
from jacbatch.integrations.laplace import JacbatchGGN

warnings.filterwarnings("ignore", message="Full backward hook is firing")


def _cases() -> dict[str, tuple[Callable[[], torch.nn.Module], torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def mlp() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)
        ).eval()

    def cnn() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 6 * 6, 10),
        ).eval()

    return {
        "MLP 20-64-10 (tanh), B=256": (
            mlp,
            torch.randn(256, 20, generator=g),
            torch.randn(256, 10, generator=g),
        ),
        "CNN Conv2d(3,8,3)-ReLU-Linear(288,10), 3x8x8, B=256": (
            cnn,
            torch.randn(256, 3, 8, 8, generator=g),
            torch.randn(256, 10, generator=g),
        ),
    }


BACKENDS: dict[str, Callable[[torch.nn.Module], Any]] = {
    "JacbatchGGN": lambda m: JacbatchGGN(m, "regression"),
    "torch.func": lambda m: CurvlinopsGGN(m, "regression"),
    "BackPACK": lambda m: BackPackGGN(m, "regression"),
    "ASDL": lambda m: AsdlGGN(m, "regression"),
}
FULL = {"JacbatchGGN": "JacbatchGGN", "BackPACK": "BackPACK", "curvlinops": "torch.func"}


def run_case(
    make: Callable[[], torch.nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int
) -> dict[str, float]:
    backends = {}
    for name, build in BACKENDS.items():
        model = make()
        model.output_size = y.shape[1]  # what Laplace.fit sets; BackPACK and ASDL read it
        backends[name] = build(model)
    x_grad = x.clone().requires_grad_()
    runners: dict[str, Callable[[], Any]] = {}
    for name, backend in backends.items():
        runners[f"{name} jacobians"] = lambda b=backend: b.jacobians(x)
        runners[f"{name} jacobians(enable_backprop=True)"] = lambda b=backend: b.jacobians(
            x_grad, enable_backprop=True
        )
    for label, name in FULL.items():
        runners[f"{label} full"] = lambda b=backends[name]: b.full(x, y)

    reference, _ = CurvatureInterface.jacobians(backends["torch.func"], x)
    for name, backend in backends.items():
        for _ in range(5):  # warm-up: jacbatch traces, plans and times its program here
            Js, _ = backend.jacobians(x)
        err = (Js - reference).abs().max().item()
        assert err < 1e-4 * reference.abs().max().item(), (name, err)
    for fn in runners.values():
        fn()

    per_round: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            reps = 1 if name.endswith(" full") else 3
            per_round[name].append(median_seconds(runners[name], reps) * 1e3)
    return {k: statistics.median(v) for k, v in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--case", default="", help="run only cases whose name contains this")
    ns = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for case, (make, x, y) in _cases().items():
        if ns.case not in case:
            continue
        t = run_case(make, x, y, ns.rounds)
        results[case] = t
        print(f"\n{case}\n")
        print("| runner | ms (median) | × JacbatchGGN |")
        print("|---|---:|---:|")
        for kind in ("jacobians", "jacobians(enable_backprop=True)", "full"):
            base = t[f"JacbatchGGN {kind}"]
            for key, ms in t.items():
                if key.endswith(f" {kind}"):
                    print(f"| {key} | {ms:.3g} | {ms / base:.2f} |")
    if ns.json is not None:
        ns.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
