"""A Jacobian call never changes the caller's state or arguments (issue items 6 and 9).

References are the per-sample float64 reference (``tests/_reference.py``), run on copies
of the state so that the reference itself cannot disturb what is compared.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import jacbatch
from jacbatch.testing import tolerance
from tests.conftest import reference_jacobian

#: a deliberate subset: "auto" and the autodiff routes, which differentiate any function
#: (closed_form, which needs a rule for every op, is not asked for here)
AUTODIFF_ROUTES = ["auto", "jacrev", "jacfwd", "vjp"]


def _per_sample(f, X):
    """``(B, *out, *in)``: the reference of one sample at a time, ``f(b)`` the function (fresh
    state) that sample ``b`` sees."""
    return torch.stack([reference_jacobian(f(b), (X[b],), in_dims=None) for b in range(len(X))])


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed: {v} -> {after[k]}"


# ---------------------------------------------------------------------------------------------
# Item 6: state
# ---------------------------------------------------------------------------------------------


def _batchnorm_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double()
    model.train()
    # running statistics that are not the defaults, so a reset would show
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    model[1].num_batches_tracked.fill_(7)
    return model


@pytest.mark.parametrize("method", AUTODIFF_ROUTES)
def test_train_mode_batchnorm_state_is_unchanged(method: str) -> None:
    model = _batchnorm_model()
    X = torch.randn(4, 5, 3, dtype=torch.float64)  # per sample: BatchNorm over (N=5, C=4)
    before = _state(model)
    if method in ("jacrev", "jacfwd"):  # torch.func refuses writes into captured tensors
        with pytest.raises(NotImplementedError, match="closes over"):
            jacbatch.jacobian(model, X, method=method)
        _assert_state(model, before)
        return
    J = jacbatch.jacobian(model, X, method=method)
    _assert_state(model, before)

    # each sample: a fresh copy in train mode (its own batch statistics), as torch.func would
    expected = _per_sample(lambda b: copy.deepcopy(model), X)
    torch.testing.assert_close(J, expected, rtol=1e-12, atol=1e-12)


def test_state_writing_func_has_no_closed_form() -> None:
    model = _batchnorm_model()
    before = _state(model)
    with pytest.raises(NotImplementedError, match="exist before the call"):
        jacbatch.jacobian(model, torch.randn(2, 5, 3, dtype=torch.float64), method="closed_form")
    _assert_state(model, before)


def test_every_entry_point_leaves_batchnorm_state_alone(tmp_path) -> None:
    model = _batchnorm_model()
    X = torch.randn(4, 5, 3, dtype=torch.float64)
    before = _state(model)
    jacbatch.explain(model, X)
    jacbatch.estimate_memory(model, X)
    jacbatch.jacobian(model, X, max_memory=2**14)  # tight budget: memory simulation + chunks
    list(jacbatch.iter_jacobian(model, X, batch_chunk=3))
    jacbatch.save_jacobian(tmp_path / "J.npy", model, X, batch_chunk=2)
    report = jacbatch.check(model, X)
    _assert_state(model, before)
    assert report.ok, str(report)
    assert report.routes == ("vjp", "finite_difference")  # torch.func refuses such writes


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode, torch.enable_grad])
@pytest.mark.parametrize("method", ["auto", "vjp"])
def test_state_is_restored_in_every_grad_context(context, method: str) -> None:
    """Under inference mode the composite batch_norm / instance_norm reach the guard undecomposed."""
    model = _batchnorm_model()
    model.append(nn.InstanceNorm1d(5, track_running_stats=True).double())  # over (C=5, L=4)
    X = torch.randn(4, 5, 3, dtype=torch.float64)
    before = _state(model)
    with context():
        jacbatch.jacobian(model, X, method=method)
    _assert_state(model, before)


def test_float32_module_in_train_mode() -> None:
    model = _batchnorm_model().float()
    X = torch.randn(3, 5, 3)
    before = _state(model)
    J = jacbatch.jacobian(model, X)
    _assert_state(model, before)
    m64 = copy.deepcopy(model).double()
    expected = _per_sample(lambda b: m64, X.double())
    rtol, atol = tolerance(torch.float32)
    torch.testing.assert_close(J.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("method", AUTODIFF_ROUTES)
def test_closed_over_counter_is_restored(method: str) -> None:
    c = torch.tensor(2.0, dtype=torch.float64)

    def f(x):
        c.add_(1)  # state: every evaluation counts
        return torch.sin(x) * c

    X = torch.randn(4, 3, dtype=torch.float64)
    if method in ("jacrev", "jacfwd"):
        with pytest.raises(NotImplementedError, match="closes over"):
            jacbatch.jacobian(f, X, method=method)
        assert c.item() == 2.0
        return
    J = jacbatch.jacobian(f, X, method=method)
    assert c.item() == 2.0

    def fresh(b):  # each sample: one call of f from the caller's state
        cc = torch.tensor(2.0, dtype=torch.float64)
        return lambda x: (cc.add_(1), torch.sin(x) * cc)[1]

    torch.testing.assert_close(J, _per_sample(fresh, X), rtol=1e-12, atol=1e-12)


def test_state_that_the_derivative_needs_is_computed_sample_by_sample() -> None:
    """Per-sample loop (vmap rejects .item()) over a function whose output's derivative uses the
    state it wrote: restoring it between samples would change a value autograd saved, so each
    sample's Jacobian is finished before the next sample runs. Each sample sees the caller's
    state (c = 2, then its own write: c = 3), as per-sample autograd on a fresh call does."""
    c = torch.tensor(2.0, dtype=torch.float64)

    def f(x):
        c.add_(1)
        scale = 1.0 if x.sum().item() > -1e9 else 0.0  # vmap rejects .item()
        return x * c * scale

    X = torch.randn(3, 2, dtype=torch.float64)
    refs = []
    for x in X:  # the reference: one fresh call per sample, state put back in between
        refs.append(reference_jacobian(f, (x,), in_dims=None))
        c.fill_(2.0)
    J = jacbatch.jacobian(f, X, method="vjp")
    torch.testing.assert_close(J, torch.stack(refs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(J[0], 3 * torch.eye(2, dtype=torch.float64))
    assert c.item() == 2.0


class RunningAverage(nn.Module):
    """A module with a custom buffer update in forward (in place, under no_grad)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("avg", torch.linspace(0.5, 1.5, n, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x) * (1 + self.avg)
        with torch.no_grad():
            self.avg.mul_(0.9).add_(0.1 * x.mean())
            self.calls += 1
        return y


@pytest.mark.parametrize("method", ["auto", "vjp"])
def test_module_with_custom_buffer_update(method: str) -> None:
    m = RunningAverage(3)
    X = torch.randn(5, 3, dtype=torch.float64)
    before = _state(m)
    J = jacbatch.jacobian(m, X, method=method)
    _assert_state(m, before)
    expected = _per_sample(lambda b: copy.deepcopy(m), X)
    torch.testing.assert_close(J, expected, rtol=1e-12, atol=1e-12)


class RebindingAverage(nn.Module):
    """A module whose forward rebinds its buffer instead of writing into it."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("avg", torch.linspace(0.5, 1.5, n, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x) * (1 + self.avg)
        self.avg = 0.9 * self.avg + 0.1 * x.detach()
        return y


@pytest.mark.parametrize("method", AUTODIFF_ROUTES)
@pytest.mark.parametrize("closure", [False, True], ids=["module", "closure"])
def test_module_that_rebinds_its_buffer(method: str, closure: bool) -> None:
    m = RebindingAverage(3)
    avg = m.avg
    kept = avg.clone()
    X = torch.randn(5, 3, dtype=torch.float64)
    f = (lambda x: m(x)) if closure else m
    J = jacbatch.jacobian(f, X, method=method)
    assert m.avg is avg and type(m.avg) is torch.Tensor  # no leaked vmap wrapper either
    assert torch.equal(m.avg, kept)
    expected = _per_sample(lambda b: copy.deepcopy(RebindingAverage(3)), X)
    torch.testing.assert_close(J, expected, rtol=1e-12, atol=1e-12)


def _writes_its_own_tensors(x: torch.Tensor) -> torch.Tensor:
    c = torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype)  # made inside func: not state
    c.add_(1)
    z = torch.zeros(3, dtype=x.dtype)
    z += x
    return torch.tanh(x * c + z)


def test_functions_without_writes_are_not_wrapped() -> None:
    """The common case pays nothing: no protection, the caller's function runs as is."""
    plan = jacbatch.explain(torch.sin, torch.randn(3, 2))
    assert not plan.protection.needed
    # writes into tensors func made itself are not state
    X = torch.randn(4, 3, dtype=torch.float64)
    plan = jacbatch.explain(_writes_its_own_tensors, X)
    assert not plan.protection.needed, str(plan)
    J = jacbatch.jacobian(_writes_its_own_tensors, X)
    expected = _per_sample(lambda b: _writes_its_own_tensors, X)
    torch.testing.assert_close(J, expected, rtol=1e-12, atol=1e-12)
    plan = jacbatch.explain(_batchnorm_model(), torch.randn(2, 5, 3, dtype=torch.float64))
    assert plan.protection.writes_state
    assert [s.route for s in plan.steps] == ["vjp"]  # torch.func would refuse the writes
    assert "restored" in str(plan)


# ---------------------------------------------------------------------------------------------
# Item 9: aliasing
# ---------------------------------------------------------------------------------------------


def test_out_overlapping_an_argument_is_refused() -> None:
    buf = torch.randn(100, dtype=torch.float64)
    X = buf[:12].view(4, 3)
    kept = X.clone()
    out = buf[10:46].view(4, 3, 3)
    with pytest.raises(ValueError, match="overlaps args\\[0\\]"):
        jacbatch.jacobian(torch.sin, X, out=out)
    assert torch.equal(X, kept)
    # the same storage, disjoint bytes: accepted, and right
    out = buf[12:48].view(4, 3, 3)
    jacbatch.jacobian(torch.sin, X, out=out)
    torch.testing.assert_close(out, torch.diag_embed(torch.cos(kept)), rtol=1e-12, atol=1e-12)
    assert torch.equal(X, kept)


def test_out_over_a_shared_argument_and_tuple_outs_are_refused() -> None:
    W = torch.randn(3, 3, dtype=torch.float64)
    X = torch.randn(2, 3, dtype=torch.float64)
    f = lambda x, w: x @ w  # noqa: E731
    big = torch.empty(2 * 3 * 3 * 3 + 9, dtype=torch.float64)
    big[:9] = W.reshape(-1)
    Wv = big[:9].view(3, 3)
    with pytest.raises(ValueError, match="overlaps args\\[1\\]"):
        jacbatch.jacobian(f, X, Wv, argnums=1, in_dims=(0, None), out=big[1:55].view(2, 3, 3, 3))
    assert torch.equal(Wv, W)
    o = torch.empty(2, 3, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="out\\[1\\] overlapping out\\[0\\]"):
        jacbatch.jacobian(
            lambda x, w, v: x @ w + x @ v,
            X,
            W,
            W.clone(),
            argnums=(1, 2),
            in_dims=(0, None, None),
            out=(o, o),
        )


def _doubling(v: torch.Tensor) -> torch.Tensor:
    v.mul_(2)
    return torch.sin(v)


@pytest.mark.parametrize("method", AUTODIFF_ROUTES)
def test_func_writing_into_its_argument_never_touches_the_callers_tensor(method: str) -> None:
    X = torch.randn(4, 3, dtype=torch.float64)
    kept = X.clone()
    J = jacbatch.jacobian(_doubling, X, method=method)
    assert torch.equal(X, kept)
    expected = _per_sample(lambda b: lambda v: _doubling(v.clone()), kept)
    torch.testing.assert_close(J, expected, rtol=1e-12, atol=1e-12)


def test_func_writing_into_its_argument_has_no_closed_form() -> None:
    X = torch.randn(4, 3, dtype=torch.float64)
    kept = X.clone()
    with pytest.raises(NotImplementedError, match="writes into its arguments"):
        jacbatch.jacobian(_doubling, X, method="closed_form")
    assert torch.equal(X, kept)
    assert "traced" not in str(jacbatch.explain(_doubling, X))


@pytest.mark.parametrize("method", AUTODIFF_ROUTES)
def test_func_writing_into_a_shared_argument(method: str) -> None:
    def f(x, w):
        w.add_(1)  # shared by the batch, written every call
        return x * w

    X = torch.randn(4, 3, dtype=torch.float64)
    W = torch.randn(3, dtype=torch.float64)
    kept = W.clone()
    Jx, Jw = jacbatch.jacobian(f, X, W, argnums=(0, 1), in_dims=(0, None), method=method)
    assert torch.equal(W, kept)
    torch.testing.assert_close(Jx, torch.diag_embed((kept + 1).expand(4, 3)), rtol=0, atol=0)
    torch.testing.assert_close(Jw, torch.diag_embed(X), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["auto", "vjp"])
def test_func_that_writes_its_argument_for_some_samples_only(method: str) -> None:
    """The probe sees the first sample only (which does not write here): the per-sample loop
    still gives func copies, so the caller's tensor is untouched and the Jacobian is the one
    with respect to the value on entry."""
    X = torch.tensor([[-1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [2.0, -1.0, 0.5]], dtype=torch.float64)
    before = X.clone()

    def f(x):
        if x[0] > 0:  # vmap rejects this: the per-sample loop runs
            x.mul_(2)
        return torch.tanh(x)

    J = jacbatch.jacobian(f, X, method=method)
    ref = reference_jacobian(lambda u: f(u.clone()), (X,))
    torch.testing.assert_close(J, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(X, before)
