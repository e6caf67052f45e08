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


# ---------------------------------------------------------------------------------------------
# Every function jacobian accepts: float32 closures, modules, shared arguments, tuple argnums
# ---------------------------------------------------------------------------------------------


def test_float32_closure_uses_a_float32_difference():
    torch.manual_seed(0)
    W = torch.randn(5, 3)
    report = jacbatch.check(lambda x: torch.tanh(x @ W), torch.randn(4, 5))
    assert report.ok, str(report)
    assert report.finite_difference_dtype == torch.float32
    assert "finite difference in torch.float32" in str(report)
    assert report.max_diff[("jacrev", "finite_difference")] > 0  # it really ran


def test_float32_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    report = jacbatch.check(model, torch.randn(3, 4))
    assert report.ok, str(report)
    assert report.finite_difference_dtype == torch.float32


def test_float32_shared_arguments_and_tuple_argnums():
    torch.manual_seed(0)
    b = torch.randn(3)  # closed over, float32
    f = lambda x, w: torch.sin(x @ w + b)  # noqa: E731
    report = jacbatch.check(
        f, torch.randn(4, 2), torch.randn(2, 3), argnums=(0, 1), in_dims=(0, None)
    )
    assert report.ok, str(report)


def test_float64_function_keeps_the_float64_difference():
    W = torch.randn(5, 3, dtype=torch.float64)
    report = jacbatch.check(lambda x: torch.tanh(x @ W), torch.randn(4, 5, dtype=torch.float64))
    assert report.ok, str(report)
    assert report.finite_difference_dtype == torch.float64
    assert report.max_diff[("jacrev", "finite_difference")] < 1e-8


def test_float32_arguments_of_a_function_that_runs_in_float64():
    w = torch.randn(3, dtype=torch.float64)  # computes in float64, returns float32
    report = jacbatch.check(lambda x: torch.sin(x.double() * w).float(), torch.randn(4, 3))
    assert report.ok, str(report)
    assert report.finite_difference_dtype == torch.float32  # float64 in, float32 out


def test_a_wrong_backward_is_caught_in_float32():
    x = torch.randn(4, 3)
    report = jacbatch.check(WrongBackward.apply, x)
    assert not report.ok
    assert report.finite_difference_dtype == torch.float64  # x**2 runs in float64 too
    assert ("vjp", "finite_difference") in report.failures
    assert ("jacfwd", "finite_difference") not in report.failures


def test_a_wrong_backward_inside_a_float32_module_is_caught():
    class Square(torch.nn.Module):
        def forward(self, x):
            return WrongBackward.apply(x)

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Square())
    report = jacbatch.check(model, torch.randn(4, 3))
    assert not report.ok
    assert ("jacrev", "finite_difference") in report.failures
