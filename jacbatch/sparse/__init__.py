"""Sparse Jacobians: structural sparsity patterns, coloring and compressed passes."""

from .detect import NoPatternError, detect, sparsity
from .pattern import SparsityPattern

__all__ = ["NoPatternError", "SparsityPattern", "detect", "sparsity"]
