"""The workloads of ``jacbatch bench`` and the methods that compute them.

A :class:`Case` is one function of ``(A, W, B)`` at one batch size, shape and dtype,
differentiated w.r.t. ``W``. A :class:`Method` builds, for a case, a zero-argument callable that
returns the case's batched Jacobian ``(B, *out_shape, *in_shape)``: a route of
:func:`jacbatch.jacobian` (group ``"jacbatch"``), the code a user would otherwise write
(``"baseline"``), or a physical reference of the Jacobian's size (``"reference"``: filling or
copying memory, the write bound).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .. import affine, jacobian  # the public API only
from .. import methods as _methods

ARGNUM = 1  # every case differentiates w.r.t. W


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def affine_tanh(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``tanh(A @ W + B)`` for one sample: ``A (m, p)``, ``W (p, q)``, ``B (q,)`` -> ``(m, q)``."""
    return torch.tanh(affine(A, W, B))


def affine_sum(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(A @ W + B).sum()`` for one sample: a scalar, so its Jacobian is the gradient ``(p, q)``."""
    return affine(A, W, B).sum()


#: The functions a case may use, by :attr:`Case.kind`. All three have closed forms: the op
#: rules compose them from the traced torch code.
FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "affine": affine,
    "tanh": affine_tanh,
    "sum": affine_sum,
}


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``func(A, W, B)`` for a batch, differentiated w.r.t. ``W``.

    Attributes:
        name: e.g. ``"affine-small"``; with the dtype, ``"affine-small/float64"``.
        kind: ``"affine"``, ``"tanh"`` or ``"sum"`` (see :data:`FUNCTIONS`).
        B, m, p, q: batch size and ``A (m, p)``, ``W (p, q)``, ``B (q,)``.
        dtype: ``"float32"`` or ``"float64"``.
    """

    name: str
    kind: str
    B: int
    m: int
    p: int
    q: int
    dtype: str = "float32"

    @property
    def id(self) -> str:
        return f"{self.name}/{self.dtype}"

    @property
    def func(self) -> Callable[..., torch.Tensor]:
        return FUNCTIONS[self.kind]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return () if self.kind == "sum" else (self.m, self.q)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.p, self.q)

    @property
    def jacobian_shape(self) -> tuple[int, ...]:
        return (self.B, *self.out_shape, *self.in_shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def jacobian_bytes(self) -> int:
        return math.prod(self.jacobian_shape) * self.torch_dtype.itemsize

    def inputs(self, device: str | torch.device = "cpu", seed: int = 0) -> list[torch.Tensor]:
        """``[A (B, m, p), W (B, p, q), Bias (B, q)]``, reproducible."""
        g = torch.Generator().manual_seed(seed)
        shapes = [(self.B, self.m, self.p), (self.B, self.p, self.q), (self.B, self.q)]
        return [torch.randn(s, generator=g, dtype=self.torch_dtype).to(device) for s in shapes]


def _full_cases() -> list[Case]:
    base = [
        Case("affine-small", "affine", 1024, 8, 8, 8),
        Case("affine-medium", "affine", 64, 32, 32, 32),
        Case("affine-large", "affine", 8, 64, 64, 64),
        Case("affine-wide", "affine", 16, 16, 128, 16),
        Case("tanh-medium", "tanh", 64, 32, 32, 32),
        Case("sum-medium", "sum", 64, 32, 32, 32),
    ]
    return base + [Case(c.name, c.kind, c.B, c.m, c.p, c.q, "float64") for c in base]


def _quick_cases() -> list[Case]:
    # Same names and shapes' character (wide stays wide), sizes small enough for a smoke test.
    base = [
        Case("affine-small", "affine", 16, 3, 3, 3),
        Case("affine-medium", "affine", 4, 5, 5, 5),
        Case("affine-large", "affine", 2, 6, 6, 6),
        Case("affine-wide", "affine", 2, 3, 9, 3),
        Case("tanh-medium", "tanh", 4, 5, 5, 5),
        Case("sum-medium", "sum", 4, 5, 5, 5),
    ]
    return base + [Case(c.name, c.kind, c.B, c.m, c.p, c.q, "float64") for c in base]


#: The cases of a full run (``jacbatch bench``), float32 then float64.
CASES: tuple[Case, ...] = tuple(_full_cases())
#: The same cases, scaled down (``jacbatch bench --quick`` and the smoke tests).
QUICK_CASES: tuple[Case, ...] = tuple(_quick_cases())
CASE_NAMES: tuple[str, ...] = tuple(dict.fromkeys(c.name for c in CASES))
DTYPES: tuple[str, ...] = ("float32", "float64")


def select_cases(
    names: Sequence[str] | None = None, dtypes: Sequence[str] | None = None, quick: bool = False
) -> list[Case]:
    """The cases named (all when ``None``) in the dtypes given (all when ``None``)."""
    pool = QUICK_CASES if quick else CASES
    return [
        c
        for c in pool
        if (names is None or c.name in names) and (dtypes is None or c.dtype in dtypes)
    ]


# ---------------------------------------------------------------------------------------------
# Methods: each builds a zero-argument callable for one case (or None when it does not apply)
# ---------------------------------------------------------------------------------------------

Runner = Callable[[], Any]

#: Why the JAX baselines do not run without JAX (shown under each table).
JAX_MISSING = "JAX not installed (pip install 'jacbatch[jax]')"


class NotApplicable(Exception):
    """Raised by :attr:`Method.build` when the method does not apply to a case; the message says
    why (e.g. :data:`JAX_MISSING`) and appears under the case's table."""


@dataclass(frozen=True)
class Method:
    """A way to get the case's Jacobian (or a physical reference of its size).

    Attributes:
        name: as shown in tables and JSON.
        group: ``"jacbatch"`` (a route of :func:`jacbatch.jacobian`), ``"baseline"`` (what a
            user would otherwise write) or ``"reference"`` (memory traffic of the output's size).
        build: ``(case, args, device) -> runner or None``; the runner returns the Jacobian
            ``(B, *out_shape, *in_shape)`` (a reference returns its buffer). It raises
            :class:`NotApplicable` with the reason (or returns ``None``) when the method does not
            apply to the case. A jacbatch route that cannot serve a case raises
            ``NotImplementedError`` on its first call, which the runner reports as not applying.
        slow: a per-sample Python loop; fewer repetitions.
    """

    name: str
    group: str
    build: Callable[[Case, list[torch.Tensor], torch.device], Runner | None]
    slow: bool = False


def _route(method: str, with_out: bool = False) -> Callable[..., Runner | None]:
    def build(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner | None:
        call = partial(jacobian, case.func, *args, argnums=ARGNUM, method=method)
        if not with_out:
            return call
        buf = torch.empty(case.jacobian_shape, dtype=case.torch_dtype, device=device)
        return partial(call, out=buf)

    return build


def _vmap_jacrev(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    f = torch.func.vmap(torch.func.jacrev(case.func, argnums=ARGNUM))
    return lambda: f(*args)


def _functional_loop(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    A, W, Bias = args

    def run() -> torch.Tensor:
        out = []
        for b in range(case.B):
            f = partial(lambda w, a, c: case.func(a, w, c), a=A[b], c=Bias[b])
            out.append(torch.autograd.functional.jacobian(f, W[b], vectorize=True))
        return torch.stack(out)

    return run


def _onehot_loop(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    A, W, Bias = args
    o = math.prod(case.out_shape)
    basis = torch.eye(o, dtype=case.torch_dtype, device=device)

    def run() -> torch.Tensor:
        J = torch.empty(case.B, o, *case.in_shape, dtype=case.torch_dtype, device=device)
        for b in range(case.B):
            w = W[b].detach().requires_grad_(True)
            with torch.enable_grad():
                y = case.func(A[b], w, Bias[b])
            for k in range(o):
                (J[b, k],) = torch.autograd.grad(
                    y, w, basis[k].view(y.shape), retain_graph=k < o - 1
                )
        return J.view(case.jacobian_shape)

    return run


def _alloc_fill(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    shape, dtype = case.jacobian_shape, case.torch_dtype
    return lambda: torch.empty(shape, dtype=dtype, device=device).fill_(1.0)


def _fill_existing(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    buf = torch.empty(case.jacobian_shape, dtype=case.torch_dtype, device=device)
    return lambda: buf.fill_(1.0)


def _copy_existing(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner:
    src = torch.ones(case.jacobian_shape, dtype=case.torch_dtype, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def jax_available() -> bool:
    """Whether JAX can be imported (the JAX baselines run only then)."""
    try:
        import jax  # noqa: F401
    except Exception:
        return False
    return True


def _jax(kind: str) -> Callable[..., Runner | None]:
    def build(case: Case, args: list[torch.Tensor], device: torch.device) -> Runner | None:
        if not jax_available():
            raise NotApplicable(JAX_MISSING)
        if kind == "closed_form" and case.kind != "affine":
            raise NotApplicable("the hand-written JAX closed form covers A @ W + B only")
        import jax
        import jax.numpy as jnp

        if case.dtype == "float64":
            jax.config.update("jax_enable_x64", True)
        platform_name = "gpu" if device.type == "cuda" else "cpu"
        jdev = jax.devices(platform_name)[0]
        A, W, Bias = (jax.device_put(a.detach().cpu().numpy(), jdev) for a in args)

        def f(a: Any, w: Any, c: Any) -> Any:
            z = a @ w + c
            if case.kind == "tanh":
                return jnp.tanh(z)
            if case.kind == "sum":
                return z.sum()
            return z

        if kind == "closed_form":  # J[b, i, j, k, l] = A[b, i, k] δ(j, l)
            eye = jnp.eye(case.q, dtype=A.dtype)
            fn = jax.jit(lambda a, w, c: jnp.einsum("bik,jl->bijkl", a, eye))
        else:
            transform = jax.jacrev if kind == "jacrev" else jax.jacfwd
            fn = jax.jit(jax.vmap(transform(f, argnums=ARGNUM)))
        return lambda: fn(A, W, Bias).block_until_ready()

    return build


#: The jacbatch routes by name (:func:`jacbatch.methods.names`); ``auto`` is compared with them.
ROUTES: tuple[str, ...] = _methods.names()


def _jacbatch_methods() -> list[Method]:
    rows = []
    for name in (*ROUTES, "auto"):
        rows.append(Method(name, "jacbatch", _route(name)))
        if name == "closed_form":  # the write-bound figure: into a caller's buffer
            rows.append(Method("closed_form(out=)", "jacbatch", _route(name, with_out=True)))
    return rows


METHODS: tuple[Method, ...] = (
    *_jacbatch_methods(),
    Method("torch.func vmap(jacrev)", "baseline", _vmap_jacrev),
    Method("autograd.functional loop", "baseline", _functional_loop, slow=True),
    Method("one-hot vjp loop", "baseline", _onehot_loop, slow=True),
    Method("jax closed form", "baseline", _jax("closed_form")),
    Method("jax jit(vmap(jacrev))", "baseline", _jax("jacrev")),
    Method("jax jit(vmap(jacfwd))", "baseline", _jax("jacfwd")),
    Method("alloc+fill", "reference", _alloc_fill),
    Method("fill existing", "reference", _fill_existing),
    Method("copy existing", "reference", _copy_existing),
)
METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in METHODS)
#: The physical references (drawn dashed in plots).
REFERENCES: tuple[str, ...] = tuple(m.name for m in METHODS if m.group == "reference")
