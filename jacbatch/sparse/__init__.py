"""Sparse Jacobians: structural sparsity patterns, coloring and compressed passes."""

from .pattern import SparsityPattern

__all__ = ["SparsityPattern"]
