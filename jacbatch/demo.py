"""``jacbatch demo``: the reference article's worked examples, then one batched Jacobian by
every route, with their agreement and timings."""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

from . import affine, chain, jacobian, methods, testing, unvec, vec  # the public API
from ._table import format_table


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _show(title: str, t: torch.Tensor) -> str:
    body = "\n".join(
        "    " + line for line in str(t.tolist()).replace("], [", "],\n [").splitlines()
    )
    return f"  {title}:\n{body}"


def article_examples() -> tuple[list[str], bool]:
    """The worked examples of the reference article. Returns the lines and whether all match."""
    A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    W = torch.tensor([[7.0, 8.0], [10.0, 11.0], [12.0, 13.0]])
    B = torch.tensor([13.0, 14.0])
    lines = ["Reference article: derivative of matrices (row-major vec)"]
    ok = True

    def expect(title: str, got: torch.Tensor, want: object) -> None:
        nonlocal ok
        match = torch.equal(got, torch.tensor(want, dtype=got.dtype))
        ok &= match
        lines.append(_show(title, got) + ("" if match else f"\n    MISMATCH, expected {want}"))

    grad = jacobian(lambda a: 2 * a.sum(), A, in_dims=None)
    expect("F(A) = 2 sum(A); dF/dA", grad, [[2.0] * 3] * 2)
    Z = affine(A, W, B)
    expect("Z = A @ W + B", Z, [[76.0, 83.0], [163.0, 179.0]])
    expect("S = sum(Z)", Z.sum(), 501.0)
    dZ_dW = jacobian(affine, A, W, B, argnums=1, in_dims=None, method="closed_form", vec="row")
    expect(
        "d vec(Z) / d vec(W) = A ⊗ I_2 (4 x 6)",
        dZ_dW,
        [[1, 0, 2, 0, 3, 0], [0, 1, 0, 2, 0, 3], [4, 0, 5, 0, 6, 0], [0, 4, 0, 5, 0, 6]],
    )
    dS_dZ = jacobian(lambda z: z.sum(), Z, in_dims=None)
    dS_dW = unvec(chain(vec(dS_dZ), dZ_dW), (3, 2))
    expect("dS/dW = dS/dZ · dZ/dW (chain rule)", dS_dW, [[5.0, 5.0], [7.0, 7.0], [9.0, 9.0]])
    return lines, ok


def route_table(
    batch: int = 64, size: int = 16, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> tuple[list[str], bool]:
    """One batched Jacobian of ``A @ W + B`` w.r.t. W by every route: agreement and time."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(batch, size, size, generator=g, dtype=dtype)
    W = torch.randn(size, size, generator=g, dtype=dtype)
    B = torch.randn(size, generator=g, dtype=dtype)

    def jac(method: str) -> torch.Tensor:
        J = jacobian(affine, A, W, B, argnums=1, in_dims=(0, None, None), method=method)
        assert isinstance(J, torch.Tensor)
        return J

    ref = jac("closed_form")
    rtol, atol = testing.tolerance(dtype)
    n = ref.numel()
    lines = [
        f"Batched Jacobian of A @ W + B w.r.t. W: B={batch}, m=p=q={size}, {dtype}, "
        f"result {tuple(ref.shape)} ({n * ref.element_size() / 2**20:.1f} MiB), "
        f"median of {repeats}",
    ]
    ok = True
    base = None
    rows = []
    for method in (*methods.names(), "auto"):
        J = jac(method)
        t = _median_time(functools.partial(jac, method), repeats)
        base = t if base is None else base
        diff = float((J - ref).abs().max()) if n else 0.0
        agree = bool(torch.allclose(J, ref, rtol=rtol, atol=atol))
        ok &= agree
        rows.append(
            [method, f"{t * 1e3:.2f}", f"{t / base:.1f}x", f"{diff:.1e}", "yes" if agree else "NO"]
        )
    header = ["route", "time (ms)", "vs closed form", "max |diff|", "agrees"]
    lines += format_table(header, rows, indent="  ")
    return lines, ok


def run() -> int:
    """Print the demo; return a process exit code (0 when everything agrees)."""
    torch.manual_seed(0)
    lines, ok1 = article_examples()
    print("\n".join(lines))
    print()
    lines, ok2 = route_table()
    print("\n".join(lines))
    print()
    print("All routes agree." if ok1 and ok2 else "MISMATCH: see above.")
    return 0 if ok1 and ok2 else 1
