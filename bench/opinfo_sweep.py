"""Run the full OpInfo sweep (tests/_opinfo.py) and print its table of outcomes per route.

Usage (from the repository root)::

    python bench/opinfo_sweep.py                 # 3 samples per op, shared and batched
    python bench/opinfo_sweep.py --write         # also rewrite bench/opinfo_sweep.md
    python bench/opinfo_sweep.py --samples 1 --variants shared

It also prints the closed-form share: cases, and ops whose every case agrees through
``method="closed_form"`` (the traced rules), of the ops with a compared case; ``--write`` keeps
the previous file's share beside the new one.

Outcomes: ``agree`` with per-sample ``torch.autograd.functional.jacobian``; ``workaround``:
agrees through a known torch bug's replacement route (jacbatch/_torch_bugs.py); ``refused``:
a clear error (jacbatch's own, or torch's "not implemented" from forward AD / vmap);
``wrong``: a result that differs; ``error``: any other exception.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import _opinfo  # noqa: E402
import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--variants", default="shared,batched")
    p.add_argument("--write", action="store_true", help="rewrite bench/opinfo_sweep.md")
    a = p.parse_args(argv)
    variants = tuple(a.variants.split(","))
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    ops = _opinfo.swept_ops()
    counts: dict[str, Counter[str]] = {r: Counter() for r in _opinfo.ROUTES}
    notable: list[tuple[str, str, str, str]] = []
    closed: list[bool] = []  # per op with a compared case: every case agrees through closed_form
    for op in ops:
        c, nb = _opinfo.sweep(a.samples, variants, ops=[op])
        for r, cr in c.items():
            counts[r].update(cr)
        notable += nb
        cf = c.get("closed_form", Counter())
        if sum(cf.values()):
            closed.append(cf["agree"] == sum(cf.values()))
    seconds = time.perf_counter() - t0
    table = _opinfo.table(counts)
    share = closed_form_share(counts, closed)
    print(table)
    print(share)
    print(
        f"{len(ops)} OpInfos, {a.samples} sample(s) each, variants {', '.join(variants)}: "
        f"{seconds:.0f} s"
    )
    for name, route, outcome, detail in notable:
        if outcome in ("wrong", "error"):
            print(f"{outcome}: {name} {route}: {detail}")
    if a.write:
        _write(table, share, notable, len(ops), a.samples, variants, seconds)
    return 1 if any(c["wrong"] for c in counts.values()) else 0


#: The line of the closed-form share in bench/opinfo_sweep.md (the previous run is read back).
SHARE_PREFIX = "**closed_form share**"


def closed_form_share(counts: dict[str, Counter[str]], closed: list[bool]) -> str:
    """The closed-form share per case and per op: ops whose every compared case agrees through
    ``method="closed_form"``, of the ops with a compared case."""
    cf = counts.get("closed_form", Counter())
    total = sum(cf.values())
    return (
        f"{SHARE_PREFIX}: {cf['agree']} of {total} cases ({100 * cf['agree'] / max(total, 1):.1f} %); "
        f"{sum(closed)} of {len(closed)} ops ({100 * sum(closed) / max(len(closed), 1):.1f} %) "
        "with every case in closed form"
    )


def _previous_share() -> str | None:
    md = ROOT / "bench" / "opinfo_sweep.md"
    if not md.exists():
        return None
    for line in md.read_text().splitlines():
        if line.startswith(SHARE_PREFIX):
            return line[len(SHARE_PREFIX) + 2 :].split(" (previous run")[0]
    return None


def _write(
    table: str,
    share: str,
    notable: list[tuple[str, str, str, str]],
    n_ops: int,
    samples: int,
    variants: tuple[str, ...],
    seconds: float,
) -> None:
    by_kind: dict[str, Counter[str]] = {"workaround": Counter(), "error": Counter()}
    for _name, route, outcome, detail in notable:
        if outcome in by_kind:
            key = detail.split(";")[0] if outcome == "workaround" else detail[:110]
            by_kind[outcome][f"{route}: {key}"] += 1
    previous = _previous_share()
    if previous is not None:
        share += f" (previous run of this file: {previous})"
    lines = [
        "# OpInfo sweep",
        "",
        f"Every OpInfo of torch {torch.__version__} that supports autograd and float64 on the CPU "
        f"({n_ops}), {samples} small sample(s) each, second tensor argument "
        f"{' and '.join(variants)}, B = 3 perturbed copies, through every route, against a "
        "per-sample float64 `torch.autograd.functional.jacobian` loop "
        "(`python bench/opinfo_sweep.py --write`, "
        f"{seconds:.0f} s on one thread of a loaded 2-core machine). "
        "Cases whose reference torch itself cannot compute are not counted.",
        "",
        table,
        "",
        share,
        "",
        "- **agree**: equal to the reference (rtol = atol = 1e-7, NaN where it has NaN);",
        "- **workaround**: equal, through the route a known torch bug makes jacbatch use "
        "instead (`jacbatch/_torch_bugs.py`);",
        "- **refused**: a clear error: jacbatch's own (`closed_form` without a closed form "
        "raises `NotImplementedError`) or torch's from forward AD / vmap;",
        "- **wrong**: a result that differs from the reference;",
        "- **error**: any other exception.",
        "",
        "## Workarounds",
        "",
        *(f"- {k} ({v})" for k, v in sorted(by_kind["workaround"].items())),
        "",
        "## Errors (not wrong results: torch raises inside the transform)",
        "",
        *(f"- {k} ({v})" for k, v in sorted(by_kind["error"].items())),
        "",
    ]
    (ROOT / "bench" / "opinfo_sweep.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
