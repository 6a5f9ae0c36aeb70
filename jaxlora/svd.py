"""The randomised SVD behind `lora.init: pissa_niter_N` (PEFT's fast-SVD PiSSA).

PEFT initialises `pissa_niter_N` from `torch.svd_lowrank(W, q=r, niter=N)`: Halko, Martinsson
and Tropp's randomised range finder (arXiv:0909.4061, algorithms 4.4 and 5.1) with exactly r
test vectors and N subspace (power) iterations, then the exact SVD of the small projected
matrix. This is the same algorithm in numpy float64, so nothing of torch runs at init.

Unlike the exact SVD, which every rank slices, the result depends on r: the r test vectors
span the subspace that the power iterations rotate towards the top-r singular subspace, at a
rate of (s_{r+1} / s_r)^2 per iteration. The test matrix comes from a fixed seed, so a start
depends only on the weight, r and N (as `pissa`'s depends only on the weight), never on an
adapter's seed or on its neighbours in a stack.
"""

from __future__ import annotations

import re

import numpy as np

_PISSA_NITER = re.compile(r"pissa_niter_([1-9][0-9]*)")


def pissa_niter(init: str) -> int | None:
    """N of `pissa_niter_N` (N >= 1 power iterations); None for any other init."""
    match = _PISSA_NITER.fullmatch(init) if isinstance(init, str) else None
    return int(match.group(1)) if match else None


def randomized_svd(
    w: np.ndarray, rank: int, niter: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U [m, r], S [r], V^T [r, n]) with U diag(S) V^T ~ the rank-r principal part of w [m, n],
    as `torch.svd_lowrank(w, q=rank, niter=niter)` computes it, in float64.

    As torch does, a wide w is factorised through its transpose, so that the Gaussian test
    matrix has the smaller dimension; each power iteration multiplies by w^T then w and
    re-orthonormalises by QR, which keeps the basis from collapsing onto the top direction."""
    w = np.asarray(w, np.float64)
    wide = w.shape[0] < w.shape[1]
    a = w.T if wide else w  # tall: [m, n], m >= n
    omega = np.random.default_rng(seed).standard_normal((a.shape[1], rank))
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(niter):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u_small, s, vh = np.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ u_small
    if wide:  # a = w^T = u s vh, so w = vh^T s u^T
        return vh.T, s, u.T
    return u, s, vh
