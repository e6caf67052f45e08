"""The library's exception types, for callers who want to catch them.

* :class:`JacobianMemoryError` (a ``MemoryError``): a Jacobian, or the work to compute it,
  cannot fit in memory (or in ``max_memory``); raised before anything is allocated.
* :class:`RankFailedError` (a ``RuntimeError``): raised by :mod:`jacbatch.distributed` on every
  rank that did not fail itself when another rank of the group failed.

Every other error is a built-in type (see :mod:`jacbatch._validation`): ``TypeError`` for
types, ``ValueError`` for shapes and values, ``NotImplementedError`` where a requested closed
form does not exist or does not cover the values.
"""

from __future__ import annotations


class JacobianMemoryError(MemoryError):
    """A Jacobian (or the work to compute it) that cannot fit, refused before allocating."""


class RankFailedError(RuntimeError):
    """Raised on every rank that did not fail itself when another rank of the group failed.

    The failing rank raises its own exception; the others raise this one, naming that rank and
    its error, so no rank is left waiting in a collective.
    """


__all__ = ["JacobianMemoryError", "RankFailedError"]
