"""A laplace-torch curvature backend whose Jacobians come from jacbatch (extra ``[laplace]``).

laplace-torch (``pip install laplace-torch``) fits Laplace approximations to neural networks.
Its generalized Gauss-Newton (GGN) curvature and its linearized (GLM) predictive are built from
per-sample Jacobians of the network output w.r.t. its parameters, ``Js (B, K, P)``.
:class:`JacbatchGGN` computes them with :func:`jacbatch.jacobian`, the parameters passed as
separate tensors through :func:`torch.func.functional_call`, so that a network made of ops with
closed-form rules gets its Jacobians without autodiff. Use it as any laplace backend::

    from laplace import Laplace
    from jacbatch.integrations.laplace import JacbatchGGN

    la = Laplace(model, "regression", hessian_structure="full", backend=JacbatchGGN)
    la.fit(train_loader)
    f_mu, f_var = la(x_test)

The module imports without laplace-torch installed (so that it can be documented and collected);
instantiating :class:`JacbatchGGN` then raises ``ImportError`` naming the install command.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch.func import functional_call

from ..api import jacobian

_IMPORT_ERROR: ImportError | None
_BASE: Any
try:
    from laplace.curvature import CurvatureInterface as _CurvatureInterface
    from laplace.curvature import CurvlinopsGGN as _CurvlinopsGGN
    from laplace.curvature import GGNInterface as _GGNInterface
except ImportError as error:  # laplace-torch is optional
    _IMPORT_ERROR = error
    _BASE = object
else:
    _IMPORT_ERROR = None
    _BASE = _CurvlinopsGGN

__all__ = ["JacbatchGGN"]


# NOTE [laplace-torch backend: which methods come from where]
# laplace selects a backend by class (``Laplace(..., backend=cls)``) and calls, on an instance
# built as ``cls(model, likelihood, last_layer=..., subnetwork_indices=..., dict_key_x=...,
# dict_key_y=..., **backend_kwargs)``:
#   * ``jacobians(x, enable_backprop)`` -> ``(Js (B, K, P), f (B, K))`` for the GLM predictive,
#     the functional variance and the Jacobian-based curvatures;
#   * ``last_layer_jacobians(x, enable_backprop)`` for last-layer Laplace;
#   * ``full`` / ``diag`` / ``kron`` for the curvature of each hessian_structure.
# JacbatchGGN subclasses laplace's CurvlinopsGGN (the default backend; curvlinops is a hard
# dependency of laplace-torch) and overrides the two Jacobian methods. ``diag`` is inherited from
# GGNInterface, which contracts ``Js`` with the likelihood Hessian, so it uses jacbatch's
# Jacobians; ``full`` is routed to the same GGNInterface contraction (CurvlinopsGGN would build the
# P x P matrix from P curvlinops matrix-vector products instead); ``kron`` (KFAC) needs no
# Jacobians and stays curvlinops'. ``functorch_jacobians`` (laplace's fallback for ASDL) and
# ``gradients`` (empirical Fisher) stay laplace's torch.func code.
#
# Parameter order and selection follow laplace: ``self.params_dict`` holds the parameters that
# require grad, in ``named_parameters()`` order; frozen parameters are held fixed at their values
# (functional_call leaves parameters missing from the dict to the module) and get no columns.
# Tied weights appear once in ``named_parameters()`` and functional_call ties them (its default),
# so their column block sums the contributions of every use, as torch.func's.
#
# The per-sample function is the torch.func idiom ``model(x.unsqueeze(0)).squeeze(0)``: the model
# always sees a batch of one, so layers that treat a leading dimension as the batch (Flatten,
# Conv2d, BatchNorm in eval mode) behave as on the whole batch.


class JacbatchGGN(_BASE):
    """laplace-torch GGN backend computing parameter Jacobians with :func:`jacbatch.jacobian`.

    A subclass of laplace's ``CurvlinopsGGN``: pass the class as ``backend=`` to
    ``laplace.Laplace``. Extra keyword arguments reach it through laplace's ``backend_kwargs``.

    Args:
        model: the network, mapping ``(B, *in_shape)`` to ``(B, K)`` (or laplace's
            ``FeatureExtractor`` for last-layer Laplace).
        likelihood: ``"regression"`` or ``"classification"``.
        last_layer: only the last (``nn.Linear``) layer's parameters.
        subnetwork_indices: indices into the flattened parameter vector, ``(P_sub,)``.
        dict_key_x, dict_key_y: keys of dict-like inputs (used by laplace; dict-like inputs
            get laplace's own torch.func Jacobians).
        stochastic: Monte Carlo Fisher instead of the exact GGN.
        method: the :func:`jacbatch.jacobian` route (``"auto"`` by default).
        max_memory: working-memory budget of each :func:`jacbatch.jacobian` call, as there.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        likelihood: Any,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        method: str = "auto",
        max_memory: int | str | None = None,
    ) -> None:
        if _IMPORT_ERROR is not None:
            raise ImportError(
                "JacbatchGGN: expected laplace-torch to be installed, got "
                f"{_IMPORT_ERROR!r}. Install it with `pip install laplace-torch` (pin the "
                "installed torch with a constraint file so that pip keeps it)."
            ) from _IMPORT_ERROR
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, stochastic
        )
        self.method = method
        self.max_memory = max_memory

    def jacobians(
        self,
        x: torch.Tensor | MutableMapping[str, Any],
        enable_backprop: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample Jacobians of the model output w.r.t. its trainable parameters.

        Args:
            x: input batch ``(B, *in_shape)`` on the model's device. A dict-like input gets
                laplace's torch.func Jacobians.
            enable_backprop: keep the autograd graph, so that ``Js`` and ``f`` can be
                differentiated (w.r.t. ``x`` and the parameters).

        Returns:
            ``Js`` ``(B, K, P)`` (``(B, *out_shape, P)`` for a model with more output
            dimensions), columns in ``named_parameters()`` order with each parameter flattened
            row-major (``P_sub`` columns with ``subnetwork_indices``), and ``f`` ``(B, K)``.
        """
        if isinstance(x, MutableMapping):
            return _CurvatureInterface.jacobians(self, x, enable_backprop=enable_backprop)
        names = list(self.params_dict)
        params = list(self.params_dict.values())
        if not params:
            raise ValueError(
                "JacbatchGGN.jacobians: expected a model with parameters that require grad, "
                "got none. Unfreeze the parameters the Laplace approximation is over."
            )
        model = self.model

        def per_sample(x_i: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
            return functional_call(
                model, dict(zip(names, ps, strict=True)), (x_i.unsqueeze(0),)
            ).squeeze(0)

        Js = self._parameter_jacobians(per_sample, x, params, enable_backprop)
        with torch.set_grad_enabled(enable_backprop):
            f = model(x)
        if self.subnetwork_indices is not None:
            Js = Js[..., self.subnetwork_indices]
        return Js, f

    def last_layer_jacobians(
        self,
        x: torch.Tensor | MutableMapping[str, Any],
        enable_backprop: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample Jacobians of the model output w.r.t. the last layer's parameters.

        ``self.model`` is laplace's ``FeatureExtractor``; its features ``phi (B, D)`` feed the
        last ``nn.Linear`` layer, ``f = phi Wᵀ + b``, whose parameters (those that require grad,
        weight before bias) are differentiated.

        Args:
            x: input batch ``(B, *in_shape)`` (or what the model takes).
            enable_backprop: keep the autograd graph (through ``phi`` to ``x``).

        Returns:
            ``Js`` ``(B, K, P_last)`` with ``P_last = K·D (+ K)`` and ``f`` ``(B, K)``.
        """
        with torch.set_grad_enabled(enable_backprop):
            f, phi = self.model.forward_with_features(x)
        layer = self.model.last_layer
        names = [n for n, p in layer.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError(
                "JacbatchGGN.last_layer_jacobians: expected a last layer with parameters that "
                "require grad, got none."
            )
        weight, bias = layer.weight, layer.bias

        # The layer is applied as F.linear rather than through the module: calling it would
        # run laplace's forward hook, which stores the features it sees.
        def per_sample(phi_i: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
            given = dict(zip(names, ps, strict=True))
            return torch.nn.functional.linear(
                phi_i, given.get("weight", weight), given.get("bias", bias)
            )

        params = [p for n, p in layer.named_parameters() if p.requires_grad]
        Js = self._parameter_jacobians(per_sample, phi, params, enable_backprop)
        return (Js, f) if enable_backprop else (Js, f.detach())

    def full(self, x: Any, y: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The GGN ``(P, P)`` from jacbatch's Jacobians (laplace's ``GGNInterface.full``).

        Returns:
            ``(loss, H)``, as every laplace backend's ``full``.
        """
        return _GGNInterface.full(self, x, y, **kwargs)

    def _parameter_jacobians(
        self,
        per_sample: Callable[..., torch.Tensor],
        x: torch.Tensor,
        params: list[torch.Tensor],
        enable_backprop: bool,
    ) -> torch.Tensor:
        """``per_sample(x_i, *params)``'s Jacobians w.r.t. ``params``, concatenated.

        Args:
            per_sample: per-sample function ``((*in_shape), *params) -> out_shape``.
            x: ``(B, *in_shape)``.
            params: the tensors to differentiate, shared by the batch.
            enable_backprop: differentiable results; otherwise no graph is built. (Every
                tensor in ``params`` requires grad, so with grad mode on jacbatch's result is
                differentiable without ``create_graph``, and repeated calls keep its cached
                program.)

        Returns:
            ``Js`` ``(B, *out_shape, P)`` with ``P = sum(p.numel())``.
        """
        n = len(params)
        if not enable_backprop:
            x = x.detach()
            params = [p.detach() for p in params]
        with torch.set_grad_enabled(enable_backprop):
            blocks = jacobian(
                per_sample,
                x,
                *params,
                argnums=tuple(range(1, n + 1)),
                in_dims=(0,) + (None,) * n,
                method=self.method,
                max_memory=self.max_memory,
            )
        # blocks[i]: (B, *out_shape, *params[i].shape) -> (B, *out_shape, params[i].numel())
        flat = [
            block.reshape(*block.shape[: block.dim() - p.dim()], p.numel())
            for block, p in zip(blocks, params, strict=True)
        ]
        return flat[0] if n == 1 else torch.cat(flat, dim=-1)
