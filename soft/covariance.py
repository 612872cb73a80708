"""The covariance that separate averaging of A and B induces (spec §4).

Σ_k p_k B_k A_k = B̄ Ā + C with C = Σ_k p_k (B_k − B̄)(A_k − Ā) exactly. With
U = [√p_k (B_k − B̄)]_k (m × K r) and V = [√p_k (A_k − Ā)]_k (K r × n), C = U V and
‖C‖²_F = tr((UᵀU)(V Vᵀ)): only (K r)×(K r) Grams, never an m×n matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from soft.factors import check_pair, product_norm_sq

__all__ = ["covariance_norm", "covariance_norm_dense", "factors_covariance_norm"]


def _prepare(As, Bs, weights):
    if len(As) != len(Bs) or len(As) == 0:
        raise ValueError(f"As and Bs must be non-empty and of equal length; got {len(As)} and {len(Bs)}")
    p = np.asarray(weights, dtype=float)
    if p.shape != (len(As),):
        raise ValueError(f"weights must have one entry per client ({len(As)}); got shape {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative, with a positive sum; got {p.tolist()}")
    p = p / p.sum()
    for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
        check_pair(A, B, f"client {k}")
        if A.shape != As[0].shape or B.shape != Bs[0].shape:
            raise ValueError(f"client {k} has A {tuple(A.shape)}, B {tuple(B.shape)}; client 0 has "
                             f"A {tuple(As[0].shape)}, B {tuple(Bs[0].shape)}")
    A = torch.stack([a.detach().double() for a in As])  # K×r×n
    B = torch.stack([b.detach().double() for b in Bs])  # K×m×r
    return A, B, torch.as_tensor(p)


def covariance_norm(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], weights) -> float:
    """‖Σ_k p_k (B_k − B̄)(A_k − Ā)‖_F via Gram matrices (weights normalised to sum 1)."""
    A, B, p = _prepare(As, Bs, weights)
    abar = (p[:, None, None] * A).sum(0)
    bbar = (p[:, None, None] * B).sum(0)
    sp = p.sqrt()
    U = torch.cat(list(sp[:, None, None] * (B - bbar)), dim=1)  # m × K r
    V = torch.cat(list(sp[:, None, None] * (A - abar)), dim=0)  # K r × n
    val = product_norm_sq(U, V)
    return max(val, 0.0) ** 0.5


def covariance_norm_dense(As, Bs, weights) -> float:
    """Reference: ‖Σ p_k B_k A_k − B̄ Ā‖_F with dense m×n products (tests only)."""
    A, B, p = _prepare(As, Bs, weights)
    mean_prod = sum(pk * (Bk @ Ak) for pk, Ak, Bk in zip(p, A, B, strict=True))
    abar = (p[:, None, None] * A).sum(0)
    bbar = (p[:, None, None] * B).sum(0)
    return float(torch.linalg.matrix_norm(mean_prod - bbar @ abar))


def factors_covariance_norm(client_factors: Sequence, weights) -> float:
    """√(Σ over modules of ‖C_ℓ‖²) for a list of per-client factor sets."""
    names = list(client_factors[0])
    total = 0.0
    for name in names:
        total += covariance_norm([f[name][0] for f in client_factors], [f[name][1] for f in client_factors],
                                 weights) ** 2
    return total**0.5
