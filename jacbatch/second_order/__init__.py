"""Helpers of :func:`jacbatch.hessian`: rewrites of its traced programs (:mod:`.passes`)."""
