"""The per-round timer the benchmark scripts share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(
    fn: Callable[[], Any], reps: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls on ``clock`` (no warm-up, grad mode as the
    caller has it: unlike :func:`jacbatch.prepared.median_seconds`, which times under
    ``no_grad``, it can time backpropagation)."""
    times = []
    for _ in range(reps):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)
