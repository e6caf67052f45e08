"""torch's OpInfo database through every route, against per-sample autograd (tests/_opinfo.py).

The default run sweeps every float64 autograd OpInfo with its first small sample, shared
second arguments, through every route (about a minute on two cores); the ``slow`` run takes
three samples each and batched second arguments too (``python -m pytest -m slow
tests/test_opinfo.py``; ``bench/opinfo_sweep.py`` prints its table of counts).

Per route, no result may be wrong; ``method="auto"`` must moreover give an answer (agree, or
agree through a known torch bug's workaround) wherever autograd can differentiate the op, and
the closed form may only refuse with its own ``NotImplementedError``. The sparse path
(``sparse=True``, compared through ``to_dense()``, NaN outside the detected pattern read as the
structural zero it is) may refuse with detection's ``NoPatternError`` or its own
``NotImplementedError``; the default run takes a quarter of the ops, the ``slow`` run all.
"""

from __future__ import annotations

from collections import Counter

import _opinfo
import pytest
import torch

OPS = _opinfo.swept_ops()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The samples are tiny: intra-op threads only add overhead (and contention in CI)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _check(
    op, samples: int, variants: tuple[str, ...], routes: tuple[str, ...] = _opinfo.ROUTES
) -> Counter[str]:
    seen: Counter[str] = Counter()
    problems = []
    for case in _opinfo.cases(op, samples, variants):
        try:
            ref = _opinfo.reference(case)
        except Exception:  # torch cannot differentiate this sample itself: nothing to compare
            continue
        for route in routes:
            outcome, detail = _opinfo.run_route(case, route, ref)
            seen[outcome] += 1
            bad = outcome == "wrong"
            if route == "auto" or route in _opinfo.PROGRAMS:
                bad |= outcome == "error"
                bad |= outcome == "refused" and not _opinfo.is_random_refusal(detail)
            if route == "closed_form" and outcome == "refused":
                bad |= not (
                    detail.startswith("NotImplementedError: jacobian:")
                    or _opinfo.is_random_refusal(detail)
                )
            if route in _opinfo.SPARSE and outcome == "refused":
                bad |= not (
                    detail.startswith(("NoPatternError: ", "NotImplementedError: jacobian:"))
                    or _opinfo.is_random_refusal(detail)
                )
            if route == "jacfwd" and not case.supports_forward_ad:
                bad |= outcome == "error"
            if bad:
                problems.append(f"{case.name} {route}: {outcome} {detail}")
    assert not problems, "\n".join(problems)
    return seen


@pytest.mark.parametrize("op", OPS, ids=lambda op: f"{op.name}.{op.variant_test_name}".rstrip("."))
def test_op_first_sample(op):
    _check(op, 1, ("shared",))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS, ids=lambda op: f"{op.name}.{op.variant_test_name}".rstrip("."))
def test_op_full(op):
    _check(op, 3, ("shared", "batched"))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS, ids=lambda op: f"{op.name}.{op.variant_test_name}".rstrip("."))
def test_op_programs(op):
    """The programs of repeated plain calls and of prepare() on every op (first sample)."""
    _check(op, 1, ("shared", "batched"), _opinfo.PROGRAMS)


#: The default run's share of the sparse sweep (the slow run takes every op): every fourth op,
#: plus the ones that met each of the sparse path's special cases (a refusal of vmap, a torch
#: bug of one mode, NaN outside the pattern, a check that fails inside the pattern).
_SPARSE_HARD = {
    "cdist",
    "gradient",
    "linalg.solve",
    "linalg.eigh",
    "special.entr",
    "nn.functional.batch_norm",
    "nn.functional.scaled_dot_product_attention",
    "scatter_reduce.prod",
}
SPARSE_OPS = [
    op
    for k, op in enumerate(OPS)
    if k % 4 == 0 or f"{op.name}.{op.variant_test_name}".rstrip(".") in _SPARSE_HARD
]


@pytest.mark.parametrize(
    "op", SPARSE_OPS, ids=lambda op: f"{op.name}.{op.variant_test_name}".rstrip(".")
)
def test_op_sparse(op):
    """``sparse=True`` (first sample, shared second argument): detection may refuse an op with
    its own error, the passes with a clear one; the result may never be wrong."""
    _check(op, 1, ("shared",), _opinfo.SPARSE[:1])


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS, ids=lambda op: f"{op.name}.{op.variant_test_name}".rstrip("."))
def test_op_sparse_full(op):
    """``sparse=True`` on every op, three samples, batched second arguments as well; its
    repeated-call program and ``method="closed_form"`` on the first sample."""
    _check(op, 3, ("shared", "batched"), _opinfo.SPARSE[:1])
    _check(op, 1, ("shared", "batched"), _opinfo.SPARSE[1:])


def test_sweep_covers_the_known_bugs_and_counts_them():
    """The sweep reaches every known torch bug it can (their OpInfos), and classifies them."""
    names = {"max.reduction_no_dim", "select_scatter", "linalg.eigh"}
    ops = [op for op in OPS if f"{op.name}.{op.variant_test_name}".rstrip(".") in names]
    assert len(ops) == len(names)
    counts, notable = _opinfo.sweep(1, ("shared", "batched"), ops=ops)
    assert sum(c["workaround"] for c in counts.values()) >= 3
    assert not any(c["wrong"] for c in counts.values()), notable
    assert "| auto |" in _opinfo.table(counts)
