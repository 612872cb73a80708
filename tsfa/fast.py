"""The online stage's fast path without a certificate (``allocate(p, certify=False)``).

One round of :mod:`tsfa.online` solved by a secant search on the slope of
G(τ) = Q τ + LP(τ) (the knapsack relaxation at τ), with windows of keep counts per client after
the first relaxation over every item; what :class:`tsfa.allocator.OnlineAllocator` runs between
certified rounds. The certified search (:func:`tsfa.online.allocate`) is its fallback.
"""

from __future__ import annotations

import math
import time

import numpy as np

from tsfa.mckp_lp import Relaxation, mckp_relaxation
from tsfa.online import Allocation, RoundProblem, allocate, assemble_allocation
from tsfa.rate import LN2, min_bandwidth_trusted, rate_bps
from tsfa.tau_search import _polish

__all__ = ["allocate_uncertified"]


def allocate_uncertified(problem: RoundProblem, *, tau_hint: float | None = None, xtol: float = 3e-3,
                         max_evaluations: int = 40, polish: int = 2, min_clients: int = 64,
                         working_set: bool = True) -> Allocation:
    """The fast path of :func:`allocate` (``certify=False``): one round without a certificate.

    With G(τ) = Q τ + LP(τ) (LP the knapsack relaxation at τ, :func:`tsfa.mckp_lp.mckp_relaxation`),
    the envelope theorem gives G'(τ) = Q + λ(τ) Σ_k Σ_s x_ks ∂b^min_ks/∂τ, with λ the relaxation's
    bandwidth price and x its (one fractional) solution. G' < 0 where nothing fits (τ below the
    slowest compute) and G' = Q > 0 once the dense round fits under the equal split, so a root is
    bracketed; a safeguarded secant search (Illinois steps, geometric bisection on wide brackets)
    starts at ``tau_hint`` and stops when the bracket is ``xtol`` relative wide. Each knapsack
    reuses the previous multiplier to sort only the increments near the split. The greedy
    integer choice of every evaluated τ is a candidate priced at Q τ + cost (it fits at that τ);
    the ``polish`` cheapest are polished by their exact least latency (Newton on Σ_k b^min_k(τ) = B
    started at the τ where the candidate fits) and the best one returned.

    G also drops where items become available (τ > T_k + S ln2 / c_k), which G' does not see. If,
    at the τ found, the items not yet available could pay for the latency they need (their cost
    savings summed per client against Q Δτ, bandwidth ignored: :func:`_jump_could_pay`), the
    certified search runs instead; on the default cell this happens in some rounds at K ≤ 300
    and none at K ≥ 1000 in the tests and benchmarks, and on the small instances of the property tests often.

    Covers every :class:`RoundProblem` (cap, skipping, min_keep); if the relaxation finds nothing
    that fits under ``max_latency_s`` it hands over to the certified search, which reports the cause.
    ``Allocation.lower_bound`` and ``gap`` are NaN; ``tau_evaluations`` counts the knapsacks.
    Below ``min_clients`` clients the certified search runs instead: it is cheap there, and the
    jumps of G are large enough that the guard above would often ask for it anyway. So it does for
    problems with a choice of precision (``value_bits``): the windows walk keep counts at one precision.

    ``working_set``: after the first knapsack over every item, later ones see only a window of
    keep counts around each client's last choice (:class:`_WorkingSet`), and fall back to every
    item at a τ where the window cannot prove that it holds the relaxation's answer.
    """
    t0 = time.perf_counter()
    p = problem
    if p.num_clients < min_clients or p.value_bits:  # the windows walk keep counts at one precision
        return allocate(problem, tau_hint=tau_hint)
    Q, B = p.queue, p.total_bandwidth_hz
    K, r = p.num_clients, p.shape.rank
    rows = np.arange(K)
    C = p.item_costs()
    t_fixed = p.compute_s + p.downlink_s
    dense_bits = float(p.shape.payload_bits(r))
    with np.errstate(divide="ignore", over="ignore"):
        equal_rate = rate_bps(B / K, p.snr_hz)
        hi = float(np.max(t_fixed + dense_bits / equal_rate))  # the dense round fits the equal split here
    lo = p.downlink_s if p.allow_skip else float(t_fixed.max())  # below it nothing fits
    cap = p.max_latency_s
    state = {"lam": None, "evals": 0}
    cands: dict[bytes, tuple[float, np.ndarray, float]] = {}

    ws = _WorkingSet.build(p, C) if working_set else None

    def slope(tau: float) -> float:
        """G'(τ) (−inf where nothing fits); records the greedy choice as a candidate."""
        state["evals"] += 1
        near = ws is not None and ws.tau is not None and 0.8 <= (tau - lo) / max(ws.tau - lo, 1e-300) <= 1.25
        band = ws.evaluate(tau, state["lam"]) if near else None  # far from the windows' τ they rarely hold
        if band is not None:
            rel, d_whole, d_split = band
            state["last"] = (tau, None, rel.whole)  # which items fit: computed at the end if needed
        else:
            W, D = p._weights_and_slopes(tau)
            rel = mckp_relaxation(W, C, B, multiplier_hint=state["lam"])
            if rel.choice is None:
                return -math.inf
            if ws is not None:
                ws.center(W, rel.multiplier, tau)
            state["last"] = (tau, np.isfinite(W), rel.whole)
            d_whole, d_split = _slope_terms(D, rel)
        if rel.multiplier > 0:
            state["lam"] = rel.multiplier
        ub = float(C[rows, rel.choice].sum()) + Q * tau
        key = rel.choice.astype(np.int8).tobytes()
        if key not in cands or ub < cands[key][0]:
            cands[key] = (ub, rel.choice, tau)
        if rel.multiplier == 0.0:
            return Q
        return Q + rel.multiplier * (d_whole + rel.fraction * d_split)

    if not (math.isfinite(hi) and hi > lo):
        return allocate(problem, tau_hint=tau_hint)  # degenerate scales: the certified search handles them
    if cap is not None and cap < hi:
        hi = cap
        if hi <= lo:  # the cap leaves no time (below the downlink or the slowest compute): certified reports it
            return allocate(problem, tau_hint=tau_hint)
        g_hi = slope(hi)
        if g_hi == -math.inf:  # nothing fits under the cap: the certified search reports why or falls back
            return allocate(problem, tau_hint=tau_hint)
    else:  # every client's cheapest allowed item fits at hi: a candidate without a knapsack
        g_hi = Q
        keep = np.where(p.allowed_keep[None, :], C, np.inf).argmin(axis=1)
        cands[keep.astype(np.int8).tobytes()] = (float(C[rows, keep].sum()) + Q * hi, keep, hi)
    # The search runs on the slack σ = τ − lo (log σ for the secant): G' moves like a power of it.
    a, b = 0.0, hi - lo
    if Q == 0.0 or g_hi <= 0:  # latency is free (or the cap binds): the largest τ is optimal
        if not cands:
            slope(hi)
    else:
        s = float(tau_hint) - lo if tau_hint is not None and lo < tau_hint < hi else None
        last: list[tuple[float, float]] = []  # the last two (log σ, G') with finite G'
        left_known = False  # whether a holds an evaluated G' < 0 (else it is only the lower limit)
        while state["evals"] < max_evaluations:
            if s is None:
                step = math.nan
                if len(last) == 2 and last[0][1] != last[1][1]:
                    (u0, g0), (u1, g1) = last
                    step = -g1 * (u1 - u0) / (g1 - g0)  # secant on G' in log σ
                elif len(last) == 1 and last[0][1] < Q:  # one point: the model G' ≈ Q (1 − (σ*/σ)^1.5)
                    u1 = last[0][0]
                    step = math.log((Q - last[0][1]) / Q) / 1.5
                if math.isfinite(step):
                    s = math.exp(u1 + min(max(step, -0.4), 0.4))  # at most a factor 1.5 per step
                if s is None or not (a < s < b):
                    s = math.sqrt(a * b) if a > 0 and b > 4 * a else (0.5 * (a + b) if left_known or a > 0
                                                                       else 0.1 * b)
            g = slope(lo + s)
            if math.isfinite(g):
                last = [*last[-1:], (math.log(s), g)]
            if g < 0:
                a, left_known = s, math.isfinite(g)
            else:
                b = s
            s = None
            if (b - a <= xtol * b or b <= 1e-9 * (hi - lo) or g == 0.0
                    or (len(last) == 2 and abs(last[1][0] - last[0][0]) <= xtol)):
                break
    # G has downward jumps where items become available (τ > T_k + S ln2 / c_k), which G' does
    # not see: if one client's jump to the right could pay for its own latency, certify instead.
    if "last" in state and state["last"][1] is None:  # a windowed evaluation: which items fit at τ
        tau_last, _, whole = state["last"]
        state["last"] = (tau_last, p.item_availability(tau_last), whole)
    if "last" in state and _jump_could_pay(p, C, *state["last"]):
        return allocate(problem, tau_hint=tau_hint)
    # Polish the cheapest candidates, Newton started where each one fits.
    best = None
    for _, keep, tau_fit in sorted(cands.values(), key=lambda v: v[0])[:polish]:
        bw = _polish(p, keep, tau_fit)
        if not bw.success:
            continue
        obj = float(C[rows, keep].sum()) + Q * bw.latency_s
        if best is None or obj < best[0]:
            best = (obj, keep, bw)
    if best is None:
        return allocate(problem, tau_hint=tau_hint)
    return assemble_allocation(p, best[1], best[2], lower=math.nan, name="fast", t0=t0, evals=state["evals"])


def _slope_terms(D: np.ndarray, rel: Relaxation) -> tuple[float, float]:
    """(Σ_k ∂b^min/∂τ of each client's whole choice, the split increment's ∂b^min/∂τ): with the
    fraction θ, the relaxation's Σ x ∂b^min/∂τ is the first plus θ times the second."""
    d_whole = float(D[np.arange(len(D)), rel.whole].sum())
    if rel.split is None:
        return d_whole, 0.0
    k, j0, j1 = rel.split
    return d_whole, float(D[k, j1] - D[k, j0])


class _WorkingSet:
    """A window of ``width`` consecutive usable keep counts per client for the fast path's knapsacks.

    With the error profile convex in the keep count (sorted component energies give that) and
    the payload affine in it (so b^min is convex in it), each client's Lagrangian C + λ W is
    convex along its chain: a window whose minimiser at the relaxation's multiplier λ lies
    strictly inside it (or at a chain end, or under an item that does not fit) holds that
    client's whole answer, and the skip option (W = 0) is always in the window. If every client
    passes, the knapsack over the windows has the same value, multiplier, split and whole choice
    as the one over every item; :meth:`evaluate` returns None otherwise, and the caller evaluates
    every item and re-centres the windows (:meth:`center`). Built only where the convexity holds.
    """

    def __init__(self, p: RoundProblem, C: np.ndarray, cols: np.ndarray, bits: np.ndarray, width: int):
        self.p, self.C, self.cols, self.bits, self.width = p, C, cols, bits, width
        self.skip = bool(p.allow_skip)
        self.t_fixed = p._items()[2]
        self.rows = np.arange(p.num_clients)
        self.start: np.ndarray | None = None
        self.tau: float | None = None  # the τ the windows were last centred at

    @classmethod
    def build(cls, p: RoundProblem, C: np.ndarray, width: int = 6, min_clients: int = 500) -> _WorkingSet | None:
        bits, cols, _ = p._items()
        if p.num_clients < min_clients or len(cols) < width + 2 or np.any(np.diff(cols) != 1):
            return None  # few clients or small ranks: every item is cheap enough
        cc = C[:, cols]
        scale = np.abs(cc).max(axis=1, keepdims=True)
        if np.any(np.diff(cc, 2, axis=1) < -1e-12 * scale) or np.any(np.diff(bits, 2) < 0):
            return None
        return cls(p, C, cols, bits, width)

    def center(self, W: np.ndarray, lam: float, tau: float) -> None:
        """Windows around each client's minimiser of C + λ W over its usable items at τ."""
        self.tau = tau
        with np.errstate(invalid="ignore"):
            lag = self.C[:, self.cols] + lam * W[:, self.cols]
        m = np.argmin(np.where(np.isnan(lag), np.inf, lag), axis=1)
        self.start = np.clip(m - self.width // 2, 0, len(self.cols) - self.width)

    def evaluate(self, tau: float, lam_hint: float | None):
        """(relaxation in the problem's columns, its :func:`_slope_terms`), or None."""
        if self.start is None:
            return None
        p, w, n, rows = self.p, self.width, len(self.cols), self.rows
        pos = self.start[:, None] + np.arange(w)
        slack = tau - self.t_fixed
        Wb, Db = min_bandwidth_trusted(self.bits[pos], p.snr_hz[:, None], slack[:, None])
        cols = self.cols[pos]
        Cb = np.take_along_axis(self.C, cols, axis=1)
        off = 0
        if self.skip:
            off = 1
            Wb = np.concatenate([np.zeros((len(rows), 1)), Wb], axis=1)
            Db = np.concatenate([np.zeros((len(rows), 1)), Db], axis=1)
            Cb = np.concatenate([self.C[:, :1], Cb], axis=1)
            cols = np.concatenate([np.zeros((len(rows), 1), dtype=cols.dtype), cols], axis=1)
        rel = mckp_relaxation(Wb, Cb, p.total_bandwidth_hz, multiplier_hint=lam_hint)
        if rel.choice is None:
            return None
        with np.errstate(invalid="ignore"):
            lag = Cb[:, off:] + rel.multiplier * Wb[:, off:]
        m = np.argmin(np.where(np.isnan(lag), np.inf, lag), axis=1)
        top = self.start + w  # the first usable position above the window
        above_fits = (top < n) & (self.bits[np.minimum(top, n - 1)] * LN2 < p.snr_hz * slack)
        if np.any((m == 0) & (self.start > 0)) or np.any((m == w - 1) & above_fits):
            return None
        if rel.split is not None and rel.split[2] - off == w - 1 and above_fits[rel.split[0]]:
            return None
        self.start, self.tau = np.clip(self.start + m - w // 2, 0, n - w), tau
        d_whole, d_split = _slope_terms(Db, rel)
        split = None if rel.split is None else (rel.split[0], int(cols[rel.split[0], rel.split[1]]),
                                                int(cols[rel.split[0], rel.split[2]]))
        mapped = Relaxation(rel.value, cols[rows, rel.choice], cols[rows, rel.whole], rel.multiplier, split,
                            rel.fraction)
        return mapped, d_whole, d_split


def _jump_could_pay(p: RoundProblem, C: np.ndarray, tau: float, available: np.ndarray, whole: np.ndarray) -> bool:
    """Whether items not available at τ (W = inf) could pay for the latency they need: item s of
    client k becomes available at τ_ks = T_k + S_s ln2 / c_k and saves at most
    C[k, whole_k] − C[k, s]; with the savings of all items available by τ' summed (the best per
    client), is there a τ' ≤ cap where they exceed Q (τ' − τ)? (A bound: bandwidth is ignored.)"""
    rows = np.arange(p.num_clients)
    now = C[rows, whole]
    later = ~available & p.allowed_keep[None, :] & (C < now[:, None])
    if not later.any():
        return False
    k, s = np.nonzero(later)  # row-major: per client, s and so τ_ks ascending
    bits = p.shape.payload_bits(s).astype(float)
    tau_ks = p.compute_s[k] + p.downlink_s + bits * LN2 / p.snr_hz[k]
    gain = now[k] - C[k, s]
    step = gain.copy()  # the saving each item adds over the client's previous later item
    same = np.flatnonzero(k[1:] == k[:-1]) + 1
    step[same] = gain[same] - gain[same - 1]
    order = np.argsort(tau_ks, kind="stable")
    pays = np.cumsum(step[order]) > p.queue * (tau_ks[order] - tau)
    if p.max_latency_s is not None:
        pays &= tau_ks[order] < p.max_latency_s
    return bool(pays.any())
