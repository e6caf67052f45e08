"""jacbatch.check: agreement is reported, and disagreement is caught."""

from __future__ import annotations

import torch

import jacbatch


class WrongBackward(torch.autograd.Function):
    """x**2 with a correct forward-mode rule and a wrong reverse-mode one (3x instead of 2x)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**2

    @staticmethod
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x

    @staticmethod
    def jvp(ctx, tangent):
        (x,) = ctx.saved_tensors
        return 2 * x * tangent


def test_agreeing_routes_are_ok_and_the_table_lists_them():
    A = torch.randn(3, 2, 4, dtype=torch.float64)
    report = jacbatch.check(
        jacbatch.affine,
        A,
        torch.randn(4, 3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
        argnums=(0, 1),
        in_dims=(0, None, None),
    )
    assert report.ok, str(report)
    assert report.routes == ("closed_form", "jacrev", "jacfwd", "vjp", "finite_difference")
    assert report.max_diff[("closed_form", "jacrev")] < 1e-12
    text = str(report)
    assert "OK" in text and "finite_difference" in text


def test_float32_uses_the_float32_tolerance():
    x = torch.randn(4, 5)
    report = jacbatch.check(lambda v: torch.softmax(v, -1), x)
    assert report.ok, str(report)
    assert report.dtype == torch.float32


def test_a_wrong_backward_is_caught():
    x = torch.randn(4, 3, dtype=torch.float64)
    report = jacbatch.check(WrongBackward.apply, x)
    assert not report.ok
    assert ("jacrev", "jacfwd") in report.failures
    assert ("vjp", "finite_difference") in report.failures
    assert ("jacfwd", "finite_difference") not in report.failures
    assert "MISMATCH" in str(report) and "*" in str(report)


def test_a_route_that_raises_is_reported_not_hidden():
    class NoForwardMode(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    report = jacbatch.check(NoForwardMode.apply, torch.randn(2, 3, dtype=torch.float64))
    assert not report.ok
    assert "jacfwd" in report.errors
    assert "jacfwd failed" in str(report)
