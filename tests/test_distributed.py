"""jacbatch.distributed over real gloo process groups of 2 and 3 ranks on loopback.

Each world size is one launch of tests/_distributed_worker.py per rank, with torchrun's
environment and a free port chosen here; the workers run every scenario in one process group and save
their outcomes, which the tests below check. Every wait is bounded: the process group's timeout
(30 s) bounds each collective, and ranks still running after LAUNCH_TIMEOUT seconds are killed.
"""

from __future__ import annotations

import itertools
import multiprocessing
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import jacbatch
from jacbatch import distributed as jd
from tests._distributed_worker import run_rank, sample, tanh_affine
from tests.conftest import assert_matches, reference_jacobian

WORLDS = (2, 3)
LAUNCH_TIMEOUT = 120.0
ROUTES = ("closed_form", "jacrev", "jacfwd", "vjp", "auto")

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo not available",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(world: int, out: Path) -> list[multiprocessing.process.BaseProcess]:
    """Start ``world`` ranks on a free loopback port.

    Forked where possible: the children inherit this process's imported torch, which would
    otherwise cost each of them seconds of start-up.
    """
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    port = _free_port()
    procs = []
    for rank in range(world):
        p = ctx.Process(target=run_rank, args=(rank, world, port, str(out)), daemon=True)
        p.start()
        procs.append(p)
    return procs


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    """``{world: [outcomes of rank 0, rank 1, ...]}``; both worlds run at the same time."""
    # warm up torch.func here, once, so that forked ranks start with it loaded
    jacbatch.jacobian(torch.tanh, torch.ones(1, 1), method="jacrev")
    dirs = {w: tmp_path_factory.mktemp(f"world{w}") for w in WORLDS}
    procs = {w: _launch(w, d) for w, d in dirs.items()}
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    for ps in procs.values():
        for p in ps:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    stragglers = [p for ps in procs.values() for p in ps if p.is_alive()]
    for p in stragglers:
        p.kill()
        p.join(timeout=10)
    problems = [
        f"world {w} rank {r}: exit code {p.exitcode}"
        for w, ps in procs.items()
        for r, p in enumerate(ps)
        if p.exitcode != 0
    ]
    if stragglers or problems:
        pytest.fail(
            f"{len(stragglers)} rank(s) still running after {LAUNCH_TIMEOUT} s were killed; "
            + "; ".join(problems)
        )
    return {
        w: [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(w)]
        for w, d in dirs.items()
    }


def _ok(outcome: dict[str, Any]) -> Any:
    assert outcome["ok"], outcome.get("trace")
    return outcome["value"]


def _assert_equal(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w), (g - w).abs().max()


# ---------------------------------------------------------------------------------------------
# Sharded results equal the single-process ones exactly
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("method", ROUTES)
def test_gathered_equals_single_process_for_every_route(outcomes, world, method):
    for rank in range(world):  # B=5: shards of 3+2 or 2+2+1
        v = _ok(outcomes[world][rank][f"route_{method}"])
        _assert_equal(v["got"], v["single"])
    # and the single-process result is right, against an independent reference
    args = sample(5)
    func = jacbatch.affine if method == "closed_form" else tanh_affine
    for argnum, J in zip((0, 1), v["got"], strict=True):
        assert_matches(J, reference_jacobian(func, args, argnum, (0, None, None)), torch.float64)


@pytest.mark.parametrize("world", WORLDS)
def test_gather_to_one_rank_with_empty_shards(outcomes, world):
    # B=2, batch at dim 1 and dim 0, vec="col", chunk_size=3; world 3 leaves rank 2 empty
    for rank in range(world):
        v = _ok(outcomes[world][rank]["jacrev_dst_col_empty_shards"])
        if rank == world - 1:
            _assert_equal(v["got"], v["single"])
            assert v["got"][0].shape == (2, 6, 12) and v["got"][1].shape == (2, 6, 8)
        else:
            assert v["got"] is None


@pytest.mark.parametrize("world", WORLDS)
def test_float32_gathered_exactly(outcomes, world):
    for rank in range(world):
        v = _ok(outcomes[world][rank]["jacfwd_float32"])
        _assert_equal(v["got"], v["single"])
        assert v["got"][0].dtype == torch.float32


@pytest.mark.parametrize("world", WORLDS)
def test_local_shards_tile_the_batch(outcomes, world):
    vs = [_ok(outcomes[world][r]["local_shard"]) for r in range(world)]
    assert [(v["start"], v["stop"]) for v in vs] == [
        jd.shard_range(5, world, r) for r in range(world)
    ]
    assert all(v["B"] == 5 for v in vs)
    assert torch.equal(torch.cat([v["shard"] for v in vs]), vs[0]["single"])


@pytest.mark.parametrize("world", WORLDS)
def test_npy_file_holds_the_whole_jacobian(outcomes, world):
    vs = [_ok(outcomes[world][r]["npy"]) for r in range(world)]
    assert [v["rows"] for v in vs] == [jd.shard_range(5, world, r) for r in range(world)]
    for path, want in zip(vs[0]["paths"], vs[0]["single"], strict=True):
        got = torch.from_numpy(np.load(path))
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# A failure on one rank is an error on every rank; mismatched calls get a clear error
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", WORLDS)
def test_compute_failure_on_one_rank_raises_on_every_rank(outcomes, world):
    for rank in range(world):
        o = outcomes[world][rank]["fail_compute"]
        assert not o["ok"]
        if rank == 1:
            assert o["type"] == "ArithmeticError" and "boom on rank 1" in o["msg"]
        else:
            assert o["type"] == "RankFailedError"
            assert "rank 1: ArithmeticError: boom on rank 1" in o["msg"]
            assert "computing its shard" in o["msg"]


@pytest.mark.parametrize("world", WORLDS)
def test_validation_failure_on_one_rank_raises_on_every_rank(outcomes, world):
    last = world - 1
    for rank in range(world):
        o = outcomes[world][rank]["fail_validation"]
        assert not o["ok"]
        if rank == last:
            assert o["type"] == "ValueError" and "'bogus'" in o["msg"]
        else:
            assert o["type"] == "RankFailedError"
            assert f"rank {last}: ValueError" in o["msg"] and "'bogus'" in o["msg"]


@pytest.mark.parametrize("world", WORLDS)
def test_npy_creation_failure_raises_on_every_rank(outcomes, world):
    for rank in range(world):
        o = outcomes[world][rank]["fail_npy_create"]
        assert not o["ok"]
        assert o["type"] == ("FileNotFoundError" if rank == 0 else "RankFailedError")
        if rank:
            assert "rank 0: FileNotFoundError" in o["msg"]


MISMATCHES = {
    "mismatch_shape": (1, "args[0].shape = (4, 3, 4) where rank 0 has (5, 3, 4)"),
    "mismatch_values": (-1, "args[0] (hash of its values)"),
    "mismatch_dtype": (1, "dtype = 'torch.float32' where rank 0 has 'torch.float64'"),
    "mismatch_in_dims": (1, "in_dims = (1, None, None) where rank 0 has (0, None, None)"),
    "mismatch_argnums": (1, "argnums = 1 where rank 0 has 0"),
    "mismatch_method": (1, "method = 'vjp' where rank 0 has 'jacrev'"),
}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("scenario", sorted(MISMATCHES))
def test_mismatched_calls_name_the_rank_on_every_rank(outcomes, world, scenario):
    bad, text = MISMATCHES[scenario]
    bad = bad % world
    msgs = set()
    for rank in range(world):
        o = outcomes[world][rank][scenario]
        assert not o["ok"] and o["type"] == "ValueError", o
        assert f"got rank {bad} with {text}" in o["msg"]
        msgs.add(o["msg"])
    assert len(msgs) == 1  # the same message everywhere


@pytest.mark.parametrize("world", WORLDS)
def test_group_still_usable_after_failures(outcomes, world):
    for rank in range(world):
        v = _ok(outcomes[world][rank]["after_failures"])
        _assert_equal(v["got"], v["single"])


@pytest.mark.parametrize("world", WORLDS)
def test_reduce_moments_equal_whole_sample(outcomes, world):
    for rank in range(world):
        v = _ok(outcomes[world][rank]["moments"])
        x = v["x"]
        assert v["count"] == 7
        torch.testing.assert_close(v["sum"], x.sum(0), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(v["sum_sq"], (x * x).sum(0), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(v["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v["var"], x.var(0), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Without a process group
# ---------------------------------------------------------------------------------------------


@given(st.integers(0, 50), st.integers(1, 8))
def test_shard_range_is_an_even_contiguous_partition(batch, world):
    ranges = [jd.shard_range(batch, world, r) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == batch
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_range_rejects_bad_arguments():
    with pytest.raises(ValueError, match="expected rank in"):
        jd.shard_range(4, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        jd.shard_range(4, 0, 0)


@pytest.mark.skipif(torch.distributed.is_initialized(), reason="a process group is initialized")
def test_needs_a_process_group():
    A = torch.randn(4, 3)
    with pytest.raises(
        RuntimeError, match=r"expected an initialized torch\.distributed process group"
    ):
        jd.jacobian(torch.sin, A)
    with pytest.raises(RuntimeError, match="expected an initialized"):
        jd.reduce_moments(A)
