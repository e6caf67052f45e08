"""Command line: ``jacbatch demo`` (also ``python -m jacbatch demo``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="jacbatch", description="Full Jacobians of matrix functions for batches of inputs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the reference article's examples and every route on one batch")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo

        return demo.run()
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
