"""Min–max latency bandwidth split (spec §2): the first solver.

Given payloads S_k (bit), SNR products c_k (Hz), compute times T_k (s) and a total
bandwidth B (Hz), choose b_k ≥ 0 with Σ b_k ≤ B minimising the round latency

    τ = T^dl + max_{k: S_k > 0} ( T_k + S_k / R_k(b_k) ),   R_k(b) = b log2(1 + c_k / b).

Clients with S_k = 0 are not scheduled: they get no bandwidth and do not count in τ.

At the optimum every scheduled client finishes exactly at τ and Σ b_k = B (KKT: any
client finishing early could give bandwidth away). So τ* solves the scalar equation
Σ_k b^min_k(τ) = B, where b^min_k(τ) = R_k^{-1}(S_k / (τ − T^dl − T_k)) is convex and
decreasing in τ (:func:`tsfa.rate.min_bandwidth`, with its slope). One kernel solves it
for any number of instances at once (:func:`min_latency_bandwidth_batch`, rows of the
leading axes); :func:`min_latency_bandwidth` is one row of it, with a typed result. Backends:

* ``"fast"``: safeguarded Newton on that equation, vectorised numpy (inner Newton for R^{-1}).
* ``"cvxpy"``: one exponential-cone program (DPP, compiled once per shape and kept in a
  bounded cache, scaled units, Clarabel).
* ``"scipy"``: an independent reference: scalar ``brentq`` for each R^{-1} and for τ.
  (Pyomo serves the MILPs of the online stage; for this nonlinear program it would need
  an NLP solver such as Ipopt, which cannot be installed offline here: see docs/model.md.)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from tsfa._cache import cached_program
from tsfa._validate import as_array, as_scalar, check_same_length
from tsfa.rate import LN2, bandwidth_for_deadline, min_bandwidth_trusted, rate_bps
from tsfa.status import ResultMixin, SolverError, Status, status_from_cvxpy

__all__ = [
    "BandwidthProblem",
    "BandwidthAllocation",
    "BatchLatency",
    "min_latency_bandwidth",
    "min_latency_bandwidth_batch",
    "BANDWIDTH_BACKENDS",
    "BATCH_BACKENDS",
]


@dataclass(frozen=True, eq=False)
class BandwidthProblem:
    """Validated inputs of the min–max latency split (arrays of length K, read-only).

    Attributes:
        payload_bits: S_k, bits to upload (0 = not scheduled).
        snr_hz: c_k = P_k g_k / N_0, Hz (> 0).
        compute_s: T^cmp_k, seconds (≥ 0).
        total_bandwidth_hz: B_total, Hz (> 0).
        downlink_s: T^dl, seconds, added to every client's finish time.
        deadline_s: optional hard cap τ_max on the round latency, seconds.
    """

    payload_bits: np.ndarray
    snr_hz: np.ndarray
    compute_s: np.ndarray
    total_bandwidth_hz: float
    downlink_s: float = 0.0
    deadline_s: float | None = None

    def __post_init__(self):
        s = as_array("payload_bits", self.payload_bits, lower=0)
        c = as_array("snr_hz", self.snr_hz, lower=0, strict=True)
        t = as_array("compute_s", self.compute_s, lower=0)
        check_same_length(payload_bits=s, snr_hz=c, compute_s=t)
        object.__setattr__(self, "payload_bits", s)
        object.__setattr__(self, "snr_hz", c)
        object.__setattr__(self, "compute_s", t)
        object.__setattr__(
            self, "total_bandwidth_hz", as_scalar("total_bandwidth_hz", self.total_bandwidth_hz, lower=0, strict=True)
        )
        object.__setattr__(self, "downlink_s", as_scalar("downlink_s", self.downlink_s, lower=0))
        if self.deadline_s is not None:
            object.__setattr__(self, "deadline_s", as_scalar("deadline_s", self.deadline_s, lower=0, strict=True))

    @property
    def num_clients(self) -> int:
        return len(self.payload_bits)

    @property
    def scheduled(self) -> np.ndarray:
        """Boolean mask of clients with a payload."""
        return self.payload_bits > 0

    def lowest_latency_bound_s(self) -> np.ndarray:
        """Per client, T^dl + T_k + S_k ln2 / c_k: its finish time with unlimited bandwidth."""
        return self.downlink_s + self.compute_s + self.payload_bits * LN2 / self.snr_hz


@dataclass(frozen=True, eq=False)
class BandwidthAllocation(ResultMixin):
    """Result of :func:`min_latency_bandwidth`.

    Attributes:
        status, message: outcome (:class:`~tsfa.status.Status`) and explanation.
        bandwidth_hz: b_k per client, Hz (0 for unscheduled clients).
        latency_s: τ, the round latency (downlink + slowest scheduled client), s.
        finish_time_s: T^dl + T_k + S_k/R_k(b_k) per client, s (NaN if unscheduled).
        upload_time_s: S_k / R_k(b_k), s (0 if unscheduled).
        objective: equals ``latency_s``.
        iterations: outer iterations of the backend (0 where not applicable).
        solve_time_s: wall time of the backend, s.
        backend: backend name.
    """

    status: Status
    message: str
    bandwidth_hz: np.ndarray
    latency_s: float
    finish_time_s: np.ndarray
    upload_time_s: np.ndarray
    objective: float
    iterations: int
    solve_time_s: float
    backend: str


# --------------------------------------------------------------------------------------
# The least-latency kernel, batched over leading axes. Rows are independent instances,
# the last axis clients. S payload bits (0 = not scheduled), c SNR product Hz,
# T = T^dl + T^cmp seconds, B Hz.
# --------------------------------------------------------------------------------------


class BatchLatency(NamedTuple):
    """Result of :func:`min_latency_bandwidth_batch`.

    Attributes:
        latency_s: τ per batch row, shape (...): downlink plus the slowest scheduled client's
            finish time (the downlink alone where no client is scheduled), s.
        bandwidth_hz: b per row and client, shape (..., K), Hz (0 for unscheduled clients).
    """

    latency_s: np.ndarray
    bandwidth_hz: np.ndarray


def _newton_tau(S, c, T, B, *, rtol=1e-13, max_iter=200):
    """Safeguarded Newton on log Σ_k b^min_k(τ) = log B, one τ per row, vectorised.

    S, c, T: (N, K). Each row is bracketed by two finite bounds: the slowest scheduled client
    alone with all the bandwidth (every b^min finite there) and the equal split (feasible).
    Returns (b (N, K) in Hz, Newton iterations per row (N,)).
    """
    sch = S > 0
    n = sch.sum(axis=1)
    nn = np.maximum(n, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lo = np.where(sch, T + S / rate_bps(B, c), -np.inf).max(axis=1)
        hi = np.where(sch, T + S / rate_bps(B / nn, c), -np.inf).max(axis=1)
    hi = np.minimum(hi, _FMAX)  # the equal split may overflow the float range: cap the bracket
    bw = np.where(sch, B / nn, 0.0)  # the answer for 0/1 client rows and degenerate brackets
    iterations = np.zeros(len(S), dtype=np.int64)
    act = np.flatnonzero((n >= 2) & (hi > lo * (1 + 1e-15)))
    tau = lo.copy()
    for _ in range(max_iter):
        if act.size == 0:
            break
        iterations[act] += 1
        t = tau[act]
        b, db = min_bandwidth_trusted(S[act], c[act], t[:, None] - T[act])
        total = b.sum(axis=1)
        g = np.log(total / B)
        lo_a = np.where(g > 0, t, lo[act])
        hi_a = np.where(g > 0, hi[act], t)
        lo[act], hi[act] = lo_a, hi_a
        done = (np.abs(total - B) <= rtol * B) | (hi_a - lo_a <= 4e-16 * hi_a)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            scaled = b * (B / total)[:, None]
        usable = (total > 0) & np.all(np.isfinite(scaled), axis=1)
        bw[act[usable]] = scaled[usable]
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.where(total > 0, g, -np.inf)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            new = t - g * total / db.sum(axis=1)  # Newton on log Σ b
        tau[act] = np.where((lo_a < new) & (new < hi_a), new, lo_a + 0.5 * (hi_a - lo_a))
        act = act[~done]
    return bw, iterations


_FMAX = float(np.finfo(float).max)
_U = 2.0**-53  # unit roundoff


def cap_total(bw: np.ndarray, B: float) -> np.ndarray:
    """Scale rows of ``bw`` (..., K) down, where needed, so that their sum in floating point
    is at most ``B`` in *any* summation order (Python's ``sum``, ``np.sum``, ``math.fsum``).

    A row whose ``np.sum`` exceeds B·(1 − 4(K−1)u) (u = 2⁻⁵³) is scaled to that level: the
    exact sum is then below B/(1 + γ_{K−1}), so no order of K − 1 rounded additions can
    exceed B. The change is a few ulps of each bandwidth (none for one client). A scaled row
    is then checked, and stepped toward 0 (``nextafter``) until its sums fit (subnormals)."""
    bw = np.array(bw, dtype=float)
    if bw.size == 0:
        return bw
    K = bw.shape[-1]
    level = B * (1.0 - 4.0 * (K - 1) * _U)
    s = bw.sum(axis=-1, keepdims=True)
    over = s > level
    if not over.any():
        return bw
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        bw = np.where(over, bw * (level / np.where(over, s, 1.0)), bw)
    rows = bw.reshape(-1, K)
    for i in np.flatnonzero(over.reshape(-1)):
        for _ in range(64):
            if max(float(rows[i].sum()), math.fsum(rows[i]), sum(rows[i].tolist())) <= B:
                break
            rows[i] = np.nextafter(rows[i], 0.0)
    return rows.reshape(bw.shape)


@cached_program
def least_latency_program(D: int, K: int):
    """One DPP program for D independent rows of K clients (compiled once per (D, K)).

    Scaled units, per row: bandwidth in B_total, time in τ_ref (the row's equal-split
    latency), bits in B_total·τ_ref, so every parameter is O(1) or below, which conic
    solvers need. Variables b (D×K), τ (D) and the slacks w = τ − T (which keep
    S·inv_pos(w) DPP); constraints S·inv_pos(w) ≤ b log2(1 + c/b) per (row, client) and
    Σ_k b ≤ 1 per row; minimise Σ_d τ_d (separable, so each τ_d is least).
    """
    import cvxpy as cp

    S = cp.Parameter((D, K), nonneg=True, name="payload")
    c = cp.Parameter((D, K), pos=True, name="snr")
    T = cp.Parameter((D, K), nonneg=True, name="offset")
    b = cp.Variable((D, K), nonneg=True, name="bandwidth")
    tau = cp.Variable(D, name="tau")
    w = cp.Variable((D, K), name="slack")
    rate = -cp.rel_entr(b, b + c) / LN2  # b log2(1 + c/b), concave
    cons = [w == cp.reshape(tau, (D, 1), order="C") @ np.ones((1, K)) - T,
            cp.multiply(S, cp.inv_pos(w)) <= rate, cp.sum(b, axis=1) <= 1.0]
    prob = cp.Problem(cp.Minimize(cp.sum(tau)), cons)
    assert prob.is_dcp(dpp=True)
    return prob, S, c, T, b


# Clarabel defaults are 1e-8; the backends are cross-checked to 1e-6 relative.
CLARABEL_OPTIONS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "max_iter": 500}


def _cvxpy_rows(S, c, T, B, *, solver="CLARABEL"):
    """Least-latency split of every row (N, K) by one exponential-cone program.

    The program keeps the shape (N, K) so it is compiled once per shape: a row with no
    scheduled client gets a dummy one (its answer is discarded). Returns (b (N, K) Hz,
    solver iterations, Status); raises :class:`SolverError` if the solver fails."""
    import cvxpy as cp

    N, K = S.shape
    sch = S > 0
    empty = ~sch.any(axis=1)
    if empty.all():
        return np.zeros((N, K)), 0, Status.OPTIMAL
    S, c, T, sch = S.copy(), c.copy(), T.copy(), sch.copy()
    S[empty, 0], c[empty, 0], T[empty, 0], sch[empty, 0] = 1.0, B, 0.0, True
    n = sch.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ref = np.where(sch, T + S / rate_bps(B / n, c), -np.inf).max(axis=1)  # equal split: feasible
    prob, pS, pc, pT, b = least_latency_program(N, K)
    pS.value = np.where(sch, S, 0.0) / (B * t_ref[:, None])
    pc.value = c / B
    pT.value = np.where(sch, T / t_ref[:, None], 0.0)  # an unscheduled client's offset must not bind
    try:
        with warnings.catch_warnings():  # inaccuracy is reported through the status instead
            warnings.simplefilter("ignore", UserWarning)
            prob.solve(solver=solver, **(CLARABEL_OPTIONS if solver == "CLARABEL" else {}))
    except cp.SolverError as exc:
        raise SolverError(f"cvxpy/{solver} failed: {exc}") from exc
    status = status_from_cvxpy(prob.status)
    if not status.success or b.value is None or not np.all(np.isfinite(b.value)):
        raise SolverError(f"cvxpy/{solver} returned status {prob.status!r}",
                          status if not status.success else Status.ERROR)
    bw = np.where(sch, np.maximum(np.asarray(b.value, dtype=float), 0.0) * B, 0.0)
    bw *= np.minimum(1.0, B / bw.sum(axis=1))[:, None]
    bw[empty] = 0.0
    return bw, int(prob.solver_stats.num_iters or 0), status


#: Backends of :func:`min_latency_bandwidth_batch`.
BATCH_BACKENDS = ("fast", "cvxpy")


def _batch_kernel(S, c, T, B, backend):
    """(b, iterations, Status) for rows (..., K); "cvxpy" solves one program per slice of the
    second-to-last axis (so (C, D, K) is C programs of D rows, each compiled once per (D, K))."""
    K = S.shape[-1]
    if backend == "fast":
        bw, it = _newton_tau(S.reshape(-1, K), c.reshape(-1, K), T.reshape(-1, K), B)
        return bw.reshape(S.shape), int(it.max(initial=0)), Status.OPTIMAL
    D = S.shape[-2] if S.ndim >= 2 else 1
    parts = [_cvxpy_rows(s, ci, t, B) for s, ci, t in zip(S.reshape(-1, D, K), c.reshape(-1, D, K),
                                                           T.reshape(-1, D, K), strict=True)]
    status = Status.OPTIMAL_INACCURATE if any(p[2] is Status.OPTIMAL_INACCURATE for p in parts) else Status.OPTIMAL
    return np.concatenate([p[0] for p in parts]).reshape(S.shape), sum(p[1] for p in parts), status


def min_latency_bandwidth_batch(payload_bits, snr_hz, compute_s, total_bandwidth_hz: float, *,
                                downlink_s=0.0, backend: str = "fast") -> BatchLatency:
    """The least-latency split (module docstring) of many independent instances at once.

    Every row of the leading axes is one instance of K clients sharing ``total_bandwidth_hz``;
    clients with a zero payload are not scheduled (no bandwidth, not in τ).

    Args:
        payload_bits: S, bits, shape (..., K) (0 = not scheduled).
        snr_hz: c = P g / N_0, Hz, broadcast to (..., K) (> 0).
        compute_s: T^cmp, seconds, broadcast to (..., K).
        total_bandwidth_hz: B_total, Hz, shared by the K clients of each row.
        downlink_s: T^dl, seconds, a scalar or broadcast to the batch shape (...).
        backend: "fast" (a safeguarded Newton on Σ_k b^min_k(τ) = B, one τ per row, vectorised)
            or "cvxpy" (one exponential-cone program per slice of the second-to-last axis,
            Clarabel; raises :class:`SolverError` if it fails).

    Returns:
        :class:`BatchLatency`: ``latency_s`` (...) and ``bandwidth_hz`` (..., K).
    """
    if backend not in BATCH_BACKENDS:
        raise ValueError(f"backend must be one of {BATCH_BACKENDS}; got backend = {backend!r}")
    S = as_array("payload_bits", payload_bits, ndim=None, lower=0)
    if S.ndim == 0 or S.shape[-1] == 0:
        raise ValueError(f"payload_bits must have a non-empty client axis (..., K); got shape {S.shape}")
    B = as_scalar("total_bandwidth_hz", total_bandwidth_hz, lower=0, strict=True)
    dl = as_array("downlink_s", downlink_s, ndim=None, lower=0)
    try:
        c = np.broadcast_to(as_array("snr_hz", snr_hz, ndim=None, lower=0, strict=True), S.shape)
        T = np.broadcast_to(dl[..., None] + as_array("compute_s", compute_s, ndim=None, lower=0), S.shape)
    except ValueError as exc:
        if "broadcast" not in str(exc):
            raise
        raise ValueError(f"snr_hz, compute_s and downlink_s must broadcast to payload_bits' shape {S.shape}; "
                         f"got {np.shape(snr_hz)}, {np.shape(compute_s)}, {np.shape(downlink_s)}") from None
    bw = cap_total(_batch_kernel(S, c, T, B, backend)[0], B)
    return BatchLatency(latency_s=split_latency_s(S, c, T, bw, dl), bandwidth_hz=bw)


def split_latency_s(S, c, T, bw, downlink):
    """The latency of a bandwidth split, per row [s]: the max over scheduled clients (S > 0) of
    T + S/R(b) (payload bits S, c = B·SNR per Hz, compute-plus-downlink T, bandwidth b in Hz;
    arrays (..., K)); the downlink time where no client is scheduled."""
    sch = S > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        finish = np.where(sch, T + S / rate_bps(bw, c), -np.inf)
    return np.where(sch.any(axis=-1), finish.max(axis=-1), np.broadcast_to(downlink, S.shape[:-1]))


# --------------------------------------------------------------------------------------
# Backends of min_latency_bandwidth: each maps the scheduled sub-problem (S, c, T, B) of
# one instance to (bandwidths, iterations[, Status]).
# --------------------------------------------------------------------------------------


def _fast(S, c, T, B):
    bw, it = _newton_tau(S[None], c[None], T[None], B)
    return bw[0], int(it[0])


def _cvxpy(S, c, T, B):
    bw, it, status = _cvxpy_rows(S[None], c[None], T[None], B)
    return bw[0], it, status


def _scipy(S, c, T, B):
    """Reference: brentq for every R^{-1} and for τ (slow, independent of the Newton kernel)."""
    from scipy.optimize import brentq

    def inv_rate(r, ck):
        f = lambda bw: rate_bps(bw, ck) - r  # noqa: E731
        hi = max(r, 1.0)
        while f(hi) < 0 and hi < _FMAX:  # R increases to its cap c/ln2 > r: double until bracketed
            hi = min(hi * 2.0, _FMAX)
        return brentq(f, 0.0, hi, xtol=5e-324, rtol=1e-15, maxiter=1100)

    def total(tau):
        return sum(inv_rate(s / (tau - t), ck) for s, ck, t in zip(S, c, T, strict=True)) - B

    lo = float(np.max(T + S / rate_bps(B, c)))
    hi = float(np.max(T + S / rate_bps(B / len(S), c)))
    if len(S) == 1 or hi <= lo:
        return (np.array([B]) if len(S) == 1 else np.full(len(S), B / len(S))), 0
    for _ in range(60):  # at the equal split Σ b = B up to rounding: widen the bracket until it changes sign
        if total(hi) <= 0:
            break
        hi += max(hi - lo, abs(hi) * 1e-15)
    tau, res = brentq(total, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=500, full_output=True)
    bw = np.array([inv_rate(s / (tau - t), ck) for s, ck, t in zip(S, c, T, strict=True)])
    return bw * (B / bw.sum()), res.iterations


def _scipy_checked(S, c, T, B):
    try:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return _scipy(S, c, T, B)
    except (ValueError, RuntimeError, OverflowError, ZeroDivisionError) as exc:
        raise SolverError(f"scipy reference failed: {exc}") from exc


_scipy_checked.__name__ = "scipy"
BANDWIDTH_BACKENDS: dict[str, Callable] = {"fast": _fast, "cvxpy": _cvxpy, "scipy": _scipy_checked}


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------


def _infeasibility(problem: BandwidthProblem, latency: float) -> str | None:
    """Explain why ``deadline_s`` cannot be met, naming the client and the fix."""
    D = problem.deadline_s
    if D is None or latency <= D * (1 + 1e-9):
        return None
    sch = np.flatnonzero(problem.scheduled)
    start = problem.downlink_s + problem.compute_s[sch]
    if np.any(start >= D):
        k = sch[np.argmax(start)]
        return (
            f"deadline_s = {D:.6g} s is below client {k}'s downlink + compute time "
            f"{problem.downlink_s + problem.compute_s[k]:.6g} s; the least feasible latency is "
            f"{latency:.6g} s: raise deadline_s to at least that, or do not schedule client {k}"
        )
    floor = problem.lowest_latency_bound_s()[sch]
    if np.any(floor >= D):
        k = sch[np.argmax(floor)]
        cap = problem.snr_hz[k] / LN2
        return (
            f"client {k} cannot meet deadline_s = {D:.6g} s with any bandwidth: its rate is capped at "
            f"c/ln2 = {cap:.6g} bit/s, so {problem.payload_bits[k]:.6g} bits need at least "
            f"{floor[np.argmax(floor)]:.6g} s; with total_bandwidth_hz = {problem.total_bandwidth_hz:.6g} "
            f"the least feasible latency is {latency:.6g} s: raise deadline_s to at least that, "
            f"or shrink client {k}'s payload"
        )
    need = float(
        np.sum(bandwidth_for_deadline(problem.payload_bits[sch], problem.snr_hz[sch],
                                      problem.downlink_s + problem.compute_s[sch], D))
    )
    return (
        f"total_bandwidth_hz = {problem.total_bandwidth_hz:.6g} Hz is too small for deadline_s = {D:.6g} s: "
        f"the least feasible latency is {latency:.6g} s; raise deadline_s to at least that, "
        f"or total_bandwidth_hz to at least {need:.6g} Hz"
    )


def min_latency_bandwidth(
    payload_bits,
    snr_hz,
    compute_s,
    total_bandwidth_hz: float,
    *,
    downlink_s: float = 0.0,
    deadline_s: float | None = None,
    backend: str | Callable = "fast",
) -> BandwidthAllocation:
    """Split ``total_bandwidth_hz`` to minimise the round latency (see module docstring).

    Args:
        payload_bits: S_k per client, bits (0 = not scheduled).
        snr_hz: c_k = P_k g_k / N_0 per client, Hz.
        compute_s: T^cmp_k per client, seconds.
        total_bandwidth_hz: B_total, Hz.
        downlink_s: T^dl, seconds, common to all clients.
        deadline_s: optional τ_max; if the least latency exceeds it the status is
            ``INFEASIBLE`` (the returned split is still the least-latency one) and the
            message names the binding client or resource and the smallest feasible value.
        backend: "fast", "cvxpy", "scipy", or a callable ``f(S, c, T, B) -> (b, iterations)``
            (optionally a third item, a :class:`Status`) on the scheduled clients (S bits,
            c Hz, T = T^dl + T^cmp seconds, B Hz); it may raise :class:`SolverError`.

    Returns:
        A :class:`BandwidthAllocation`.
    """
    problem = BandwidthProblem(payload_bits=payload_bits, snr_hz=snr_hz, compute_s=compute_s,
                               total_bandwidth_hz=total_bandwidth_hz, downlink_s=downlink_s, deadline_s=deadline_s)
    if callable(backend):
        fn, name = backend, getattr(backend, "__name__", "custom")
    else:
        if backend not in BANDWIDTH_BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BANDWIDTH_BACKENDS)} or a callable; got {backend!r}")
        fn, name = BANDWIDTH_BACKENDS[backend], backend
    return _solve(problem, fn, name)


def _solve(problem: BandwidthProblem, fn: Callable, name: str) -> BandwidthAllocation:
    K = problem.num_clients
    sch = problem.scheduled
    bw = np.zeros(K)
    t0 = time.perf_counter()
    iterations = 0
    if sch.any():
        S, c = problem.payload_bits[sch], problem.snr_hz[sch]
        T = problem.downlink_s + problem.compute_s[sch]
        try:
            out = fn(S, c, T, problem.total_bandwidth_hz)
        except SolverError as exc:
            return _result(problem, np.full(K, np.nan), Status(exc.status), str(exc), 0,
                           time.perf_counter() - t0, name)
        b_s, iterations = out[0], out[1]
        status = out[2] if len(out) > 2 else Status.OPTIMAL
        b_s = np.asarray(b_s, dtype=float)
        if b_s.shape != S.shape or not np.all(np.isfinite(b_s)) or np.any(b_s < 0):
            return _result(problem, np.full(K, np.nan), Status.ERROR,
                           f"backend {name!r} returned an invalid bandwidth vector", iterations,
                           time.perf_counter() - t0, name)
        bw[sch] = cap_total(b_s, problem.total_bandwidth_hz)
    else:
        status = Status.OPTIMAL
    return _result(problem, bw, status, "", iterations, time.perf_counter() - t0, name)


def _result(problem, bw, status, message, iterations, solve_time_s, name) -> BandwidthAllocation:
    sch = problem.scheduled
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        upload = np.where(sch, problem.payload_bits / rate_bps(np.nan_to_num(bw, nan=0.0), problem.snr_hz), 0.0)
        finish = np.where(sch, problem.downlink_s + problem.compute_s + upload, np.nan)
    if np.isnan(bw).any():
        upload, finish = np.where(sch, np.nan, upload), np.where(sch, np.nan, finish)
    if not sch.any():
        latency = problem.downlink_s
    elif np.all(np.isfinite(finish[sch])):
        latency = float(np.max(finish[sch]))
    else:
        latency = float("nan")
    if status.success and not math.isfinite(latency):
        k = int(np.flatnonzero(sch)[np.argmax(np.where(np.isfinite(finish[sch]), finish[sch], np.inf))])
        status = Status.INFEASIBLE
        message = (f"the round cannot be served in floating point: client {k}'s upload of "
                   f"{problem.payload_bits[k]:.6g} bits at snr_hz = {problem.snr_hz[k]:.6g} Hz with "
                   f"total_bandwidth_hz = {problem.total_bandwidth_hz:.6g} Hz takes longer than "
                   f"{_FMAX:.6g} s; raise total_bandwidth_hz or shrink the payloads")
    elif status.success:
        why = _infeasibility(problem, latency)
        if why is not None:
            status, message = Status.INFEASIBLE, why
        elif not sch.any():
            message = "no client has a payload: nothing is scheduled"
        else:
            message = f"{status.value}: {int(sch.sum())} scheduled clients finish by {latency:.6g} s"
    bw.setflags(write=False)
    for arr in (finish, upload):
        arr.setflags(write=False)
    return BandwidthAllocation(status=status, message=message, bandwidth_hz=bw, latency_s=latency,
                               finish_time_s=finish, upload_time_s=upload, objective=latency,
                               iterations=iterations, solve_time_s=solve_time_s, backend=name)
