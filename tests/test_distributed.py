"""jacbatch.distributed over real gloo process groups of 2 and 3 ranks on loopback (and NCCL
with 2 ranks where 2 GPUs are available).

Each group is one launch of tests/_distributed_worker.py per rank, with torchrun's environment
and a free port chosen here; the ranks run every scenario in one process group and save their
outcomes, which the tests below check. Every wait is bounded: the process group's timeout
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

LAUNCH_TIMEOUT = 120.0
ROUTES = (*jacbatch.methods.names(), "auto")  # every route a caller may ask for
HAS_NCCL = (
    torch.distributed.is_available()
    and torch.distributed.is_nccl_available()
    and torch.cuda.device_count() >= 2
)
# (backend, world size); NCCL needs one GPU per rank
SETUPS = [
    ("gloo", 2),
    ("gloo", 3),
    pytest.param(
        ("nccl", 2),
        marks=pytest.mark.skipif(not HAS_NCCL, reason="NCCL with 2 GPUs not available"),
    ),
]
SETUP_IDS = ["gloo2", "gloo3", "nccl2"]
# a group of one rank takes the same paths except communication (no failures or mismatches)
DATA_SETUPS = [("gloo", 1), *SETUPS]
DATA_SETUP_IDS = ["gloo1", *SETUP_IDS]

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo not available",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(backend: str, world: int, out: Path) -> list[multiprocessing.process.BaseProcess]:
    """Start ``world`` ranks on a free loopback port.

    gloo ranks are forked where possible: they inherit this process's imported torch, which
    would otherwise cost each of them seconds of start-up. CUDA cannot be forked, so NCCL ranks
    are spawned.
    """
    fork = backend == "gloo" and "fork" in multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if fork else "spawn")
    port = _free_port()
    procs = []
    for rank in range(world):
        p = ctx.Process(target=run_rank, args=(rank, world, port, str(out), backend), daemon=True)
        p.start()
        procs.append(p)
    return procs


def _collect(
    launched: dict[tuple[str, int], tuple[Path, list[multiprocessing.process.BaseProcess]]],
) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Wait for every rank (bounded), kill stragglers, and load each rank's outcomes."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    for _, ps in launched.values():
        for p in ps:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
    stragglers = [p for _, ps in launched.values() for p in ps if p.is_alive()]
    for p in stragglers:
        p.kill()
        p.join(timeout=10)
    problems = [
        f"{setup} rank {r}: exit code {p.exitcode}"
        for setup, (_, ps) in launched.items()
        for r, p in enumerate(ps)
        if p.exitcode != 0
    ]
    if stragglers or problems:
        pytest.fail(
            f"{len(stragglers)} rank(s) still running after {LAUNCH_TIMEOUT} s were killed; "
            + "; ".join(problems)
        )
    return {
        setup: [
            torch.load(d / f"rank{r}.pt", weights_only=False, map_location="cpu")
            for r in range(len(ps))
        ]
        for setup, (d, ps) in launched.items()
    }


@pytest.fixture(scope="module")
def gloo_outcomes(tmp_path_factory: pytest.TempPathFactory):
    """Outcomes of the gloo groups of 1, 2 and 3 ranks, which run at the same time."""
    # warm up torch.func here, once, so that forked ranks start with it loaded
    jacbatch.jacobian(torch.tanh, torch.ones(1, 1), method="jacrev")
    setups = [("gloo", 1), ("gloo", 2), ("gloo", 3)]
    dirs = {s: tmp_path_factory.mktemp(f"{s[0]}{s[1]}") for s in setups}
    return _collect({s: (dirs[s], _launch(*s, dirs[s])) for s in setups})


@pytest.fixture(scope="module")
def nccl_outcomes(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("nccl2")
    return _collect({("nccl", 2): (d, _launch("nccl", 2, d))})


def _ranks(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    backend, world = request.param
    fixture = "gloo_outcomes" if backend == "gloo" else "nccl_outcomes"
    return request.getfixturevalue(fixture)[(backend, world)]


@pytest.fixture(params=SETUPS, ids=SETUP_IDS)
def ranks(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """One setup's outcomes (2 or more ranks), one dict per rank: ``{scenario: outcome}``."""
    return _ranks(request)


@pytest.fixture(params=DATA_SETUPS, ids=DATA_SETUP_IDS)
def data_ranks(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    """As ``ranks``, and a group of one rank too."""
    return _ranks(request)


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


@pytest.mark.parametrize("method", ROUTES)
def test_gathered_equals_single_process_for_every_route(data_ranks, method):
    world = len(data_ranks)
    for rank in range(world):  # B=5: shards of 3+2 or 2+2+1
        v = _ok(data_ranks[rank][f"route_{method}"])
        _assert_equal(v["got"], v["single"])
    # and the single-process result is right, against an independent reference
    args = [a.cpu() for a in sample(5)]
    func = jacbatch.affine if method == "closed_form" else tanh_affine
    for argnum, J in zip((0, 1), v["got"], strict=True):
        assert_matches(J, reference_jacobian(func, args, argnum, (0, None, None)), torch.float64)


def test_gather_to_one_rank_with_empty_shards(data_ranks):
    world = len(data_ranks)
    # B=2, batch at dim 1 and dim 0, vec="col", chunk_size=3; world 3 leaves rank 2 empty
    for rank in range(world):
        v = _ok(data_ranks[rank]["jacrev_dst_col_empty_shards"])
        if rank == world - 1:
            _assert_equal(v["got"], v["single"])
            assert v["got"][0].shape == (2, 6, 12) and v["got"][1].shape == (2, 6, 8)
        else:
            assert v["got"] is None


def test_float32_gathered_exactly(data_ranks):
    world = len(data_ranks)
    for rank in range(world):
        v = _ok(data_ranks[rank]["jacfwd_float32"])
        _assert_equal(v["got"], v["single"])
        assert v["got"][0].dtype == torch.float32


def test_local_shards_tile_the_batch(data_ranks):
    world = len(data_ranks)
    vs = [_ok(data_ranks[r]["local_shard"]) for r in range(world)]
    assert [(v["start"], v["stop"]) for v in vs] == [
        jd.shard_range(5, world, r) for r in range(world)
    ]
    assert all(v["B"] == 5 for v in vs)
    assert torch.equal(torch.cat([v["shard"] for v in vs]), vs[0]["single"])


def test_npy_file_holds_the_whole_jacobian(data_ranks):
    world = len(data_ranks)
    vs = [_ok(data_ranks[r]["npy"]) for r in range(world)]
    assert [v["rows"] for v in vs] == [jd.shard_range(5, world, r) for r in range(world)]
    for path, want in zip(vs[0]["paths"], vs[0]["single"], strict=True):
        got = torch.from_numpy(np.load(path))
        assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# A failure on one rank is an error on every rank; mismatched calls get a clear error
# ---------------------------------------------------------------------------------------------


def test_compute_failure_on_one_rank_raises_on_every_rank(ranks):
    world = len(ranks)
    for rank in range(world):
        o = ranks[rank]["fail_compute"]
        assert not o["ok"]
        if rank == 1:
            assert o["type"] == "ArithmeticError" and "boom on rank 1" in o["msg"]
        else:
            assert o["type"] == "RankFailedError"
            assert "rank 1: ArithmeticError: boom on rank 1" in o["msg"]
            assert "computing its shard" in o["msg"]


def test_validation_failure_on_one_rank_raises_on_every_rank(ranks):
    world = len(ranks)
    last = world - 1
    for rank in range(world):
        o = ranks[rank]["fail_validation"]
        assert not o["ok"]
        if rank == last:
            assert o["type"] == "ValueError" and "'bogus'" in o["msg"]
        else:
            assert o["type"] == "RankFailedError"
            assert f"rank {last}: ValueError" in o["msg"] and "'bogus'" in o["msg"]


def test_npy_creation_failure_raises_on_every_rank(ranks):
    world = len(ranks)
    for rank in range(world):
        o = ranks[rank]["fail_npy_create"]
        assert not o["ok"]
        assert o["type"] == ("FileNotFoundError" if rank == 0 else "RankFailedError")
        if rank:
            assert "rank 0: FileNotFoundError" in o["msg"]


def test_npy_write_failure_keeps_the_old_file_and_leaves_no_temporary(ranks):
    for rank in range(len(ranks)):
        o = _ok(ranks[rank]["fail_npy_write"])
        assert o["type"] == ("ArithmeticError" if rank == 1 else "RankFailedError")
        assert "writing its rows" in o["msg"] or rank == 1
        assert o["content"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert not [n for n in o["listing"] if ".tmp-" in n], o["listing"]


def test_ranks_on_one_host_share_its_free_memory(ranks):
    """4.5 KiB gathered on each rank fits 8 KiB free alone, not shared by 2 or 3 ranks."""
    for rank in range(len(ranks)):
        o = ranks[rank]["shared_host"]
        assert not o["ok"]
        assert o["type"] == "JacobianMemoryError", o.get("trace")
        assert "the gathered Jacobian (4.5 KiB) on every rank" in o["msg"]
        assert f"8 KiB free shared by {len(ranks)} rank(s) on this host" in o["msg"]
        assert "gather='dst'" in o["msg"]


def test_system_exit_on_one_rank_is_a_rank_failure_on_the_others(ranks):
    for rank in range(len(ranks)):
        o = ranks[rank]["system_exit"]
        if rank == 1:
            assert _ok(o) == "SystemExit 4"
        else:
            assert o["type"] == "RankFailedError"
            assert "rank 1: SystemExit: 4" in o["msg"] and "computing its shard" in o["msg"]


MISMATCHES = {
    "mismatch_shape": (1, "args[0].shape = (4, 3, 4) where rank 0 has (5, 3, 4)"),
    "mismatch_values": (-1, "args[0] (hash of its values)"),
    "mismatch_dtype": (1, "dtype = 'torch.float32' where rank 0 has 'torch.float64'"),
    "mismatch_in_dims": (1, "in_dims = (1, None, None) where rank 0 has (0, None, None)"),
    "mismatch_argnums": (1, "argnums = 1 where rank 0 has 0"),
    "mismatch_method": (1, "method = 'vjp' where rank 0 has 'jacrev'"),
}


@pytest.mark.parametrize("scenario", sorted(MISMATCHES))
def test_mismatched_calls_name_the_rank_on_every_rank(ranks, scenario):
    world = len(ranks)
    bad, text = MISMATCHES[scenario]
    bad = bad % world
    msgs = set()
    for rank in range(world):
        o = ranks[rank][scenario]
        assert not o["ok"] and o["type"] == "ValueError", o
        assert f"got rank {bad} with {text}" in o["msg"]
        msgs.add(o["msg"])
    assert len(msgs) == 1  # the same message everywhere


def test_group_still_usable_after_failures(ranks):
    world = len(ranks)
    for rank in range(world):
        v = _ok(ranks[rank]["after_failures"])
        _assert_equal(v["got"], v["single"])


def test_subgroup_uses_group_ranks(gloo_outcomes):
    ranks = gloo_outcomes[("gloo", 3)]
    assert "subgroup_all" not in ranks[0]
    for rank in (1, 2):
        v = _ok(ranks[rank]["subgroup_all"])
        _assert_equal(v["got"], v["single"])
        v = _ok(ranks[rank]["subgroup_dst"])
        if rank == 2:  # group rank 1
            _assert_equal(v["got"], v["single"])
        else:
            assert v["got"] is None


def test_reduce_moments_equal_whole_sample(data_ranks):
    world = len(data_ranks)
    for rank in range(world):
        v = _ok(data_ranks[rank]["moments"])
        x = v["x"]
        assert v["count"] == 7
        torch.testing.assert_close(v["sum"], x.sum(0), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(v["sum_sq"], (x * x).sum(0), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(v["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v["var"], x.var(0), rtol=1e-12, atol=1e-12)


def test_dgsm_over_ranks_equals_single_process(data_ranks):
    for rank in range(len(data_ranks)):
        v = _ok(data_ranks[rank]["dgsm"])
        assert v.pop("n") == (1001, 1001)
        for field, (got, single) in v.items():
            torch.testing.assert_close(got, single, rtol=1e-12, atol=1e-12, msg=field)


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


def test_a_process_that_exited_is_told_from_a_live_one():
    """What names a rank that died outright (NOTE [A rank that dies] in jacbatch.distributed)."""
    import os
    import subprocess
    import sys

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while zombie.poll() is None:  # poll reaps it; a fresh exited child is a zombie before that
        time.sleep(0.01)
    assert jd._process_gone(zombie.pid)
    assert not jd._process_gone(os.getpid())
