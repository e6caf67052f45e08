"""Performance targets a user passes to the runner (``jacbatch bench --targets FILE``).

A target is a ratio of two measured quantities of one case, compared with a limit::

    {"name": "closed_form / alloc+fill",        # optional; default "numerator / denominator"
     "numerator": "closed_form", "denominator": "alloc+fill",
     "op": "<=", "limit": 1.1,
     "limits": {"affine-small": 1.3},           # optional: per case name
     "kinds": ["affine"],                       # optional: only these case kinds
     "cases": ["affine-small", "affine-large"]} # optional: only these case names

Quantities: a method name (its median time in seconds, e.g. ``"closed_form"``,
``"torch.func vmap(jacrev)"``), ``"peak(<method>)"`` (its peak memory in bytes), ``"output"``
(the Jacobian's bytes), or ``"fastest route"`` (the smallest median over the routes of
:func:`jacbatch.methods.names`). A target is evaluated on every case where both quantities were
measured (and the denominator is nonzero); elsewhere it is skipped. A file holds either a list
of targets or ``{"targets": [...]}``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import _table
from .cases import ROUTES

_OPS = ("<=", ">=")
_KEYS = {"name", "numerator", "denominator", "op", "limit", "limits", "kinds", "cases"}


@dataclass(frozen=True)
class Target:
    """``numerator / denominator`` of a case must be ``op`` ``limit`` (see the module docstring)."""

    numerator: str
    denominator: str
    op: str
    limit: float
    name: str = ""
    limits: Mapping[str, float] = field(default_factory=dict)
    kinds: tuple[str, ...] | None = None
    cases: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.numerator} / {self.denominator}"

    def applies(self, record: Mapping[str, Any]) -> bool:
        return (self.kinds is None or record["kind"] in self.kinds) and (
            self.cases is None or record["name"] in self.cases
        )

    def limit_for(self, record: Mapping[str, Any]) -> float:
        return float(self.limits.get(record["name"], self.limit))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Target:
        """A target from its JSON form; ``ValueError`` naming the first problem."""
        if not isinstance(d, Mapping):
            raise ValueError(f"expected a target object, got {type(d).__name__}: {d!r}")
        unknown = set(d) - _KEYS
        if unknown:
            raise ValueError(f"unknown target key(s) {sorted(unknown)}; expected {sorted(_KEYS)}")
        for key in ("numerator", "denominator", "op", "limit"):
            if key not in d:
                raise ValueError(f"target {d!r}: missing {key!r}")
        if d["op"] not in _OPS:
            raise ValueError(f"target {d!r}: expected op in {_OPS}, got {d['op']!r}")
        for key in ("numerator", "denominator"):
            if not isinstance(d[key], str):
                raise ValueError(f"target {d!r}: expected {key} to be a string")
        return cls(
            numerator=d["numerator"],
            denominator=d["denominator"],
            op=d["op"],
            limit=float(d["limit"]),
            name=str(d.get("name", "")),
            limits={str(k): float(v) for k, v in d.get("limits", {}).items()},
            kinds=None if d.get("kinds") is None else tuple(d["kinds"]),
            cases=None if d.get("cases") is None else tuple(d["cases"]),
        )


def parse_targets(data: Any) -> list[Target]:
    """Targets from parsed JSON: a list of target objects or ``{"targets": [...]}``."""
    rows = data.get("targets") if isinstance(data, Mapping) else data
    if not isinstance(rows, list):
        raise ValueError('expected a list of targets or {"targets": [...]}')
    return [t if isinstance(t, Target) else Target.from_dict(t) for t in rows]


def load_targets(path: str | os.PathLike[str]) -> list[Target]:
    """Targets from a JSON file (see the module docstring for the format)."""
    with open(path) as fh:
        return parse_targets(json.load(fh))


def _ok_results(record: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in record["results"] if r["status"] == "ok"}


def _quantity(name: str, record: Mapping[str, Any], ok: Mapping[str, Any]) -> float | None:
    if name == "output":
        return float(record["jacobian_bytes"])
    if name == "fastest route":
        times = [ok[n]["median_s"] for n in ROUTES if n in ok and ok[n]["median_s"]]
        return min(times) if times else None
    if name.startswith("peak(") and name.endswith(")"):
        res = ok.get(name[5:-1])
        return None if res is None or res["peak_bytes"] is None else float(res["peak_bytes"])
    res = ok.get(name)
    return None if res is None else res["median_s"]


def evaluate_targets(
    records: Iterable[Mapping[str, Any]], targets: Sequence[Target | Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """One row per (case, target) that could be evaluated, cases in order, then targets in order.

    Each row: ``{"target", "case", "value", "op", "limit", "met"}``.
    """
    parsed = parse_targets(list(targets))
    rows: list[dict[str, Any]] = []
    for rec in records:
        ok = _ok_results(rec)
        for t in parsed:
            if not t.applies(rec):
                continue
            num = _quantity(t.numerator, rec, ok)
            den = _quantity(t.denominator, rec, ok)
            if num is None or not den:
                continue
            value, limit = num / den, t.limit_for(rec)
            met = value <= limit if t.op == "<=" else value >= limit
            rows.append(
                {
                    "target": t.label,
                    "case": rec["id"],
                    "value": value,
                    "op": t.op,
                    "limit": limit,
                    "met": met,
                }
            )
    return rows


def format_targets(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table of evaluated targets."""
    if not rows:
        return "targets: none evaluated"
    body = [
        [
            r["target"],
            r["case"],
            f"{r['value']:.2f}",
            f"{r.get('op', '')} {r['limit']:g}",
            "met" if r["met"] else "MISSED",
        ]
        for r in rows
    ]
    header = ["target", "case", "value", "limit", ""]
    return "\n".join(["targets:", *_table.format_table(header, body, indent="  ")])
