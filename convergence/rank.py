"""The rank term ε(r) of spec §5: the loss no rank-r adapter can remove.

For a linear layer with input covariance Σ_x, loss ½ E‖(ΔW* − ΔW) x‖² and ideal update
ΔW*, the best rank-r ΔW leaves

    ε(r) = ½ Σ_{i > r} λ_i(ΔW* Σ_x ΔW*ᵀ)

(Eckart–Young on ΔW* Σ_x^{1/2}: the loss is ½‖(ΔW* − ΔW) Σ_x^{1/2}‖²_F and ΔW Σ_x^{1/2} has
rank ≤ r). This module is numpy-only.
"""

from __future__ import annotations

import numpy as np

from tsfa._validate import as_int_array

__all__ = ["rank_term", "check_spectrum", "covariance_weighted_spectrum", "stack_spectra"]


def check_spectrum(spectrum, name: str = "spectrum") -> np.ndarray:
    """A finite, non-negative array sorted non-increasing along its last axis (float64): 1-D for
    one module, 2-D (modules × eigenvalues) for several; errors name the problem."""
    s = np.asarray(spectrum, dtype=float)
    if s.ndim not in (1, 2) or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (or 2-D: one row per module); got shape {s.shape}")
    flat = s.reshape(-1, s.shape[-1])
    if not np.all(np.isfinite(s)):
        i = np.argwhere(~np.isfinite(s))[0]
        raise ValueError(f"{name} must be finite; {name}{list(i)} = {s[tuple(i)]!r}")
    if np.any(s < 0):
        i = np.argwhere(s < 0)[0]
        raise ValueError(f"{name} must be non-negative; {name}{list(i)} = {s[tuple(i)]!r}")
    for row_i, row in enumerate(flat):
        tol = 1e-12 * max(float(row[0]), 1e-300)
        bad = np.flatnonzero(np.diff(row) > tol)
        if bad.size:
            i = int(bad[0])
            where = f"[{i}]" if s.ndim == 1 else f"[{row_i}][{i}]"
            nxt = f"[{i + 1}]" if s.ndim == 1 else f"[{row_i}][{i + 1}]"
            raise ValueError(f"{name} must be sorted non-increasing; "
                             f"{name}{where} = {row[i]!r} < {name}{nxt} = {row[i + 1]!r}")
    return s


def stack_spectra(spectra) -> np.ndarray:
    """{module: 1-D spectrum} (e.g. from ``estimate_spectrum``) → a 2-D array, one row per
    module, zero-padded to the longest (still sorted)."""
    rows = [check_spectrum(v, f"spectra[{k!r}]") for k, v in dict(spectra).items()]
    if not rows:
        raise ValueError("spectra must hold at least one module")
    n = max(len(r) for r in rows)
    return np.stack([np.pad(r, (0, n - len(r))) for r in rows])


def rank_term(spectrum, rank, *, weight: float = 0.5):
    """ε(r) = weight · Σ_{i > r} spectrum_i, vectorised over ``rank`` (int or int array).

    ``spectrum`` is the covariance-weighted target spectrum λ_1 ≥ λ_2 ≥ … ≥ 0 (e.g. from
    :func:`covariance_weighted_spectrum`); a 2-D spectrum holds one module per row, each
    module keeps its own top r and ε sums the modules' tails. ``weight`` = ½ for a ½‖·‖²
    loss. Ranks must lie in 0..(number of eigenvalues per module).
    """
    s = check_spectrum(spectrum)
    r = as_int_array("rank", rank, 0, s.shape[-1], " (the spectrum's length)")
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be finite and >= 0; got weight = {weight!r}")
    flat = s.reshape(-1, s.shape[-1])
    tail = np.concatenate([np.cumsum(flat[:, ::-1], axis=1)[:, ::-1], np.zeros((len(flat), 1))], axis=1).sum(0)
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
