"""``randomness="error" | "different" | "same"``: every route differentiates ONE realization per
sample (issue item 6).

The function ``f(x) = d ⊙ (A x)`` with a dropout mask ``d`` (p = 0.5, scale 2) has the per-sample
Jacobian ``diag(d) A``: every row is either zero or ``2 A[i]``. A route whose rows or columns saw
different draws (e.g. a forward-mode column chunk that re-ran the forward) gives rows that mix
zero and non-zero entries of ``A``, which the structure check catches; ``J @ x == f(x)`` with the
draw replayed checks the realization is the one ``f`` produced.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import jacbatch

torch.manual_seed(1)
A = torch.randn(6, 4, dtype=torch.float64)


def dropped(x: torch.Tensor) -> torch.Tensor:
    y = x @ A.T
    return F.dropout(torch.ones_like(y), 0.5, training=True) * y


def dropped_item(x: torch.Tensor) -> torch.Tensor:
    """The same, but vmap rejects it (``.item()``): the vjp route's per-sample loop runs."""
    scale = 1.0 if x.sum().item() > -1e9 else 0.0
    return dropped(x) * scale


CASES = [
    ("auto", {}),
    ("jacrev", {}),
    ("jacrev", {"chunk_size": 1}),
    ("jacfwd", {}),
    ("jacfwd", {"chunk_size": 1}),  # every column a separate forward pass
    ("vjp", {}),
]
IDS = [m + ("-chunked" if kw else "") for m, kw in CASES]


def _one_realization(J: torch.Tensor) -> torch.Tensor:
    """Per sample and output row, whether the row is 0 or 2·A[i]; returns the mask (B, 6)."""
    zero = (J == 0).all(-1)
    kept = torch.isclose(J, 2 * A.expand_as(J), rtol=1e-12, atol=1e-12).all(-1)
    assert bool((zero | kept).all()), "a row mixes draws: not one realization"
    assert not bool((zero & kept).any())
    return kept


@pytest.mark.parametrize(("method", "kw"), CASES, ids=IDS)
def test_different_each_sample_its_own_realization(method: str, kw: dict) -> None:
    X = torch.randn(8, 4, dtype=torch.float64)
    torch.manual_seed(0)
    J = jacbatch.jacobian(dropped, X, method=method, randomness="different", **kw)
    masks = _one_realization(J)
    assert len({tuple(m.tolist()) for m in masks}) > 1  # 8 samples, 6 draws each
    # the Jacobian is that of the realization f produced: f is linear in x given the draw
    assert bool(masks.any()) and not bool(masks.all())


@pytest.mark.parametrize(("method", "kw"), CASES, ids=IDS)
def test_same_one_realization_for_every_sample(method: str, kw: dict) -> None:
    X = torch.randn(5, 4, dtype=torch.float64)
    torch.manual_seed(0)
    J = jacbatch.jacobian(dropped, X, method=method, randomness="same", **kw)
    masks = _one_realization(J)
    assert all(torch.equal(m, masks[0]) for m in masks)
    # the draw f makes from the same generator state
    torch.manual_seed(0)
    y = dropped(X[0])
    torch.testing.assert_close(J[0] @ X[0], y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", *jacbatch.methods.names()])
def test_error_refuses_before_any_work(method: str) -> None:
    X = torch.randn(3, 4, dtype=torch.float64)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match="randomness='different'"):
        jacbatch.jacobian(dropped, X, method=method)
    assert torch.equal(torch.get_rng_state(), state)  # nothing drew a number
    with pytest.raises(ValueError, match="randomness="):
        jacbatch.explain(dropped, X)
    with pytest.raises(ValueError, match="randomness="):
        jacbatch.estimate_memory(dropped, X)


def test_bad_option_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'error', 'different', 'same'"):
        jacbatch.jacobian(torch.sin, torch.randn(2, 3), randomness="fresh")


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_per_sample_loop_honours_the_option(randomness: str) -> None:
    X = torch.randn(6, 4, dtype=torch.float64)
    torch.manual_seed(0)
    J = jacbatch.jacobian(dropped_item, X, randomness=randomness)  # vjp's per-sample loop
    masks = _one_realization(J)
    distinct = len({tuple(m.tolist()) for m in masks})
    assert distinct == 1 if randomness == "same" else distinct > 1


def test_random_functions_never_take_the_closed_form() -> None:
    f = lambda x: F.dropout(x, 0.5, training=True) * 2  # noqa: E731  (traced ops all have rules)
    X = torch.randn(4, 5, dtype=torch.float64)
    plan = jacbatch.explain(f, X, randomness="different")
    assert all(s.route != "traced" for s in plan.steps), str(plan)
    with pytest.raises(NotImplementedError, match="draws random numbers"):
        jacbatch.jacobian(f, X, method="closed_form", randomness="same")
    torch.manual_seed(0)
    J = jacbatch.jacobian(f, X, randomness="same")
    d = torch.diagonal(J, dim1=1, dim2=2)
    assert torch.equal(J, torch.diag_embed(d))
    assert bool(((d == 0) | (d == 4)).all())  # 2 / (1 - p) * 2
    assert all(torch.equal(row, d[0]) for row in d)


def test_streaming_same_replays_the_draw_in_every_chunk() -> None:
    X = torch.randn(7, 4, dtype=torch.float64)
    torch.manual_seed(0)
    chunks = [J for _, J in jacbatch.iter_jacobian(dropped, X, batch_chunk=3, randomness="same")]
    masks = _one_realization(torch.cat(chunks))
    assert all(torch.equal(m, masks[0]) for m in masks)


def test_sensitivity_forwards_the_option() -> None:
    X = torch.randn(16, 4, dtype=torch.float64)
    g = lambda x: dropped(x).sum()  # noqa: E731
    with pytest.raises(ValueError, match="randomness="):
        jacbatch.sensitivity.dgsm(g, X)
    torch.manual_seed(0)
    res = jacbatch.sensitivity.dgsm(g, X, randomness="same", batch_size=5)  # 4 batches
    # one draw d for every sample and batch: the gradient A^T d is the same everywhere, so
    # E[(df/dx)^2] = E[|df/dx|]^2 and the standard error of nu vanishes
    torch.testing.assert_close(res.nu, res.mean_abs**2, rtol=1e-12, atol=1e-12)
    assert float(res.nu_se.abs().max()) < 1e-12
    assert float(res.nu.max()) > 0
    # the outputs come from the same draw: mean f = sum(A^T d) . mean x
    torch.manual_seed(0)
    d = F.dropout(torch.ones(6, dtype=torch.float64), 0.5, training=True)
    torch.testing.assert_close(res.mean, (X @ (A.T @ d)).mean(), rtol=1e-10, atol=1e-10)


def test_check_compares_one_realization_across_routes() -> None:
    X = torch.randn(4, 4, dtype=torch.float64)
    report = jacbatch.check(dropped, X, randomness="same")
    assert report.ok, str(report)
    with pytest.raises(ValueError, match="randomness="):
        jacbatch.check(dropped, X)


@pytest.mark.parametrize("method", ["auto", "jacrev", "jacfwd", "vjp"])
@pytest.mark.parametrize("randomness", ["different", "same"])
def test_every_argnum_sees_the_same_realization(method: str, randomness: str) -> None:
    """jacfwd runs one forward per argnum: each must replay the draw the others saw."""

    def f(x, w):
        return F.dropout(torch.ones_like(x), 0.5, training=True) * x * w

    X = torch.randn(6, 5, dtype=torch.float64)
    W = torch.randn(5, dtype=torch.float64)
    torch.manual_seed(0)
    Jx, Jw = jacbatch.jacobian(
        f, X, W, argnums=(0, 1), in_dims=(0, None), method=method, randomness=randomness
    )
    dx = torch.diagonal(Jx, dim1=1, dim2=2)
    dw = torch.diagonal(Jw, dim1=1, dim2=2)
    assert torch.equal(Jx, torch.diag_embed(dx)) and torch.equal(Jw, torch.diag_embed(dw))
    mask = dx != 0
    assert torch.equal(mask, dw != 0)  # the same draw for both argnums
    torch.testing.assert_close(dx[mask], 2 * W.expand_as(X)[mask], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw[mask], 2 * X[mask], rtol=1e-12, atol=1e-12)
    rows = {tuple(m.tolist()) for m in mask}
    assert len(rows) == 1 if randomness == "same" else len(rows) > 1
