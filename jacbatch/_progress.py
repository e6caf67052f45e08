"""One progress bar for the whole library: tqdm when installed, else plain lines on stderr."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any


class Bar:
    """What :func:`progress` yields: ``bar(n)`` advances by ``n`` items; ``bar.status(text)``
    names the item being worked on (shown beside a tqdm bar, or as a plain line)."""

    def __call__(self, n: int) -> None:
        pass

    def status(self, text: str) -> None:
        pass


class _Tqdm(Bar):
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def status(self, text: str) -> None:
        self.bar.set_postfix_str(text)


class _Plain(Bar):
    """Plain lines on stderr once ``delay`` seconds have passed: counts, or ``k/total: text``
    per :meth:`status` (a log-friendly progress report where no terminal draws a bar)."""

    def __init__(self, total: int, desc: str, unit: str, delay: float) -> None:
        self.total, self.desc, self.unit, self.delay = total, desc, unit, delay
        self.t0, self.done, self.named = time.perf_counter(), 0, False

    def _due(self) -> bool:
        return time.perf_counter() - self.t0 >= self.delay

    def __call__(self, n: int) -> None:
        self.done += n
        if self._due() and not self.named:  # a line per named item says it already
            print(
                f"{self.desc}: {self.done}/{self.total} {self.unit}s", file=sys.stderr, flush=True
            )

    def status(self, text: str) -> None:
        self.named = True
        if self._due():
            print(
                f"{self.desc}: {self.unit} {self.done + 1}/{self.total}: {text}",
                file=sys.stderr,
                flush=True,
            )


@contextlib.contextmanager
def progress(
    total: int,
    show: bool | None,
    desc: str,
    unit: str = "sample",
    *,
    delay: float = 2.0,
    plain_off_tty: bool = False,
) -> Iterator[Bar]:
    """A progress bar over ``total`` items; yields a :class:`Bar` (``bar(n)`` advances).

    Args:
        total: number of items (samples, benchmark cases, ...).
        show: ``True`` / ``False``, or ``None`` to show it only on an interactive stderr.
        desc: the label printed before the count.
        unit: what is counted (``"sample"``, ``"case"``).
        delay: seconds before anything appears, so that short runs print nothing.
        plain_off_tty: with ``show=None`` and a stderr that is not a terminal (a log, a pipe),
            plain lines instead of nothing.
    """
    tty = sys.stderr.isatty()
    enabled = (tty or plain_off_tty) if show is None else show
    if not enabled:
        yield Bar()
        return
    if show is None and not tty:
        yield _Plain(total, desc, unit, delay)
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield _Plain(total, desc, unit, delay)
        return
    with tqdm(total=total, desc=desc, unit=unit, delay=delay, leave=False) as bar:
        yield _Tqdm(bar)
