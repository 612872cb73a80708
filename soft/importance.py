"""Rank-component importances and error profiles from vectors alone (spec §3).

Component i of a module changes the product by D_i = b'_i a'_iᵀ − b_i a_iᵀ, and

    ‖u vᵀ − x yᵀ‖²_F = ‖u‖²‖v‖² + ‖x‖²‖y‖² − 2 (u·x)(v·y),

so its norm costs O(m + n): no m×n matrix, no SVD. The error profile e(s) is the energy
of the components dropped when each module keeps its s most important ones.
"""

from __future__ import annotations

import numpy as np
import torch

from soft.factors import Factors, check_pair, check_same_layout, product_norm_sq

__all__ = ["component_importance", "error_profile", "select_top", "dropped_error", "update_energy"]


def component_importance(A_old, B_old, A_new, B_new) -> torch.Tensor:
    """‖b'_i a'_iᵀ − b_i a_iᵀ‖_F for i = 0..r−1 (float64 tensor of length r)."""
    check_pair(A_old, B_old, "old")
    check_pair(A_new, B_new, "new")
    if A_old.shape != A_new.shape or B_old.shape != B_new.shape:
        raise ValueError(
            f"old and new factors must have the same shapes; got A {tuple(A_old.shape)} vs {tuple(A_new.shape)}, "
            f"B {tuple(B_old.shape)} vs {tuple(B_new.shape)}"
        )
    return _importance(A_old, B_old, A_new, B_new)


def _importance(A_old, B_old, A_new, B_new) -> torch.Tensor:
    # D_i = δb_i a'_iᵀ + b_i δa_iᵀ with δ = new − old: ‖D_i‖² = ‖δb‖²‖a'‖² + ‖b‖²‖δa‖² + 2 (δb·b)(a'·δa).
    # Sums of products in the input dtype (no float64 copies of the factors), from the increments,
    # so nothing cancels but the cross term; the r-vectors are combined in float64.
    a0, b0 = A_old.detach(), B_old.detach()
    a1, b1 = A_new.detach(), B_new.detach()
    db, da = b1 - b0, a1 - a0
    dot = torch.linalg.vecdot
    sq = (dot(db, db, dim=0).double() * dot(a1, a1, dim=1).double()
          + dot(b0, b0, dim=0).double() * dot(da, da, dim=1).double()
          + 2.0 * dot(db, b0, dim=0).double() * dot(a1, da, dim=1).double())
    return sq.clamp_min(0.0).sqrt()


def select_top(importance: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest importances, ascending (ties: lower index first)."""
    order = torch.sort(importance, descending=True, stable=True).indices
    return torch.sort(order[:keep]).values


def error_profile(old: Factors, new: Factors, scope: str = "module") -> np.ndarray:
    """e(s), s = 0..r: Σ ‖D_i‖² over the components dropped at keep s.

    ``scope="module"``: each module ranks its own components (spec §3); ``"global"``: the
    keep·L largest over all modules are kept (as :func:`soft.sparsify` with that scope).
    e(0) is the whole update's component energy Σ ‖D_i‖², e(r) = 0, and e is
    non-increasing and convex in s (sums of sorted squares).
    """
    r = check_same_layout(old, new)
    sqs = [(component_importance(*old[n], *new[n]) ** 2).numpy() for n in old]
    if scope == "module":
        e = np.zeros(r + 1)
        for sq in sqs:
            sq = np.sort(sq)[::-1]
            e += np.concatenate([np.cumsum(sq[::-1])[::-1], [0.0]])
        return e
    if scope != "global":
        raise ValueError(f"scope must be 'module' or 'global'; got scope = {scope!r}")
    flat = np.sort(np.concatenate(sqs))[::-1]
    tail = np.concatenate([np.cumsum(flat[::-1])[::-1], [0.0]])
    return tail[np.arange(r + 1) * len(sqs)]


def dropped_error(A_old, B_old, A_new, B_new, kept: torch.Tensor) -> float:
    """Exact ‖D − Σ_{i kept} D_i‖²_F = ‖Σ_{i dropped} D_i‖²_F through r×r-sized Grams.

    Equals Σ_dropped ‖D_i‖² (the error profile) when the D_i are mutually orthogonal.
    """
    r = A_old.shape[0]
    mask = torch.ones(r, dtype=torch.bool)
    mask[kept] = False
    if not mask.any():
        return 0.0
    P = torch.cat([B_new[:, mask], B_old[:, mask]], dim=1).double()
    Q = torch.cat([A_new[mask], -A_old[mask]], dim=0).double()
    return product_norm_sq(P, Q)


def update_energy(A_old, B_old, A_new, B_new) -> float:
    """‖B'A' − BA‖²_F without forming it."""
    P = torch.cat([B_new, B_old], dim=1).double()
    Q = torch.cat([A_new, -A_old], dim=0).double()
    return product_norm_sq(P, Q)
