"""jacbatch: full Jacobians of matrix functions for batches of inputs.

Every Jacobian three ways that agree: closed forms (no autodiff), torch.func (``jacrev`` /
``jacfwd`` under ``vmap``) and explicit VJP loops. See :func:`jacobian`.
"""

from . import distributed, errors, sensitivity
from .api import (
    CheckReport,
    Plan,
    check,
    estimate_memory,
    explain,
    jacobian,
    structured_jacobian,
)
from .chain import chain
from .conventions import commutation_matrix, unvec, vec
from .functions import affine
from .hessian import hessian
from .memory import MemoryEstimate
from .prepared import PreparedJacobian, prepare
from .sparse import SparsityPattern, sparsity
from .streaming import iter_jacobian, save_jacobian

__version__ = "0.1.0"

__all__ = [
    "CheckReport",
    "MemoryEstimate",
    "Plan",
    "PreparedJacobian",
    "SparsityPattern",
    "affine",
    "chain",
    "check",
    "commutation_matrix",
    "distributed",
    "errors",
    "estimate_memory",
    "explain",
    "hessian",
    "iter_jacobian",
    "jacobian",
    "prepare",
    "save_jacobian",
    "sensitivity",
    "sparsity",
    "structured_jacobian",
    "unvec",
    "vec",
]
