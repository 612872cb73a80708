"""Min–max latency bandwidth split (SPEC §2): the first solver.

Given payloads S_k (bit), SNR products c_k (Hz), compute times T_k (s) and a total
bandwidth B (Hz), choose b_k ≥ 0 with Σ b_k ≤ B minimising the round latency

    τ = T^dl + max_{k: S_k > 0} ( T_k + S_k / R_k(b_k) ),   R_k(b) = b log2(1 + c_k / b).

Clients with S_k = 0 are not scheduled: they get no bandwidth and do not count in τ.

At the optimum every scheduled client finishes exactly at τ and Σ b_k = B (KKT: any
client finishing early could give bandwidth away). So τ* solves the scalar equation
Σ_k b^min_k(τ) = B, where b^min_k(τ) = R_k^{-1}(S_k / (τ − T^dl − T_k)) is convex and
decreasing in τ. Backends:

* ``"fast"``: safeguarded Newton on that equation, vectorised numpy (inner Newton for R^{-1}).
* ``"cvxpy"``: one exponential-cone program (DPP, compiled once per client count, units
  MHz / Mbit / s, Clarabel).
* ``"scipy"``: an independent reference: scalar ``brentq`` for each R^{-1} and for τ.
  (Pyomo serves the MILPs of the online stage; for this nonlinear program it would need
  an NLP solver such as Ipopt, which cannot be installed offline here: see docs/model.md.)
"""

from __future__ import annotations

import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tsfa._validate import as_array, as_scalar, check_same_length
from tsfa.model import LN2, _inverse_x, bandwidth_for_deadline, rate_bps
from tsfa.status import ResultMixin, SolverError, Status, status_from_cvxpy

__all__ = ["BandwidthProblem", "BandwidthAllocation", "min_latency_bandwidth", "BANDWIDTH_BACKENDS"]


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
# Backends: each maps the scheduled sub-problem (S, c, T offsets, B) to bandwidths.
# Symbols: S payload bits, c SNR product Hz, T = T^dl + T^cmp s, B total Hz.
# --------------------------------------------------------------------------------------


def _newton_bandwidth(S, c, T, tau):
    """b^min_k(τ) and db^min_k/dτ for all k (τ > every T_k + S_k ln2/c_k)."""
    slack = tau - T
    a = S * LN2 / (c * slack)
    x, _ = _inverse_x(a)
    b = c / x
    # d b / d τ = c a / (x (τ − T) (1/(1+x) − a))   (< 0)
    db = c * a / (x * slack * (1.0 / (1.0 + x) - a))
    return b, db


def _fast(S, c, T, B, *, rtol=1e-13, max_iter=200):
    """Safeguarded Newton on log Σ b^min(τ) = log B, bracketed by two finite bounds."""
    # Left end: the slowest client alone with all the bandwidth (every b^min finite there).
    lo = float(np.max(T + S / rate_bps(B, c)))
    # Right end: the equal split is feasible.
    hi = float(np.max(T + S / rate_bps(B / len(S), c)))
    if hi <= lo * (1 + 1e-15) or len(S) == 1:
        b = np.full(len(S), B / len(S)) if len(S) > 1 else np.array([B])
        return b, 0
    tau = lo
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        b, db = _newton_bandwidth(S, c, T, tau)
        total = b.sum()
        g = math.log(total / B)
        if g > 0:
            lo = tau
        else:
            hi = tau
        if abs(total - B) <= rtol * B or hi - lo <= 4e-16 * hi:
            break
        step = g * total / db.sum()  # Newton on log Σ b
        new = tau - step
        if not (lo < new < hi):
            new = 0.5 * (lo + hi)
        tau = new
    return b * (B / b.sum()), it


_CVXPY_CACHE: OrderedDict[int, tuple] = OrderedDict()


def _cvxpy_problem(n: int):
    """Build (once per client count) the DPP program in scaled units.

    Units: bandwidth in B_total, time in τ_ref (the equal-split latency), bits in
    B_total·τ_ref. Every parameter is then O(1) or below, which conic solvers need.
    """
    import cvxpy as cp

    if n in _CVXPY_CACHE:
        _CVXPY_CACHE.move_to_end(n)
        return _CVXPY_CACHE[n]
    S = cp.Parameter(n, nonneg=True, name="payload")
    c = cp.Parameter(n, pos=True, name="snr")
    T = cp.Parameter(n, nonneg=True, name="offset")
    b = cp.Variable(n, nonneg=True, name="bandwidth")
    tau = cp.Variable(name="tau")
    w = cp.Variable(n, name="slack")  # w = τ − T keeps S·inv_pos(w) DPP
    rate = -cp.rel_entr(b, b + c) / LN2  # b log2(1 + c/b), concave
    cons = [w == tau - T, cp.multiply(S, cp.inv_pos(w)) <= rate, cp.sum(b) <= 1.0]
    prob = cp.Problem(cp.Minimize(tau), cons)
    assert prob.is_dcp(dpp=True)
    _CVXPY_CACHE[n] = (prob, S, c, T, b)
    while len(_CVXPY_CACHE) > 32:
        _CVXPY_CACHE.popitem(last=False)
    return _CVXPY_CACHE[n]


# Clarabel defaults are 1e-8; the backends are cross-checked to 1e-6 relative.
CLARABEL_OPTIONS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "max_iter": 500}


def _cvxpy(S, c, T, B, *, solver="CLARABEL"):
    import cvxpy as cp

    prob, pS, pc, pT, b = _cvxpy_problem(len(S))
    t_ref = float(np.max(T + S / rate_bps(B / len(S), c)))  # equal split: feasible
    pS.value, pc.value, pT.value = S / (B * t_ref), c / B, T / t_ref
    try:
        with warnings.catch_warnings():  # inaccuracy is reported through the status instead
            warnings.simplefilter("ignore", UserWarning)
            prob.solve(solver=solver, **(CLARABEL_OPTIONS if solver == "CLARABEL" else {}))
    except cp.SolverError as exc:
        raise SolverError(f"cvxpy/{solver} failed: {exc}") from exc
    status = status_from_cvxpy(prob.status)
    if not status.success or b.value is None or not np.all(np.isfinite(b.value)):
        bad = status if not status.success else Status.ERROR
        raise SolverError(f"cvxpy/{solver} returned status {prob.status!r}", bad)
    bw = np.maximum(np.asarray(b.value, dtype=float), 0.0) * B
    return bw * min(1.0, B / bw.sum()), int(prob.solver_stats.num_iters or 0), status


def _scipy(S, c, T, B):
    """Reference: brentq for every R^{-1} and for τ (slow, independent of ``_fast``)."""
    from scipy.optimize import brentq

    def inv_rate(r, ck):
        f = lambda bw: bw * math.log1p(ck / bw) / LN2 - r  # noqa: E731
        hi = max(r, 1.0)
        while f(hi) < 0:  # R increases to its cap c/ln2 > r: double until bracketed
            hi *= 2.0
        return brentq(f, hi * 1e-30, hi, xtol=1e-300, rtol=1e-15, maxiter=500)

    def total(tau):
        return sum(inv_rate(s / (tau - t), ck) for s, ck, t in zip(S, c, T, strict=True)) - B

    lo = float(np.max(T + S / rate_bps(B, c)))
    hi = float(np.max(T + S / rate_bps(B / len(S), c)))
    if len(S) == 1 or hi <= lo:
        return (np.array([B]) if len(S) == 1 else np.full(len(S), B / len(S))), 0
    tau, res = brentq(total, lo, hi, xtol=1e-300, rtol=1e-15, maxiter=500, full_output=True)
    bw = np.array([inv_rate(s / (tau - t), ck) for s, ck, t in zip(S, c, T, strict=True)])
    return bw * (B / bw.sum()), res.iterations


BANDWIDTH_BACKENDS: dict[str, Callable] = {"fast": _fast, "cvxpy": _cvxpy, "scipy": _scipy}


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
    problem = BandwidthProblem(payload_bits, snr_hz, compute_s, total_bandwidth_hz, downlink_s, deadline_s)
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
        bw[sch] = b_s
    else:
        status = Status.OPTIMAL
    solve_time = time.perf_counter() - t0
    return _result(problem, bw, status, "", iterations, solve_time, name)


def _result(problem, bw, status, message, iterations, solve_time, name) -> BandwidthAllocation:
    sch = problem.scheduled
    with np.errstate(divide="ignore", invalid="ignore"):
        upload = np.where(sch, problem.payload_bits / rate_bps(bw, problem.snr_hz), 0.0)
    finish = np.where(sch, problem.downlink_s + problem.compute_s + upload, np.nan)
    if not sch.any():
        latency = problem.downlink_s
    elif np.all(np.isfinite(finish[sch])):
        latency = float(np.max(finish[sch]))
    else:
        latency = float("nan")
    if status.success:
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
    return BandwidthAllocation(status, message, bw, latency, finish, upload, latency, iterations, solve_time, name)
