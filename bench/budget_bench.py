"""Working memory per route and budget: peak resident memory beyond the result, fresh process.

Each case runs in a fresh process with glibc's default allocator settings (what users get); the
working memory is the rise of the peak resident set size (VmHWM, reset just before the call)
over the resident size before it, minus the result's bytes. The estimate column is
``estimate_memory(...).peak_bytes`` for the unchunked call, set against the measured rise of an
unchunked call (no budget) in its own fresh process.

    PYTHONPATH=$PWD python bench/budget_bench.py            # the table
    PYTHONPATH=$PWD python bench/budget_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from jacbatch.methods import names

ROOT = Path(__file__).resolve().parents[1]

ROUTES = (*names(), "auto")
BUDGETS = ("64MiB", "256MiB")

CHILD = r"""
import json, sys, torch
import jacbatch
torch.set_num_threads(1)
def status(field):
    with open('/proc/self/status') as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(field))
spec = json.loads(sys.argv[1])
B, m, p, q = spec['shape']
torch.manual_seed(0)
if spec['func'] == 'cumsum':
    A, W, b = torch.randn(B, m, p), torch.randn(p, q), torch.randn(q)
    func = lambda A, W, B: torch.cumsum(A @ W, 0)
else:
    A, W, b = torch.randn(B, m, p), torch.randn(p, q), torch.randn(q)
    func = lambda A, W, B: torch.tanh(A @ W + B)
kw = dict(argnums=spec.get('argnums', 1), in_dims=(0, None, None), method=spec['method'])
est = None
if spec.get('estimate'):
    est = jacbatch.estimate_memory(func, A, W, b, **kw).peak_bytes
jacbatch.jacobian(func, A[:1], W, b, **kw)  # warm up (imports, traces)
with open('/proc/self/clear_refs', 'w') as fh:
    fh.write('5')
base = status('VmRSS:')
J = jacbatch.jacobian(func, A, W, b, max_memory=spec['budget'], **kw)
peak = status('VmHWM:') - base
out = J.numel() * J.element_size()
print(json.dumps({'peak': peak, 'out': out, 'working': peak - out, 'estimate': est}))
"""


def run_child(spec: dict, env_extra: dict | None = None, root: Path = ROOT) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if env_extra:
        env.update(env_extra)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(spec)],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", type=int, nargs=4, default=(64, 32, 32, 32))
    parser.add_argument("--routes", nargs="*", default=list(ROUTES))
    parser.add_argument("--json", default=None)
    parser.add_argument("--argnum", type=int, default=1, help="0: d/dA (chunks view A)")
    parser.add_argument("--root", default=str(ROOT), help="the jacbatch checkout to measure")
    parser.add_argument("--no-estimates", action="store_true")
    parser.add_argument("--func", choices=("tanh", "cumsum"), default="tanh")
    args = parser.parse_args()
    root = Path(args.root)
    shape = tuple(args.shape)
    rows = []
    wrt = "dW" if args.argnum == 1 else "dA"
    name = "tanh(A @ W + B)" if args.func == "tanh" else "cumsum(A @ W, 0)"
    print(f"shape (B, m, p, q) = {shape}, {name}, d/{wrt}, float32")
    print("| route | budget | working beyond result | within budget + 16 MiB |")
    print("|---|---|---:|---|")
    for method in args.routes:
        for budget in BUDGETS:
            spec = {"shape": shape, "func": args.func, "method": method, "budget": budget,
                    "argnums": args.argnum}  # fmt: skip
            r = run_child(spec, root=root)
            ok = r["working"] <= _bytes(budget) + 16 * 2**20
            rows.append({"method": method, "budget": budget, **r})
            print(
                f"| {method} | {budget} | {r['working'] / 2**20:.0f} MiB | {'yes' if ok else 'NO'} |",
                flush=True,
            )
    if args.no_estimates:
        return
    print()
    print("| route | estimate (peak) | measured (peak) | measured / estimate |")
    print("|---|---:|---:|---:|")
    for method in args.routes:
        r = run_child(
            {
                "shape": (8, 48, 48, 48),
                "func": "tanh",
                "method": method,
                "budget": None,
                "estimate": True,
            }
        )
        rows.append({"method": method, "budget": None, "estimate_case": True, **r})
        print(
            f"| {method} | {r['estimate'] / 2**20:.1f} MiB | {r['peak'] / 2**20:.1f} MiB | "
            f"{r['peak'] / r['estimate']:.2f} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _bytes(text: str) -> int:
    return int(text[:-3]) * 2**20


if __name__ == "__main__":
    main()
