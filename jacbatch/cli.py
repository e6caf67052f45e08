"""The ``jacbatch`` command line (``jacbatch demo``, ``jacbatch bench``; also ``python -m
jacbatch``): a thin argparse dispatcher over subcommands.

Each subcommand adds its parser in one ``_add_<name>`` function and runs through one
``_run_<name>`` function that calls into the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo",
        help="the reference article's examples and every route on one batch",
        description="Reproduce the worked examples of the reference article (derivative of "
        "matrices), then compute one batched Jacobian by every route and show that they agree.",
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import demo

    return demo.run()


#: The first line of ``jacbatch bench --quick``.
QUICK_NOTE = (
    "--quick: scaled-down cases and few repetitions, a smoke test that every route runs and "
    "agrees;\ntimes at these sizes are dominated by per-call overhead and say little about "
    "speed."
)
#: Printed instead of the targets' table at ``--quick``.
QUICK_TARGETS_NOTE = (
    "targets: not evaluated at --quick (they apply to the full sizes; run without --quick)"
)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .benchmarks import CASE_NAMES, DTYPES, METHOD_NAMES

    p = sub.add_parser(
        "bench",
        help="time every Jacobian route against baselines and the memory-write limit",
        description="Time every jacbatch route side by side with torch.func / autograd / JAX "
        "baselines and with filling a tensor of the Jacobian's size; one table per case.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="scaled-down cases, few repetitions: a smoke test (--targets are not evaluated)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", nargs="+", choices=DTYPES, default=None, help="default: all")
    p.add_argument("--cases", nargs="+", choices=CASE_NAMES, default=None, help="default: all")
    p.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=None, help="default: all")
    p.add_argument("--json", metavar="PATH", help="write the report (with environment) as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a log-log PNG (needs matplotlib)")
    p.add_argument(
        "--targets",
        metavar="FILE",
        help="evaluate the performance targets in this JSON file on the results "
        "(format: jacbatch.benchmarks.targets; full sizes only, not with --quick)",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run every case in this process instead of a fresh one each",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch intra-op threads (default: torch's own choice)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (by default one appears on an interactive terminal)",
    )
    p.set_defaults(run=_run_bench)


def _run_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import benchmarks as bm

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(
                "--plot: expected matplotlib to be installed, got ImportError. "
                "Install it with pip install 'jacbatch[plot]', or drop --plot."
            )
    targets = None
    if args.targets:
        try:
            targets = bm.load_targets(args.targets)
        except (OSError, ValueError) as err:  # json.JSONDecodeError is a ValueError
            parser.error(f"--targets: expected a readable JSON file of targets, got {err}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                "--device: expected a CUDA device, got none (torch.cuda.is_available() is "
                "False). Use --device cpu."
            )
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected a positive int, got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    cases = bm.select_cases(args.cases, args.dtype, quick=args.quick)
    if args.quick:
        print(QUICK_NOTE + "\n", flush=True)
    report = bm.run(
        cases,
        args.device,
        args.methods,
        quick=args.quick,
        isolate=not args.in_process,
        progress=False if args.no_progress else None,  # None: a bar on a terminal, else lines
        targets=None if args.quick else targets,
    )
    if args.quick and targets:
        print(QUICK_TARGETS_NOTE)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if args.plot:
        bm.plot(report["cases"], args.plot)
    return 0


def version() -> str:
    """The installed distribution's version (``importlib.metadata``), else ``jacbatch.__version__``
    (a source tree on ``PYTHONPATH`` without an installed distribution)."""
    from importlib import metadata

    try:
        return metadata.version("jacbatch")
    except metadata.PackageNotFoundError:
        from . import __version__

        return __version__


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="jacbatch", description="Full Jacobians of matrix functions for batches of inputs."
    )
    parser.add_argument("--version", action="version", version=f"jacbatch {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_bench(sub)
    return parser, dict(sub.choices)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jacbatch`` console script and ``python -m jacbatch``."""
    parser, subparsers = _build()
    args = parser.parse_args(argv)
    return int(args.run(args, subparsers[args.command]))


if __name__ == "__main__":
    sys.exit(main())
