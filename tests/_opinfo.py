"""The OpInfo sweep: every float64 autograd OpInfo of torch through every jacbatch route.

As torch.func's own ``test/functorch/test_ops.py`` does, each op's own sample inputs are used
(so the points are the ones torch's tests consider differentiable). For a sample
``op(input, *args, **kwargs)``:

* the batch is ``B = 3`` copies of ``input``: the sample itself and two small perturbations
  (``in_dims`` 0);
* the first floating tensor in ``args`` is either shared by the batch (``in_dims`` None,
  variant ``"shared"``) or batched too, each sample perturbed (variant ``"batched"``); every
  other argument, integer tensors and keyword arguments are closed over;
* an output that is not one floating tensor goes through the sample's
  ``output_process_fn_grad`` and then keeps only its floating tensors, flattened and
  concatenated.

The reference is the tests' per-sample ``torch.autograd.functional.jacobian`` loop in float64
(``tests/_reference.py``; it shares no code with jacbatch). Each (op, sample, variant, route)
is one of:

* ``agree``: jacbatch's Jacobian equals the reference (NaN where the reference has NaN);
* ``refused``: a clear error: a jacbatch error (``"jacobian: expected ..."``), or torch's own
  "not implemented" from forward AD or vmap;
* ``workaround``: agrees, and jacbatch ran the workaround of a known torch bug
  (:mod:`jacbatch._torch_bugs`) to get there;
* ``wrong``: a result that differs from the reference;
* ``error``: any other exception (a crash without a clear message).

Samples whose reference itself cannot be computed (the op rejects the perturbed inputs,
autograd raises) are not counted.
"""

from __future__ import annotations

import itertools
import re
import types
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import jacbatch
from jacbatch import _torch_bugs
from tests._reference import reference_jacobian

ROUTES = ("auto", *jacbatch.methods.names())  # every route a caller may ask for
OUTCOMES = ("agree", "workaround", "refused", "wrong", "error")
B = 3
#: float64 agreement between differently ordered computations (linalg, reductions)
RTOL, ATOL = 1e-7, 1e-7

#: torch's own words for "this transform does not support this op"
_TORCH_REFUSALS = re.compile(
    r"not implemented|not supported|does not support|doesn't support|NotImplemented|"
    r"batching rule|vmap: |Batching|forward AD|forward-mode|fw_grad|"
    r"data-dependent|\.item\(\)|requires_grad|mismatch in shape|randomness|"
    r"got a batched tensor as input while",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Case:
    """One (op, sample, variant): a per-sample function and its batched arguments."""

    name: str
    func: Callable[..., torch.Tensor]
    args: tuple[torch.Tensor, ...]
    in_dims: tuple[int | None, ...]
    supports_forward_ad: bool


#: OpInfos left out, with the reason (``name.variant``).
SKIPPED = {
    f"nn.functional.max_unpool{d}d.": "its samples repeat indices, where the derivative is not "
    "defined; torch tests its gradients on the 'grad' variant only (swept)"
    for d in (1, 2, 3)
}


def swept_ops() -> list[Any]:
    """Every OpInfo that supports autograd and float64 on the CPU (but :data:`SKIPPED`)."""
    from torch.testing._internal.common_methods_invocations import op_db

    return [
        op
        for op in op_db
        if op.supports_autograd
        and torch.float64 in op.supported_dtypes("cpu")
        and f"{op.name}.{op.variant_test_name}" not in SKIPPED
    ]


def _floating_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.dtype.is_floating_point else None
    if isinstance(out, (tuple, list)):
        parts = [
            o.reshape(-1) for o in out if isinstance(o, torch.Tensor) and o.dtype.is_floating_point
        ]
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return None


def _perturb(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    if k == 0:
        return x
    g = torch.Generator().manual_seed(seed * 7 + k)
    noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x + 1e-3 * noise * (1 + x.abs())


#: Largest differentiated input (elements) swept: the reference runs one backward per output.
MAX_INPUT = 256


def _small(sample: Any) -> bool:
    x = sample.input
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        return False
    others = [a for a in sample.args if isinstance(a, torch.Tensor)]
    if any(t.layout != torch.strided for t in [x, *others]):
        return False  # sparse layouts: jacbatch takes dense tensors
    return 0 < x.numel() <= MAX_INPUT and all(a.numel() <= 16 * MAX_INPUT for a in others)


def cases(
    op: Any, samples: int, variants: tuple[str, ...] = ("shared", "batched")
) -> Iterator[Case]:
    """The cases of ``op``: its first ``samples`` samples, in each variant that applies."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = op.sample_inputs("cpu", torch.float64, requires_grad=False)
        picked = list(itertools.islice(filter(_small, gen), samples))
    for s_idx, sample in enumerate(picked):
        x = sample.input
        args = list(sample.args)
        kwargs = dict(sample.kwargs)
        post = sample.output_process_fn_grad
        second = next(
            (
                i
                for i, a in enumerate(args)
                if isinstance(a, torch.Tensor) and a.dtype.is_floating_point and a.numel() > 0
            ),
            None,
        )
        for variant in variants:
            if variant == "batched" and second is None:
                continue

            def func(
                xx: torch.Tensor,
                *rest: torch.Tensor,
                _args: list[Any] = args,
                _s: int | None = second,
                _kwargs: dict[str, Any] = kwargs,
                _post: Any = post,
            ) -> torch.Tensor:
                call_args = list(_args)
                if rest:
                    call_args[_s] = rest[0]  # type: ignore[index]
                out = op.op(xx, *call_args, **_kwargs)
                out = _post(out) if _post is not None else out
                res = _floating_output(out)
                if res is None:
                    raise TypeError("no floating output")
                return res

            # One code object per case, as distinct user functions have: Dynamo's recompile
            # budget is per code object, and 537 ops through one closure would exhaust it.
            own = types.FunctionType(
                func.__code__.replace(),
                func.__globals__,
                func.__name__,
                func.__defaults__,
                func.__closure__,
            )
            own.__kwdefaults__ = func.__kwdefaults__
            func = own
            X = torch.stack([_perturb(x, k, s_idx) for k in range(B)])
            if variant == "batched":
                assert second is not None
                Y = torch.stack([_perturb(args[second], k, s_idx + 100) for k in range(B)])
                yield Case(
                    f"{op.name}.{op.variant_test_name or ''}[{s_idx}]/batched",
                    func,
                    (X, Y),
                    (0, 0),
                    op.supports_forward_ad,
                )
            else:
                yield Case(
                    f"{op.name}.{op.variant_test_name or ''}[{s_idx}]/shared",
                    func,
                    (X,),
                    (0,),
                    op.supports_forward_ad,
                )


def reference(case: Case) -> torch.Tensor:
    """The reference Jacobian w.r.t. the first argument: ``(B, *out, *in)``, float64.

    Raises where the sweep does not compare: an output that is not float64, an output too large
    for the sweep, per-sample output shapes that differ, or autograd failing on the sample.
    """

    def checked(*args: torch.Tensor) -> torch.Tensor:
        out = case.func(*args)
        if out.dtype != torch.float64:
            raise TypeError(f"output dtype {out.dtype}")
        if out.numel() > 4 * MAX_INPUT:
            raise ValueError("output too large for the sweep")
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reference_jacobian(checked, case.args, 0, case.in_dims)


#: Ops that draw random numbers (dropout, bernoulli, normal, rrelu, fractional max-pooling, the
#: randomized low-rank factorizations) are refused under the default ``randomness="error"``, as
#: under ``torch.func.vmap``: a draw of their own could never match the reference's draw. They
#: count as "refused" (see ``is_random_refusal``).
RANDOMNESS = "error"


def is_random_refusal(detail: str) -> bool:
    """Whether a refusal is the one for functions that draw random numbers."""
    return "draws random numbers" in detail or "randomness=" in detail


def _is_clear(err: BaseException, route: str) -> bool:
    msg = str(err)
    if msg.startswith(("jacobian:", "jacobian ")):
        return True
    if route in SPARSE and type(err).__name__ == "NoPatternError":  # detection's own refusal
        return True
    if route in ("jacfwd", "jacrev", "vjp", "auto", *SPARSE) and _TORCH_REFUSALS.search(msg):
        return isinstance(err, (RuntimeError, NotImplementedError, ValueError, TypeError))
    return False


#: Programs rather than routes: ``"auto:repeated"`` is ``method="auto"`` called until its key
#: is hot (the last call runs the program over the captured graph, NOTE [Repeated plain
#: calls]); ``"prepared"`` is :func:`jacbatch.prepare`'s program.
PROGRAMS = ("auto:repeated", "prepared")

#: The sparse path (``sparse=True``: detection, coloring, compressed passes, the pattern check),
#: compared through ``to_dense()``; ``"sparse:repeated"`` calls until its key is hot (NOTE
#: [Repeated sparse calls] in jacbatch/sparse/_hot.py), ``"sparse:closed_form"`` asks for the
#: traced closed form at the nonzeros (refused where the rules do not cover the op). Detection
#: may refuse an op
#: (``NoPatternError``, a ``NotImplementedError`` naming the call); it may never be wrong.
SPARSE = ("sparse", "sparse:repeated", "sparse:closed_form")


def _compute(case: Case, route: str) -> torch.Tensor:
    kw = {"argnums": 0, "in_dims": case.in_dims, "randomness": RANDOMNESS}
    if route in SPARSE:
        from jacbatch.sparse import _hot

        for _ in range(_hot.HOT_CALLS if route == "sparse:repeated" else 0):
            jacbatch.jacobian(case.func, *case.args, sparse=True, **kw)
        method = "closed_form" if route == "sparse:closed_form" else "auto"
        J = jacbatch.jacobian(case.func, *case.args, sparse=True, method=method, **kw)
        return J.to_dense()  # type: ignore[union-attr]
    if route == "prepared":
        return jacbatch.prepare(case.func, *case.args, **kw)(*case.args)  # type: ignore[return-value]
    if route == "auto:repeated":
        for _ in range(jacbatch.repeated.HOT_CALLS):
            jacbatch.jacobian(case.func, *case.args, **kw)
        route = "auto"
    return jacbatch.jacobian(case.func, *case.args, method=route, **kw)  # type: ignore[return-value]


def run_route(case: Case, route: str, ref: torch.Tensor) -> tuple[str, str]:
    """``(outcome, detail)`` of one route (or one of :data:`PROGRAMS`) on one case."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            J = _compute(case, route)
    except Exception as err:  # classified below
        line = (
            f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[
                :160
            ]
        )
        return ("refused" if _is_clear(err, route) else "error"), line
    if route in SPARSE and J.dim() == 3 and J.numel() == ref.numel():  # (B, out_numel, in_numel)
        J = J.reshape(ref.shape)
        ref = _structural_zeros(case, ref)
    if J.shape != ref.shape or J.dtype != ref.dtype:
        return "wrong", f"{tuple(J.shape)} {J.dtype} vs {tuple(ref.shape)} {ref.dtype}"
    scale = max(1.0, float(ref.nan_to_num(0.0, 0.0, 0.0).abs().max()) if ref.numel() else 1.0)
    ok = torch.allclose(J, ref, rtol=RTOL, atol=ATOL * scale, equal_nan=True)
    if not ok:
        diff = (J - ref).abs().nan_to_num(float("inf"))
        return "wrong", f"max |diff| {float(diff.max()):.3g}"
    bug = worked_around(case, route)
    return ("workaround", bug) if bug else ("agree", "")


def _structural_zeros(case: Case, ref: torch.Tensor) -> torch.Tensor:
    """``ref`` with its NaN outside the detected pattern set to zero: there the derivative is
    zero by the function's structure, and per-sample autograd's NaN is a ``0 · NaN`` of its
    pull-back (``entr`` at a negative input spreads NaN along its column); a sparse result
    holds no entry there (docs/sparse.md, "NaN and Inf")."""
    P = jacbatch.sparsity(case.func, *case.args, argnums=0, in_dims=case.in_dims)
    outside = ~P.to_mask().reshape(ref.shape[1:]).to(ref.device)
    return torch.where(outside & ref.isnan(), torch.zeros((), dtype=ref.dtype), ref)


def worked_around(case: Case, route: str) -> str:
    """The known torch bug whose workaround this call ran, or ``""`` (the sparse path routes
    around them by its choice of coloring, which its explain does not list as a workaround)."""
    if route in SPARSE:
        return ""
    route = "auto" if route in PROGRAMS else route
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = jacbatch.explain(
            case.func,
            *case.args,
            argnums=0,
            in_dims=case.in_dims,
            method=route,
            randomness=RANDOMNESS,
        )
    for note in plan.notes:
        if note.startswith(_torch_bugs.NOTE_PREFIX):
            return note
    return ""


def sweep(
    samples: int,
    variants: tuple[str, ...],
    routes: tuple[str, ...] = ROUTES,
    ops: list[Any] | None = None,
) -> tuple[dict[str, Counter[str]], list[tuple[str, str, str, str]]]:
    """Counts per route, and every (case, route, outcome, detail) that is not ``agree``."""
    counts: dict[str, Counter[str]] = {r: Counter() for r in routes}
    notable: list[tuple[str, str, str, str]] = []
    for op in ops if ops is not None else swept_ops():
        try:
            op_cases = list(cases(op, samples, variants))
        except Exception:  # the OpInfo's own sample generator fails on this build
            continue
        for case in op_cases:
            try:
                ref = reference(case)
            except Exception:
                continue
            for route in routes:
                outcome, detail = run_route(case, route, ref)
                counts[route][outcome] += 1
                if outcome != "agree":
                    notable.append((case.name, route, outcome, detail))
    return counts, notable


def table(counts: dict[str, Counter[str]]) -> str:
    """A markdown table of outcomes per route."""
    lines = [
        "| route | " + " | ".join(OUTCOMES) + " | total |",
        "|---" * (len(OUTCOMES) + 2) + "|",
    ]
    for r, c in counts.items():
        lines.append(
            f"| {r} | " + " | ".join(str(c[o]) for o in OUTCOMES) + f" | {sum(c.values())} |"
        )
    return "\n".join(lines)
