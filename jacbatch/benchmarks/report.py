"""What a benchmark run reports: the environment, one table per case, a plot."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .. import _table
from .cases import METHOD_NAMES, REFERENCES, jax_available


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict[str, Any]:
    """Versions and hardware: torch, jax (or ``None``), Python, threads, CPU and GPU names."""
    jax_version = None
    if jax_available():
        import jax

        jax_version = jax.__version__
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "torch": torch.__version__,
        "jax": jax_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "device": device,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


_COLUMNS = [
    "method",
    "median",
    "IQR",
    "x closed",
    "x write",
    "x alloc",
    "peak MiB",
    "peak/out",
    "ok",
]


def format_case(record: Mapping[str, Any]) -> str:
    """A plain-text table for one case: every method's median, spread, ratios, memory, agreement."""
    mib = record["jacobian_bytes"] / 2**20
    head = (
        f"{record['id']}: B={record['B']} m={record['m']} p={record['p']} q={record['q']}, "
        f"Jacobian {tuple(record['jacobian_shape'])} = {mib:.1f} MiB "
        f"(agreement vs {record['reference_method']})"
    )
    bw = record.get("bandwidth") or {}
    if bw.get("closed_form_fraction_of_copy") is not None:
        head += (
            f"\nclosed form writes {bw['closed_form_write_GBps']:.1f} GB/s = "
            f"{bw['closed_form_fraction_of_copy']:.2f} of the copy bandwidth "
            f"({bw['copy_GBps']:.1f} GB/s read + write)"
        )
    rows: list[list[str]] = []
    why: dict[str, list[str]] = {}  # reason -> methods that do not apply, for the notes
    for r in record["results"]:
        if r["status"] != "ok":
            note = "n/a" if r["status"] == "n/a" else f"error: {r['error']}"[:60]
            if r["status"] == "n/a":
                reason = _one_line(r.get("error") or "does not apply to this case")
                why.setdefault(reason, []).append(r["method"])
            rows.append([r["method"], note, *[""] * (len(_COLUMNS) - 2)])
            continue
        peak = r["peak_bytes"]
        rows.append(
            [
                r["method"],
                _fmt_time(r["median_s"]),
                _fmt_time(r["iqr_s"]),
                _fmt_ratio(r["ratio_to_closed_form"]),
                _fmt_ratio(r["ratio_to_write_bound"]),
                _fmt_ratio(r["ratio_to_alloc_fill"]),
                "-" if peak is None else f"{peak / 2**20:.1f}",
                _fmt_ratio(r["peak_over_output"]),
                {True: "yes", False: "NO", None: ""}[r["agrees"]],
            ]
        )
    notes = [f"n/a: {', '.join(names)}: {reason}" for reason, names in why.items()]
    return "\n".join([head, *_table.format_table(_COLUMNS, rows, rule=True), *notes])


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _medians(record: Mapping[str, Any]) -> dict[str, float]:
    return {r["method"]: r["median_s"] for r in record["results"] if r["status"] == "ok"}


def plot(records: Sequence[Mapping[str, Any]], path: str) -> None:
    """Log-log PNG of time against Jacobian size over the affine cases (the size sweep), one
    line per method, one panel per dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise RuntimeError(
            "jacbatch bench: expected matplotlib for --plot, got ImportError. "
            "Install the optional extra: pip install 'jacbatch[plot]'."
        ) from err
    dtypes = sorted({r["dtype"] for r in records})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        recs = sorted(
            (r for r in records if r["dtype"] == dtype and r["kind"] == "affine"),
            key=lambda r: r["jacobian_bytes"],
        )
        cmap = plt.get_cmap("tab20")
        colors = [cmap(i) for i in range(20)]
        for k, name in enumerate(METHOD_NAMES):
            pts = [
                (rec["jacobian_bytes"], _medians(rec)[name])
                for rec in recs
                if name in _medians(rec)
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                style = "--" if name in REFERENCES else "-o"
                ax.plot(xs, ys, style, label=name, markersize=4, color=colors[k % len(colors)])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("Jacobian size (bytes)")
        ax.set_ylabel("median time (s)")
        ax.set_title(f"A @ W + B w.r.t. W, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
