"""The online stage's τ search (interval branch-and-bound), used by :func:`tsfa.online.allocate`.

At fixed τ the round problem of :mod:`tsfa.online` is a multiple-choice knapsack; this module
searches τ: :class:`TauSearch` keeps intervals of τ with certified lower bounds (zeroth order,
tangent Lagrangian bounds from the relaxation's multiplier) and polishes discrete choices by
their exact least latency (:func:`_polish`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tsfa.bandwidth import BANDWIDTH_BACKENDS, min_latency_bandwidth
from tsfa.mckp_lp import mckp_greedy
from tsfa.rate import min_bandwidth_trusted, rate_bps

if TYPE_CHECKING:
    from tsfa.online import RoundProblem

__all__ = ["TauSearch"]




def _polish(problem: RoundProblem, keep: np.ndarray, tau_fit: float | None = None):
    """The exact least-latency split (a BandwidthAllocation) of a keep vector; with ``tau_fit``
    (a τ at which the keep vector fits, Σ_k b^min_k(τ) ≤ B) Newton starts there. The split does
    not depend on the queue or V: problems of one round at several prices may share a dict of
    splits as the attribute ``_polished`` (:meth:`tsfa.allocator.OnlineAllocator.step`)."""
    shared = problem.__dict__.get("_polished")  # set by callers that solve one round at several prices
    key = (np.asarray(keep, dtype=np.int32).tobytes(), problem.max_latency_s)
    if shared is not None and key in shared:
        return shared[key]
    backend = "fast" if tau_fit is None else _warm_newton(tau_fit)
    bw = min_latency_bandwidth(problem.item_payload_bits[np.asarray(keep)], problem.snr_hz, problem.compute_s,
                               problem.total_bandwidth_hz, downlink_s=problem.downlink_s,
                               deadline_s=problem.max_latency_s, backend=backend)
    if shared is not None:
        shared[key] = bw
    return bw


def _warm_newton(tau_fit: float, rtol: float = 1e-13, max_iter: int = 100):
    """A ``min_latency_bandwidth`` backend: the least-latency τ (Σ_k b^min_k(τ) = B) by Newton on
    log Σ b started at ``tau_fit``, safeguarded by the bracket [slowest client alone with all
    of B, tau_fit] (bisection where Newton leaves it); as the default backend's kernel, the
    bandwidths are b^min scaled to sum to B."""

    def newton(S, c, T, B):
        with np.errstate(divide="ignore", over="ignore"):
            lo = float(np.max(T + S / rate_bps(B, c)))
        hi = max(float(tau_fit), lo)
        tau, bw = hi, None
        for it in range(1, max_iter + 1):
            b, db = min_bandwidth_trusted(S, c, tau - T)
            total = float(b.sum())
            if total > 0 and math.isfinite(total):
                bw = b * (B / total)
                if total > B:
                    lo = max(lo, tau)
                else:
                    hi = min(hi, tau)
                if abs(total - B) <= rtol * B or hi - lo <= 4e-16 * hi:
                    return bw, it
                new = tau - math.log(total / B) * total / float(db.sum())
            else:
                lo, new = max(lo, tau), math.nan
            tau = new if lo < new < hi else lo + 0.5 * (hi - lo)
        if bw is None:  # pragma: no cover - the bracket always holds a finite Σ b
            return _default_bandwidth(S, c, T, B)
        return bw, max_iter

    newton.__name__ = "fast"
    return newton


def _default_bandwidth(S, c, T, B):  # pragma: no cover
    return BANDWIDTH_BACKENDS["fast"](S, c, T, B)


@dataclass
class _Point:
    """What the τ search knows at one evaluated τ."""

    tau: float
    lp: float  # LP-relaxation value (inf: nothing fits)
    lam: float  # its multiplier (bandwidth price), ≥ 0
    W: np.ndarray | None  # b^min at tau
    D: np.ndarray | None  # ∂b^min/∂τ at tau (≤ 0)
    exact: float = -math.inf  # exact discrete value (or a lower bound on it), if computed
    resolved_from: float = math.inf  # [resolved_from, tau] is certified by a polished exact choice


class TauSearch:
    """Interval branch-and-bound over τ with first-order (tangent) Lagrangian bounds.

    For an interval [a, b] and an evaluated point r ≥ b with LP multiplier λ_r, every
    (τ, s) with τ ∈ [a, b] satisfies, because b^min is convex and decreasing in τ,

        Q τ + Σ C ≥ Q τ + Σ_k min_s [C_ks + λ_r (W_ks(r) + D_ks(r)(τ − r))] − λ_r B =: φ_r(τ),

    and φ_r is concave in τ (a minimum of affine functions), so min over [a, b] is
    min(φ_r(a), φ_r(b)). Together with the zeroth-order bound Q a + KP(r) this is the
    interval's lower bound. Its error is second order in the interval width.
    """

    def __init__(self, p: RoundProblem, oracle, exact: bool, lazy: bool):
        self.p, self.oracle, self.exact, self.lazy = p, oracle, exact, lazy
        self.C = p.item_costs()
        self.Q = p.queue
        self.K = p.num_clients
        self.points: dict[float, _Point] = {}
        self.best_obj, self.best_keep, self.best_alloc = math.inf, None, None
        self.cands: dict[bytes, tuple[float, np.ndarray]] = {}  # unpolished: key → (upper bound, keep)
        self.polished: dict[bytes, object] = {}  # key → its least-latency BandwidthAllocation
        self.evals = 0
        self.relaxed_best = math.inf
        self.heap: list = []

    # -- incumbents -------------------------------------------------------------------
    def upper(self) -> float:
        ub = min((u for u, _ in self.cands.values()), default=math.inf)
        return min(self.best_obj, ub)

    def add_candidate(self, keep: np.ndarray, tau_fit: float):
        key = keep.astype(np.int32).tobytes()
        if key in self.polished:
            return
        cost = float(self.C[np.arange(self.K), keep].sum())
        ub = cost + self.Q * tau_fit
        if self.lazy:
            old = self.cands.get(key)
            if old is None or ub < old[0]:
                self.cands[key] = (ub, keep.copy())
        else:
            self.polish(keep)

    def polish(self, keep: np.ndarray):
        """The exact least-latency split of ``keep`` (cached); updates the incumbent."""
        key = keep.astype(np.int32).tobytes()
        self.cands.pop(key, None)
        if key in self.polished:
            return self.polished[key]
        res = self.polished[key] = _polish(self.p, keep)
        if not res.success:
            return res
        obj = float(self.C[np.arange(self.K), keep].sum()) + self.Q * res.latency_s
        if obj < self.best_obj:
            self.best_obj, self.best_keep, self.best_alloc = obj, keep.copy(), res
        return res

    def polish_candidates(self, n: int):
        for _, keep in sorted(self.cands.values(), key=lambda c: c[0])[:n]:
            self.polish(keep)

    # -- evaluation ---------------------------------------------------------------------
    def evaluate(self, tau: float) -> _Point:
        if tau in self.points:
            return self.points[tau]
        self.evals += 1
        W, D = self.p._weights_and_slopes(tau)
        lp, choice, lam, split = mckp_greedy(W, self.C, self.p.total_bandwidth_hz, return_split=True)
        if self.oracle is not None and not self.exact:  # another relaxation solver (cvxpy)
            lp, choice = self.oracle(W, self.C, self.p.total_bandwidth_hz)
            split = None
        pt = _Point(tau, float(lp), float(lam) if math.isfinite(lam) else 0.0, W, D)
        self.points[tau] = pt
        self.relaxed_best = min(self.relaxed_best, self.Q * tau + pt.lp)
        if choice is not None:
            choice = np.asarray(choice, dtype=np.int64)
            self.add_candidate(choice, tau)
            if split is not None:  # round the split item up: it fits at a slightly larger τ
                up = choice.copy()
                up[split[0]] = split[1]
                self.add_candidate(up, math.inf)
        return pt

    def evaluate_exact(self, pt: _Point, a: float):
        """Exact knapsack at pt.tau; only choices that could beat the incumbent on [a, τ] matter."""
        self.evals += 1
        cutoff = self.upper() - self.Q * a
        bound, choice = self.oracle(pt.W, self.C, self.p.total_bandwidth_hz, cutoff=cutoff)
        pt.exact = max(pt.exact, float(bound))
        if choice is not None:
            choice = np.asarray(choice, dtype=np.int64)
            cost = float(self.C[np.arange(self.K), choice].sum())
            res = self.polish(choice)
            if res.success and cost <= pt.exact + 1e-12 * max(abs(cost), 1.0):
                pt.resolved_from = min(pt.resolved_from, res.latency_s)

    # -- bounds -------------------------------------------------------------------------
    def value_at_ref(self, pt: _Point) -> float:
        return max(pt.lp, pt.exact)

    def tangent(self, pt: _Point, tau: float) -> float:
        if not math.isfinite(pt.lp):
            return math.inf
        with np.errstate(invalid="ignore"):
            if pt.lam == 0.0:
                M = np.where(np.isfinite(pt.W), self.C, np.inf)
            else:
                M = self.C + pt.lam * (pt.W + pt.D * (tau - pt.tau))
            val = float(np.nan_to_num(M, nan=np.inf).min(axis=1).sum()) - pt.lam * self.p.total_bandwidth_hz
        return self.Q * tau + val

    def forward_tangent(self, left: _Point, ref: _Point, tau: float) -> float:
        """The bound from the left end's data, valid for τ ∈ [left, ref]: tangents at left
        for items that fit there, W(ref) (b^min decreases in τ) for those that do not."""
        if not math.isfinite(left.lp):
            return -math.inf
        with np.errstate(invalid="ignore"):
            Wlb = np.where(np.isfinite(left.W), left.W + left.D * (tau - left.tau), ref.W)
            M = np.where(np.isfinite(Wlb), self.C + left.lam * Wlb, np.inf)
        val = float(M.min(axis=1).sum()) - left.lam * self.p.total_bandwidth_hz
        return self.Q * tau + val

    def bound(self, a: float, b: float, pt: _Point, left: _Point | None = None) -> float:
        g = self.value_at_ref(pt)
        if not math.isfinite(g):
            return math.inf
        lb = max(self.Q * a + g, min(self.tangent(pt, a), self.tangent(pt, b)))
        if left is not None and left.tau <= a:
            lb = max(lb, min(self.forward_tangent(left, pt, a), self.forward_tangent(left, pt, b)))
        return lb

    def push(self, a: float, b: float, pt: _Point, left: _Point | None = None):
        lt = None if left is None else left.tau
        heapq.heappush(self.heap, (self.bound(a, b, pt, left), a, b, pt.tau, lt))

    def target(self, rel_tol: float, tol_abs: float) -> float:
        inc = self.upper()
        level = inc if self.exact else min(inc, self.relaxed_best)
        return level - rel_tol * abs(inc) - tol_abs

    def shrink(self, a: float, b: float, pt: _Point, target: float) -> float:
        """Largest b' ≤ b such that [b', b] is certified ≥ target by the data at pt."""
        if self.exact and pt.resolved_from <= b:
            b = max(a, pt.resolved_from)
        if self.Q > 0:
            b = min(b, max(a, (target - self.value_at_ref(pt)) / self.Q))
        return b

    def run(self, points, rel_tol, max_evaluations, tol_abs):
        pts = [self.evaluate(t) for t in points]
        for lo, hi in zip(pts[:-1], pts[1:], strict=True):
            self.push(lo.tau, hi.tau, hi, lo)
        phase_exact = False
        while self.heap and self.evals < max_evaluations:
            # exact backends first find a good incumbent to 1e-4, then certify to rel_tol; an
            # interval is only ever shrunk against the final target, or the coarse phase would
            # drop regions holding improvements below 1e-4 that the exact phase never revisits
            strict = self.target(rel_tol, tol_abs)
            target = strict if (phase_exact or not self.exact) else self.target(1e-4, tol_abs)
            lb, a, b, ref, lt = self.heap[0]
            if lb >= target:
                if self.exact and not phase_exact:
                    phase_exact = True
                    self.polish_candidates(3)
                    continue
                break
            heapq.heappop(self.heap)
            pt = self.points[ref]
            left = None if lt is None else self.points[lt]
            if phase_exact and pt.exact == -math.inf:
                self.evaluate_exact(pt, a)
                self.push(a, b, pt, left)
                continue
            b2 = self.shrink(a, b, pt, strict)
            if b2 < b - 1e-15 * b:
                self.push(a, b2, pt, left)
                continue
            if b - a <= 1e-12 * max(b, 1e-300):
                heapq.heappush(self.heap, (lb, a, b, ref, lt))
                break
            # Geometric midpoint on wide intervals (τ spans orders of magnitude), else arithmetic.
            m = math.sqrt(a * b) if a > 0 and b > 4 * a else 0.5 * (a + b)
            mp = self.evaluate(m)
            if phase_exact:
                self.evaluate_exact(mp, a)
            self.push(a, m, mp, left)
            if m < b:
                self.push(m, b, pt, mp)
        self.polish_candidates(3)
        return min((self.heap[0][0],) if self.heap else (math.inf,))
