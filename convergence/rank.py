"""The rank term ε(r) of SPEC §5: the loss no rank-r adapter can remove.

For a linear layer with input covariance Σ_x, loss ½ E‖(ΔW* − ΔW) x‖² and ideal update
ΔW*, the best rank-r ΔW leaves

    ε(r) = ½ Σ_{i > r} λ_i(ΔW* Σ_x ΔW*ᵀ)

(Eckart–Young on ΔW* Σ_x^{1/2}: the loss is ½‖(ΔW* − ΔW) Σ_x^{1/2}‖²_F and ΔW Σ_x^{1/2} has
rank ≤ r). This module is numpy-only.
"""

from __future__ import annotations

import numpy as np

from tsfa._validate import as_int_array

__all__ = ["rank_term", "check_spectrum", "covariance_weighted_spectrum"]


def check_spectrum(spectrum, name: str = "spectrum") -> np.ndarray:
    """A 1-D, finite, non-negative, non-increasing array (float64); errors name the problem."""
    s = np.asarray(spectrum, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array; got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        i = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"{name} must be finite; {name}[{i}] = {s[i]!r}")
    if np.any(s < 0):
        i = int(np.flatnonzero(s < 0)[0])
        raise ValueError(f"{name} must be non-negative; {name}[{i}] = {s[i]!r}")
    if np.any(np.diff(s) > 1e-12 * max(float(s[0]), 1e-300)):
        i = int(np.flatnonzero(np.diff(s) > 1e-12 * max(float(s[0]), 1e-300))[0])
        raise ValueError(f"{name} must be sorted non-increasing; "
                         f"{name}[{i}] = {s[i]!r} < {name}[{i + 1}] = {s[i + 1]!r}")
    return s


def rank_term(spectrum, rank, *, weight: float = 0.5):
    """ε(r) = weight · Σ_{i > r} spectrum_i, vectorised over ``rank`` (int or int array).

    ``spectrum`` is the covariance-weighted target spectrum λ_1 ≥ λ_2 ≥ … ≥ 0 (e.g. from
    :func:`covariance_weighted_spectrum`); ``weight`` = ½ for a ½‖·‖² loss. Ranks must lie in
    0..len(spectrum).
    """
    s = check_spectrum(spectrum)
    r = as_int_array("rank", rank, 0, s.size, " (the spectrum's length)")
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be finite and >= 0; got weight = {weight!r}")
    tail = np.concatenate([np.cumsum(s[::-1])[::-1], [0.0]])
    out = weight * tail[r]
    return float(out) if out.ndim == 0 else out


def covariance_weighted_spectrum(target_delta, input_cov) -> np.ndarray:
    """λ(ΔW* Σ_x ΔW*ᵀ), sorted non-increasing (numerical negatives clipped to 0)."""
    D = np.asarray(target_delta, dtype=float)
    S = np.asarray(input_cov, dtype=float)
    if D.ndim != 2 or S.shape != (D.shape[1], D.shape[1]):
        raise ValueError(f"target_delta must be m×n and input_cov n×n; got {D.shape} and {S.shape}")
    if not np.allclose(S, S.T, rtol=1e-10, atol=1e-12 * max(np.abs(S).max(), 1e-300)):
        raise ValueError("input_cov must be symmetric")
    lam = np.linalg.eigvalsh(D @ S @ D.T)[::-1]
    return np.clip(lam, 0.0, None)
