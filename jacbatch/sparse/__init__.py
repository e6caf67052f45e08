"""Sparse Jacobians: structural sparsity patterns, coloring and compressed passes.

:func:`jacbatch.sparse.detect.detect` finds a function's pattern (:func:`sparsity` is its public
form); :class:`SparsityPattern` is the type every part shares.
"""

from . import _hot
from .detect import NoPatternError, sparsity
from .pattern import SparsityPattern


def compile_repeated(enabled: bool = True) -> bool:
    """Compile the program of repeated sparse calls with Inductor (off by default).

    A sparse call that gets hot (NOTE [Repeated sparse calls] in :mod:`jacbatch.sparse._hot`)
    runs its compressed passes and gather as one traced program; with this on, that program is
    also compiled by ``torch._inductor`` (C++ on the CPU) and kept only if its values equal the
    uncompiled path's exactly (NOTE [Compiling the kept program]). The compile costs seconds
    per function and shapes; it pays in loops of hundreds of calls or more (a Newton
    iteration on a large residual).

    Args:
        enabled: turn compiling on (``True``) or off.

    Returns:
        The previous setting.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"compile_repeated: expected enabled to be a bool, got {enabled!r}.")
    before = _hot.COMPILE
    _hot.COMPILE = enabled
    return before


__all__ = ["NoPatternError", "SparsityPattern", "compile_repeated", "sparsity"]
