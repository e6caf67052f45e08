"""Lettered Jacobian terms: the one structured form op rules return, the chain rule composes,
the writer (:mod:`jacbatch.rules.write`) materializes and :mod:`jacbatch.structured` applies lazily.

NOTE [Lettered Jacobian terms]
    Most local Jacobians of tensor ops are sparse in a very regular way: an elementwise map is
    diagonal, ``X @ Y`` w.r.t. ``Y`` is ``X ⊗ I``, a permutation is an identity with its axes
    reordered, a broadcast is an identity that ignores an index. All of them, and their chain-rule
    products, have the form

        J[b, o_1..o_r, i_1..i_s] = c · Π_f F_f[b, letters of f] · Π (deltas between axes that share a letter)

    where every output axis ``o_k`` and input axis ``i_k`` carries a *letter* (an index name,
    as in einsum), each factor ``F_f`` is a dense tensor over some of those letters and ``c`` is a
    number. Two axes with the same letter must take the same value (a Kronecker delta, i.e. a
    diagonal or identity factor); a letter that is on an axis but in no factor is either such a
    delta or "free" (``J`` does not depend on that index: a broadcast). A Jacobian is a sum of such
    terms (``diag(y) - y yᵀ`` for softmax has two).

    Composing ``L`` (v w.r.t. u) with ``J`` (u w.r.t. x) matches letters: the u-axes of ``L`` and
    of ``J`` are the same index, so their letters are unified. Nothing is multiplied: the factor
    lists are concatenated (:func:`chain_rule`). ``diag(1 - tanh²) ∘ (A ⊗ I_q)`` is the term with
    factors ``s[b, i, j]`` (``(B, m, q)``) and ``A[b, i, k]`` and a delta ``j = l``: the
    ``(B, m, q, p)`` product is never formed unless it is written out. Contraction happens only
    when asked for:

    * a unified letter left in factors but on no surviving axis is summed: the factors holding it
      are contracted together (one einsum, its order chosen by :func:`contract`);
    * a letter in no factor and on no surviving axis is a sum of ones: its size joins ``c``;
    * a term with more than :data:`MAX_FACTORS` factors is contracted to one;
    * the writer and :func:`dense` form the product where they write it.

    Free merges are made at once: a factor whose letters are a subset of another's (e.g.
    ``diag(s) ∘ diag(t)``, or a per-row scale) is multiplied into it (no growth), numbers join
    ``c`` (never a full-size multiply by a ``(1, 1, 1, 1)`` tensor).

    Axes of size 1 carry no information and are dropped from terms. A reshape is an identity on
    the flat index: where the shapes have a common refinement (e.g. ``(m*q,)`` vs ``(m, q)``),
    the affected letters are split into the refined axes (:func:`refine`), which keeps deltas
    intact; where they do not (``(2, 3)`` vs ``(3, 2)``), the term is made dense first.

NOTE [Why several factors and not one]
    A term used to hold one dense factor, so every chain-rule step contracted everything into it:
    ``tanh(A @ W + B)`` w.r.t. ``W`` became a ``(B, m, q, p)`` factor, the same size as the
    Jacobian divided by ``q``, and ``L ⊗ R`` could not stay lazy. With a factor list the same
    Jacobian holds ``(B, m, q)`` and ``(B, m, p)``; a lazy operator
    (:class:`jacbatch.structured.TermJacobian`) applies it with a few small einsums per vector,
    and the writer forms the product only where it writes the dense result (one pass over it,
    as before). The factor list is bounded so that long chains of ops never keep a pile of
    factors that a contraction would have made smaller.

A factor's leading axis is the batch: size ``B`` (per-sample factor) or 1 (shared by the
batch, broadcast).

This module is about 700 lines, over the project's 600: the term type, its contraction,
refinement and the chain rule are one piece of algebra that changes together (the writer, which
only reads terms, lives in :mod:`jacbatch.rules.write`).
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
#: Most factors a term keeps before they are contracted into one (NOTE [Lettered Jacobian terms]).
MAX_FACTORS = 4

#: A factor: a tensor ``(B or 1, *[sizes[l] for l in letters])`` and its (distinct) letters.
Factor = tuple[torch.Tensor, tuple[int, ...]]


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
    """One term ``c · Π F[b, letters] · Π deltas`` of a Jacobian (NOTE [Lettered Jacobian terms]).

    Attributes:
        factors: the dense factors ``(T, letters)``; ``T`` is ``(B or 1, *sizes of letters)``
            (possibly an expanded view); every letter is on an output or input axis.
        out: one letter per output axis (axes of size 1 dropped).
        inp: one letter per input axis (axes of size 1 dropped).
        sizes: size of every letter on an axis, all > 1.
        scale: the number ``c``.
        dtype: dtype of the Jacobian.
        device: device of the Jacobian.
    """

    factors: tuple[Factor, ...]
    out: tuple[int, ...]
    inp: tuple[int, ...]
    sizes: Mapping[int, int]
    scale: float
    dtype: torch.dtype
    device: torch.device

    @property
    def out_sizes(self) -> tuple[int, ...]:
        return tuple(self.sizes[x] for x in self.out)

    @property
    def in_sizes(self) -> tuple[int, ...]:
        return tuple(self.sizes[x] for x in self.inp)

    @property
    def batch(self) -> int:
        """The factors' batch size (1 when every factor is shared)."""
        return max((T.shape[0] for T, _ in self.factors), default=1)

    def transposed(self) -> Term:
        """The term of the transposed Jacobian (inputs and outputs swapped)."""
        return Term(
            self.factors, self.inp, self.out, self.sizes, self.scale, self.dtype, self.device
        )


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
        like: a tensor with the dtype and device of the Jacobian.

    Returns:
        The :class:`Term`, with fresh letters and size-1 axes dropped; a factor axis of size 1
        (broadcast) is dropped too (the factor does not depend on that letter).
    """
    if not isinstance(T, torch.Tensor):
        return from_factors([], out, inp, out_shape, in_shape, like, float(T))
    return from_factors([(T, t)], out, inp, out_shape, in_shape, like)


def from_factors(
    factors: Sequence[tuple[torch.Tensor, str]],
    out: str,
    inp: str,
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    like: torch.Tensor,
    scale: float = 1.0,
) -> Term:
    """:func:`make` with several factors ``(T, t)`` (each as ``make``'s ``T`` and ``t``)."""
    if len(out) != len(out_shape) or len(inp) != len(in_shape):
        raise ValueError(f"rule bug: letters {out!r}/{inp!r} for shapes {out_shape}/{in_shape}")
    size: dict[str, int] = {}
    for ch, n in itertools.chain(zip(out, out_shape, strict=True), zip(inp, in_shape, strict=True)):
        if size.setdefault(ch, int(n)) != int(n):
            raise ValueError(f"rule bug: letter {ch!r} has sizes {size[ch]} and {n}")
    letter = {ch: fresh() for ch in size if size[ch] > 1}
    sizes = {v: size[c] for c, v in letter.items()}
    outl = tuple(letter[c] for c in out if size[c] > 1)
    inl = tuple(letter[c] for c in inp if size[c] > 1)
    fs: list[Factor] = []
    for T, t in factors:
        if T.ndim != 1 + len(t):
            raise ValueError(f"rule bug: factor of shape {tuple(T.shape)} for letters {t!r}")
        index: list[int | slice] = [slice(None)]
        t_letters = []
        for k, ch in enumerate(t):
            if ch not in size:
                raise ValueError(f"rule bug: factor letter {ch!r} is on no axis")
            n, have = size[ch], T.shape[1 + k]
            if have not in (1, n):
                raise ValueError(f"rule bug: factor axis {ch!r} has size {have}, not {n}")
            if n == 1 or have == 1:  # size-1 axis, or broadcast: the factor ignores this letter
                index.append(0)
                continue
            index.append(slice(None))
            t_letters.append(letter[ch])
        fs.append((T[tuple(index)], tuple(t_letters)))
    return normalize(fs, outl, inl, sizes, scale, like.dtype, like.device)


def identity_reshape(out_shape: Sequence[int], in_shape: Sequence[int], like: torch.Tensor) -> Term:
    """The Jacobian of ``reshape`` (the identity on the flat row-major index).

    Shared letters over the common refinement of both shapes when there is one; a dense
    identity otherwise.
    """
    P = [int(n) for n in out_shape if n != 1]
    Q = [int(n) for n in in_shape if n != 1]
    R = common_refinement(P, Q)
    if R is not None:
        letters = tuple(fresh() for _ in R)
        sizes = dict(zip(letters, R, strict=True))
        return Term((), letters, letters, sizes, 1.0, like.dtype, like.device)
    n = math.prod(P)
    _check_dense(n * n)
    out_l = tuple(fresh() for _ in P)
    in_l = tuple(fresh() for _ in Q)
    T = torch.eye(n, dtype=like.dtype, device=like.device).reshape(1, *P, *Q)
    sizes = dict(zip(out_l + in_l, P + Q, strict=True))
    return Term(((T, out_l + in_l),), out_l, in_l, sizes, 1.0, like.dtype, like.device)


# ---------------------------------------------------------------------------------------------
# Contraction
# ---------------------------------------------------------------------------------------------


def _einsum(ops: Sequence[Factor], keep: Sequence[int]) -> torch.Tensor:
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


def _path(ops: Sequence[Factor], keep: Sequence[int]) -> list[tuple[int, ...]]:
    """The pairwise contraction order (opt_einsum's ``contract_path`` format) for ``ops``.

    NOTE [Contraction order]
        The order of a multi-operand contraction decides its cost by orders of magnitude
        (``s·A·x`` contracted as ``(s·A)·x`` forms an ``(m, q, p)`` intermediate, as
        ``s·(A·x)`` only ``(m, q)``). opt_einsum's path search (the library behind
        ``torch.backends.opt_einsum``) is used when it is installed; without it a greedy order is
        used (repeatedly the pair with the smallest result), which is right for the common
        chains (a vector through a diagonal-times-Kronecker term).
    """
    try:
        import opt_einsum
    except ImportError:
        return _greedy_path(ops, keep)
    chars: dict[int, str] = {}
    for _, ls in ops:
        for x in ls:
            chars.setdefault(x, opt_einsum.get_symbol(len(chars) + 1))
    bsym = opt_einsum.get_symbol(0)
    terms_ = []
    shapes = []
    for X, ls in ops:
        lead = bsym if X.shape[0] != 1 else ""
        terms_.append(lead + "".join(chars[x] for x in ls))
        shapes.append(tuple(X.shape[1:]) if not lead else tuple(X.shape))
    batched = any(X.shape[0] != 1 for X, _ in ops)
    rhs = (bsym if batched else "") + "".join(chars[x] for x in keep if x in chars)
    try:
        path, _ = opt_einsum.contract_path(
            ",".join(terms_) + "->" + rhs, *shapes, shapes=True, optimize="auto"
        )
    except Exception:  # any failure of the optional search: the plain greedy order
        return _greedy_path(ops, keep)
    return [tuple(p) for p in path]


def _greedy_path(ops: Sequence[Factor], keep: Sequence[int]) -> list[tuple[int, ...]]:
    """Without opt_einsum: repeatedly contract the pair with the smallest result."""
    size: dict[int, int] = {}
    items: list[tuple[set[int], bool]] = []
    for X, ls in ops:
        size.update(zip(ls, X.shape[1:], strict=True))
        items.append((set(ls), X.shape[0] != 1))
    path: list[tuple[int, ...]] = []
    while len(items) > 1:
        best: tuple[int, int, int] | None = None
        for a, b in itertools.combinations(range(len(items)), 2):
            others = set(keep).union(*(items[k][0] for k in range(len(items)) if k not in (a, b)))
            res = (items[a][0] | items[b][0]) & others
            cost = math.prod(size[x] for x in res)
            if best is None or cost < best[0]:
                best = (cost, a, b)
        assert best is not None
        _, a, b = best
        others = set(keep).union(*(items[k][0] for k in range(len(items)) if k not in (a, b)))
        merged = ((items[a][0] | items[b][0]) & others, items[a][1] or items[b][1])
        items = [it for k, it in enumerate(items) if k not in (a, b)] + [merged]
        path.append((a, b))
    return path


def contract(ops: Sequence[Factor], keep: Sequence[int]) -> torch.Tensor:
    """``Π ops`` summed over every letter not in ``keep``: ``(B or 1, *sizes of keep)``.

    Pairwise, in the order of :func:`_path` (NOTE [Contraction order]). Every letter of
    ``keep`` must be in some operand.
    """
    items = list(ops)
    if len(items) <= 2:
        return _einsum(items, keep)
    for pair in _path(items, keep):
        picked = [items[k] for k in pair]
        rest = [items[k] for k in range(len(items)) if k not in pair]
        needed = set(keep).union(*(set(ls) for _, ls in rest))
        letters = list(dict.fromkeys(x for _, ls in picked for x in ls if x in needed))
        items = [*rest, (_einsum(picked, letters), tuple(letters))]
    ((T, ls),) = items
    if list(ls) != list(keep):
        T = _einsum([(T, ls)], keep)
    return T


def normalize(
    factors: Sequence[Factor],
    out: tuple[int, ...],
    inp: tuple[int, ...],
    sizes: Mapping[int, int],
    scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> Term:
    """A term from a factor list: diagonals taken, summed letters contracted, free merges made,
    at most :data:`MAX_FACTORS` factors (NOTE [Lettered Jacobian terms])."""
    on_axes = set(out) | set(inp)
    fs: list[Factor] = []
    for T, ls in factors:
        if len(set(ls)) != len(ls):  # a letter twice: the diagonal
            u = tuple(dict.fromkeys(ls))
            T, ls = _einsum([(T, ls)], u), u
        fs.append((T, tuple(ls)))
    summed = {x for _, ls in fs for x in ls} - on_axes
    if summed:
        group = [f for f in fs if set(f[1]) & summed]
        rest = [f for f in fs if not set(f[1]) & summed]
        keep = tuple(dict.fromkeys(x for _, ls in group for x in ls if x in on_axes))
        fs = [*rest, (contract(group, keep), keep)]
    fs = _free_merges(fs)
    if len(fs) > MAX_FACTORS:
        keep = tuple(dict.fromkeys(x for _, ls in fs for x in ls))
        fs = [(contract(fs, keep), keep)]
    used = {x: sizes[x] for x in on_axes}
    return Term(tuple(fs), out, inp, used, scale, dtype, device)


def _free_merges(fs: list[Factor]) -> list[Factor]:
    """Multiply a factor into another whose letters (and batch) contain its own: no growth.

    Of the factors that could take it, the smallest does (a per-sample scalar or a diagonal is
    multiplied into the smallest factor holding its letters, never into a large one when a
    small one will do: that product is a copy of the factor it goes into).
    """
    changed = True
    while changed and len(fs) > 1:
        changed = False
        for a in range(len(fs)):
            Ta, la = fs[a]
            fits = [
                b
                for b in range(len(fs))
                if b != a
                and set(la) <= set(fs[b][1])
                and (Ta.shape[0] == 1 or fs[b][0].shape[0] != 1)
            ]
            if fits:
                b = min(fits, key=lambda k: fs[k][0].numel())
                Tb, lb = fs[b]
                merged = (_einsum([(Tb, lb), (Ta, la)], lb), lb)
                fs = [f for k, f in enumerate(fs) if k not in (a, b)] + [merged]
                changed = True
                break
    return fs


def collapse(term: Term, order: Sequence[int] | None = None) -> Factor:
    """The term's factors and scale as one factor over the letters they hold (in the order of
    ``order`` where given, e.g. the memory order of the buffer it is written into).

    With no factor, a ``(1,)`` tensor holding the scale (letters ``()``).
    """
    fs = list(term.factors)
    if not fs:
        return torch.full((1,), term.scale, dtype=term.dtype, device=term.device), ()
    if term.scale != 1.0:  # scale the smallest factor, never the product
        k = min(range(len(fs)), key=lambda i: fs[i][0].numel())
        fs[k] = (fs[k][0] * term.scale, fs[k][1])
    if len(fs) == 1:
        return fs[0]
    keep = tuple(dict.fromkeys(x for _, ls in fs for x in ls))
    if order is not None:
        keep = tuple(x for x in dict.fromkeys(order) if x in keep)
    return contract(fs, keep), keep


def single(term: Term) -> Term:
    """The same term with (at most) one factor and scale 1 (the product formed)."""
    if not term.factors and term.scale == 1.0:
        return term
    T, t = collapse(term)
    return Term(((T, t),), term.out, term.inp, term.sizes, 1.0, term.dtype, term.device)


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

    factors = []
    for T, ls in term.factors:
        if letter in ls:
            k = 1 + ls.index(letter)
            T = T.reshape(*T.shape[:k], *parts, *T.shape[k + 1 :])
        factors.append((T, sub(ls)))
    return Term(
        tuple(factors), sub(term.out), sub(term.inp), sizes, term.scale, term.dtype, term.device
    )


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


def dense_factor(term: Term) -> torch.Tensor:
    """``term`` as a dense ``(B or 1, *out_sizes, *in_sizes)`` tensor, out of place.

    One contraction of the factors with an identity per repeated letter (a delta): torch ops
    only, so autograd and torch.func differentiate it (the result may be an expanded view).
    """
    T, t = collapse(term)
    ops: list[Factor] = [(T, t)]
    keep: list[int] = []
    for x in term.out + term.inp:
        if x in keep:  # a second axis with this letter: δ(x, y) with a fresh letter y
            y = fresh()
            n = term.sizes[x]
            ops.append((torch.eye(n, dtype=term.dtype, device=term.device)[None], (x, y)))
            keep.append(y)
        else:
            keep.append(x)
    present = set().union(*(set(ls) for _, ls in ops))
    inner = [x for x in keep if x in present]
    D = contract(ops, inner)
    # letters in no factor (broadcast): size-1 axes, expanded
    view = [D.shape[0]]
    it = iter(D.shape[1:])
    for x in keep:
        view.append(next(it) if x in present else 1)
    D = D.reshape(view)
    return D.expand(D.shape[0], *term.out_sizes, *term.in_sizes)


def densify(term: Term) -> Term:
    """The same Jacobian with one letter per axis and one dense factor."""
    n = math.prod(term.out_sizes) * math.prod(term.in_sizes) * term.batch
    _check_dense(n)
    Y = dense_factor(term)
    out_l = tuple(fresh() for _ in term.out)
    in_l = tuple(fresh() for _ in term.inp)
    sizes = dict(zip(out_l + in_l, term.out_sizes + term.in_sizes, strict=True))
    return Term(((Y, out_l + in_l),), out_l, in_l, sizes, 1.0, term.dtype, term.device)


def regroup(term: Term, side: str, R: Sequence[int]) -> Term:
    """``term`` with its ``side`` axes of sizes ``R``: split letters, or densify and reshape."""
    try:
        return refine(term, side, R)
    except Unsupported:
        pass
    d = densify(term)
    no = len(d.out)
    T = d.factors[0][0]
    if side == "out":
        T = T.reshape(T.shape[0], *R, *T.shape[1 + no :])
        out_l, in_l = tuple(fresh() for _ in R), d.inp
    else:
        T = T.reshape(*T.shape[: 1 + no], *R)
        out_l, in_l = d.out, tuple(fresh() for _ in R)
    sizes = dict(zip(out_l + in_l, tuple(T.shape[1:]), strict=True))
    return Term(((T, out_l + in_l),), out_l, in_l, sizes, 1.0, d.dtype, d.device)


def _check_dense(n: int) -> None:
    if n > DENSE_LIMIT:
        raise Unsupported(f"a dense intermediate of {n} elements would be needed")


def refined(terms: Sequence[Term], out_shape: Sequence[int], in_shape: Sequence[int]) -> list[Term]:
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


# ---------------------------------------------------------------------------------------------
# The chain rule and sums
# ---------------------------------------------------------------------------------------------


def renamed(term: Term) -> Term:
    """The same term with fresh letters."""
    new = {x: fresh() for x in term.sizes}
    return Term(
        tuple((T, tuple(new[x] for x in ls)) for T, ls in term.factors),
        tuple(new[x] for x in term.out),
        tuple(new[x] for x in term.inp),
        {new[x]: n for x, n in term.sizes.items()},
        term.scale,
        term.dtype,
        term.device,
    )


def chain_rule(L: Term, J: Term) -> Term:
    """``L ∘ J`` for ``L`` (v w.r.t. u) and ``J`` (u w.r.t. x): letters matched, factor lists
    concatenated, contracted only where a letter is summed (NOTE [Lettered Jacobian terms])."""
    if L.in_sizes != J.out_sizes:
        R = common_refinement(L.in_sizes, J.out_sizes)
        if R is None:
            R = [n for n in (math.prod(L.in_sizes),) if n > 1]
        L, J = regroup(L, "inp", R), regroup(J, "out", R)
    if set(L.sizes) & set(J.sizes):  # one term's letters used twice (e.g. Jᵀ ∘ J): rename
        J = renamed(J)
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
    factors = [(T, tuple(find(x) for x in ls)) for T, ls in L.factors + J.factors]
    on_axes = set(out) | set(inp)
    in_factors = {x for _, ls in factors for x in ls}
    scale = L.scale * J.scale
    for x in {find(u) for u in L.inp}:
        if x not in on_axes and x not in in_factors:
            scale *= sizes[x]  # a sum of ones
    return normalize(factors, out, inp, sizes, scale, L.dtype, L.device)


def chain_rule_sums(Ls: Sequence[Term], Js: Sequence[Term]) -> list[Term]:
    """``(Σ L) ∘ (Σ J)`` as a merged list of terms."""
    return merge([chain_rule(L, J) for L in Ls for J in Js])


def _canonical(term: Term) -> tuple[object, ...]:
    rename: dict[int, int] = {}
    for x in term.out + term.inp:
        rename.setdefault(x, len(rename))
    return (
        tuple(rename[x] for x in term.out),
        tuple(rename[x] for x in term.inp),
        tuple(term.sizes[x] for x in term.out + term.inp),
    )


def _add(prev: Term, term: Term) -> Term | None:
    """``prev + term`` (same letter pattern) as one term when that costs no growth, else None."""
    if len(prev.factors) > 1 or len(term.factors) > 1:
        return None
    m = dict(zip(term.out + term.inp, prev.out + prev.inp, strict=True))
    pl = prev.factors[0][1] if prev.factors else ()
    tl = tuple(m[x] for x in term.factors[0][1]) if term.factors else ()
    pb = prev.factors[0][0].shape[0] if prev.factors else 1
    tb = term.factors[0][0].shape[0] if term.factors else 1
    if set(tl) <= set(pl) and (tb == 1 or pb != 1):
        keep = pl
    elif set(pl) <= set(tl) and (pb == 1 or tb != 1):
        keep = tl
    else:
        return None
    Tp, lp = collapse(prev)
    Tt, lt = collapse(term)
    lt = tuple(m[x] for x in lt)
    T = _einsum([(Tp, lp)], keep) + _einsum([(Tt, lt)], keep) if keep else Tp + Tt
    return Term(((T, keep),), prev.out, prev.inp, prev.sizes, 1.0, prev.dtype, prev.device)


def merge(terms: Sequence[Term]) -> list[Term]:
    """Add terms with the same letter pattern where that costs no growth (so sums of diagonals
    and identities stay one term); other terms stay separate (the list is a sum)."""
    groups: dict[tuple[object, ...], list[Term]] = {}
    for term in terms:
        group = groups.setdefault(_canonical(term), [])
        for k, prev in enumerate(group):
            added = _add(prev, term)
            if added is not None:
                group[k] = added
                break
        else:
            group.append(term)
    return [t for group in groups.values() for t in group]
