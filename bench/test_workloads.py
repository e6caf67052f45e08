"""The eight workloads of ``bench/workloads.py``: every closed form against the float64
per-sample autograd reference, every runner (jacbatch's routes, torch.func, the sum trick, JAX)
against the closed form, and one tiny end-to-end run of the script. No timing assertions.

    PYTHONPATH=$PWD python -m pytest bench/test_workloads.py -o addopts=""

(``-o addopts=""`` drops the test configuration in pyproject.toml, which ignores bench/.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import workloads as wl
from workload_defs import WORKLOADS, make, missing

from tests._reference import reference_jacobian

B = 3  # a small batch: the reference loops over samples
NAMES = [n for n in WORKLOADS if not missing(n)]  # kuka needs pytorch-kinematics


def _runner_names(name: str) -> list[str]:
    return [r.name for r in wl.runners_for(make(name, batch=2))]


CASES = [(n, r) for n in NAMES for r in _runner_names(n)]


@pytest.mark.parametrize("name", NAMES)
def test_closed_form_matches_reference(name: str) -> None:
    w = make(name, batch=B, dtype=torch.float64)
    R = reference_jacobian(w.func, w.args, w.argnums, w.in_dims)
    assert wl.agree(w.closed_form(*w.args), R, torch.float64) is None


@pytest.mark.parametrize("name", NAMES)
def test_batched_function_matches_per_sample(name: str) -> None:
    w = make(name, batch=B, dtype=torch.float64)
    if w.batched is None:
        pytest.skip("no batched version (the differentiated argument is shared)")
    per_sample = torch.stack(
        [
            w.func(*(a[b] if d == 0 else a for a, d in zip(w.args, w.in_dims, strict=True)))
            for b in range(B)
        ]
    )
    torch.testing.assert_close(w.batched(*w.args), per_sample, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "runner"), CASES, ids=[f"{n}-{r}" for n, r in CASES])
def test_runner_matches_closed_form(name: str, runner: str) -> None:
    """float64: every route agrees with the closed form to ~1e-10; one that raises is reported
    (skipped) unless it is jacbatch's default, which must work on every workload."""
    w = make(name, batch=B, dtype=torch.float64)
    (r,) = [r for r in wl.runners_for(w) if r.name == runner]
    if r.fn is None:
        pytest.skip(f"{runner} could not be built: {r.error}")
    try:
        J = r.fn()
    except Exception as e:
        if runner.startswith("jacbatch auto"):
            raise
        pytest.skip(f"{runner} raises on {name}: {wl._short(e)}")
    assert wl.agree(J, w.closed_form(*w.args), torch.float64) is None


def test_agree_catches_a_wrong_jacobian() -> None:
    w = make("mlp-small", batch=B, dtype=torch.float64)
    J = w.closed_form(*w.args)
    assert wl.agree(J, J, torch.float64) is None
    assert "WRONG" in str(wl.agree(J * (1 + 1e-6), J, torch.float64))
    assert "shape" in str(wl.agree(J[:, :1], J, torch.float64))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "kuka"])
def test_jax_version_matches_closed_form(name: str) -> None:
    jax = pytest.importorskip("jax")
    import numpy as np

    w = make(name, batch=B)
    assert w.jax is not None
    fn, args, argnums, in_axes = w.jax()
    ref = w.closed_form(*w.args)
    for tr in (jax.jacrev, jax.jacfwd):
        out = jax.jit(jax.vmap(tr(fn, argnums=argnums), in_axes=in_axes))(*args)
        got: Any = (
            tuple(torch.from_numpy(np.array(o)) for o in out)
            if isinstance(out, tuple)
            else torch.from_numpy(np.array(out))
        )
        assert wl.agree(got, ref, torch.float32) is None


def test_script_end_to_end(tmp_path: Any, capsys: Any) -> None:
    """One round of the smallest workload through the command line, JAX process included."""
    pytest.importorskip("jax")
    out = tmp_path / "w.json"
    old = torch.get_num_threads()
    try:
        wl.main(["--quick", "--rounds", "1", "--only", "mlp-small", "--json", str(out)])
    finally:
        torch.set_num_threads(old)
    data = json.loads(out.read_text())
    entry = data["workloads"]["mlp-small"]
    assert data["schema"] == "jacbatch-workloads/1"
    assert entry["closed_form_vs_reference"].startswith("agrees")
    errors = {n: e["error"] for n, e in entry["runners"].items() if e["error"]}
    assert not any("WRONG" in str(e) for e in errors.values()), errors
    assert "ms" in entry["runners"]["jacbatch auto"]
    assert "ms" in entry["runners"]["JAX jit(vmap(jacrev))"]
    assert "| mlp-small |" in capsys.readouterr().out
    wl.main(["--render", str(out)])  # the same tables again from the saved results
    assert "| mlp-small |" in capsys.readouterr().out


def test_runners_of_apis_added_later(monkeypatch: Any) -> None:
    """``jacbatch.prepare`` and ``jacobian(..., batched=True)`` get runners once they exist (here
    stand-ins), checked like the rest; a ``prepare`` that refuses an option is reported."""
    import jacbatch

    real = jacbatch.jacobian

    def by_sum(func: Any, args: tuple[Any, ...], argnums: int) -> torch.Tensor:
        x = args[argnums]

        def summed(xx: torch.Tensor) -> torch.Tensor:
            return func(*args[:argnums], xx, *args[argnums + 1 :]).sum(0)

        return wl._sum_trick_shape(torch.autograd.functional.jacobian(summed, x), x)

    def jacobian(func: Any, *args: Any, batched: bool = False, **kw: Any) -> Any:
        return by_sum(func, args, kw["argnums"]) if batched else real(func, *args, **kw)

    def prepare(func: Any, *example: Any, argnums: Any = 0, in_dims: Any = 0, **kw: Any) -> Any:
        if kw.get("compile"):
            raise NotImplementedError("compile is not available")
        if kw.get("batched"):
            return lambda *a: by_sum(func, a, argnums)
        return lambda *a: real(func, *a, argnums=argnums, in_dims=in_dims)

    monkeypatch.setattr(jacbatch, "jacobian", jacobian)
    monkeypatch.setattr(jacbatch, "prepare", prepare, raising=False)
    w = make("mlp-small", batch=B, dtype=torch.float64)
    rs = {r.name: r for r in wl.runners_for(w)}
    ref = w.closed_form(*w.args)
    for name in ("jacbatch batched=True", "jacbatch prepare", "jacbatch prepare(batched=True)"):
        fn = rs[name].fn
        assert fn is not None
        assert wl.agree(fn(), ref, torch.float64) is None
    assert rs["jacbatch prepare(compile=True)"].fn is None
    assert "compile is not available" in str(rs["jacbatch prepare(compile=True)"].error)
    # a shared differentiated argument: no batched runner (summing over samples would mix them)
    names = [r.name for r in wl.runners_for(make("per-sample-params", batch=B))]
    assert "jacbatch batched=True" not in names
    assert "jacbatch prepare" in names


def test_script_survives_a_dying_jax_process(tmp_path: Any, monkeypatch: Any) -> None:
    """A JAX process that dies mid-run leaves its routes with the error and the rest timed."""
    pytest.importorskip("jax")

    def dead(self: Any, slow: bool) -> dict[str, float]:
        self.p.kill()
        raise RuntimeError("the JAX process ended")

    monkeypatch.setattr(wl.JaxProcess, "round", dead)
    out = tmp_path / "w.json"
    old = torch.get_num_threads()
    try:
        wl.main(["--quick", "--rounds", "2", "--only", "mlp-small", "--json", str(out)])
    finally:
        torch.set_num_threads(old)
    runners = json.loads(out.read_text())["workloads"]["mlp-small"]["runners"]
    assert "JAX process" in runners["JAX jit(vmap(jacrev))"]["error"]
    assert "ms" not in runners["JAX jit(vmap(jacrev))"]
    assert len(runners["jacbatch auto"]["rounds_ms"]) == 2
