"""Bad input gets a clear error naming the argument and the fix, before any work."""

from __future__ import annotations

import pytest
import torch

import jacbatch

X = torch.randn(4, 3)


class Spy:
    """A per-sample function that records whether it was ever called."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *xs):
        self.calls += 1
        # erfcx has no closed-form rule, so method="closed_form" has nothing to trace into
        return sum(torch.special.erfcx(x.reshape(-1))[-1] for x in xs)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        (
            (X, torch.randn(5, 3)),
            {},
            ValueError,
            r"one batch size.*args\[0\] has 4.*args\[1\] has 5",
        ),
        ((X,), {"in_dims": 2}, ValueError, r"in_dims\[0\] to be a dimension of args\[0\]"),
        ((X, X), {"in_dims": (0,)}, ValueError, "one entry per argument"),
        ((X,), {"in_dims": "0"}, TypeError, "in_dims to be an int, None or a tuple"),
        ((X.long(),), {}, TypeError, r"floating-point.*args\[0\].*int64.*\.double\(\)"),
        ((X.bool(),), {}, TypeError, "integer/bool"),
        ((X.to(torch.complex64),), {}, TypeError, "complex"),
        (
            (X, X.double()),
            {},
            TypeError,
            r"share one dtype.*args\[0\]: torch.float32, args\[1\]: torch.float64",
        ),
        ((X, X.to("meta")), {}, ValueError, r"meta device"),
        ((X, [1.0]), {}, ValueError, r"in_dim of args\[1\]\[0\].*Use None for a leaf shared"),
        ((X,), {"method": "magic"}, ValueError, "'auto', 'closed_form', 'jacrev', 'jacfwd', 'vjp'"),
        ((X,), {"vec": "F"}, ValueError, "None, 'row', 'col'"),
        ((X,), {"chunk_size": 0}, ValueError, "chunk_size to be a positive int"),
        ((X,), {"chunk_size": -3}, ValueError, "chunk_size to be a positive int"),
        ((X,), {"chunk_size": True}, ValueError, "chunk_size to be a positive int"),
        ((X,), {"argnums": 1}, ValueError, r"argnums in range \[-1, 1\)"),
        ((X, X), {"argnums": (0, -2)}, ValueError, "distinct argnums"),
        ((X,), {"argnums": "0"}, TypeError, "argnums to be an int or a tuple"),
        ((X,), {"argnums": ()}, ValueError, "at least one"),
        (
            (X,),
            {"method": "closed_form"},
            NotImplementedError,
            r"Closed forms exist for: jacbatch.affine \(argnums 0, 1, 2\)",
        ),
    ],
)
def test_bad_calls_fail_before_func_runs(args, kwargs, exc, match):
    spy = Spy()
    with pytest.raises(exc, match=match):
        jacbatch.jacobian(spy, *args, **kwargs)
    if exc is not NotImplementedError:
        assert spy.calls == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_mixed_devices_are_refused():
    with pytest.raises(ValueError, match=r"one device.*args\[0\]: cpu, args\[1\]: cuda"):
        jacbatch.jacobian(Spy(), X, X.cuda())


def test_not_callable_and_no_args():
    with pytest.raises(TypeError, match="func to be callable"):
        jacbatch.jacobian(X, X)
    with pytest.raises(TypeError, match="at least one tensor argument"):
        jacbatch.jacobian(Spy())


@pytest.mark.parametrize(
    ("func", "exc", "match"),
    [
        (lambda x: (x, 1.0), TypeError, r"output\[1\] of type float"),
        (lambda x: x.sum().item(), TypeError, "single torch.Tensor, got float"),
        (lambda x: (x > 0).long(), TypeError, "floating-point tensor, got dtype torch.int64"),
    ],
)
def test_non_tensor_outputs(func, exc, match):
    with pytest.raises(exc, match=match):
        jacbatch.jacobian(func, X)


@pytest.mark.parametrize(
    ("A", "W", "B", "match"),
    [
        (torch.ones(2, 3), torch.ones(4, 2), torch.ones(2), "matching p"),
        (torch.ones(2, 3), torch.ones(3, 2), torch.ones(3), r"B of shape \(2,\)"),
        (torch.ones(3), torch.ones(3, 2), torch.ones(2), "matrices per sample"),
    ],
)
def test_affine_shape_errors(A, W, B, match):
    for method in ("closed_form", "jacrev", "auto"):
        with pytest.raises(ValueError, match=match):
            jacbatch.jacobian(jacbatch.affine, A, W, B, in_dims=None, method=method)
    with pytest.raises(ValueError, match=match):
        jacbatch.affine(A, W, B)


@pytest.mark.parametrize(
    ("out", "exc", "match"),
    [
        (torch.empty(4, 3, 4), ValueError, r"out of shape \(4, 3, 3\)"),
        (torch.empty(4, 3, 3, dtype=torch.float64), TypeError, "dtype torch.float32"),
        (torch.empty(4, 3, 3).transpose(1, 2), ValueError, "contiguous"),
        (torch.empty(4, 3, 3, requires_grad=True), ValueError, "not to require grad"),
        ([0.0], TypeError, "out to be a torch.Tensor"),
        ((torch.empty(4, 3, 3),), TypeError, "out to be one tensor"),
    ],
)
def test_out_errors(out, exc, match):
    with pytest.raises(exc, match=match):
        jacbatch.jacobian(torch.sin, X, out=out)
