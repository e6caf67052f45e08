"""Peak live torch allocations of a repeated sparse call on ``diff`` (n = 10,000, float32),
and which allocations are live at the peak (bench/sparse_bench.py's ``sparse_peak`` figure).

    PYTHONPATH=$PWD taskset -c 1 python bench/sparse_peak_breakdown.py
"""

from __future__ import annotations

import sys
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_bench import known_pattern, sparse_peak, torch_funcs

import jacbatch
from jacbatch.memory import LiveBytes
from jacbatch.sparse import _hot


class Breakdown(LiveBytes):
    """As sparse_peak, also the (op, bytes, where) of every allocation live at the peak."""

    def __init__(self) -> None:
        super().__init__(include_meta=False)
        self.what: dict[Any, tuple[str, int, str]] = {}
        self.at_peak: list[tuple[str, int, str]] = []

    def _release(self, key: Any) -> None:  # type: ignore[override]
        super()._release(key)
        if key not in self._refs:
            self.what.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            key = t.untyped_storage()._cdata
            entry = self._refs.get(key)
            if entry is None:
                entry = self._refs[key] = [0, t.untyped_storage().nbytes()]
                frames = [
                    f"{Path(f.filename).name}:{f.lineno}"
                    for f in traceback.extract_stack()[-12:-1]
                    if "jacbatch" in f.filename and "_python_dispatch" not in f.filename
                ]
                self.what[key] = (str(func), entry[1], " < ".join(frames[-3:][::-1]))
                self.live += entry[1]
                if self.live > self.peak:
                    self.peak = self.live
                    self.at_peak = list(self.what.values())
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


def main() -> None:
    torch.set_num_threads(1)
    f = torch_funcs()["diff"]
    n = 10_000
    P = known_pattern("diff", n)
    for B in (1, 4):
        X = torch.rand(B, n, generator=torch.Generator().manual_seed(0)) + 0.5
        _hot.forget_all()
        for _ in range(_hot.HOT_CALLS + 2):
            jacbatch.jacobian(f, X, sparse=P)
        values = B * P.nnz * 4
        index = (P.shape[0] + 1 + P.nnz) * 8
        peak = sparse_peak(lambda X=X: jacbatch.jacobian(f, X, sparse=P))
        print(
            f"diff_{B}: peak {peak} B, values {values} B: peak/values {peak / values:.2f}, "
            f"peak/(values + CSR index {index} B) {peak / (values + index):.2f}"
        )
        with Breakdown() as bd:
            J = jacbatch.jacobian(f, X, sparse=P)
            del J
        print(f"  breakdown at the peak ({bd.peak} B):")
        for op, size, where in sorted(bd.at_peak, key=lambda e: -e[1]):
            print(f"    {size:>8} {op:40s} {where}")


if __name__ == "__main__":
    main()
