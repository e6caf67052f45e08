"""Memory benchmarks: peak resident memory and time under budgets, and streaming to disk.

Each measurement runs in a fresh process with a fixed glibc mmap threshold, so resident memory
follows what is allocated; the peak (VmHWM, reset before the call) is reported over the inputs.

    PYTHONPATH=$PWD python bench/memory_bench.py            # budgets table
    PYTHONPATH=$PWD python bench/memory_bench.py --stream   # + an 8 GiB Jacobian streamed to disk
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # name: (B, m, p, q)
    "small": (1024, 8, 8, 8),
    "medium": (64, 32, 32, 32),
    "large": (8, 64, 64, 64),
    "wide": (16, 16, 128, 16),
}

_CHILD = r"""
import json, sys, time, torch
import jacbatch
def status(field):
    with open('/proc/self/status') as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(field))
spec = json.loads(sys.argv[1])
B, m, p, q = spec['shape']
torch.manual_seed(0)
A, W, b = torch.randn(B, m, p), torch.randn(p, q), torch.randn(q)
func = jacbatch.affine if spec['func'] == 'affine' else (lambda A, W, B: torch.tanh(A @ W + B))
kw = dict(argnums=1, in_dims=(0, None, None), method=spec['method'], max_memory=spec['budget'])
if spec.get('stream'):
    with open('/proc/self/clear_refs', 'w') as fh: fh.write('5')
    base = status('VmRSS:')
    t0 = time.perf_counter()
    shape = jacbatch.save_jacobian(spec['stream'], func, A, W, b, **kw)
    t = time.perf_counter() - t0
    print(json.dumps({'time': t, 'peak': status('VmHWM:') - base, 'shape': shape}))
    raise SystemExit
jacbatch.jacobian(func, A[:2], W, b, **kw)  # warm up
times = []
for i in range(spec['repeats']):
    with open('/proc/self/clear_refs', 'w') as fh: fh.write('5')
    base = status('VmRSS:')
    t0 = time.perf_counter()
    J = jacbatch.jacobian(func, A, W, b, **kw)
    times.append(time.perf_counter() - t0)
    peak = status('VmHWM:') - base
    out = J.numel() * J.element_size()
    del J
print(json.dumps({'times': times, 'peak': peak, 'out': out}))
"""


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def budgets_table(repeats: int) -> list[str]:
    lines = [
        "| case | func / method | budget | median time | vs unchunked | peak over inputs | peak / output |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, shape in CASES.items():
        for func, method in (("affine", "auto"), ("tanh", "auto")):
            if func == "tanh" and name != "medium":
                continue
            base_t = None
            for budget in (None, "256MiB", "64MiB"):
                r = run_child(
                    {
                        "shape": shape,
                        "func": func,
                        "method": method,
                        "budget": budget,
                        "repeats": repeats,
                    }
                )
                t = statistics.median(r["times"])
                base_t = t if base_t is None else base_t
                lines.append(
                    f"| {name} {shape} | {func} / {method} | {budget or 'default'} | {t * 1e3:.1f} ms "
                    f"| {t / base_t:.2f}x | {r['peak'] / 2**20:.0f} MiB | {r['peak'] / r['out']:.2f}x |"
                )
                print(lines[-1], flush=True)
    return lines


def stream_case() -> list[str]:
    shape = (128, 64, 64, 64)  # dZ/dW: 128 * 64**4 float32 = 8 GiB, 64 MiB per sample
    with tempfile.TemporaryDirectory(dir=os.environ.get("JACBATCH_BENCH_DIR")) as tmp:
        path = os.path.join(tmp, "J.npy")
        r = run_child(
            {
                "shape": shape,
                "func": "affine",
                "method": "auto",
                "budget": "512MiB",
                "stream": path,
                "repeats": 1,
            }
        )
        size = os.path.getsize(path)
    line = (
        f"streamed {size / 2**30:.2f} GiB ({tuple(r['shape'])}) to disk under max_memory=512MiB: "
        f"{r['time']:.1f} s ({size / 2**30 / r['time']:.2f} GiB/s), peak resident over inputs "
        f"{r['peak'] / 2**20:.0f} MiB"
    )
    print(line, flush=True)
    return [line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--stream", action="store_true", help="also stream an 8 GiB Jacobian to disk"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only-stream", action="store_true", help="skip the budgets table")
    args = parser.parse_args()
    if not args.only_stream:
        budgets_table(args.repeats)
    if args.stream or args.only_stream:
        stream_case()


if __name__ == "__main__":
    main()
