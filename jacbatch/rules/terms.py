"""Lettered Jacobian terms: the structured form op rules return and the traced route composes.

NOTE [Lettered Jacobian terms]
    Most local Jacobians of tensor ops are sparse in a very regular way: an elementwise map is
    diagonal, ``X @ Y`` w.r.t. ``Y`` is ``X ⊗ I``, a permutation is an identity with its axes
    reordered, a broadcast is an identity that ignores an index. All of them have the form

        J[b, o_1..o_r, i_1..i_s] = T[b, letters] · Π (deltas between axes that share a letter)

    where every output axis ``o_k`` and input axis ``i_k`` carries a *letter* (an index name,
    as in einsum), and ``T`` is a dense tensor over some of those letters. Two axes with the same
    letter must take the same value (a Kronecker delta, i.e. a diagonal or identity factor); a
    letter that is on an axis but not in ``T`` is either such a delta or "free" (``J`` does not
    depend on that index: a broadcast). A Jacobian is a sum of such terms (``diag(y) - y yᵀ`` for
    softmax has two).

    Composing ``L`` (v w.r.t. u) with ``J`` (u w.r.t. x) is one einsum: the u-axes of ``L`` and of
    ``J`` are the same index, so their letters are unified; letters that survive on v- or x-axes
    are kept, letters only in ``T`` factors are summed, and a unified u-letter in no factor and
    on no surviving axis contributes its size (a sum of ones). Deltas therefore never become
    dense: ``diag(1 - tanh²) ∘ (A ⊗ I_q)`` is the ``(B, m, q, p)`` tensor ``s[b,i,j] A[b,i,k]``
    with a delta ``j = l``, and only :func:`materialize` writes the ``(B, m, q, p, q)`` result.

    Axes of size 1 carry no information and are dropped from terms. A reshape is an identity on
    the flat index: where the shapes have a common refinement (e.g. ``(m*q,)`` vs ``(m, q)``),
    the affected letters are split into the refined axes (:func:`refine`), which keeps deltas
    intact; where they do not (``(2, 3)`` vs ``(3, 2)``), the term is made dense first.

A term's leading ``T`` axis is the batch: size ``B`` (per-sample factor) or 1 (shared by the
batch, broadcast). This module is the small interface between rules and outputs: a list of
:class:`Term` is the traced Jacobian; :func:`materialize` writes it densely, and a structured
(lazy) output can be built from the same list.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad

_LETTERS = itertools.count(1)

#: Largest dense term (elements) built when a reshape defeats the lettered form.
DENSE_LIMIT = 1 << 26


class Unsupported(Exception):
    """A rule or composition step cannot produce a closed form for this graph (fall back)."""


def keeps_graph(*ts: torch.Tensor) -> bool:
    """Whether writing ``ts`` in place into a fresh buffer would lose or break a graph.

    True when one of them carries an autograd graph (grad mode on), is wrapped by a torch.func
    transform (which refuses writes of a wrapped value into a plain tensor), is a forward-mode
    dual tensor (``out=`` ops have no forward derivative) or is a fake tensor being traced.
    Writers then compute out of place.
    """

    def has_tangent(t: torch.Tensor) -> bool:
        try:
            return forward_ad.unpack_dual(t).tangent is not None
        except RuntimeError:  # a value unpack_dual cannot look into: assume it has one
            return True

    grad = torch.is_grad_enabled()
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    dual = forward_ad._current_level >= 0
    return any(
        (grad and t.requires_grad)
        or wrapped(t)
        or isinstance(t, FakeTensor)
        or (dual and has_tangent(t))
        for t in ts
    )


def fresh() -> int:
    """A letter not used anywhere before."""
    return next(_LETTERS)


@dataclass(frozen=True)
class Term:
    """One term ``T[b, t] · Π deltas`` of a Jacobian with output axes ``out`` and input axes ``inp``.

    Attributes:
        T: ``(B or 1, *[sizes[l] for l in t])``; may be an expanded (stride-0) view.
        t: the letters of ``T``'s axes after the batch axis (distinct, each in ``out`` or ``inp``).
        out: one letter per output axis (axes of size 1 dropped).
        inp: one letter per input axis (axes of size 1 dropped).
        sizes: size of every letter used, all > 1.
    """

    T: torch.Tensor
    t: tuple[int, ...]
    out: tuple[int, ...]
    inp: tuple[int, ...]
    sizes: Mapping[int, int]

    @property
    def out_sizes(self) -> tuple[int, ...]:
        return tuple(self.sizes[x] for x in self.out)

    @property
    def in_sizes(self) -> tuple[int, ...]:
        return tuple(self.sizes[x] for x in self.inp)


def make(
    T: torch.Tensor | float,
    t: str,
    out: str,
    inp: str,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    like: torch.Tensor,
) -> Term:
    """Build a term from einsum-style letter strings, as rules write them.

    Args:
        T: the factor, ``(B or 1, *axes of t)`` (axes of size 1 broadcast), or a number.
        t: one character per non-batch axis of ``T``.
        out: one character per axis of the (per-sample) output, ``len(out_shape)`` of them.
        inp: one character per axis of the (per-sample) input, ``len(in_shape)`` of them.
        out_shape: per-sample output shape.
        in_shape: per-sample input shape.
        like: a tensor with the dtype and device for a numeric ``T``.

    Returns:
        The :class:`Term`, with fresh letters and size-1 axes dropped.
    """
    if len(out) != len(out_shape) or len(inp) != len(in_shape):
        raise ValueError(f"rule bug: letters {out!r}/{inp!r} for shapes {out_shape}/{in_shape}")
    if not isinstance(T, torch.Tensor):
        T = torch.full((1,) * (1 + len(t)), float(T), dtype=like.dtype, device=like.device)
    size: dict[str, int] = {}
    for ch, n in itertools.chain(zip(out, out_shape, strict=True), zip(inp, in_shape, strict=True)):
        if size.setdefault(ch, int(n)) != int(n):
            raise ValueError(f"rule bug: letter {ch!r} has sizes {size[ch]} and {n}")
    if T.ndim != 1 + len(t):
        raise ValueError(f"rule bug: factor of shape {tuple(T.shape)} for letters {t!r}")
    letter = {ch: fresh() for ch in size if size[ch] > 1}
    # broadcast / squeeze T's axes to the letters' sizes
    index: list[int | slice] = [slice(None)]
    target: list[int] = [T.shape[0]]
    t_letters = []
    for k, ch in enumerate(t):
        if ch not in size:
            raise ValueError(f"rule bug: factor letter {ch!r} is on no axis")
        n = size[ch]
        if n == 1:
            index.append(0)
            continue
        index.append(slice(None))
        target.append(n)
        t_letters.append(letter[ch])
        if T.shape[1 + k] not in (1, n):
            raise ValueError(f"rule bug: factor axis {ch!r} has size {T.shape[1 + k]}, not {n}")
    T = T[tuple(index)].expand(*target)
    return Term(
        T=T,
        t=tuple(t_letters),
        out=tuple(letter[c] for c in out if size[c] > 1),
        inp=tuple(letter[c] for c in inp if size[c] > 1),
        sizes={v: size[c] for c, v in letter.items()},
    )


def identity_reshape(out_shape: Sequence[int], in_shape: Sequence[int], like: torch.Tensor) -> Term:
    """The Jacobian of ``reshape`` (the identity on the flat row-major index).

    Shared letters over the common refinement of both shapes when there is one; a dense
    identity otherwise.
    """
    P = [int(n) for n in out_shape if n != 1]
    Q = [int(n) for n in in_shape if n != 1]
    R = common_refinement(P, Q)
    one = like.new_ones((1,))
    if R is not None:
        letters = tuple(fresh() for _ in R)
        sizes = dict(zip(letters, R, strict=True))
        return Term(T=one, t=(), out=letters, inp=letters, sizes=sizes)
    n = math.prod(P)
    _check_dense(n * n)
    out_l = tuple(fresh() for _ in P)
    in_l = tuple(fresh() for _ in Q)
    T = torch.eye(n, dtype=like.dtype, device=like.device).reshape(1, *P, *Q)
    return Term(T, out_l + in_l, out_l, in_l, dict(zip(out_l + in_l, P + Q, strict=True)))


# ---------------------------------------------------------------------------------------------
# Refinement (reshape support)
# ---------------------------------------------------------------------------------------------


def common_refinement(P: Sequence[int], Q: Sequence[int]) -> list[int] | None:
    """The coarsest list of sizes that splits both ``P`` and ``Q`` (row-major), or ``None``.

    Example:
        >>> common_refinement([6], [2, 3])
        [2, 3]
        >>> common_refinement([4, 6], [2, 12])
        [2, 2, 6]
        >>> common_refinement([2, 3], [3, 2]) is None
        True
    """
    P, Q = list(P), list(Q)
    R: list[int] = []
    i = j = 0
    p = q = None
    while True:
        if p is None and i < len(P):
            p, i = P[i], i + 1
        if q is None and j < len(Q):
            q, j = Q[j], j + 1
        if p is None or q is None:
            return R if p is None and q is None else None
        if p == q:
            R.append(p)
            p = q = None
        elif p % q == 0:
            R.append(q)
            p, q = p // q, None
        elif q % p == 0:
            R.append(p)
            q, p = q // p, None
        else:
            return None


def _split(term: Term, letter: int, parts: Sequence[int]) -> Term:
    new = [fresh() for _ in parts]
    sizes = {k: v for k, v in term.sizes.items() if k != letter}
    sizes.update(zip(new, parts, strict=True))

    def sub(xs: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(itertools.chain.from_iterable(new if x == letter else (x,) for x in xs))

    T = term.T
    if letter in term.t:
        k = 1 + term.t.index(letter)
        T = T.reshape(*T.shape[:k], *parts, *T.shape[k + 1 :])
    return Term(T, sub(term.t), sub(term.out), sub(term.inp), sizes)


def refine(term: Term, side: str, R: Sequence[int]) -> Term:
    """Split letters of ``term`` until its ``side`` (``"out"``/``"inp"``) axes have sizes ``R``."""
    while True:
        letters = term.out if side == "out" else term.inp
        sizes = [term.sizes[x] for x in letters]
        if sizes == list(R):
            return term
        if math.prod(sizes) != math.prod(R):
            raise Unsupported("refinement of a different number of elements")
        k = next(k for k, (a, b) in enumerate(zip(sizes, R, strict=False)) if a != b)
        a, b = sizes[k], R[k]
        if a < b or a % b:
            raise Unsupported(f"axes {sizes} cannot be split into {list(R)}")
        term = _split(term, letters[k], (b, a // b))


def densify(term: Term) -> Term:
    """The same Jacobian with one letter per axis and a dense factor."""
    n = math.prod(term.out_sizes) * math.prod(term.in_sizes) * term.T.shape[0]
    _check_dense(n)
    if keeps_graph(term.T):
        Y = _dense_term(term)
    else:
        Y = torch.zeros(
            term.T.shape[0],
            *term.out_sizes,
            *term.in_sizes,
            dtype=term.T.dtype,
            device=term.T.device,
        )
        write([term], Y)
    out_l = tuple(fresh() for _ in term.out)
    in_l = tuple(fresh() for _ in term.inp)
    sizes = dict(zip(out_l + in_l, term.out_sizes + term.in_sizes, strict=True))
    return Term(Y, out_l + in_l, out_l, in_l, sizes)


def regroup(term: Term, side: str, R: Sequence[int]) -> Term:
    """``term`` with its ``side`` axes of sizes ``R``: split letters, or densify and reshape."""
    try:
        return refine(term, side, R)
    except Unsupported:
        pass
    d = densify(term)
    no = len(d.out)
    T = d.T
    if side == "out":
        T = T.reshape(T.shape[0], *R, *T.shape[1 + no :])
        out_l, in_l = tuple(fresh() for _ in R), d.inp
    else:
        T = T.reshape(*T.shape[: 1 + no], *R)
        out_l, in_l = d.out, tuple(fresh() for _ in R)
    sizes = dict(zip(out_l + in_l, tuple(T.shape[1:]), strict=True))
    return Term(T, out_l + in_l, out_l, in_l, sizes)


def _check_dense(n: int) -> None:
    if n > DENSE_LIMIT:
        raise Unsupported(f"a dense intermediate of {n} elements would be needed")


# ---------------------------------------------------------------------------------------------
# Composition and sums
# ---------------------------------------------------------------------------------------------


def _einsum(ops: Sequence[tuple[torch.Tensor, Sequence[int]]], keep: Sequence[int]) -> torch.Tensor:
    """``einsum`` over integer letters with a leading batch axis (size B or 1) on every operand.

    When nothing is summed and no operand takes a diagonal, this is a broadcast product (an
    outer product along distinct letters), computed as such rather than through ``bmm``.
    """
    if all(len(set(ls)) == len(ls) and set(ls) <= set(keep) for _, ls in ops):
        pos = {x: k for k, x in enumerate(keep)}
        prod: torch.Tensor | None = None
        for X, ls in ops:
            Xp = X.permute(0, *sorted(range(1, X.ndim), key=lambda k: pos[ls[k - 1]]))
            present = dict(zip(sorted(ls, key=pos.__getitem__), Xp.shape[1:], strict=True))
            Xv = Xp.reshape(X.shape[0], *(present.get(x, 1) for x in keep))
            prod = Xv if prod is None else prod * Xv
        assert prod is not None
        return prod
    batched = [X.shape[0] != 1 for X, _ in ops]
    ids: dict[int, int] = {}

    def sub(letters: Iterable[int]) -> list[int]:
        return [ids.setdefault(x, len(ids) + 1) for x in letters]

    args: list[object] = []
    for (X, letters), bat in zip(ops, batched, strict=True):
        if bat:
            args += [X, [0, *sub(letters)]]
        else:
            args += [X[0], sub(letters)]
    res = sub(keep)
    if len(ids) >= 52:
        raise Unsupported("more than 51 distinct letters in one contraction")
    if any(batched):
        return torch.einsum(*args, [0, *res])
    return torch.einsum(*args, res).unsqueeze(0)


def compose(L: Term, J: Term) -> Term:
    """The chain rule ``L ∘ J`` for ``L`` (v w.r.t. u) and ``J`` (u w.r.t. x)."""
    if L.in_sizes != J.out_sizes:
        R = common_refinement(L.in_sizes, J.out_sizes)
        if R is None:
            R = [n for n in (math.prod(L.in_sizes),) if n > 1]
        L, J = regroup(L, "inp", R), regroup(J, "out", R)
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for a, b in zip(L.inp, J.out, strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra
    sizes = {find(k): v for k, v in itertools.chain(L.sizes.items(), J.sizes.items())}
    out = tuple(find(x) for x in L.out)
    inp = tuple(find(x) for x in J.inp)
    lt = [find(x) for x in L.t]
    jt = [find(x) for x in J.t]
    on_axes = set(out) | set(inp)
    keep = list(dict.fromkeys(x for x in lt + jt if x in on_axes))
    in_factors = set(lt) | set(jt)
    scale = math.prod(
        sizes[x] for x in {find(u) for u in L.inp} if x not in on_axes and x not in in_factors
    )
    if not lt and L.T.shape[0] == 1 and not (set(jt) - set(keep)) and len(set(jt)) == len(jt):
        T = J.T * L.T.reshape((1,) * J.T.ndim)  # scalar outer factor: no contraction needed
        T = T.permute(0, *(1 + jt.index(x) for x in keep))
    elif not jt and J.T.shape[0] == 1 and not (set(lt) - set(keep)) and len(set(lt)) == len(lt):
        T = L.T * J.T.reshape((1,) * L.T.ndim)
        T = T.permute(0, *(1 + lt.index(x) for x in keep))
    else:
        T = _einsum([(L.T, lt), (J.T, jt)], keep)
    if scale != 1:
        T = T * scale
    used = set(out) | set(inp)
    return Term(T, tuple(keep), out, inp, {k: v for k, v in sizes.items() if k in used})


def compose_sum(Ls: Sequence[Term], Js: Sequence[Term]) -> list[Term]:
    """``(Σ L) ∘ (Σ J)`` as a merged list of terms."""
    return merge([compose(L, J) for L in Ls for J in Js])


def _canonical(term: Term) -> tuple[object, ...]:
    rename: dict[int, int] = {}
    for x in term.out + term.inp:
        rename.setdefault(x, len(rename))
    return (
        tuple(rename[x] for x in term.out),
        tuple(rename[x] for x in term.inp),
        tuple(sorted(rename[x] for x in term.t)),
        tuple(term.sizes[x] for x in term.out + term.inp),
    )


def merge(terms: Sequence[Term]) -> list[Term]:
    """Add terms with the same letter pattern (so sums do not grow without bound)."""
    groups: dict[tuple[object, ...], Term] = {}
    for term in terms:
        key = _canonical(term)
        prev = groups.get(key)
        if prev is None:
            groups[key] = term
            continue
        # rename term's letters to prev's (same pattern) and add the factors
        m = dict(zip(term.out + term.inp, prev.out + prev.inp, strict=True))
        t = [m[x] for x in term.t]
        T = term.T.permute(0, *(1 + t.index(x) for x in prev.t))
        groups[key] = Term(prev.T + T, prev.t, prev.out, prev.inp, prev.sizes)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# Writing a Jacobian
# ---------------------------------------------------------------------------------------------


def _diagonal_view(Y: torch.Tensor, letters: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """View of ``Y (B, *axes)`` with one axis per distinct letter (shared letters: a diagonal)."""
    order = list(dict.fromkeys(letters))
    stride = dict.fromkeys(order, 0)
    size = {}
    for x, n, s in zip(letters, Y.shape[1:], Y.stride()[1:], strict=True):
        stride[x] += s
        size[x] = n
    view = Y.as_strided(
        (Y.shape[0], *(size[x] for x in order)),
        (Y.stride(0), *(stride[x] for x in order)),
        Y.storage_offset(),
    )
    return view, order


def _aligned(term: Term, order: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """``term.T`` permuted to ``order`` with missing letters broadcast, shape ``shape``."""
    pos = {x: k for k, x in enumerate(order)}
    T = term.T.permute(0, *sorted(range(1, term.T.ndim), key=lambda k: pos[term.t[k - 1]]))
    present = set(term.t)
    view = [T.shape[0]]
    it = iter(T.shape[1:])
    for x in order:
        view.append(next(it) if x in present else 1)
    return T.reshape(view).expand(*shape)


def write(terms: Sequence[Term], Y: torch.Tensor) -> torch.Tensor:
    """Write ``Σ terms`` into ``Y (B, *out_sizes, *in_sizes)`` (any strides); returns ``Y``.

    NOTE [Writing a lettered Jacobian once]
        A term with no shared letters is one broadcasting copy. A single term with a delta
        (a letter on two axes) is written as one broadcast multiply
        ``Y = Z ⊙ I_n`` where ``Z`` (``n`` times smaller than ``Y``) is the term with the second
        axis of its largest delta letter removed, so each entry of ``Y`` is written exactly once,
        like an allocate-and-fill. Otherwise ``Y`` is zeroed and every term is added into its
        diagonal view (only its nonzeros are touched).
    """
    if not terms:
        return Y.zero_()
    axes = terms[0].out + terms[0].inp
    if len(terms) == 1:
        term = terms[0]
        if len(set(axes)) == len(axes):
            D, order = _diagonal_view(Y, axes)
            D.copy_(_aligned(term, order, D.shape))
            return Y
        twice = [x for x in dict.fromkeys(axes) if axes.count(x) == 2]
        if twice:
            star = max(twice, key=lambda x: term.sizes[x])
            p1 = axes.index(star)
            p2 = axes.index(star, p1 + 1)
            rest = axes[:p2] + axes[p2 + 1 :]
            zshape = Y.shape[: 1 + p2] + Y.shape[2 + p2 :]
            if len(set(rest)) == len(rest):  # the factor itself, broadcast: no copy
                Z = _aligned(term, rest, (term.T.shape[0], *zshape[1:]))
            else:
                Z = _scatter([term], torch.empty(zshape, dtype=Y.dtype, device=Y.device), [rest])
            n = term.sizes[star]
            eye_shape = [1] * Y.ndim
            eye_shape[1 + p1] = eye_shape[1 + p2] = n
            I = torch.eye(n, dtype=Y.dtype, device=Y.device).reshape(eye_shape)
            Z = Z.unsqueeze(1 + p2)
            torch.mul(Z.expand(Y.shape[0], *Z.shape[1:]), I, out=Y)
            return Y
    return _scatter(terms, Y, [t.out + t.inp for t in terms])


def _scatter(terms: Sequence[Term], Y: torch.Tensor, axes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Zero ``Y`` (unless one delta-free term covers it) and add each term into its diagonal view.

    ``axes[k]`` are the letters of ``Y``'s non-batch axes for ``terms[k]``.
    """
    first = True
    if len(terms) > 1 or len(set(axes[0])) < len(axes[0]):
        Y.zero_()
        first = False
    for term, letters in zip(terms, axes, strict=True):
        D, order = _diagonal_view(Y, letters)
        T = _aligned(term, order, D.shape)
        if first:
            D.copy_(T)
            first = False
        else:
            D.add_(T)
    return Y


def _refined(
    terms: Sequence[Term], out_shape: Sequence[int], in_shape: Sequence[int]
) -> list[Term]:
    """``terms`` brought to one refinement of ``out_shape``/``in_shape`` (the same axis sizes)."""
    P = [int(n) for n in out_shape if n != 1]
    Q = [int(n) for n in in_shape if n != 1]
    terms = list(terms)
    for side, base in (("out", P), ("inp", Q)):
        R: list[int] | None = base
        for term in terms:
            if R is not None:
                R = common_refinement(R, term.out_sizes if side == "out" else term.in_sizes)
        terms = [regroup(term, side, R if R is not None else base) for term in terms]
    return terms


def _dense_term(term: Term) -> torch.Tensor:
    """``term`` as a dense ``(B or 1, *out_sizes, *in_sizes)`` tensor, out of place.

    One broadcast product of the factor with an identity per repeated letter (a delta): torch
    ops only, so autograd and torch.func differentiate it (the result may be an expanded view).
    """
    ops: list[tuple[torch.Tensor, Sequence[int]]] = [(term.T, term.t)]
    keep: list[int] = []
    for x in term.out + term.inp:
        if x in keep:  # a second axis with this letter: δ(x, y) with a fresh letter y
            y = fresh()
            n = term.sizes[x]
            ops.append((torch.eye(n, dtype=term.T.dtype, device=term.T.device)[None], (x, y)))
            keep.append(y)
        else:
            keep.append(x)
    D = _einsum(ops, keep)
    return D.expand(D.shape[0], *term.out_sizes, *term.in_sizes)


def dense(
    terms: Sequence[Term],
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    batch_size: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """The Jacobian ``Σ terms`` as a new ``(B, *out_shape, *in_shape)`` tensor, out of place.

    What :func:`materialize` writes, computed with out-of-place torch ops on the factors, so the
    result stays differentiable w.r.t. whatever the factors depend on (autograd, or an outer
    torch.func transform whose wrapped values cannot be written into a plain buffer).
    ``like`` gives the dtype and device of an all-zero result.
    """
    shape = (batch_size, *out_shape, *in_shape)
    terms = _refined(terms, out_shape, in_shape)
    if not terms:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    for term in terms:
        if term.T.shape[0] not in (1, batch_size):
            raise ValueError("rule bug: factor batch size differs from the call's")
    parts = [_dense_term(term) for term in terms]
    Y = parts[0]
    for part in parts[1:]:
        Y = Y + part
    Y = Y.expand(batch_size, *Y.shape[1:]).reshape(shape)
    # a single term may still be a view of a factor (e.g. of an argument): never return one
    return Y.clone() if len(parts) == 1 else Y


def materialize(
    terms: Sequence[Term],
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    Y: torch.Tensor,
) -> torch.Tensor:
    """Write the Jacobian ``Σ terms`` into ``Y``, a ``(B, *out_shape, *in_shape)`` view (any strides).

    Terms' axes may refine ``out_shape``/``in_shape``; they are brought to one refinement first.
    For a result that must stay differentiable, use :func:`dense` (out of place) instead.
    """
    P = [int(n) for n in out_shape if n != 1]
    Q = [int(n) for n in in_shape if n != 1]
    terms = _refined(terms, out_shape, in_shape)
    Ro = terms[0].out_sizes if terms else tuple(P)
    Ri = terms[0].in_sizes if terms else tuple(Q)
    Yv = Y.view(Y.shape[0], *Ro, *Ri)  # drops size-1 axes and splits others: always a view
    for term in terms:
        if term.T.shape[0] not in (1, Y.shape[0]):
            raise ValueError("rule bug: factor batch size differs from the call's")
    write(terms, Yv)
    return Y
