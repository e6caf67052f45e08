"""1 vs 2 processes for a compute-bound batch of Jacobians, with jacbatch.distributed on gloo.

    PYTHONPATH=. python bench/distributed_bench.py [--batch 64] [--size 32] [--layers 1]
        [--repeat 3] [--rounds 3]

Case: ``tanh(A @ W + B)`` per sample, A ``(m, p)`` batched, W ``(p, q)`` and B ``(q,)`` shared,
the Jacobian w.r.t. A by jacrev in float32, ``(B, m, q, m, p)``; ``--layers L`` applies the layer
L times (m = p = q), which multiplies the work per Jacobian row by L at the same result size. Each configuration runs in fresh
processes with one torch thread each (started with torchrun's environment on loopback), timing
``--repeat`` calls after one warm-up call on rank 0 between two barriers (so they include waiting
for the slowest rank); ``--rounds`` rounds of all configurations, in a rotated order, and the
median and minimum over the pooled calls.

Rows:
- ``single``: ``jacbatch.jacobian`` in one process, no process group (the baseline);
- ``world=1``: ``jacbatch.distributed.jacobian`` in a group of one (the cost of the stages);
- ``world=2 shard``: two ranks, ``gather=None`` (each computes half, nothing is communicated);
- ``world=2 dst``: two ranks, ``gather="dst"`` (the whole Jacobian on rank 0 only);
- ``world=2 all``: two ranks, ``gather="all"`` (the whole Jacobian on both ranks).

Bytes per rank: Jacobian payload sent and received by rank 0 (for ``gather="all"`` every rank
sends its shard and receives all the others; for ``"dst"`` rank 1 sends its shard to rank 0), and the pickled status and
signature objects it contributes to the stage exchanges (counted around ``_exchange``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _worker(mode: str, batch: int, size: int, layers: int, repeat: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import jacbatch
    from jacbatch import distributed as jd

    torch.set_num_threads(1)
    distributed = mode != "single"
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    meta_bytes = 0
    exchange = jd._exchange

    def counting_exchange(group: object, payload: object) -> list[object]:
        nonlocal meta_bytes
        meta_bytes += len(pickle.dumps(payload))
        return exchange(group, payload)

    jd._exchange = counting_exchange

    g = torch.Generator().manual_seed(0)
    m = p = q = size
    A = torch.randn(batch, m, p, generator=g)
    W = torch.randn(p, q, generator=g) / p**0.5
    B = torch.randn(q, generator=g)

    def f(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        for _ in range(layers):
            A = torch.tanh(A @ W + B)
        return A

    gather = {"single": "all", "world1": "all", "shard": None, "dst": "dst", "all": "all"}[mode]

    def call() -> object:
        if not distributed:
            return jacbatch.jacobian(f, A, W, B, in_dims=(0, None, None), method="jacrev")
        return jd.jacobian(f, A, W, B, in_dims=(0, None, None), method="jacrev", gather=gather)

    times = []
    for i in range(repeat + 1):
        if distributed:
            dist.barrier()
        t = time.perf_counter()
        res = call()
        if distributed:
            dist.barrier()
        if i:
            times.append(time.perf_counter() - t)
        del res
    calls = repeat + 1
    a, b = jd.shard_range(batch, world, rank)
    row = 4 * (m * q) * (m * p)  # bytes of one sample's float32 Jacobian
    # payload per rank: "all" sends its shard and receives the others; "dst" only to rank 0
    sent = received = 0
    if world > 1 and gather == "all":
        sent, received = (b - a) * row, (batch - (b - a)) * row
    elif world > 1 and gather == "dst":
        sent, received = 0, (batch - (b - a)) * row  # as seen by rank 0, the receiver
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "median_s": statistics.median(times),
                    "times": times,
                    "sent_per_call": sent,
                    "received_per_call": received,
                    "meta_per_call": meta_bytes // calls,
                    "jacobian_bytes": batch * row,
                }
            )
        )
    if distributed:
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(mode: str, world: int, args: argparse.Namespace) -> dict[str, Any]:
    out = tempfile.mktemp(suffix=".json")
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(ROOT),
        )
        cmd = [sys.executable, "-X", "faulthandler", __file__, "--worker", mode]
        cmd += ["--batch", str(args.batch), "--size", str(args.size), "--layers", str(args.layers)]
        cmd += ["--repeat", str(args.repeat)]
        procs.append(subprocess.Popen([*cmd, "--out", out], env=env, cwd=ROOT))
    codes = [p.wait(timeout=600) for p in procs]
    if any(codes) and not Path(out).exists():
        raise SystemExit(f"{mode}: ranks exited with {codes} before rank 0 wrote its timings")
    if any(codes):
        # rank 0 finished timing; a process died afterwards, while shutting down
        print(f"note: {mode}: ranks exited with {codes} after the timings", file=sys.stderr)
    res: dict[str, Any] = json.loads(Path(out).read_text())
    os.unlink(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", choices=["single", "world1", "shard", "dst", "all"])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.batch, args.size, args.layers, args.repeat, args.out)
        return
    rows = [("single", 1), ("world1", 1), ("shard", 2), ("dst", 2), ("all", 2)]
    # Rounds of every configuration, in a rotated order each round, so that load from other
    # processes on the machine falls on all of them alike; times are pooled over the rounds.
    results: dict[str, dict[str, Any]] = {}
    for k in range(args.rounds):
        for mode, world in rows[k % len(rows) :] + rows[: k % len(rows)]:
            r = run(mode, world, args)
            if mode in results:
                results[mode]["times"] += r["times"]
            else:
                results[mode] = r
    for r in results.values():
        r["median_s"] = statistics.median(r["times"])
        r["min_s"] = min(r["times"])
    base = float(results["single"]["median_s"])
    mb = 1024**2
    jac = int(results["single"]["jacobian_bytes"])
    print(
        f"tanh(A @ W + B) x {args.layers} layer(s), jacrev w.r.t. A, float32, B={args.batch}, "
        f"m=p=q={args.size}: "
        f"Jacobian {jac / mb:.0f} MiB; {args.rounds} rounds x {args.repeat} calls per "
        f"configuration, 1 torch thread per process"
    )
    names = {
        "single": "single (jacbatch.jacobian)",
        "world1": "world=1 distributed.jacobian",
        "shard": "world=2 gather=None",
        "dst": 'world=2 gather="dst" (to rank 0)',
        "all": 'world=2 gather="all"',
    }
    print(
        "| configuration | median s | min s | speedup (median) | speedup (min) "
        "| Jacobian MiB sent / received | metadata bytes per rank |"
    )
    print("|---|---|---|---|---|---|---|")
    best = float(results["single"]["min_s"])
    for mode, _ in rows:
        r = results[mode]
        t = float(r["median_s"])
        t_min = float(r["min_s"])
        sent = int(r["sent_per_call"]) / mb
        recv = int(r["received_per_call"]) / mb
        meta = int(r["meta_per_call"])
        print(
            f"| {names[mode]} | {t:.3f} | {t_min:.3f} | {base / t:.2f}x | {best / t_min:.2f}x "
            f"| {sent:.0f} / {recv:.0f} | {meta} |"
        )


if __name__ == "__main__":
    main()
