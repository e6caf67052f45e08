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


def heatmap(
    rows: list[str], cols: list[str], ratio: dict[tuple[str, str], float], title: str
) -> Any:
    """A log-coloured grid of ratios (rows × columns), each cell annotated; blank where missing."""
    import numpy as np

    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in ratio.items():
        if v and v > 0:
            grid[rows.index(r), cols.index(c)] = math.log10(v)
    fig, ax = plt.subplots(
        figsize=(1.0 + 0.75 * len(cols), 0.9 + 0.32 * len(rows)), constrained_layout=True
    )
    lim = max(1.0, float(np.nanmax(np.abs(grid)))) if np.isfinite(grid).any() else 1.0
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(grid[i, j]):
                v = 10 ** grid[i, j]
                ax.text(
                    j,
                    i,
                    f"{v:.2g}" if v < 100 else f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                )
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="log10 of the ratio", shrink=0.8)
    return fig


def details(title: str, body: list[str]) -> list[str]:
    """A collapsed block (pymdownx.details) around ``body``."""
    return [f'??? note "{title}"', ""] + [f"    {line}" if line else "" for line in body] + [""]


def environment(env: dict[str, Any]) -> str:
    keep = ["cpu", "cpu_count", "cpus", "torch_threads", "torch", "jax", "python", "gpu", "time", "date"]  # fmt: skip
    return ", ".join(f"{k} `{env[k]}`" for k in keep if env.get(k) is not None)


# --- jacbatch bench: routes against baselines -------------------------------------------------


def render_bench(name: str, data: dict[str, Any]) -> list[str]:
    out = [f"## Routes against baselines: `{name}`", ""]
    out += [f"Environment: {environment(data['environment'])}.", ""]
    cases = data["cases"]
    methods = list(dict.fromkeys(r["method"] for c in cases for r in c["results"]))
    ratio = {}
    for c in cases:
        ref = {r["method"]: r.get("median_s") for r in c["results"]}.get(c["reference_method"])
        for r in c["results"]:
            if r["status"] == "ok" and r.get("median_s") and ref:
                ratio[(r["method"], c["id"])] = r["median_s"] / ref
    fig = heatmap(methods, [c["id"] for c in cases], ratio,
                  "median time ÷ the case's reference route (closed_form; jacrev where none)")  # fmt: skip
    out += [
        f"![time relative to the closed form, {name}]({save(fig, Path(name).stem + '.png')})",
        "",
    ]
    out += ["Each case differentiates `Z = A @ W + b` (or `tanh`/`sum` of it) w.r.t. `W`; the",
            "tables give every method's median, interquartile range, ratio to the closed form,",
            "peak memory over the output and whether its Jacobian agrees.", ""]  # fmt: skip

    for case in cases:
        shape = "×".join(str(s) for s in case["jacobian_shape"])
        body = [f"Jacobian `{shape}` ({case['jacobian_bytes'] / 2**20:.1f} MiB), "
                f"reference route `{case['reference_method']}`.", ""]  # fmt: skip
        body += ["| method | group | median ms | IQR ms | × closed form | peak / output | agrees |"]
        body += ["|---|---|---:|---:|---:|---:|:-:|"]
        for r in case["results"]:
            if r["status"] != "ok":
                body.append(f"| {cell(r['method'])} | {r['group']} | {cell(r['status'])} | | | | |")
                continue
            rel = r.get("ratio_to_closed_form")
            peak = r.get("peak_over_output")
            body.append(
                f"| {cell(r['method'])} | {r['group']} | {ms(r['median_s'])} | {ms(r.get('iqr_s'))} "
                f"| {'' if rel is None else f'{rel:.2f}'} "
                f"| {'' if peak is None else f'{peak:.2f}'} "
                f"| {'yes' if r.get('agrees') else '**no**' if r.get('agrees') is False else ''} |"
            )
        out += details(case["id"], body)

    targets = data.get("targets") or []
    if targets:
        met = sum(bool(t["met"]) for t in targets)
        body = ["| target | case | value | limit | met |", "|---|---|---:|---:|:-:|"]
        for t in targets:
            body.append(
                f"| {cell(t['target'])} | {t['case']} | {t['value']:.2f} | {t['limit']} "
                f"| {'yes' if t['met'] else '**no**'} |"
            )
        out += details(f"Targets: {met} of {len(targets)} met", body)
    return out


# --- the eight workloads ------------------------------------------------------------------------


def render_workloads(name: str, data: dict[str, Any]) -> list[str]:
    out = [f"## Eight real workloads: `{name}`", ""]
    out += [f"Environment: {environment(data['environment'])}; {data.get('rounds')} rounds per "
            "runner, the median shown.", ""]  # fmt: skip
    workloads = data["workloads"]
    runners = list(dict.fromkeys(n for w in workloads.values() for n in w["runners"]))
    ratio = {}
    for key, w in workloads.items():
        base = w["runners"].get(w.get("baseline", ""), {}).get("ms")
        hand = [r["ms"] for r in w["runners"].values() if r["kind"] == "closed" and r.get("ms")]
        ref = hand[0] if hand else base
        for n, r in w["runners"].items():
            if r.get("error") is None and r.get("ms") and ref:
                ratio[(n, key)] = r["ms"] / ref
    fig = heatmap(runners, list(workloads), ratio,
                  "median time ÷ the hand-written closed form (blank: failed or not run)")  # fmt: skip
    out += [f"![workload timings]({save(fig, 'workloads.png')})", ""]
    for key, w in workloads.items():
        body = [f"jacbatch's plan: `{cell(w.get('explain_reason', w.get('explain', '')))}`; "
                f"closed form against the reference: {w.get('closed_form_vs_reference', '–')}.", ""]  # fmt: skip
        body += ["| runner | kind | median ms | IQR ms | note |", "|---|---|---:|---:|---|"]
        for n, r in w["runners"].items():
            if r.get("error"):
                note = cell(r["error"])
                note = note if len(note) < 90 else note[:87] + "..."
                body.append(f"| {cell(n)} | {r['kind']} | – | – | {note} |")
            else:
                body.append(
                    f"| {cell(n)} | {r['kind']} | {r['ms']:.3g} | {r.get('iqr_ms', 0):.2g} | |"
                )
        out += details(f"{key}: {w['title']}".replace('"', "'"), body)
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
    order = {"jacbatch-workloads/1": 0, None: 1, "jacbatch-bench/1": 2}
    files = sorted(
        RESULTS.glob("*.json"),
        key=lambda p: (order.get(json.loads(p.read_text()).get("schema"), 3), p.name),
    )
    lines += ["Files: " + ", ".join(f"`{p.name}`" for p in files) + ".", ""]
    for path in files:
        lines += render(path)
    with mkdocs_gen_files.open(PAGE, "w") as f:
        f.write("\n".join(lines))


main()
