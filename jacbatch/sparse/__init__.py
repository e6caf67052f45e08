"""Sparse Jacobians: structural sparsity patterns, coloring and compressed passes.

:func:`jacbatch.sparse.detect.detect` finds a function's pattern (:func:`sparsity` is its public
form); :class:`SparsityPattern` is the type every part shares.
"""

from .detect import NoPatternError, sparsity
from .pattern import SparsityPattern

__all__ = ["NoPatternError", "SparsityPattern", "sparsity"]
