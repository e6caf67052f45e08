"""Shared fixtures, devices, and the independent reference Jacobian every test compares with.

The reference (``tests/_reference.py``) is a per-sample loop of
``torch.autograd.functional.jacobian`` in float64 on the CPU: it shares no code with jacbatch.
Tests import ``DEVICES``, ``reference_jacobian`` and ``assert_matches`` from here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

from tests._reference import reference_jacobian

__all__ = ["DEVICES", "assert_matches", "reference_jacobian"]

settings.register_profile(
    "jacbatch",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("jacbatch")

#: the devices tests run on: CUDA entries skip cleanly without a GPU
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
    ),
]


@pytest.fixture(autouse=True)
def _seeded_rng():
    """Every test starts from the same global torch RNG state.

    Draws without an explicit generator (``torch.randn(...)``) are then the same whatever ran
    before, so a test's outcome cannot depend on test order or selection (tests whose inputs
    must satisfy a condition, e.g. ``det > 0``, still construct them so, with their own
    generator). The state the test leaves behind is restored afterwards.
    """
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    yield
    torch.random.set_rng_state(state)


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


def assert_matches(J: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare a jacbatch result with the float64 reference under the per-dtype tolerance."""
    from jacbatch.testing import tolerance

    rtol, atol = tolerance(dtype)
    assert J.dtype == dtype
    assert J.shape == ref.shape, (J.shape, ref.shape)
    torch.testing.assert_close(J.detach().to("cpu", torch.float64), ref, rtol=rtol, atol=atol)
