"""Shared fixtures and the independent reference Jacobian used by every route test.

The reference is a per-sample loop of ``torch.autograd.functional.jacobian`` in float64 on the
CPU: it shares no code with jacbatch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "jacbatch",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jacbatch")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full-precision matmuls on CUDA so float32 tolerances mean what they say."""
    if torch.cuda.is_available():
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
        torch.backends.cuda.matmul.allow_tf32 = old
    else:
        yield


def reference_jacobian(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    argnum: int,
    in_dims: Sequence[int | None],
) -> torch.Tensor:
    """``(B, *out_shape, *in_shape)`` (no B when nothing is batched), float64 on the CPU."""
    args64 = [a.detach().to("cpu", torch.float64) for a in args]
    batched = [i for i, d in enumerate(in_dims) if d is not None]
    if not batched:
        return _one(func, args64, argnum)
    B = args64[batched[0]].shape[in_dims[batched[0]]]  # type: ignore[index]
    if B == 0:  # no sample to differentiate: the result is empty, with shapes from zeros
        sample = [
            a if d is None else torch.zeros(_drop(a.shape, d), dtype=torch.float64)
            for a, d in zip(args64, in_dims, strict=True)
        ]
        out = func(*sample)
        return torch.zeros(0, *out.shape, *sample[argnum].shape, dtype=torch.float64)
    per_sample = []
    for b in range(B):
        sample = [a if d is None else a.select(d, b) for a, d in zip(args64, in_dims, strict=True)]
        per_sample.append(_one(func, sample, argnum))
    return torch.stack(per_sample)


def _drop(shape: torch.Size, d: int) -> tuple[int, ...]:
    s = list(shape)
    del s[d]
    return tuple(s)


def _one(
    func: Callable[..., torch.Tensor], args: Sequence[torch.Tensor], argnum: int
) -> torch.Tensor:
    def f(x: torch.Tensor) -> torch.Tensor:
        return func(*args[:argnum], x, *args[argnum + 1 :])

    x = args[argnum]
    out = f(x)
    if out.numel() == 0 or x.numel() == 0:  # autograd.functional cannot stack nothing
        return torch.zeros(*out.shape, *x.shape, dtype=torch.float64)
    return torch.autograd.functional.jacobian(f, x)


def assert_matches(J: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare a jacbatch result with the float64 reference under the per-dtype tolerance."""
    from jacbatch.testing import tolerance

    rtol, atol = tolerance(dtype)
    assert J.dtype == dtype
    assert J.shape == ref.shape, (J.shape, ref.shape)
    torch.testing.assert_close(J.detach().to("cpu", torch.float64), ref, rtol=rtol, atol=atol)
