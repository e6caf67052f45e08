"""Per-sample Jacobians of an ``nn.Module``'s output w.r.t. its parameters.

NOTE [Module Jacobians: the torch.func idiom, written once]
    ``module_jacobian(model, X)`` is ``jacbatch.jacobian(f, params, X, in_dims=(None, 0))``
    with ``f(p, x) = functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)``: the model sees
    each sample as a batch of one (so ``Conv2d`` and ``BatchNorm`` get the batch dimension they
    expect), and the parameters are one dict argument. ``named_parameters()`` lists a tied
    weight once (under its first name) and ``functional_call`` ties it again
    (``tie_weights=True``), as torch.func does; frozen parameters (``requires_grad=False``)
    and buffers are the module's own unless given. The model is called in the mode it is in
    (``train()``/``eval()``): dropout in train mode draws random numbers (pass
    ``randomness="different"``), and a train-mode ``BatchNorm`` cannot normalize a batch of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.func import functional_call
from torch.utils import _pytree as pt

from .api import jacobian


def module_jacobian(
    model: torch.nn.Module,
    x: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    params: Mapping[str, torch.Tensor] | Iterable[str] | None = None,
    buffers: Mapping[str, torch.Tensor] | None = None,
    in_dims: int | tuple[int | None, ...] | None = 0,
    **options: Any,
) -> Any:
    """Per-sample Jacobians of ``model``'s output w.r.t. its parameters, one per name.

    Args:
        model: the module; called on one sample at a time as a batch of one, in its mode.
        x: the batch of inputs ``(B, *in_shape)``, or a tuple of forward arguments.
        params: the parameters to differentiate: a dict name -> tensor, or names of the
            model's parameters. Default: those that require grad (frozen ones excluded; a tied
            weight once).
        buffers: values for some of the model's buffers (default: its own).
        in_dims: the batch dimension of ``x`` (per forward argument for a tuple; ``None`` for
            one shared by the batch).
        **options: as for :func:`jacbatch.jacobian` (``method``, ``vec``, ``max_memory``,
            ``create_graph`` ...). Without ``create_graph=True`` the parameters are detached
            (no graph is built).

    Returns:
        ``dict`` name -> ``(B, *out_shape, *param_shape)`` (``(B, out_numel, param_numel)``
        with ``vec``); for a tuple or dict output, the output's tree of such dicts.
    """
    named = dict(model.named_parameters())
    if params is None:
        params = {k: v for k, v in named.items() if v.requires_grad}
    elif not isinstance(params, Mapping):
        names = [params] if isinstance(params, str) else list(params)
        unknown = [n for n in names if n not in named]
        if unknown:
            raise ValueError(
                f"module_jacobian: expected names of the model's parameters, got {unknown}. "
                f"Its parameters: {', '.join(named)}."
            )
        params = {n: named[n] for n in names}
    if not params:
        raise ValueError(
            "module_jacobian: expected at least one parameter to differentiate, got none (every "
            "parameter is frozen). Pass params= (names or a dict of tensors)."
        )
    if not options.get("create_graph", False):
        params = {k: v.detach() for k, v in params.items()}
    xs = x if isinstance(x, tuple) else (x,)
    dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(xs)
    state = dict(buffers or {})

    def f(p: dict[str, torch.Tensor], *xs: torch.Tensor) -> Any:
        one = [a.unsqueeze(0) if d is not None else a for a, d in zip(xs, dims, strict=True)]
        out = functional_call(model, (p, state), tuple(one))
        return pt.tree_map(lambda y: y.squeeze(0), out)

    return jacobian(f, dict(params), *xs, in_dims=(None, *dims), **options)  # type: ignore[call-overload]


__all__ = ["module_jacobian"]
