"""First calls from several threads at once, in fresh processes (NOTE [First calls from several
threads] in jacbatch._threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jacbatch

ROOT = Path(__file__).resolve().parents[1]

_THREADS = """
import threading, torch
import jacbatch
from tests._reference import reference_jacobian

def f(A, W, B):
    return torch.tanh(A @ W + B)

errors, checked = [], []
start = threading.Barrier(4)

def work(i):
    try:
        g = torch.Generator().manual_seed(i)
        A = torch.randn(6, 3, 4, generator=g, dtype=torch.float64)
        W = torch.randn(4, 2, generator=g, dtype=torch.float64)
        b = torch.randn(2, generator=g, dtype=torch.float64)
        if i < 4:
            start.wait()  # every thread makes its first call at the same moment
        for method in ("jacfwd", "auto", "jacrev", "vjp", "jacfwd"):
            J = jacbatch.jacobian(f, A, W, b, argnums=1, in_dims=(0, None, None), method=method)
            ref = reference_jacobian(f, (A, W, b), 1, (0, None, None))  # independent
            assert (J - ref).abs().max() < 1e-12, method
            checked.append(method)
    except BaseException as e:
        errors.append(f"thread {i}: {type(e).__name__}: {e}")

threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
work(4)  # the main thread still works afterwards
print("ERRORS" if errors else f"OK {len(checked)}", *errors[:2], sep="\\n")
"""


def test_first_calls_from_four_threads_in_fresh_processes():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _THREADS],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out
        assert out.strip().splitlines()[-1] == "OK 25", out


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["coo", "csr"])
@pytest.mark.parametrize(
    "entry", ["jacobian", "estimate_memory", "explain", "iter_jacobian", "structured_jacobian"]
)
def test_sparse_inputs_get_a_clear_type_error(layout, entry):
    x = torch.eye(3, dtype=torch.float64)
    sparse = x.to_sparse() if layout == "coo" else x.to_sparse_csr()
    with pytest.raises(TypeError, match=rf"{entry}: expected dense \(strided\) tensors.*to_dense"):
        getattr(jacbatch, entry)(torch.cos, sparse)
