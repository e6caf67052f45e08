"""Functions and argument layouts shared by the route tests.

Each op family (elementwise, reductions, softmax, linalg, matmul, shape ops) appears, so every
route is checked on more than affine maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import jacbatch


@dataclass(frozen=True)
class Case:
    name: str
    func: Callable[..., torch.Tensor]
    shapes: tuple[tuple[int, ...], ...]  # per-sample argument shapes
    make: str = "randn"  # "randn" or "spd" (well-conditioned matrices for linalg)
    # every op has a closed-form rule (registered, or traced): method="closed_form" is tested
    closed_form: bool = False

    def sample_args(self, batch: int | None, in_dims, dtype, device, gen) -> list[torch.Tensor]:
        """Arguments with a batch of ``batch`` at ``in_dims[i]`` (None: shared)."""
        out = []
        for shape, d in zip(self.shapes, in_dims, strict=True):
            full = list(shape)
            if d is not None:
                full.insert(d if d >= 0 else len(full) + 1 + d, batch)
            x = torch.randn(full, generator=gen, dtype=torch.float64)
            if self.make == "spd" and len(shape) == 2 and shape[0] == shape[1]:
                eye = torch.eye(shape[0], dtype=torch.float64)
                if d is not None:
                    eye = eye.unsqueeze(d if d >= 0 else 2 + 1 + d)
                x = 0.3 * x + 2 * eye
            out.append(x.to(device=device, dtype=dtype))
        return out


def _softmax_rows(X: torch.Tensor) -> torch.Tensor:
    return torch.softmax(X, dim=-1)


CASES: list[Case] = [
    Case("affine_qvec", jacbatch.affine, ((3, 4), (4, 2), (2,)), closed_form=True),
    Case("affine_mq", jacbatch.affine, ((3, 4), (4, 2), (3, 2)), closed_form=True),
    Case(
        "tanh_affine",
        lambda A, W, B: torch.tanh(A @ W + B),
        ((3, 4), (4, 2), (2,)),
        closed_form=True,
    ),
    Case(
        "elementwise_mix",
        lambda x: torch.exp(x) * torch.sin(x) + torch.sigmoid(x) ** 2,
        ((2, 3),),
        closed_form=True,
    ),
    Case(
        "reduction_sum_mean",
        lambda X: torch.stack([X.sum(), X.mean(), (X**2).sum()]),
        ((3, 2),),
        closed_form=True,
    ),
    Case("scalar_2sum", lambda A: 2 * A.sum(), ((2, 3),), closed_form=True),
    Case("row_softmax", _softmax_rows, ((3, 4),), closed_form=True),
    Case("matmul_chain", lambda X, Y: X @ Y @ X.T, ((3, 3), (3, 3)), closed_form=True),
    Case("transpose_reshape", lambda X: X.T.reshape(-1)[:5] * 3.0, ((2, 3),), closed_form=True),
    Case("inverse", torch.linalg.inv, ((3, 3),), make="spd", closed_form=True),
    Case(
        "logdet",
        lambda X: torch.logdet(X.T @ X + torch.eye(3, dtype=X.dtype, device=X.device)),
        ((3, 3),),
        closed_form=True,
    ),
    Case(
        "det_solve",
        lambda X, b: torch.linalg.det(X) * torch.linalg.solve(X, b),
        ((3, 3), (3,)),
        make="spd",
        closed_form=True,
    ),
    # no rule for a vector norm of order 3: closed_form refuses it
    Case("norms", lambda x: torch.stack([x.norm(), torch.linalg.vector_norm(x, 3)]), ((4,),)),
    Case(
        "cumsum_prod",
        lambda x: torch.cumsum(x, 0) * torch.cumprod(x, 0),
        ((4,),),
        closed_form=True,
    ),
    Case(
        "mlp", lambda x, W1, W2: torch.tanh(x @ W1) @ W2, ((4,), (4, 5), (5, 2)), closed_form=True
    ),
    Case(
        "vector_input_matrix_output",
        lambda v: torch.outer(v, v.sin()),
        ((3,),),
        closed_form=True,
    ),
]

BY_NAME = {c.name: c for c in CASES}
