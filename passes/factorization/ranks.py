"""Low-rank factorization maths, pure numpy: truncated and whitened SVD, the spatial and Tucker-2
unfoldings of a conv kernel, rank selection (energy threshold, EVBMF) and the global budget (an
adapter on compiler/analysis/allocate.py). The ``factorize-rank`` pass
(passes/factorization/factorize.py) builds on these.

Errors are *relative squared* errors: ``||W - W_r||^2 / ||W||^2`` for weights, or, with a whitening
factor ``L`` of the layer's input second moment ``E[x x^T] = L L^T`` (x: an im2col patch of the
input), ``||(W - W_r) L||^2 / ||W L||^2``, which is the layer's expected squared output error
relative to its output energy. Data-aware, every form is measured that way, so forms compare:

- channel: the SVD of ``W L`` (``W ~= (U_r S_r)(V_r^T L^-1)``) is optimal and its error is its
  discarded spectrum;
- spatial: the SVD of ``L_v^T M`` with ``L_v`` whitening the ``kh x 1`` column patches (the input of
  the first factor; the cross terms between columns are left out of the choice of factors, not out
  of the error, which :func:`spatial_error_curve` measures with the full ``L``);
- Tucker-2: the output basis spans the top of ``W L``, the input projection keeps the input channel
  directions ``W`` reads most (the SVD of ``L_c^T W_(1)``, ``L_c`` whitening one pixel's channels),
  and :meth:`Tucker2.error_grid` measures every rank pair with the full ``L``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.analysis import allocate as shared

# -- SVDs ----------------------------------------------------------------------------------------


def whitening_factor(second_moment: np.ndarray, damping: float = 1e-3) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``M + damping * mean(diag M) * I`` (``M = E[x x^T]``).

    The damping keeps ``L`` invertible when some inputs never vary (dead channels, zero padding);
    it is relative, so the same value suits inputs of any scale.
    """
    m = np.asarray(second_moment, dtype=np.float64)
    scale = max(float(np.mean(np.diag(m))), 1e-30)
    eye = np.eye(len(m))
    for extra in (damping, damping * 10, damping * 100, 1.0):
        try:
            return np.linalg.cholesky(m + extra * scale * eye)
        except np.linalg.LinAlgError:
            continue
    return np.sqrt(scale) * eye  # never reached for a real second-moment matrix


def left_singular(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(U, s)`` of a matrix from the eigendecomposition of its Gram matrix ``A A^T``.

    Several times faster than a full SVD for the wide unfoldings of conv kernels (64 x 576, 512 x
    4608). Squaring the matrix only blurs singular values below ~1e-8 of the largest, which carry
    no energy; ``U`` is orthonormal to machine precision either way, so ``U U^T A`` stays exact.
    """
    gram = matrix @ matrix.T
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1]
    return vectors[:, order], np.sqrt(np.maximum(values[order], 0.0))


def thin_svd(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U, s, Vt)`` with ``matrix = U diag(s) Vt``, computed from the smaller Gram matrix.

    Directions with (numerically) zero singular values get a zero row in ``Vt``: they carry no
    energy, and dividing by ~0 would only amplify rounding.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape[0] > m.shape[1]:
        u, s, vt = thin_svd(m.T)
        return vt.T, s, u.T
    u, s = left_singular(m)
    tiny = s <= s[0] * 1e-10 if len(s) and s[0] > 0 else np.ones(len(s), bool)
    vt = (u.T @ m) / np.where(tiny, 1.0, s)[:, None]
    vt[tiny] = 0.0
    return u, s, vt


@dataclass
class Svd:
    """``left^T @ matrix @ whiten = u @ diag(s) @ vt`` (each whitening the identity when None).

    ``whiten`` (right) is a factor of the second moment of the vectors the matrix multiplies from
    the right (a layer's input rows for ``W``); ``left`` whitens the row space instead (the spatial
    form's ``(C_in kh, C_out kw)`` matrix, whose rows index the input).
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    whiten: np.ndarray | None = None
    left: np.ndarray | None = None

    @classmethod
    def of(
        cls, matrix: np.ndarray, whiten: np.ndarray | None = None, left: np.ndarray | None = None
    ) -> Svd:
        m = np.asarray(matrix, dtype=np.float64)
        if whiten is not None:
            m = m @ whiten
        if left is not None:
            m = left.T @ m
        u, s, vt = thin_svd(m)
        return cls(u, s, vt, whiten, left)

    @property
    def full_rank(self) -> int:
        return len(self.s)

    def whitened(self) -> np.ndarray:
        """The whitened matrix ``left^T @ matrix @ whiten`` itself."""
        return self.u * self.s @ self.vt

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(a, b)`` with ``matrix ~= a @ b``, ``a`` (m, rank), ``b`` (rank, n), balanced: both
        carry ``sqrt(s)``, so neither factor's scale dwarfs the other's when fine-tuned. The
        factors at rank r are the first r columns of ``a`` and rows of ``b`` at full rank."""
        root = np.sqrt(self.s[:rank])
        a = self.u[:, :rank] * root
        b = root[:, None] * self.vt[:rank]
        if self.whiten is not None:  # b = (V_r^T S^1/2) L^-1, solved rather than inverted
            b = np.linalg.solve(self.whiten.T, b.T).T
        if self.left is not None:  # a = L^-T (U_r S^1/2)
            a = np.linalg.solve(self.left.T, a)
        return a, b


def relative_error_curve(*singular_values: np.ndarray) -> np.ndarray:
    """Relative squared error at rank 1..R (index r-1) when every listed spectrum (one per conv
    group, all truncated to the same rank) drops its values past r."""
    size = max(len(s) for s in singular_values)
    kept = np.zeros(size)
    total = 0.0
    for s in singular_values:
        e = np.asarray(s, dtype=np.float64) ** 2
        c = np.cumsum(e)
        kept += np.concatenate([c, np.full(size - len(c), c[-1] if len(c) else 0.0)])
        total += float(e.sum())
    if total <= 0:
        return np.zeros(size)
    return np.maximum(1.0 - kept / total, 0.0)


def energy_rank(errors: np.ndarray, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the squared singular values (error curve as
    from :func:`relative_error_curve`)."""
    ok = np.nonzero(errors <= (1.0 - energy) + 1e-12)[0]
    return int(ok[0]) + 1 if len(ok) else len(errors)


# -- conv kernel unfoldings ----------------------------------------------------------------------


def channel_matrices(w: np.ndarray, groups: int = 1) -> list[np.ndarray]:
    """One ``(C_out/g, C_in/g * kh * kw)`` matrix per group: ``conv = 1x1(kxk(x))`` factors it."""
    o = w.shape[0]
    return list(np.asarray(w, np.float64).reshape(groups, o // groups, -1))


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """``M[(i, y), (o, x)] = W[o, i, y, x]``: a rank-r split is a ``kh x 1`` conv to r channels
    (columns of U) followed by a ``1 x kw`` conv (rows of S V^T)."""
    o, i, kh, kw = w.shape
    return np.asarray(w, np.float64).transpose(1, 2, 0, 3).reshape(i * kh, o * kw)


def spatial_kernels(svd: Svd, rank: int, w_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The ``(r, C_in, kh, 1)`` and ``(C_out, r, 1, kw)`` kernels of a rank-``rank`` spatial SVD."""
    o, i, kh, kw = w_shape
    a, b = svd.factors(rank)  # a: (i*kh, r), b: (r, o*kw)
    vertical = a.T.reshape(rank, i, kh, 1)
    horizontal = b.reshape(rank, o, 1, kw).transpose(1, 0, 2, 3)
    return vertical, horizontal


def moment_blocks(moment: np.ndarray, w_shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """From the second moment of a conv's ``(C_in, kh, kw)`` input patches: the second moment of
    its ``(C_in, kh)`` column patches (averaged over the kernel's columns) and of one pixel's
    ``C_in`` channels (averaged over the kernel's positions)."""
    _, i, kh, kw = w_shape
    m = np.asarray(moment, np.float64).reshape(i, kh, kw, i, kh, kw)
    columns = np.einsum("ayxbzx->aybz", m).reshape(i * kh, i * kh) / kw
    pixels = np.einsum("ayxbyx->ab", m) / (kh * kw)
    return columns, pixels


def spatial_error_curve(svd: Svd, w: np.ndarray, whiten: np.ndarray) -> np.ndarray:
    """Relative output error ``||(W - W_r) L||^2 / ||W L||^2`` of the spatial factorization in
    ``svd`` (of ``spatial_matrix(w)``) at rank 1..R, ``L`` whitening the layer's im2col patches."""
    o, i, kh, kw = w.shape
    d = i * kh * kw
    a, b = svd.factors(svd.full_rank)  # component j: W_j[o, (i, y), x] = a[(i, y), j] b[j, (o, x)]
    psi = np.einsum("pj,pxd->jxd", a, whiten.reshape(i * kh, kw, d), optimize=True)
    parts = b.reshape(-1, o, kw)
    residual = np.asarray(w, np.float64).reshape(o, d) @ whiten
    total = max(float((residual**2).sum()), 1e-300)
    errors = np.empty(svd.full_rank)
    for j in range(svd.full_rank):
        residual -= parts[j] @ psi[j]
        errors[j] = float((residual**2).sum())
    return np.maximum(errors / total, 0.0)


@dataclass
class Tucker2:
    """HOSVD of a conv kernel on its two channel modes: ``W ~= core x0 U_out x1 E``, read as
    ``conv1x1(first) -> conv_kxk(core) -> conv1x1(U_out)`` with ``first`` the input projection.

    Weight-only, ``U_out`` and ``E = first^T`` are the leading singular vectors of the two channel
    unfoldings. Data-aware (``whiten``: the im2col patches' factor ``L``, ``channel_whiten``: one
    pixel's channels' ``L_c``), ``U_out`` spans the top of ``W L`` (the output's principal
    directions) and the input projection ``E first = L_c V V^T L_c^-1`` keeps the leading left
    singular vectors ``V`` of ``L_c^T W_(1)``. Ranks ``(r_out, r_in)`` take the first columns of
    ``U_out``, the first rows of ``first`` and ``core[:r_out, :r_in]``.
    """

    u_out: np.ndarray  # (C_out, R_out)
    first: np.ndarray  # (R_in, C_in)
    expand: np.ndarray  # (C_in, R_in)
    core: np.ndarray  # (R_out, R_in, kh, kw), the full core
    w: np.ndarray
    whiten: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        w: np.ndarray,
        whiten: np.ndarray | None = None,
        channel_whiten: np.ndarray | None = None,
    ) -> Tucker2:
        w = np.asarray(w, np.float64)
        o, i = w.shape[:2]
        flat = w.reshape(o, -1)
        mode1 = w.transpose(1, 0, 2, 3).reshape(i, -1)
        r_out, r_in = min(o, w[0].size), min(i, w.size // i)
        if whiten is None or channel_whiten is None:
            u_out = left_singular(flat)[0][:, :r_out]
            u_in = left_singular(mode1)[0][:, :r_in]
            first, expand, whiten = u_in.T, u_in, None
        else:
            u_out = left_singular(flat @ whiten)[0][:, :r_out]
            v = left_singular(channel_whiten.T @ mode1)[0][:, :r_in]
            first = np.linalg.solve(channel_whiten.T, v).T  # V^T L_c^-1
            expand = channel_whiten @ v
        core = np.einsum("oiyx,or,is->rsyx", w, u_out, expand, optimize=True)
        return cls(u_out, first, expand, core, w, whiten)

    def error_grid(self) -> np.ndarray:
        """Relative squared error at ranks ``(r_out, r_in)`` (index ``[r_out-1, r_in-1]``).

        Weight-only the bases are orthonormal: ``1 - ||core[:r_out, :r_in]||^2 / ||W||^2``.
        Data-aware, with ``P`` the output projection and ``Q`` the input one, ``W - P W Q`` splits
        into ``(I - P) W`` and ``P W (I - Q)``, orthogonal in the output metric: the first is the
        output spectrum discarded, the second is summed per output direction as the input rank
        grows.
        """
        if self.whiten is None:
            energy = (self.core**2).sum(axis=(2, 3))
            kept = energy.cumsum(0).cumsum(1)
            return np.maximum(1.0 - kept / max(float((self.w**2).sum()), 1e-300), 0.0)
        o, i, kh, kw = self.w.shape
        k, d = kh * kw, i * kh * kw
        projected = self.u_out.T @ (self.w.reshape(o, d) @ self.whiten)  # (R_out, d)
        total = max(float(((self.w.reshape(o, d) @ self.whiten) ** 2).sum()), 1e-300)
        out_error = total - np.cumsum((projected**2).sum(axis=1))
        phi = np.einsum("si,ikd->skd", self.first, self.whiten.reshape(i, k, d), optimize=True)
        core = self.core.reshape(*self.core.shape[:2], k)
        grid = np.empty(self.core.shape[:2])
        for s in range(grid.shape[1]):
            projected = projected - core[:, s] @ phi[s]
            grid[:, s] = out_error + np.cumsum((projected**2).sum(axis=1))
        return np.maximum(grid / total, 0.0)

    def kernels(self, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(r_in, C_in, 1, 1)``, ``(r_out, r_in, kh, kw)`` and ``(C_out, r_out, 1, 1)``."""
        first = self.first[:r_in][:, :, None, None]
        last = self.u_out[:, :r_out][:, :, None, None]
        return first, self.core[:r_out, :r_in], last


# -- EVBMF ---------------------------------------------------------------------------------------


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    d = x - (1 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4 * alpha, 0.0)))


def evbmf(matrix: np.ndarray) -> tuple[int, float]:
    """Analytic empirical variational Bayes matrix factorization (Nakajima et al., JMLR 2013).

    Returns ``(rank, sigma2)``: the number of singular values above ``sqrt(M * sigma2 * x_bar)``
    and the fitted noise variance (Nakajima et al.'s Theorem 2 threshold; the variance minimises
    the model's free energy, a 1-D search).
    """
    y = np.asarray(matrix, np.float64)
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape  # L <= M
    s = left_singular(y)[1]
    if rows < 2 or float(s[0]) <= 0:
        return (int(s[0] > 0), 0.0)
    alpha = rows / cols
    tau_bar = 2.5129 * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    e_upper = min(math.ceil(rows / (1 + alpha)) - 1, len(s)) - 1
    tail = s[e_upper + 1 :] ** 2 if 0 <= e_upper + 1 < len(s) else s[-1:] ** 2
    upper = float((s**2).sum()) / (rows * cols)
    lower = max(float(tail[0]) / (cols * x_bar), float(tail.mean()) / cols)
    lower = min(lower, upper)

    def objective(sigma2: float) -> float:
        x = s**2 / (cols * sigma2)
        big, small = x[x > x_bar], x[x <= x_bar]
        t = _tau(big, alpha)
        return float(
            (small - np.log(small)).sum()
            + (big - t).sum()
            + np.log((t + 1) / big).sum()
            + alpha * np.log(t / alpha + 1).sum()
        )

    if upper <= lower * (1 + 1e-12):
        sigma2 = upper
    else:  # a log-spaced scan, then golden-section refinement around the best point
        grid = np.geomspace(lower, upper, 200)
        values = [objective(g) for g in grid]
        k = int(np.argmin(values))
        a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        phi = (math.sqrt(5) - 1) / 2
        for _ in range(60):
            c, d = b - phi * (b - a), a + phi * (b - a)
            if objective(c) < objective(d):
                b = d
            else:
                a = c
        sigma2 = (a + b) / 2
    threshold = math.sqrt(cols * sigma2 * x_bar)
    return int((s > threshold).sum()), sigma2


# -- candidates and the global allocator ---------------------------------------------------------


@dataclass
class Choice:
    """One way to factorize a layer: its form, ranks, cost (MACs and params) and relative error."""

    form: str
    ranks: tuple[int, ...]
    macs: int
    params: int
    error: float


def allocate(
    layers: list[list[Choice]],
    kept_costs: list[int],
    fixed_cost: int,
    goal: float,
    metric: str = "macs",
    method: str = shared.DEFAULT_METHOD,
) -> tuple[list[Choice | None], int]:
    """Global budget: one choice per layer (or None, the layer left alone) whose total cost is
    at most ``goal`` with the least summed relative error, by the shared allocator
    (:func:`compiler.analysis.allocate.allocate`).

    Args:
        layers: per layer, its candidate choices (any order).
        kept_costs: per layer, its cost when left alone.
        fixed_cost: cost of everything that is never factorized.
        goal: the total cost to reach.
        metric: the cost, "macs" or "params".
        method: the allocator's solver ("best": greedy on the hulls and a knapsack, the better).

    Returns:
        ``(choice per layer or None, total cost reached)``.

    Raises:
        BudgetError: ``goal`` is below the cost with every layer at its cheapest choice;
            ``least`` is that cost less ``fixed_cost``.
    """
    options = [
        [shared.Option(kept, 0.0, None)]
        + [
            shared.Option(getattr(c, metric), c.error, c)
            for c in choices
            if getattr(c, metric) < kept
        ]  # a choice that saves nothing is never worth its error
        for choices, kept in zip(layers, kept_costs)
    ]
    picked = shared.allocate(options, goal - fixed_cost, method=method)
    return list(picked.payloads), int(round(fixed_cost + picked.cost))
