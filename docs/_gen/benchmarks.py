"""Render ``bench/results/*.json`` as the site's Benchmarks page: tables and plots, at build time.

Run by the mkdocs-gen-files plugin (``mkdocs.yml``); it writes ``benchmarks.md`` and PNGs under
``assets/bench/`` into the built site only, nothing into the repository. Three result schemas are
known: ``jacbatch-bench/1`` (``jacbatch bench --json``: routes against baselines per case),
``jacbatch-workloads/1`` (``bench/workloads.py``: the eight real workloads) and the Hessian
benchmark's ``{case: {build_s, times_s, agrees}}``. A file of another shape is listed as not
rendered, so a new result file never breaks the build.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mkdocs_gen_files

RESULTS = Path("bench/results")
PAGE = "benchmarks.md"
ASSETS = "assets/bench"


def save(fig: Any, name: str) -> str:
    """Write ``fig`` into the built site as ``assets/bench/<name>``; the page's link to it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    with mkdocs_gen_files.open(f"{ASSETS}/{name}", "wb") as f:
        f.write(buf.getvalue())
    return f"{ASSETS}/{name}"


def ms(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "–"
    value = seconds * 1e3
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def environment(env: dict[str, Any]) -> str:
    keep = ["cpu", "cpu_count", "cpus", "torch_threads", "torch", "jax", "python", "gpu", "time", "date"]  # fmt: skip
    return ", ".join(f"{k} `{env[k]}`" for k in keep if env.get(k) is not None)


# --- jacbatch bench: routes against baselines -------------------------------------------------


def render_bench(name: str, data: dict[str, Any]) -> list[str]:
    out = [f"## Routes against baselines: `{name}`", ""]
    out += [f"Environment: {environment(data['environment'])}.", ""]
    cases = data["cases"]
    # One figure: median time of every method, one panel per case.
    cols = 3
    rows = math.ceil(len(cases) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 3.2 * rows), constrained_layout=True)
    for ax, case in zip(axes.flat, cases, strict=False):
        ok = [r for r in case["results"] if r["status"] == "ok" and r.get("median_s")]
        colors = {"jacbatch": "C0", "baseline": "C1", "reference": "C2"}
        ax.barh(
            [r["method"] for r in ok],
            [r["median_s"] * 1e3 for r in ok],
            color=[colors.get(r["group"], "C7") for r in ok],
        )
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(case["id"], fontsize=9)
        ax.set_xlabel("median ms (log)", fontsize=8)
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    fig.suptitle("blue: jacbatch routes, orange: baselines, green: memory references")
    out += [f"![median times per case, {name}]({save(fig, Path(name).stem + '.png')})", ""]

    for case in cases:
        shape = "×".join(str(s) for s in case["jacobian_shape"])
        out += [f"### {case['id']}", ""]
        out += [f"Jacobian `{shape}` ({case['jacobian_bytes'] / 2**20:.1f} MiB), "
                f"reference route `{case['reference_method']}`.", ""]  # fmt: skip
        out += ["| method | group | median ms | IQR ms | × closed form | peak / output | agrees |"]
        out += ["|---|---|---:|---:|---:|---:|:-:|"]
        for r in case["results"]:
            if r["status"] != "ok":
                out.append(f"| {cell(r['method'])} | {r['group']} | {cell(r['status'])} | | | | |")
                continue
            ratio = r.get("ratio_to_closed_form")
            peak = r.get("peak_over_output")
            out.append(
                f"| {cell(r['method'])} | {r['group']} | {ms(r['median_s'])} | {ms(r.get('iqr_s'))} "
                f"| {'' if ratio is None else f'{ratio:.2f}'} "
                f"| {'' if peak is None else f'{peak:.2f}'} "
                f"| {'yes' if r.get('agrees') else '**no**' if r.get('agrees') is False else ''} |"
            )
        out.append("")

    targets = data.get("targets") or []
    if targets:
        met = sum(bool(t["met"]) for t in targets)
        out += [f"### Targets ({met} of {len(targets)} met)", ""]
        out += ["| target | case | value | limit | met |", "|---|---|---:|---:|:-:|"]
        for t in targets:
            out.append(
                f"| {cell(t['target'])} | {t['case']} | {t['value']:.2f} | {t['limit']} "
                f"| {'yes' if t['met'] else '**no**'} |"
            )
        out.append("")
    return out


# --- the eight workloads ------------------------------------------------------------------------


def render_workloads(name: str, data: dict[str, Any]) -> list[str]:
    out = [f"## Eight real workloads: `{name}`", ""]
    out += [f"Environment: {environment(data['environment'])}; {data.get('rounds')} rounds per "
            "runner, the median shown.", ""]  # fmt: skip
    workloads = data["workloads"]
    cols = 2
    rows = math.ceil(len(workloads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(15, 4.2 * rows), constrained_layout=True)
    colors = {"jacbatch": "C0", "torch": "C1", "closed": "C2", "jax": "C3"}
    for ax, (key, w) in zip(axes.flat, workloads.items(), strict=False):
        ok = [(n, r) for n, r in w["runners"].items() if r.get("error") is None and r.get("ms")]
        ax.barh([n for n, _ in ok], [r["ms"] for _, r in ok],
                color=[colors.get(r["kind"], "C7") for _, r in ok])  # fmt: skip
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("median ms (log)", fontsize=8)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    fig.suptitle("blue: jacbatch, orange: torch, green: hand-written closed form, red: JAX")
    out += [f"![workload timings]({save(fig, 'workloads.png')})", ""]
    for key, w in workloads.items():
        out += [f"### {key}: {cell(w['title'])}", ""]
        out += [f"jacbatch's plan: `{cell(w.get('explain_reason', w.get('explain', '')))}`; "
                f"closed form against the reference: {w.get('closed_form_vs_reference', '–')}.", ""]  # fmt: skip
        out += ["| runner | kind | median ms | IQR ms | note |", "|---|---|---:|---:|---|"]
        for n, r in w["runners"].items():
            if r.get("error"):
                note = cell(r["error"])
                note = note if len(note) < 90 else note[:87] + "..."
                out.append(f"| {cell(n)} | {r['kind']} | – | – | {note} |")
            else:
                out.append(
                    f"| {cell(n)} | {r['kind']} | {r['ms']:.3g} | {r.get('iqr_ms', 0):.2g} | |"
                )
        out.append("")
    return out


# --- Hessians -----------------------------------------------------------------------------------


def render_hessian(name: str, data: dict[str, Any]) -> list[str]:
    out = [f"## Hessians: `{name}`", ""]
    fig, axes = plt.subplots(1, len(data), figsize=(5 * len(data), 3.4), constrained_layout=True)
    for ax, (case, d) in zip(list(getattr(axes, "flat", [axes])), data.items(), strict=True):
        names = list(d["times_s"])
        ax.barh(names, [d["times_s"][n] * 1e3 for n in names],
                color=["C0" if d["agrees"].get(n) else "C3" for n in names])  # fmt: skip
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(case.split(":")[0], fontsize=10)
        ax.set_xlabel("ms per call (log)", fontsize=8)
    fig.suptitle("red: the result disagrees with the reference")
    out += [f"![Hessian timings]({save(fig, 'hessian.png')})", ""]
    out += ["| case | method | ms per call | agrees | build s |", "|---|---|---:|:-:|---:|"]
    for case, d in data.items():
        for n, t in d["times_s"].items():
            agrees = "yes" if d["agrees"].get(n) else "**no**"
            out.append(f"| {cell(case)} | {cell(n)} | {t * 1e3:.3g} | {agrees} | {d['build_s']:.1f} |")  # fmt: skip
    out.append("")
    return out


def render(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema == "jacbatch-bench/1":
        return render_bench(path.name, data)
    if schema == "jacbatch-workloads/1":
        return render_workloads(path.name, data)
    if (
        isinstance(data, dict)
        and data
        and all(isinstance(v, dict) and {"times_s", "agrees"} <= v.keys() for v in data.values())
    ):
        return render_hessian(path.name, data)
    return [f"## `{path.name}`", "", "A result file of a shape this page does not render.", ""]


def main() -> None:
    lines = [
        "# Benchmarks",
        "",
        "Rendered when the site is built from the JSON files in `bench/results/` (the raw data:",
        "every repetition and the environment). How each benchmark is run, the settings and what",
        "the figures mean are in `bench/README.md`; the machine is a shared 2-core CPU VM, so",
        "wall-clock figures are noisy and the ratios measured side by side are what matters.",
        "",
    ]
    files = sorted(RESULTS.glob("*.json"))
    lines += ["Files: " + ", ".join(f"`{p.name}`" for p in files) + ".", ""]
    for path in files:
        lines += render(path)
    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write("\n".join(lines))


main()
