"""The benchmark runner behind ``jacbatch bench``: differentiation strategies side by side.

Every route of :func:`jacbatch.jacobian` is timed side by side with the code a user would
otherwise write (``vmap(jacrev)`` called directly, a per-sample
``torch.autograd.functional.jacobian`` loop, a per-sample one-hot VJP loop, JAX when installed)
and with two physical references of the Jacobian's size: allocating and filling a fresh tensor,
and filling an existing buffer (the write bound). Ratios to these references say how close a
route is to the memory-write limit on this machine.

Modules:

* :mod:`~jacbatch.benchmarks.cases`: the workloads (:class:`Case`) and the methods that compute
  them (:class:`Method`, :data:`METHODS`).
* :mod:`~jacbatch.benchmarks.runner`: timing, memory, agreement (:func:`run`, :func:`run_case`).
* :mod:`~jacbatch.benchmarks.report`: the environment, tables, plots.
* :mod:`~jacbatch.benchmarks.targets`: performance targets a user passes (``--targets FILE``),
  evaluated on the records.

Methodology:

* Each case runs in a fresh Python process (``isolate=True``): on CPU, fresh-page faults
  dominate the time of writing a large new tensor, and how many a call pays depends on the
  allocator's history. Inside a case the methods are timed round-robin (one repetition of
  each in turn, the order rotating every round), so drifts in machine load hit all methods
  alike.
* Times are wall-clock medians; the spread is the interquartile range. On CUDA every
  repetition is bracketed by CUDA events after a synchronize.
* Peak memory over the inputs: on CUDA ``torch.cuda.max_memory_allocated`` minus the memory
  allocated before the call; on Linux CPUs the growth of the resident set (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``, with freed heap returned by ``malloc_trim``
  first); ``None`` elsewhere.
* Every method's Jacobian is compared with the closed form (or, where it was not run, with
  ``jacrev``) within :func:`jacbatch.testing.tolerance`.

* Targets describe the full sizes: ``jacbatch bench --quick`` (the scaled-down ``QUICK_CASES``,
  a smoke test dominated by per-call overhead) does not evaluate them and says so.
* A method that does not apply to a case is ``n/a``, its reason (e.g. :data:`JAX_MISSING`)
  printed under the case's table.

Optional extras: ``tqdm`` (progress bar; plain lines without it), ``matplotlib`` (``--plot``),
``jax`` (JAX baselines; ``n/a`` when absent).

Example::

    from jacbatch import benchmarks as bm
    report = bm.run(bm.select_cases(["affine-small"], ["float32"], quick=True),
                    targets=[{"numerator": "auto", "denominator": "fastest route",
                              "op": "<=", "limit": 1.1}])
"""

from .cases import (
    ARGNUM,
    CASE_NAMES,
    CASES,
    DTYPES,
    FUNCTIONS,
    JAX_MISSING,
    METHOD_NAMES,
    METHODS,
    QUICK_CASES,
    REFERENCES,
    ROUTES,
    Case,
    Method,
    NotApplicable,
    affine_sum,
    affine_tanh,
    jax_available,
    select_cases,
)
from .report import environment, format_case, plot
from .runner import SCHEMA, PeakMemory, Result, run, run_case
from .targets import Target, evaluate_targets, format_targets, load_targets, parse_targets

__all__ = [
    "ARGNUM",
    "CASES",
    "CASE_NAMES",
    "DTYPES",
    "FUNCTIONS",
    "JAX_MISSING",
    "METHODS",
    "METHOD_NAMES",
    "QUICK_CASES",
    "REFERENCES",
    "ROUTES",
    "SCHEMA",
    "Case",
    "Method",
    "NotApplicable",
    "PeakMemory",
    "Result",
    "Target",
    "affine_sum",
    "affine_tanh",
    "environment",
    "evaluate_targets",
    "format_case",
    "format_targets",
    "jax_available",
    "load_targets",
    "parse_targets",
    "plot",
    "run",
    "run_case",
    "select_cases",
]
