"""Eight real workloads for the Jacobian benchmarks, each defined once.

Each :class:`Workload` holds the per-sample torch function, its seeded inputs, the batched
version of the same function (for the sum trick and for libraries that only take batches), a
hand-written closed-form Jacobian in torch (exact formulas, no autodiff) and a JAX (jax.numpy)
version of the function. :func:`make` builds one at its benchmark size or at any batch size and
dtype (the tests use a small float64 batch against the per-sample autograd reference).

Every Jacobian has jacbatch's layout ``(B, *out_shape, *in_shape)``, a tuple of them for a tuple
``argnums``. Batched arguments carry the batch in dimension 0; shared ones are ``None`` in
``in_dims``. ``bench/workloads.py`` times every route on these; ``bench/test_workloads.py``
checks them.

Optional libraries: the KUKA workload needs ``pytorch-kinematics`` (its chain is read from
``bench/data/kuka_iiwa.urdf``, joints only; :func:`missing` says when it cannot be built), and
the JAX versions need ``jax[cpu]``; both are imported only when used.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

URDF = Path(__file__).resolve().parent / "data" / "kuka_iiwa.urdf"

Jac = Tensor | tuple[Tensor, ...]


@dataclass
class Workload:
    """One workload: a per-sample function, its batch, and its exact Jacobian.

    Attributes:
        name: the key on the command line (``--only``).
        title: a one-line description with sizes.
        func: the per-sample function ``func(*sample_args) -> Tensor``.
        args: the arguments, batched ones with the batch in dimension 0.
        argnums: the argument(s) differentiated.
        in_dims: ``0`` or ``None`` per argument.
        batched: ``batched(*args) -> (B, *out_shape)``, the same function on the whole batch
            (``None`` where the differentiated argument is shared, so summing over the batch
            would mix samples).
        closed_form: ``closed_form(*args)``, the Jacobian by hand-written formulas.
        jax: ``jax()`` returns ``(fn, numpy_args, argnums, in_axes)``, the per-sample function in
            jax.numpy; ``None`` where there is no JAX version.
        closed_label: what the closed form is called in the tables.
    """

    name: str
    title: str
    func: Callable[..., Tensor]
    args: tuple[Tensor, ...]
    argnums: int | tuple[int, ...]
    in_dims: tuple[int | None, ...]
    batched: Callable[..., Tensor] | None
    closed_form: Callable[..., Jac]
    jax: Callable[[], tuple[Any, tuple[Any, ...], Any, tuple[int | None, ...]]] | None = None
    closed_label: str = "hand closed form"

    @property
    def batch_size(self) -> int:
        return next(a.shape[0] for a, d in zip(self.args, self.in_dims, strict=True) if d == 0)


def _rnd(g: torch.Generator, dtype: torch.dtype, *shape: int, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _np(*ts: Tensor) -> tuple[Any, ...]:
    return tuple(t.detach().numpy() for t in ts)


# --- 1. PINN: u(x, t) by an MLP 2-64-64-64-1 (tanh), du/d(x, t) -----------------------------


def pinn(B: int, dtype: torch.dtype, g: torch.Generator) -> Workload:
    """x (2,) -> u (1,), weights shared; Jacobian (B, 1, 2)."""
    sizes = (2, 64, 64, 64, 1)
    Ws = [_rnd(g, dtype, a, b, scale=1 / math.sqrt(a)) for a, b in itertools.pairwise(sizes)]
    bs = [_rnd(g, dtype, b, scale=0.1) for b in sizes[1:]]
    X = _rnd(g, dtype, B, 2)

    def f(x: Tensor) -> Tensor:
        h = x
        for W, b in zip(Ws[:-1], bs[:-1], strict=True):
            h = torch.tanh(h @ W + b)
        return h @ Ws[-1] + bs[-1]

    def closed(X: Tensor) -> Tensor:
        # backward through the layers by hand: J = W4ᵀ diag(1-h3²) W3ᵀ diag(1-h2²) W2ᵀ ...
        hs, h = [], X
        for W, b in zip(Ws[:-1], bs[:-1], strict=True):
            h = torch.tanh(h @ W + b)
            hs.append(h)
        G = Ws[-1].T.expand(X.shape[0], 1, 64)  # (B, 1, 64)
        for k in (2, 1, 0):
            G = G * (1 - hs[k] * hs[k]).unsqueeze(1)
            G = G @ Ws[k].T
        return G  # (B, 1, 2)

    def jax() -> Any:
        import jax.numpy as jnp

        jW, jb = _np(*Ws), _np(*bs)

        def fj(x: Any) -> Any:
            h = x
            for W, b in zip(jW[:-1], jb[:-1], strict=True):
                h = jnp.tanh(h @ W + b)
            return h @ jW[-1] + jb[-1]

        return fj, _np(X), 0, (0,)

    return Workload(
        "pinn", f"PINN MLP 2-64-64-64-1 tanh, du/dx, B={B}", f, (X,), 0, (0,), f, closed, jax
    )


# --- 2. a small MLP 3-64-5, per call ----------------------------------------------------------


def mlp_small(B: int, dtype: torch.dtype, g: torch.Generator) -> Workload:
    """x (3,) -> y (5,); Jacobian (B, 5, 3). Small enough that per-call overhead dominates."""
    V1, c1 = _rnd(g, dtype, 3, 64, scale=0.5), _rnd(g, dtype, 64, scale=0.1)
    V2, c2 = _rnd(g, dtype, 64, 5, scale=0.125), _rnd(g, dtype, 5, scale=0.1)
    X = _rnd(g, dtype, B, 3)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(x @ V1 + c1) @ V2 + c2

    def closed(X: Tensor) -> Tensor:
        s = 1 - torch.tanh(X @ V1 + c1) ** 2  # (B, 64)
        return torch.einsum("ki,bk,jk->bij", V2, s, V1)  # (B, 5, 3)

    def jax() -> Any:
        import jax.numpy as jnp

        a, b, c, d = _np(V1, c1, V2, c2)
        return (lambda x: jnp.tanh(x @ a + b) @ c + d), _np(X), 0, (0,)

    return Workload("mlp-small", f"MLP 3-64-5, B={B}, per call", f, (X,), 0, (0,), f, closed, jax)


# --- 3. per-sample Jacobians w.r.t. every parameter of an MLP 20-64-10 (NTK, Laplace) -------


def per_sample_params(B: int, dtype: torch.dtype, g: torch.Generator) -> Workload:
    """y = model(x) (10,) for x (20,); Jacobians w.r.t. W1 (64, 20), b1 (64,), W2 (10, 64),
    b2 (10,), shared by the batch: (B, 10, 64, 20), (B, 10, 64), (B, 10, 10, 64), (B, 10, 10)."""
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
    names = [n for n, _ in model.named_parameters()]  # 0.weight (64, 20), 0.bias, 2.weight, 2.bias
    W1, b1 = _rnd(g, dtype, 64, 20, scale=0.2), _rnd(g, dtype, 64, scale=0.1)
    W2, b2 = _rnd(g, dtype, 10, 64, scale=0.125), _rnd(g, dtype, 10, scale=0.1)
    X = _rnd(g, dtype, B, 20)

    def f(x: Tensor, w1: Tensor, c1: Tensor, w2: Tensor, c2: Tensor) -> Tensor:
        params = dict(zip(names, (w1, c1, w2, c2), strict=True))
        return torch.func.functional_call(model, params, (x,))

    def closed(X: Tensor, w1: Tensor, c1: Tensor, w2: Tensor, c2: Tensor) -> tuple[Tensor, ...]:
        h = torch.tanh(X @ w1.T + c1)  # (B, 64)
        G = w2.unsqueeze(0) * (1 - h * h).unsqueeze(1)  # dy_i/db1_k = W2[i,k](1-h_k²): (B, 10, 64)
        eye = torch.eye(10, dtype=X.dtype)
        return (
            G.unsqueeze(-1) * X[:, None, None, :],  # dy_i/dW1[k,l] = G[i,k] x_l: (B, 10, 64, 20)
            G,
            eye[None, :, :, None] * h[:, None, None, :],  # dy_i/dW2[k,l] = δ_ik h_l
            eye.expand(X.shape[0], 10, 10).clone(),  # dy/db2 = I
        )

    def jax() -> Any:
        import jax.numpy as jnp

        def fj(x: Any, w1: Any, c1: Any, w2: Any, c2: Any) -> Any:
            return jnp.tanh(x @ w1.T + c1) @ w2.T + c2

        return fj, _np(X, W1, b1, W2, b2), (1, 2, 3, 4), (0, None, None, None, None)

    return Workload(
        "per-sample-params",
        f"per-sample params, MLP 20-64-10 (functional_call), all weights and biases, B={B}",
        f, (X, W1, b1, W2, b2), (1, 2, 3, 4), (0, None, None, None, None), None, closed, jax,
    )  # fmt: skip


# --- 4. self-attention softmax(QKᵀ/√d)V, d/dX -------------------------------------------------


def attention(B: int, dtype: torch.dtype, g: torch.Generator, n: int = 16, d: int = 32) -> Workload:
    """X (n, d) -> Y (n, d), Wq, Wk, Wv (d, d) shared; Jacobian (B, n, d, n, d)."""
    Wq, Wk, Wv = (_rnd(g, dtype, d, d, scale=1 / math.sqrt(d)) for _ in range(3))
    X = _rnd(g, dtype, B, n, d)
    r = 1 / math.sqrt(d)

    def f(x: Tensor) -> Tensor:
        q, k, v = x @ Wq, x @ Wk, x @ Wv
        return torch.softmax(q @ k.transpose(-1, -2) * r, dim=-1) @ v

    def closed(X: Tensor) -> Tensor:
        # NOTE [Jacobian of self-attention] Y = P V, P = softmax(S), S = Q Kᵀ/√d, Q = X Wq,
        # K = X Wk, V = X Wv. With dP_ik = P_ik (dS_ik - Σ_l P_il dS_il) and Σ_l P_il V_lj = Y_ij:
        #   dY_ij/dX_ab = δ_ia/√d Σ_k P_ik (V_kj - Y_ij) A_kb  +  P_ia (V_aj - Y_ij) C_ib/√d
        #                 + P_ia Wv[b, j],      A = K Wqᵀ, C = Q Wkᵀ.
        Q, K, V = X @ Wq, X @ Wk, X @ Wv
        P = torch.softmax(Q @ K.transpose(-1, -2) * r, dim=-1)  # (B, n, n)
        Y = P @ V  # (B, n, d)
        A, C = K @ Wq.T, Q @ Wk.T  # (B, n, d)
        PC = P.unsqueeze(-1) * C.unsqueeze(2) * r  # (B, i, a, b)
        J = PC.unsqueeze(3) * (V.unsqueeze(1) - Y.unsqueeze(2)).unsqueeze(-1)  # (B, i, a, j, b)
        J = J.permute(0, 1, 3, 2, 4) + torch.einsum("bia,mj->bijam", P, Wv)
        diag = torch.einsum("bik,bkj,bkm->bijm", P, V, A) - Y.unsqueeze(-1) * (P @ A).unsqueeze(2)
        J.diagonal(dim1=1, dim2=3).add_(diag.permute(0, 2, 3, 1) * r)  # i == a
        return J.contiguous()  # (B, n, d, n, d)

    def jax() -> Any:
        import jax

        q_, k_, v_ = _np(Wq, Wk, Wv)

        def fj(x: Any) -> Any:
            return jax.nn.softmax((x @ q_) @ (x @ k_).T * r, axis=-1) @ (x @ v_)

        return fj, _np(X), 0, (0,)

    title = f"attention softmax(QKᵀ/√d)V, d/dX, X ({n}, {d}), B={B}"
    return Workload("attention", title, f, (X,), 0, (0,), f, closed, jax)


# --- 5. planar 7-link arm, d(x, y)/dθ ---------------------------------------------------------


def planar_arm(B: int, dtype: torch.dtype, g: torch.Generator) -> Workload:
    """θ (7,) -> end point (x, y) (2,) of a planar chain of 7 links; Jacobian (B, 2, 7)."""
    L = torch.tensor([0.5, 0.4, 0.35, 0.3, 0.25, 0.2, 0.1], dtype=dtype)  # link lengths
    TH = _rnd(g, dtype, B, 7)

    def f(th: Tensor) -> Tensor:
        phi = torch.cumsum(th, dim=-1)  # absolute link angles
        return torch.stack([(L * torch.cos(phi)).sum(-1), (L * torch.sin(phi)).sum(-1)], dim=-1)

    def closed(TH: Tensor) -> Tensor:
        # d x/dθ_j = -Σ_{i≥j} l_i sin φ_i, d y/dθ_j = Σ_{i≥j} l_i cos φ_i: reversed cumulative sums
        phi = torch.cumsum(TH, dim=-1)
        tail = lambda v: v.flip(-1).cumsum(-1).flip(-1)  # noqa: E731
        return torch.stack([-tail(L * torch.sin(phi)), tail(L * torch.cos(phi))], dim=1)

    def jax() -> Any:
        import jax.numpy as jnp

        (l_,) = _np(L)

        def fj(th: Any) -> Any:
            phi = jnp.cumsum(th)
            return jnp.stack([(l_ * jnp.cos(phi)).sum(), (l_ * jnp.sin(phi)).sum()])

        return fj, _np(TH), 0, (0,)

    return Workload("planar-arm", f"planar 7-link arm, d(x,y)/dθ, B={B}", f, (TH,), 0, (0,), f, closed, jax)  # fmt: skip


# --- 6. KUKA iiwa forward kinematics by pytorch-kinematics, d(end-effector position)/dθ -------


def kuka(B: int, dtype: torch.dtype, g: torch.Generator) -> Workload:
    """θ (7,) -> end-effector position (3,) by pytorch-kinematics; Jacobian (B, 3, 7)."""
    import pytorch_kinematics as pk

    chain = pk.build_serial_chain_from_urdf(URDF.read_text(), "lbr_iiwa_link_7").to(dtype=dtype)
    TH = _rnd(g, dtype, B, 7)

    def f(th: Tensor) -> Tensor:
        return chain.forward_kinematics(th.unsqueeze(0)).get_matrix()[0, :3, 3]

    def batched(TH: Tensor) -> Tensor:
        return chain.forward_kinematics(TH).get_matrix()[:, :3, 3]

    def closed(TH: Tensor) -> Tensor:
        # the library's analytic geometric Jacobian (B, 6, 7) in the base frame: its linear rows
        return chain.jacobian(TH)[:, :3].contiguous()

    return Workload(
        "kuka",
        f"pytorch-kinematics KUKA iiwa FK, d(end-effector position)/dθ, B={B}",
        f, (TH,), 0, (0,), batched, closed, None, "chain.jacobian (analytic)",
    )  # fmt: skip


# --- 7. Levenberg-Marquardt residual of a two-exponential decay -------------------------------


def lm_residual(B: int, dtype: torch.dtype, g: torch.Generator, n_t: int = 200) -> Workload:
    """p (4,), y (n_t,) -> residual (n_t,); Jacobian w.r.t. p (B, n_t, 4)."""
    t = torch.linspace(0, 5, n_t, dtype=torch.float64).to(dtype)
    P = (torch.tensor([2.0, 1.5, 0.5, 0.2], dtype=torch.float64) * (1 + 0.2 * _rnd(g, torch.float64, B, 4))).to(dtype)  # fmt: skip
    Yobs = _rnd(g, dtype, B, n_t, scale=0.05) + 1.0

    def f(p: Tensor, y: Tensor) -> Tensor:
        # r(p) = a·exp(-b t) + c·exp(-d t) - y, p = (a, b, c, d)
        return p[..., 0:1] * torch.exp(-p[..., 1:2] * t) + p[..., 2:3] * torch.exp(-p[..., 3:4] * t) - y  # fmt: skip

    def closed(P: Tensor, Y: Tensor) -> Tensor:
        a, b, c, d = (P[:, k : k + 1] for k in range(4))
        e1, e2 = torch.exp(-b * t), torch.exp(-d * t)  # (B, n_t)
        return torch.stack([e1, -a * t * e1, e2, -c * t * e2], dim=-1)  # (B, n_t, 4)

    def jax() -> Any:
        import jax.numpy as jnp

        (t_,) = _np(t)

        def fj(p: Any, y: Any) -> Any:
            return p[0] * jnp.exp(-p[1] * t_) + p[2] * jnp.exp(-p[3] * t_) - y

        return fj, _np(P, Yobs), 0, (0, 0)

    title = f"LM residual a·e^(-bt)+c·e^(-dt)-y, {n_t} points × 4 params, B={B}"
    return Workload("lm-residual", title, f, (P, Yobs), 0, (0, 0), f, closed, jax)


# --- 8. A @ W + B written as plain code, d/dW ---------------------------------------------------


def affine_plain(B: int, dtype: torch.dtype, g: torch.Generator, n: int = 8) -> Workload:
    """a (n, n), w (n, n), c (n,) -> a @ w + c (n, n), all batched; Jacobian w.r.t. w
    (B, n, n, n, n)."""
    A, W, b = _rnd(g, dtype, B, n, n), _rnd(g, dtype, B, n, n), _rnd(g, dtype, B, n)

    def f(a: Tensor, w: Tensor, c: Tensor) -> Tensor:
        return a @ w + c

    def closed(A: Tensor, W: Tensor, b: Tensor) -> Tensor:
        # d Z_ij / d W_kl = A_ik δ_jl
        eye = torch.eye(n, dtype=A.dtype)
        return A[:, :, None, :, None] * eye[None, None, :, None, :]

    def jax() -> Any:
        return (lambda a, w, c: a @ w + c), _np(A, W, b), 1, (0, 0, 0)

    def batched(a: Tensor, w: Tensor, c: Tensor) -> Tensor:
        return a @ w + c.unsqueeze(-2)

    title = f"`a @ w + b` as plain code, d/dW, B={B}, {n}³"
    return Workload("affine-plain", title, f, (A, W, b), 1, (0, 0, 0), batched, closed, jax)


#: name -> (builder, benchmark batch size), in the order of the tables.
WORKLOADS: dict[str, tuple[Callable[..., Workload], int]] = {
    "pinn": (pinn, 1024),
    "mlp-small": (mlp_small, 128),
    "per-sample-params": (per_sample_params, 256),
    "attention": (attention, 64),
    "planar-arm": (planar_arm, 10_000),
    "kuka": (kuka, 1000),
    "lm-residual": (lm_residual, 4096),
    "affine-plain": (affine_plain, 1024),
}


def missing(name: str) -> str | None:
    """Why workload ``name`` cannot be built here (an optional library it needs), else ``None``."""
    if name == "kuka":
        import importlib.util

        if importlib.util.find_spec("pytorch_kinematics") is None:
            return "needs pytorch-kinematics (pip install pytorch-kinematics)"
    return None


def make(
    name: str, batch: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Workload:
    """The workload ``name`` at its benchmark batch size (or ``batch``), inputs seeded by ``seed``."""
    builder, default = WORKLOADS[name]
    g = torch.Generator().manual_seed(seed)
    return builder(default if batch is None else batch, dtype, g)
