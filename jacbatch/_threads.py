"""Calls from several threads: torch's lazy imports and forward-mode AD's process-wide levels.

NOTE [First calls from several threads]
    torch imports ``torch._dynamo`` lazily, on the first call of any function wrapped with
    ``torch._disable_dynamo`` (``torch.func.vmap``, ``jacrev``, ``jvp``, ``make_fx`` all are).
    Four threads making their first calls at once raced on that import ("partially initialized
    module 'torch._dynamo'") in 7 of 10 fresh processes, and the half-imported module then broke
    every later call, the main thread's too. :func:`ready` does those imports once, under a lock,
    before a call touches torch.func (every entry point validates its call first, and
    validation calls it), so the first call pays the imports it would have paid anyway and
    other threads wait for them to finish.

    Forward-mode AD keeps its dual levels in process-wide state: two threads running ``jvp`` at
    once exit each other's levels ("Trying to create a dual Tensor for forward AD but no level
    exists"). Forward-mode routes hold :data:`FORWARD_AD` while they run, so threads take turns
    there; reverse mode and the closed forms run concurrently.
"""

from __future__ import annotations

import threading

#: Held while a forward-mode route runs (see NOTE [First calls from several threads]).
FORWARD_AD = threading.RLock()

_READY = threading.Lock()
_done = False


def ready() -> None:
    """Import what torch would import lazily on the first call, once, under a lock."""
    global _done
    if _done:
        return
    with _READY:
        if _done:
            return
        import torch._dynamo
        import torch._functorch.eager_transforms
        import torch.fx.experimental.proxy_tensor  # noqa: F401

        _done = True
