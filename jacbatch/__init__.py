"""jacbatch: full Jacobians of matrix functions for batches of inputs.

Every Jacobian three ways that agree: closed forms (no autodiff), torch.func (``jacrev`` /
``jacfwd`` under ``vmap``) and explicit VJP loops. See :func:`jacobian`.
"""

from . import distributed
from .api import CheckReport, Plan, check, explain, jacobian
from .compose import chain
from .conventions import commutation_matrix, unvec, vec
from .functions import affine

__version__ = "0.1.0"

__all__ = [
    "CheckReport",
    "Plan",
    "affine",
    "chain",
    "check",
    "commutation_matrix",
    "distributed",
    "explain",
    "jacobian",
    "unvec",
    "vec",
]
