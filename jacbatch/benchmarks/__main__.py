"""``python -m jacbatch.benchmarks SPEC PATH``: the worker process of one isolated case."""

import sys

from .runner import worker

worker(sys.argv[1:])
