"""One progress bar for the whole library: tqdm when installed, else plain lines on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress(
    total: int, show: bool | None, desc: str, unit: str = "sample"
) -> Iterator[Callable[[int], object]]:
    """A progress bar over ``total`` items; yields ``advance(n)``.

    Args:
        total: number of items (samples, benchmark cases, ...).
        show: ``True`` / ``False``, or ``None`` to show it only on an interactive stderr.
        desc: the label printed before the count.
        unit: what is counted (``"sample"``, ``"case"``).

    It appears after 2 seconds either way, so short runs print nothing.
    """
    enabled = sys.stderr.isatty() if show is None else show
    if not enabled:
        yield lambda n: None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        t0, done = time.perf_counter(), [0]

        def plain(n: int) -> None:
            done[0] += n
            if time.perf_counter() - t0 > 2:
                print(f"{desc}: {done[0]}/{total} {unit}s", file=sys.stderr, flush=True)

        yield plain
        return
    with tqdm(total=total, desc=desc, unit=unit, delay=2, leave=False) as bar:
        yield bar.update
