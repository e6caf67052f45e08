"""The validated, normalized call to :func:`jacbatch.jacobian` (:class:`Call`), used by every
route; :func:`jacbatch._validation.normalize_call` builds it from what the caller passed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Call:
    """A validated, normalized call to :func:`jacbatch.jacobian`.

    Attributes:
        func: the per-sample function.
        args: the caller's tensors, untouched.
        in_dims: per argument, the (non-negative) batch dimension or ``None`` for shared.
        argnums: the differentiated argument indices (non-negative, unique).
        tuple_argnums: whether the caller passed a tuple (and gets a tuple back).
        batch_size: ``B``, or ``None`` when no argument is batched.
        dtype: the common floating dtype.
        device: the common device.
        randomness: ``"error"``, ``"different"`` or ``"same"``, as in ``torch.func.vmap``.
        create_graph: the result must stay differentiable (autograd graph, torch.func levels);
            set by :func:`jacbatch.jacobian` from ``jacbatch.methods.needs_graph``.
        probe: what one probe run of ``func`` showed (:class:`jacbatch._probe.ProbeResult`),
            ``None`` until probed.
        batched_func: with ``jacobian(..., batched=True)``, the caller's batched function;
            ``func`` is then its per-sample view (NOTE [Batched functions: one call, two views]
            in :mod:`jacbatch.methods.batched`). ``None`` for a per-sample ``func``.
    """

    func: Callable[..., Any]
    args: tuple[torch.Tensor, ...]
    in_dims: tuple[int | None, ...]
    argnums: tuple[int, ...]
    tuple_argnums: bool
    batch_size: int | None
    dtype: torch.dtype
    device: torch.device
    randomness: str = "error"
    create_graph: bool = False
    probe: Any = None
    batched_func: Callable[..., Any] | None = None

    @property
    def batched(self) -> bool:
        return self.batch_size is not None

    def sample_shape(self, i: int) -> tuple[int, ...]:
        """Shape of argument ``i`` as ``func`` sees it (batch dimension removed)."""
        shape = list(self.args[i].shape)
        d = self.in_dims[i]
        if d is not None:
            del shape[d]
        return tuple(shape)

    def moved(self, i: int) -> torch.Tensor:
        """Argument ``i`` with its batch dimension first (a view), or as is when shared."""
        d = self.in_dims[i]
        a = self.args[i]
        return a if d is None or d == 0 else a.movedim(d, 0)
