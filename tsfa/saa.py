"""Expected round latency by sample-average approximation (SAA), step 1 of the offline stage.

With channel *statistics* only, D fading draws c_{d,k} (``Cell.sample_snr_hz``; the same
draws for every allocation: common random numbers) stand in for the expectation. In the
nominal plan every client uploads S(s) bits with the latency-optimal bandwidth split of
that draw (a convex problem per draw), solved for all draws and allocations at once by
:func:`tsfa.bandwidth.min_latency_bandwidth_batch` (``"fast"``: the vectorised Newton
kernel; ``"cvxpy"``: one batched program per allocation) or by a loop over
:func:`tsfa.min_latency_bandwidth` (``"loop"``, the reference). The estimate is the sample
mean with a Student-t confidence interval mean ± t_{(1+conf)/2, D−1} · sd / √D.

*Heavy tail.* With Rayleigh fading E[1/|h|²] = ∞, and τ ≥ S ln2 / c_k for every scheduled
k, so the expected latency of "every client uploads every round" is infinite: the SAA mean
then grows slowly (like log D) with the draws and its interval does not shrink reliably.
``max_latency_s`` (τ_max, the online stage's hard cap) fixes this the way the online stage
does: in a draw, the largest set of clients that can all finish by τ_max uploads (the
clients with the least bandwidth need b^min_k(τ_max), taken in increasing order while they
fit into B_total: the most clients possible) and the others skip the round. The latency is
then ≤ τ_max, its mean is finite, and the share of uploading clients (``participation``)
is reported.

``scipy.special`` is imported lazily, inside the functions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from tsfa._validate import as_array, as_scalar
from tsfa.bandwidth import min_latency_bandwidth, min_latency_bandwidth_batch, split_latency_s
from tsfa.model import Cell, Clients, LoraShape
from tsfa.rate import bandwidth_for_deadline

__all__ = ["LatencyEstimate", "expected_latency", "saa_latency", "LATENCY_BACKENDS"]

#: SAA backends: the batched kernel ("fast", "cvxpy") or the per-draw reference ("loop").
LATENCY_BACKENDS = ("fast", "cvxpy", "loop")


@dataclass(frozen=True, eq=False)
class LatencyEstimate:
    """SAA estimate of the expected round latency of one nominal allocation.

    Attributes:
        mean_s: sample mean of the per-draw least round latency, s.
        low_s, high_s: the ``confidence`` Student-t interval of the mean, s.
        std_s: sample standard deviation over draws, s.
        median_s, max_s: median and largest per-draw latency, s.
        draws: D, the number of fading draws.
        confidence: level of the interval (e.g. 0.95).
        participation: mean share of clients that upload (1 without ``max_latency_s``).
        max_latency_s: τ_max, the per-round cap (None: every client uploads every round).
        per_draw_s: the D per-draw latencies, s (read-only).
        backend: "fast", "cvxpy" or "loop".
        solve_time_s: wall time, s.
    """

    mean_s: float
    low_s: float
    high_s: float
    std_s: float
    median_s: float
    max_s: float
    draws: int
    confidence: float
    participation: float
    max_latency_s: float | None
    per_draw_s: np.ndarray
    backend: str
    solve_time_s: float

    @property
    def half_width_s(self) -> float:
        """Half the width of the confidence interval, s."""
        return 0.5 * (self.high_s - self.low_s)


def _participants(S, c, T, B, cap):
    """Per row, the most clients that can all finish by ``cap`` (mask (..., K)).

    b^min_k(cap) per client (inf if impossible); sorted increasing, the longest prefix
    whose sum fits into B is the largest feasible set (exchange argument)."""
    need = np.where(S > 0, bandwidth_for_deadline(S, c, T, cap), np.inf)
    order = np.argsort(need, axis=-1, kind="stable")
    cum = np.cumsum(np.take_along_axis(need, order, axis=-1), axis=-1)
    fits = cum <= B * (1 + 1e-12)
    mask = np.zeros(S.shape, dtype=bool)
    np.put_along_axis(mask, order, fits, axis=-1)
    return mask & (S > 0)


def saa_latency(payload_bits, compute_s, snr_hz, total_bandwidth_hz, downlink_s, max_latency_s, backend):
    """Per-draw least latency of C allocations on D draws.

    Args:
        payload_bits: (C, K) bits per allocation and client.
        compute_s: (C, K) T^cmp per allocation (it may depend on the rank), s.
        snr_hz: (D, K) fading draws, Hz.
        total_bandwidth_hz: B, Hz.
        downlink_s: (C,) T^dl per allocation, s.
        max_latency_s: τ_max or None (see the module docstring).
        backend: one of :data:`LATENCY_BACKENDS`.

    Returns:
        (latency (C, D) s, participation (C, D)).
    """
    S = np.asarray(payload_bits, dtype=float)[:, None, :]
    c = np.asarray(snr_hz, dtype=float)[None, :, :]
    down = np.asarray(downlink_s, dtype=float)[:, None]  # (C, 1): the batch shape is (C, D)
    comp = np.asarray(compute_s, dtype=float)[:, None, :]
    shape = (S.shape[0], c.shape[1], S.shape[2])
    S, c = np.broadcast_to(S, shape), np.broadcast_to(c, shape)
    if max_latency_s is not None:
        S = np.where(_participants(S, c, down[..., None] + comp, total_bandwidth_hz, max_latency_s), S, 0.0)
    if backend == "loop":
        T = np.broadcast_to(down[..., None] + comp, shape)
        bw = np.zeros(shape)
        for i in np.ndindex(shape[:-1]):
            bw[i] = min_latency_bandwidth(S[i], c[i], T[i], total_bandwidth_hz).bandwidth_hz
        lat = split_latency_s(S, c, T, bw, down)
    else:
        lat = min_latency_bandwidth_batch(S, c, comp, total_bandwidth_hz, downlink_s=down, backend=backend).latency_s
    return lat, (S > 0).mean(axis=-1)


def _t_quantile(confidence: float, dof: int) -> float:
    from scipy.special import stdtrit

    return float(stdtrit(dof, 0.5 + 0.5 * confidence))


def summaries(lat: np.ndarray, confidence: float):
    """Mean, interval (low, high) and standard deviation along the last axis (the draws)."""
    D = lat.shape[-1]
    mean = lat.mean(axis=-1)
    std = lat.std(axis=-1, ddof=1)
    half = _t_quantile(confidence, D - 1) * std / math.sqrt(D)
    return mean, mean - half, mean + half, std


def check_backend(backend) -> str:
    if backend not in LATENCY_BACKENDS:
        raise ValueError(f"backend must be one of {LATENCY_BACKENDS}; got backend = {backend!r}")
    return backend


def check_cap(max_latency_s):
    return None if max_latency_s is None else as_scalar("max_latency_s", max_latency_s, lower=0, strict=True)


def check_confidence(confidence) -> float:
    conf = as_scalar("confidence", confidence, lower=0, strict=True)
    if conf >= 1:
        raise ValueError(f"confidence must lie in (0, 1); got confidence = {confidence!r}")
    return conf


def check_compute(compute_s, k: int) -> np.ndarray:
    t = as_array("compute_s", compute_s, lower=0)
    if len(t) != k:
        raise ValueError(f"mismatched lengths: len(compute_s) = {len(t)}, len(clients) = {k}")
    return t


def expected_latency(
    shape: LoraShape,
    cell: Cell,
    clients: Clients,
    compute_s,
    keep,
    *,
    draws: int = 200,
    rng: np.random.Generator | int | None = None,
    downlink_s: float = 0.0,
    max_latency_s: float | None = None,
    confidence: float = 0.95,
    backend: str = "fast",
) -> LatencyEstimate:
    """Expected round latency of a nominal allocation by sample-average approximation.

    Every client uploads ``shape.payload_bits(keep)`` bits with the latency-optimal split of
    ``cell.total_bandwidth_hz`` in each of ``draws`` Rayleigh fading draws; the estimate is
    the mean over draws with a Student-t ``confidence`` interval (module docstring).

    Args:
        shape: the LoRA shape (rank r, payload bits).
        cell, clients: the radio cell and the client population (large-scale gains).
        compute_s: T^cmp_k per client, seconds.
        keep: components kept per module, an int in 1..r for every client or an int array (K,).
        draws: D ≥ 2 fading draws.
        rng: seed or Generator of the fading draws.
        downlink_s: T^dl, seconds.
        max_latency_s: τ_max; if set, in each draw only the largest set of clients that can
            all finish by τ_max uploads (the mean is infinite without it under Rayleigh
            fading: see the module docstring).
        confidence: interval level in (0, 1).
        backend: "fast" (vectorised Newton over draws), "cvxpy" (one batched program) or
            "loop" (``min_latency_bandwidth`` per draw, the reference).
    """
    if not isinstance(shape, LoraShape):
        raise ValueError(f"shape must be a LoraShape; got {type(shape).__name__}")
    if not isinstance(cell, Cell):
        raise ValueError(f"cell must be a Cell; got {type(cell).__name__}")
    if not isinstance(clients, Clients):
        raise ValueError(f"clients must be Clients; got {type(clients).__name__}")
    K = len(clients)
    t_cmp = check_compute(compute_s, K)
    k = np.broadcast_to(np.asarray(keep), (K,)) if np.ndim(keep) == 0 else np.asarray(keep)
    if k.shape != (K,):
        raise ValueError(f"keep must be an int or have one entry per client ({K}); got shape {k.shape}")
    bits = np.asarray(shape.payload_bits(k), dtype=float)
    if np.any(bits <= 0):
        raise ValueError(f"keep must be >= 1 for every client (the nominal plan schedules everyone); "
                         f"got keep = {keep!r}")
    draws = as_scalar("draws", draws, lower=2, integer=True)
    confidence = check_confidence(confidence)
    downlink_s = as_scalar("downlink_s", downlink_s, lower=0)
    cap = check_cap(max_latency_s)
    backend = check_backend(backend)
    t0 = time.perf_counter()
    snr = cell.sample_snr_hz(clients, rng=rng, rounds=draws)
    lat, part = saa_latency(bits[None, :], t_cmp[None, :], snr, cell.total_bandwidth_hz, np.array([downlink_s]),
                            cap, backend)
    mean, low, high, std = summaries(lat, confidence)
    per = lat[0].copy()
    per.setflags(write=False)
    return LatencyEstimate(
        mean_s=float(mean[0]), low_s=float(low[0]), high_s=float(high[0]), std_s=float(std[0]),
        median_s=float(np.median(per)), max_s=float(per.max()), draws=draws, confidence=confidence,
        participation=float(part.mean()), max_latency_s=cap, per_draw_s=per, backend=backend,
        solve_time_s=time.perf_counter() - t0,
    )
