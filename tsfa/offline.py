"""TSFA stage 1 — the offline design (SPEC §6).

Before training, with channel *statistics* only (no realised gains), choose the structural
rank r, a nominal keep count s (keep ratio ρ = s/r), the number of rounds and the Lyapunov
weight V so that the predicted final loss is least while the expected round latency stays
within τ̄ (and the training fits a wall-clock budget, if one is given).

Candidates are the grid ranks × keep_ratios (× a rounds grid). For each:

1. **Expected latency by sample-average approximation (SAA).** D fading draws c_{d,k}
   (``Cell.sample_snr_hz``; the same draws for every candidate: common random numbers).
   In the nominal plan every client uploads S(s) bits with the latency-optimal bandwidth
   split of that draw (a convex problem per draw, :func:`tsfa.min_latency_bandwidth`),
   solved for all draws at once: a vectorised Newton kernel (``"fast"``), one batched
   cvxpy program over the D draws (``"cvxpy"``), or a loop over
   ``min_latency_bandwidth`` (``"loop"``, the reference). The estimate is the sample mean
   with a Student-t confidence interval mean ± t_{(1+conf)/2, D−1} · sd / √D.

   *Heavy tail.* With Rayleigh fading E[1/|h|²] = ∞, and τ ≥ S ln2 / c_k for every
   scheduled k, so the expected latency of "every client uploads every round" is infinite:
   the SAA mean then grows slowly (like log D) with the draws and its interval does not
   shrink reliably. ``max_latency_s`` (τ_max, the online stage's hard cap) fixes this the
   way the online stage does: in a draw, the largest set of clients that can all finish by
   τ_max uploads (the clients with the least bandwidth need b^min_k(τ_max), taken in
   increasing order while they fit into B_total: the most clients possible) and the others
   skip the round. The latency is then ≤ τ_max, its mean is finite, and the share of
   uploading clients (``participation``) is reported and constrained
   (``min_participation``) — otherwise a huge payload that nobody can send would look fast.

2. **Rounds.** ``rounds`` fixed (an int, or a grid the design chooses from, subject to
   rounds · latency ≤ ``time_budget_s``), or, with ``rounds=None``, derived from the time
   budget per candidate: rounds = max(1, ⌊time_budget_s / latency⌋) (the most that fit;
   a candidate slower than the whole budget violates the time constraint).

3. **Predicted loss.** ``predict(rank, keep_ratio, rounds)`` (numpy arrays, broadcast)
   returns named terms and their "total"; the table keeps every term. The keep ratio passed
   is the one actually sent, s/r, with s = ⌈ρ r⌉ clipped to 1..r.

4. **Choice.** minimise total over candidates subject to latency ≤ τ̄, rounds · latency ≤
   time budget, participation ≥ min_participation: a MILP (one binary per candidate,
   Σ x = 1, the constraints as linear rows; Pyomo + HiGHS) or plain enumeration. Both break
   ties the same way (smaller rank, then smaller keep, then fewer rounds: the MILP by a
   second, lexicographic solve), and the MILP is always cross-checked against
   enumeration. ``latency_statistic`` says which latency the constraints use: the SAA
   mean ("mean", the SPEC's expectation) or the interval's upper end ("upper", guarding
   against an optimistic sample).

5. **V.** The allocation-only simulator (:func:`tsfa.simulate.simulate_allocation`) runs the
   online stage (:class:`tsfa.allocator.OnlineAllocator`, skipping allowed, hard cap
   ``online_cap_factor`` · τ̄) for the chosen rank on fresh channel draws, with error profiles
   from :class:`tsfa.simulate.ErrorModel` normalised by the round's mean dense energy
   Σ_k p_k e_k(0), and allocator weight V·τ̄² (the scale-free V of ``fedloop``). Over a
   log grid of V (the same draws for every V), refined by a few geometric bisections between
   the best V that meets τ̄ and the next larger V that does not, the chosen V is the one with
   the least simulated dropped energy among those whose time-average latency is ≤ τ̄ over
   min(rounds, v_rounds) rounds (the planned horizon: a large V's queue transient must fit
   in it). Larger V drops less energy and lets the queue, hence the latency, run higher.

Symbols (SPEC → code): r ``rank``; s ``keep``; ρ ``keep_ratio``; τ̄ ``latency_budget_s``;
τ_max ``max_latency_s``; D ``draws``; V ``weight_v``; T^dl ``downlink_s`` =
r·M·q / ``downlink_rate_bps``; T^cmp_k ``compute_s``.

``cvxpy``, ``pyomo`` and ``scipy.special`` are imported lazily, inside the functions.
"""

from __future__ import annotations

import math
import time
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tsfa._validate import as_array, as_scalar
from tsfa.bandwidth import min_latency_bandwidth
from tsfa.model import LN2, Cell, Clients, LoraShape, ModuleShape, _inverse_x, bandwidth_for_deadline, rate_bps
from tsfa.simulate import ErrorModel
from tsfa.status import ResultMixin, SolverError, Status, status_from_cvxpy

__all__ = [
    "LatencyEstimate",
    "Candidate",
    "VPoint",
    "OfflinePlan",
    "expected_latency",
    "design_offline",
    "LATENCY_BACKENDS",
    "DESIGN_METHODS",
    "DEFAULT_V_GRID",
]

LATENCY_BACKENDS = ("fast", "cvxpy", "loop")
DESIGN_METHODS = ("milp", "enumerate")
LATENCY_STATISTICS = ("mean", "upper")
#: The scale-free V values swept by default (profiles relative to the mean dense energy).
DEFAULT_V_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Relative slack with which a candidate meets a budget (the MILP's rows use HiGHS at 1e-10).
FEASIBILITY_RTOL = 1e-9
#: Two predicted losses within this relative distance (of the largest |loss|) tie.
TIE_RTOL = 1e-9
CONSTRAINTS = ("latency", "time", "participation")


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


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


@dataclass(frozen=True, eq=False)
class Candidate:
    """One row of the design table (one (rank, keep ratio, rounds) candidate).

    Attributes:
        index: position in the table (the tie-break order: rank, then keep, then rounds).
        rank: r.  keep: s = ⌈ρ r⌉ in 1..r.  keep_ratio: s / r (what ``predict`` saw).
        nominal_keep_ratios: the grid values ρ that give this keep at this rank.
        rounds: training rounds.
        payload_bits: S(s) per client, bits.  downlink_s: T^dl, s.
        predicted_loss: the predictor's "total".  loss_terms: every term, by name (read-only).
        latency_mean_s, latency_low_s, latency_high_s: SAA mean and interval, s.
        latency_s: the statistic the constraints use (mean or upper end), s.
        participation: mean share of uploading clients.
        training_time_s: rounds · latency_s, s.
        violated: the constraints this candidate breaks (names from ``CONSTRAINTS``).
    """

    index: int
    rank: int
    keep: int
    keep_ratio: float
    nominal_keep_ratios: tuple[float, ...]
    rounds: int
    payload_bits: int
    downlink_s: float
    predicted_loss: float
    loss_terms: Mapping[str, float]
    latency_mean_s: float
    latency_low_s: float
    latency_high_s: float
    latency_s: float
    participation: float
    training_time_s: float
    violated: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.violated

    def as_dict(self) -> dict:
        """A flat dict (loss terms as ``loss_<name>``), e.g. for a CSV row."""
        row = {k: getattr(self, k) for k in ("index", "rank", "keep", "keep_ratio", "rounds", "payload_bits",
                                             "downlink_s", "predicted_loss")}
        row["nominal_keep_ratios"] = " ".join(f"{x:g}" for x in self.nominal_keep_ratios)
        row.update({f"loss_{k}": v for k, v in self.loss_terms.items() if k != "total"})
        row.update({k: getattr(self, k) for k in ("latency_mean_s", "latency_low_s", "latency_high_s", "latency_s",
                                                  "participation", "training_time_s")})
        row["feasible"] = self.feasible
        row["violated"] = "+".join(self.violated)
        return row


@dataclass(frozen=True)
class VPoint:
    """One V of the sweep: the online stage simulated for the chosen rank.

    ``weight_v`` is scale-free (profiles relative to the mean dense energy, allocator weight
    V·τ̄²); latency in s; dropped energy relative to the dense update energy.
    """

    weight_v: float
    time_average_latency_s: float
    average_dropped_energy: float
    average_queue_s: float
    mean_keep: float
    meets_budget: bool


@dataclass(frozen=True, eq=False)
class OfflinePlan(ResultMixin):
    """Result of :func:`design_offline`.

    Attributes:
        status: OPTIMAL, INFEASIBLE (no candidate meets the budgets; ``message`` gives the
            smallest feasible τ̄ and the fix) or ERROR (a solver failed, or the MILP and the
            enumeration disagree).
        message: what was decided and why, in words.
        rank, keep, keep_ratio, rounds: the chosen r, s, s/r and round count (None if none).
        weight_v: the chosen scale-free V (None if not chosen); ``allocator_weight_v`` = V·τ̄²
            is what to pass to :class:`~tsfa.allocator.OnlineAllocator` with error profiles
            divided by the round's Σ p_k e_k(0) (``fedloop``'s convention).
        predicted_loss, loss_terms: the chosen candidate's predicted final loss and its terms.
        expected_latency_s, latency_low_s, latency_high_s: its SAA mean latency and interval, s.
        participation: its mean share of uploading clients.
        latency_budget_s, time_budget_s, max_latency_s, min_participation: the inputs.
        min_latency_budget_s: the smallest τ̄ for which some candidate is feasible (the least
            latency statistic among candidates that meet the other constraints; inf if none).
        binding: the constraints that bind: relaxing one alone admits a candidate with lower
            predicted loss (if no single one does but a better candidate exists, the ones it
            breaks); with rounds derived from the time budget, "time" always binds.
        table: every candidate (:class:`Candidate`), in tie-break order.
        chosen: index of the chosen candidate in ``table`` (None if none).
        draws, confidence, latency_statistic: SAA settings.
        v_sweep: the V sweep (:class:`VPoint`), empty if V was not chosen.
        cross_check: True if the MILP and enumeration agreed (None for method="enumerate").
        objective: equals ``predicted_loss``.
        solve_time_s: wall time of the whole design, s.
        backend: "milp:appsi_highs" or "enumerate" (and the SAA backend after a "/").
    """

    status: Status
    message: str
    rank: int | None
    keep: int | None
    keep_ratio: float | None
    rounds: int | None
    weight_v: float | None
    allocator_weight_v: float | None
    predicted_loss: float
    loss_terms: Mapping[str, float]
    expected_latency_s: float
    latency_low_s: float
    latency_high_s: float
    participation: float
    latency_budget_s: float
    time_budget_s: float | None
    max_latency_s: float | None
    min_participation: float
    min_latency_budget_s: float
    binding: tuple[str, ...]
    table: tuple[Candidate, ...]
    chosen: int | None
    draws: int
    confidence: float
    latency_statistic: str
    v_sweep: tuple[VPoint, ...]
    cross_check: bool | None
    objective: float
    solve_time_s: float
    backend: str

    @property
    def chosen_candidate(self) -> Candidate | None:
        return None if self.chosen is None else self.table[self.chosen]

    def table_rows(self) -> list[dict]:
        """The table as flat dicts (see :meth:`Candidate.as_dict`), with a ``chosen`` flag."""
        return [dict(c.as_dict(), chosen=c.index == self.chosen) for c in self.table]

    def format_table(self, *, feasible_only: bool = False) -> str:
        """The table as fixed-width text; the chosen row is marked with '*'."""
        terms = [k for k in (self.table[0].loss_terms if self.table else {}) if k != "total"]
        head = ["", "rank", "keep", "ratio", "rounds", *terms, "total", "lat mean", f"{self.confidence:.0%} CI",
                "particip", "violated"]
        rows = []
        for c in self.table:
            if feasible_only and not c.feasible:
                continue
            rows.append(["*" if c.index == self.chosen else "", str(c.rank), str(c.keep), f"{c.keep_ratio:.3g}",
                         str(c.rounds), *(f"{c.loss_terms[t]:.4g}" for t in terms), f"{c.predicted_loss:.4g}",
                         f"{c.latency_mean_s:.4g}", f"[{c.latency_low_s:.4g}, {c.latency_high_s:.4g}]",
                         f"{c.participation:.3f}", "+".join(c.violated) or "-"])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def shape(self, modules) -> LoraShape:
        """The chosen rank applied to ``modules`` (a LoraShape or a sequence of ModuleShape)."""
        if self.rank is None:
            raise ValueError(f"the plan has no chosen rank (status {self.status.value})")
        return _base_shape(modules).with_rank(self.rank)


# --------------------------------------------------------------------------------------
# SAA: batched least-latency kernels. Rows are (candidate, draw) pairs, columns clients.
# S payload bits (0 = not scheduled), c SNR product Hz, T = T^dl + T^cmp s, B Hz.
# --------------------------------------------------------------------------------------


def _fast_batched(S, c, T, B, *, rtol=1e-13, max_iter=100):
    """Least-latency split of every row at once: the Newton of ``tsfa.bandwidth._fast``
    on log Σ_k b^min_k(τ) = log B, one τ per row, vectorised. Returns b (N, K) in Hz."""
    N, K = S.shape
    sch = S > 0
    n = sch.sum(axis=1)
    nn = np.maximum(n, 1)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        lo = np.where(sch, T + S / rate_bps(B, c), -np.inf).max(axis=1)
        hi = np.where(sch, T + S / rate_bps(B / nn, c), -np.inf).max(axis=1)
    bw = np.where(sch, B / nn, 0.0)  # the answer for 0/1 client rows and degenerate brackets
    act = np.flatnonzero((n >= 2) & (hi > lo * (1 + 1e-15)))
    tau = lo.copy()
    for _ in range(max_iter):
        if act.size == 0:
            break
        sa, Sa, ca, Ta, t = sch[act], S[act], c[act], T[act], tau[act]
        slack = t[:, None] - Ta
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(sa, Sa * LN2 / (ca * slack), 0.5)  # 0.5: a placeholder for unscheduled
        x = _inverse_x(a.ravel())[0].reshape(a.shape)
        b = np.where(sa, ca / x, 0.0)
        db = np.where(sa, ca * a / (x * slack * (1.0 / (1.0 + x) - a)), 0.0)
        total = b.sum(axis=1)
        g = np.log(total / B)
        lo_a = np.where(g > 0, t, lo[act])
        hi_a = np.where(g > 0, hi[act], t)
        lo[act], hi[act] = lo_a, hi_a
        done = (np.abs(total - B) <= rtol * B) | (hi_a - lo_a <= 4e-16 * hi_a)
        bw[act] = b * (B / total)[:, None]
        new = t - g * total / db.sum(axis=1)
        new = np.where((lo_a < new) & (new < hi_a), new, 0.5 * (lo_a + hi_a))
        tau[act] = new
        act = act[~done]
    return bw


_CVXPY_CACHE: OrderedDict[tuple[int, int], tuple] = OrderedDict()


def _cvxpy_batched_problem(D: int, K: int):
    """One DPP program for D independent draws (compiled once per (D, K)).

    Variables b (D×K, in units of B), τ (D, in each draw's equal-split latency) and the
    slacks w = τ − T; constraints S·inv_pos(w) ≤ b log2(1 + c/b) per (draw, client) and
    Σ_k b ≤ 1 per draw; minimise Σ_d τ_d (separable, so each τ_d is least).
    """
    import cvxpy as cp

    key = (D, K)
    if key in _CVXPY_CACHE:
        _CVXPY_CACHE.move_to_end(key)
        return _CVXPY_CACHE[key]
    S = cp.Parameter((D, K), nonneg=True, name="payload")
    c = cp.Parameter((D, K), pos=True, name="snr")
    T = cp.Parameter((D, K), nonneg=True, name="offset")
    b = cp.Variable((D, K), nonneg=True, name="bandwidth")
    tau = cp.Variable(D, name="tau")
    w = cp.Variable((D, K), name="slack")
    rate = -cp.rel_entr(b, b + c) / LN2
    cons = [w == cp.reshape(tau, (D, 1), order="C") @ np.ones((1, K)) - T,
            cp.multiply(S, cp.inv_pos(w)) <= rate, cp.sum(b, axis=1) <= 1.0]
    prob = cp.Problem(cp.Minimize(cp.sum(tau)), cons)
    assert prob.is_dcp(dpp=True)
    _CVXPY_CACHE[key] = (prob, S, c, T, b)
    while len(_CVXPY_CACHE) > 8:
        _CVXPY_CACHE.popitem(last=False)
    return _CVXPY_CACHE[key]


def _cvxpy_batched(S, c, T, B):
    """Least-latency split of every row by one batched exponential-cone program (Clarabel).

    The program keeps the shape (rows, K) so it is compiled once per shape: a row with no
    scheduled client gets a dummy one (its answer is discarded)."""
    import cvxpy as cp

    from tsfa.bandwidth import CLARABEL_OPTIONS

    N, K = S.shape
    sch = S > 0
    empty = ~sch.any(axis=1)
    if empty.all():
        return np.zeros((N, K))
    S, c, T, sch = S.copy(), c.copy(), T.copy(), sch.copy()
    S[empty, 0], c[empty, 0], T[empty, 0], sch[empty, 0] = 1.0, B, 0.0, True
    n = sch.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_ref = np.where(sch, T + S / rate_bps(B / n, c), -np.inf).max(axis=1)  # equal split: feasible
    prob, pS, pc, pT, b = _cvxpy_batched_problem(N, K)
    pS.value = np.where(sch, S, 0.0) / (B * t_ref[:, None])
    pc.value = c / B
    pT.value = np.where(sch, T / t_ref[:, None], 0.0)  # an unscheduled client's offset must not bind
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            prob.solve(solver="CLARABEL", **CLARABEL_OPTIONS)
    except cp.SolverError as exc:
        raise SolverError(f"cvxpy/CLARABEL failed on the batched SAA program: {exc}") from exc
    status = status_from_cvxpy(prob.status)
    if not status.success or b.value is None or not np.all(np.isfinite(b.value)):
        raise SolverError(f"cvxpy/CLARABEL returned status {prob.status!r} on the batched SAA program",
                          status if not status.success else Status.ERROR)
    bw = np.where(sch, np.maximum(np.asarray(b.value, dtype=float), 0.0) * B, 0.0)
    bw *= np.minimum(1.0, B / bw.sum(axis=1))[:, None]
    bw[empty] = 0.0
    return bw


def _loop(S, c, T, B):
    """Reference: :func:`tsfa.min_latency_bandwidth` (fast backend) on every row."""
    bw = np.zeros(S.shape)
    for i in range(S.shape[0]):
        bw[i] = min_latency_bandwidth(S[i], c[i], T[i], B).bandwidth_hz
    return bw


_KERNELS = {"fast": _fast_batched, "cvxpy": _cvxpy_batched, "loop": _loop}


def _participants(S, c, T, B, cap):
    """Per row, the most clients that can all finish by ``cap`` (mask N × K).

    b^min_k(cap) per client (inf if impossible); sorted increasing, the longest prefix
    whose sum fits into B is the largest feasible set (exchange argument)."""
    need = np.where(S > 0, bandwidth_for_deadline(S, c, T, cap), np.inf)
    order = np.argsort(need, axis=1, kind="stable")
    cum = np.cumsum(np.take_along_axis(need, order, axis=1), axis=1)
    fits = cum <= B * (1 + 1e-12)
    mask = np.zeros(S.shape, dtype=bool)
    np.put_along_axis(mask, order, fits, axis=1)
    return mask & (S > 0)


def _saa(S, T, snr, B, downlink, cap, backend):
    """Per-draw least latency for C allocations on D draws.

    S, T: (C, K) payload bits and T^dl + T^cmp offsets; snr: (D, K); downlink: (C,).
    Returns (latency (C, D), participation (C, D)).
    """
    C, K = S.shape
    D = snr.shape[0]
    Sx = np.broadcast_to(S[:, None, :], (C, D, K)).reshape(C * D, K)
    Tx = np.broadcast_to(T[:, None, :], (C, D, K)).reshape(C * D, K)
    cx = np.broadcast_to(snr[None, :, :], (C, D, K)).reshape(C * D, K)
    if cap is not None:
        Sx = np.where(_participants(Sx, cx, Tx, B, cap), Sx, 0.0)
    sch = Sx > 0
    if backend == "cvxpy":  # one batched program per allocation (D draws each)
        bw = np.concatenate([_cvxpy_batched(Sx[i * D:(i + 1) * D], cx[i * D:(i + 1) * D], Tx[i * D:(i + 1) * D], B)
                             for i in range(C)])
    else:
        bw = _KERNELS[backend](Sx, cx, Tx, B)
    with np.errstate(divide="ignore", invalid="ignore"):
        finish = np.where(sch, Tx + Sx / rate_bps(bw, cx), -np.inf)
    lat = finish.max(axis=1).reshape(C, D)
    lat = np.where(sch.any(axis=1).reshape(C, D), lat, np.asarray(downlink, dtype=float)[:, None])
    return lat, sch.mean(axis=1).reshape(C, D)


def _t_quantile(confidence: float, dof: int) -> float:
    from scipy.special import stdtrit

    return float(stdtrit(dof, 0.5 + 0.5 * confidence))


def _summaries(lat: np.ndarray, confidence: float):
    """Mean, interval and spread along the last axis (the draws)."""
    D = lat.shape[-1]
    mean = lat.mean(axis=-1)
    std = lat.std(axis=-1, ddof=1)
    half = _t_quantile(confidence, D - 1) * std / math.sqrt(D)
    return mean, mean - half, mean + half, std


def _check_backend(backend) -> str:
    if backend not in LATENCY_BACKENDS:
        raise ValueError(f"backend must be one of {LATENCY_BACKENDS}; got backend = {backend!r}")
    return backend


def _check_cap(max_latency_s):
    return None if max_latency_s is None else as_scalar("max_latency_s", max_latency_s, lower=0, strict=True)


def _check_compute(compute_s, k: int) -> np.ndarray:
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
    t_cmp = _check_compute(compute_s, K)
    k = np.broadcast_to(np.asarray(keep), (K,)) if np.ndim(keep) == 0 else np.asarray(keep)
    if k.shape != (K,):
        raise ValueError(f"keep must be an int or have one entry per client ({K}); got shape {k.shape}")
    bits = np.asarray(shape.payload_bits(k), dtype=float)
    if np.any(bits <= 0):
        raise ValueError(f"keep must be >= 1 for every client (the nominal plan schedules everyone); "
                         f"got keep = {keep!r}")
    draws = as_scalar("draws", draws, lower=2, integer=True)
    confidence = _check_confidence(confidence)
    downlink_s = as_scalar("downlink_s", downlink_s, lower=0)
    cap = _check_cap(max_latency_s)
    backend = _check_backend(backend)
    t0 = time.perf_counter()
    snr = cell.sample_snr_hz(clients, rng=rng, rounds=draws)
    lat, part = _saa(bits[None, :], (downlink_s + t_cmp)[None, :], snr, cell.total_bandwidth_hz,
                     np.array([downlink_s]), cap, backend)
    mean, low, high, std = _summaries(lat, confidence)
    per = lat[0].copy()
    per.setflags(write=False)
    return LatencyEstimate(float(mean[0]), float(low[0]), float(high[0]), float(std[0]), float(np.median(per)),
                           float(per.max()), draws, confidence, float(part.mean()), cap, per, backend,
                           time.perf_counter() - t0)


def _check_confidence(confidence) -> float:
    conf = as_scalar("confidence", confidence, lower=0, strict=True)
    if conf >= 1:
        raise ValueError(f"confidence must lie in (0, 1); got confidence = {confidence!r}")
    return conf


# --------------------------------------------------------------------------------------
# The discrete choice: enumeration and the MILP (Pyomo + HiGHS), same rule, same ties
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choice:
    status: Status
    index: int | None
    message: str


def _violations(lat, rounds, part, latency_budget, time_budget, min_participation) -> np.ndarray:
    """Boolean (N, 3): candidate i breaks latency / time / participation (FEASIBILITY_RTOL slack)."""
    bad = np.zeros((len(lat), 3), dtype=bool)
    bad[:, 0] = lat > latency_budget * (1 + FEASIBILITY_RTOL)
    if time_budget is not None:
        bad[:, 1] = rounds * lat > time_budget * (1 + FEASIBILITY_RTOL)
    if min_participation > 0:
        bad[:, 2] = part < min_participation - FEASIBILITY_RTOL
    return bad


def _tie_tol(loss: np.ndarray) -> float:
    return TIE_RTOL * max(float(np.max(np.abs(loss))), 1e-300)


def _choose_enumerate(loss, lat, rounds, part, *, latency_budget, time_budget=None, min_participation=0.0) -> _Choice:
    """Least loss among feasible candidates; ties (within TIE_RTOL) go to the lowest index."""
    loss = np.asarray(loss, dtype=float)
    ok = ~_violations(lat, rounds, part, latency_budget, time_budget, min_participation).any(axis=1)
    if not ok.any():
        return _Choice(Status.INFEASIBLE, None, "enumeration: no candidate meets the constraints")
    best = float(loss[ok].min())
    idx = int(np.flatnonzero(ok & (loss <= best + _tie_tol(loss)))[0])
    return _Choice(Status.OPTIMAL, idx, f"enumeration over {len(loss)} candidates")


def _choose_milp(loss, lat, rounds, part, *, latency_budget, time_budget=None, min_participation=0.0,
                 solver: str = "appsi_highs") -> _Choice:
    """The same choice as a MILP: binaries x_i, Σ x = 1, the budgets as linear rows.

    Stage 1 minimises Σ loss_i x_i; stage 2 adds Σ loss_i x_i ≤ optimum + tie tolerance and
    minimises Σ i x_i, which breaks ties exactly as :func:`_choose_enumerate` does. Rows are
    scaled (latency by τ̄, time by its budget, loss by max |loss|).
    """
    import logging

    import pyomo.environ as pe
    from pyomo.common.log import LoggingIntercept

    from tsfa.knapsack import _HIGHS_FEASIBILITY_TOL, _pyomo_status_table

    loss = np.asarray(loss, dtype=float)
    N = len(loss)
    scale = max(float(np.max(np.abs(loss))), 1e-300)
    idx = range(N)
    m = pe.ConcreteModel(name="offline_design")
    m.candidates = pe.Set(initialize=idx, ordered=True)
    m.x = pe.Var(m.candidates, domain=pe.Binary)
    m.one = pe.Constraint(expr=pe.quicksum(m.x[i] for i in idx) == 1)
    m.latency = pe.Constraint(expr=pe.quicksum(float(lat[i] / latency_budget) * m.x[i] for i in idx) <= 1)
    if time_budget is not None:
        m.time = pe.Constraint(expr=pe.quicksum(float(rounds[i] * lat[i] / time_budget) * m.x[i] for i in idx) <= 1)
    if min_participation > 0:
        m.participation = pe.Constraint(
            expr=pe.quicksum(float(part[i]) * m.x[i] for i in idx) >= min_participation)
    m.loss = pe.Objective(expr=pe.quicksum(float(loss[i] / scale) * m.x[i] for i in idx), sense=pe.minimize)

    opt = pe.SolverFactory(solver)
    if opt is None or not opt.available(exception_flag=False):
        return _Choice(Status.ERROR, None, f"Pyomo solver {solver!r} is not available")
    options = {"mip_rel_gap": 0.0, "mip_abs_gap": 0.0, "mip_feasibility_tolerance": _HIGHS_FEASIBILITY_TOL,
               "random_seed": 0}

    def solve(stage: str):
        try:
            res = opt.solve(m, load_solutions=False, options=options)
        except Exception as exc:  # a solver failure is a status, never an exception
            return Status.ERROR, None, f"Pyomo {solver} raised {type(exc).__name__} ({stage}): {exc}"
        cond = res.solver.termination_condition
        status = _pyomo_status_table().get(cond, Status.ERROR)
        if status is not Status.OPTIMAL or len(res.solution) == 0:
            status = status if status is Status.INFEASIBLE else Status.ERROR
            return status, None, f"Pyomo {solver}: {cond} ({stage})"
        with LoggingIntercept(level=logging.WARNING, module="pyomo.core"):
            m.solutions.load_from(res)
        x = np.array([m.x[i].value if m.x[i].value is not None else np.nan for i in idx])
        pick = np.flatnonzero(np.rint(x) == 1)
        if len(pick) != 1:
            return Status.ERROR, None, f"Pyomo {solver}: the solution does not pick one candidate ({stage})"
        return Status.OPTIMAL, int(pick[0]), f"Pyomo {solver}: {cond}"

    status, first, msg = solve("least loss")
    if first is None:
        return _Choice(status, None, msg)
    m.loss.deactivate()
    m.tie = pe.Constraint(expr=pe.quicksum(float(loss[i] / scale) * m.x[i] for i in idx)
                          <= float((loss[first] + _tie_tol(loss)) / scale))
    m.order = pe.Objective(expr=pe.quicksum((i / N) * m.x[i] for i in idx), sense=pe.minimize)
    status, second, msg2 = solve("tie-break")
    if second is None:
        return _Choice(status, None, msg2)
    return _Choice(Status.OPTIMAL, second, f"MILP over {N} candidates ({msg}; lexicographic tie-break)")


# --------------------------------------------------------------------------------------
# V: the allocation-only simulator on the chosen rank
# --------------------------------------------------------------------------------------


class _RelativeProfiles:
    """Wraps an OnlineAllocator so that each round's error profiles are divided by the round's
    mean dense energy Σ_k p_k e_k(0) (``fedloop``'s scale-free convention)."""

    def __init__(self, policy):
        self.policy = policy
        self.shape = policy.shape
        self.latency_budget_s = policy.latency_budget_s

    @property
    def queue(self):
        return self.policy.queue

    def step(self, snr_hz, compute_s, error_profile, data_weight=None):
        k = len(error_profile)
        p = np.full(k, 1.0 / k) if data_weight is None else np.asarray(data_weight, dtype=float)
        scale = float(np.sum(p * error_profile[:, 0]))
        rel = error_profile / scale if scale > 0 else error_profile
        return self.policy.step(snr_hz, compute_s, rel, data_weight)

    def observe(self, latency_s):
        self.policy.observe(latency_s)


def _sweep_v(shape, cell, clients, compute_s, *, latency_budget, downlink_s, v_grid, refine, rounds, cap_factor,
             error_model, data_weight, seed, drift="linear") -> tuple[VPoint, ...]:
    """Simulate the online stage for every V of the grid, then bisect (geometrically, ``refine``
    times) between the best V that meets τ̄ and the next larger V that does not."""
    from tsfa.allocator import OnlineAllocator
    from tsfa.simulate import simulate_allocation

    cap = None if cap_factor is None else cap_factor * latency_budget

    def run(v: float) -> VPoint:
        policy = OnlineAllocator(shape, latency_budget_s=latency_budget, weight_v=v * latency_budget**2,
                                 total_bandwidth_hz=cell.total_bandwidth_hz, downlink_s=downlink_s,
                                 max_latency_s=cap, allow_skip=True, drift=drift)
        res = simulate_allocation(_RelativeProfiles(policy), cell, clients, rounds=rounds, compute_s=compute_s,
                                  error_model=error_model, data_weight=data_weight, rng=seed)
        lat = res.time_average_latency_s
        return VPoint(float(v), lat, res.average_dropped_energy, res.average_queue, float(res.mean_keep.mean()),
                      bool(lat <= latency_budget * (1 + FEASIBILITY_RTOL)))

    points = [run(float(v)) for v in np.sort(v_grid)]
    for _ in range(refine):
        # Bracket the budget's edge: the largest V that meets τ̄ and the next larger V that does
        # not (at small V the dropped energy is flat up to simulation noise, so bisecting from
        # the least-energy point could stall there).
        meets = [p.weight_v for p in points if p.meets_budget]
        if not meets:
            break
        lo = max(meets)
        above = [p.weight_v for p in points if not p.meets_budget and p.weight_v > lo]
        if not above:
            break
        points.append(run(math.sqrt(lo * min(above))))
    return tuple(sorted(points, key=lambda p: p.weight_v))


def _pick_v(sweep: tuple[VPoint, ...]) -> VPoint | None:
    """Least dropped energy among the V that meet τ̄ (ties: the larger V); None if none does."""
    ok = [p for p in sweep if p.meets_budget]
    if not ok:
        return None
    return min(ok, key=lambda p: (p.average_dropped_energy, -p.weight_v))


# --------------------------------------------------------------------------------------
# The design
# --------------------------------------------------------------------------------------


def _base_shape(modules) -> LoraShape:
    if isinstance(modules, LoraShape):
        return modules.with_rank(1)
    if isinstance(modules, (str, bytes)) or not isinstance(modules, Sequence) or not modules:
        raise ValueError(f"modules must be a LoraShape or a non-empty sequence of ModuleShape; got {modules!r}")
    return LoraShape(tuple(m if isinstance(m, ModuleShape) else ModuleShape(*m) for m in modules), 1)


def _int_grid(name: str, values, lower: int) -> np.ndarray:
    arr = as_array(name, values, integer=True, lower=lower)
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} must not repeat values; got {name} = {list(values)!r}")
    return np.sort(arr)


def _predict(predict, rank, keep_ratio, rounds) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    n = len(rank)
    try:
        out = predict(rank, keep_ratio, rounds)
    except Exception as exc:
        raise ValueError(f"predict(rank, keep_ratio, rounds) raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, Mapping) or "total" not in out:
        raise ValueError(f"predict must return a mapping of term names to arrays with a 'total' entry; got {out!r}")
    terms = {}
    for name, val in out.items():
        try:
            arr = np.broadcast_to(np.asarray(val, dtype=float), (n,)).copy()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"predict's term {name!r} must broadcast to shape ({n},); got {np.shape(val)}") from exc
        if not np.all(np.isfinite(arr)):
            i = int(np.flatnonzero(~np.isfinite(arr))[0])
            raise ValueError(f"predict's term {name!r} must be finite; got {arr[i]!r} at rank = {rank[i]}, "
                             f"keep_ratio = {keep_ratio[i]:.6g}, rounds = {rounds[i]}")
        terms[str(name)] = arr
    return terms["total"], terms


def _binding(loss, bad, chosen, derived_rounds) -> tuple[str, ...]:
    tol = _tie_tol(loss)
    better = np.flatnonzero(loss < loss[chosen] - tol)
    names = set()
    for j in range(3):  # constraint j alone keeps a better candidate out
        only_j = bad[better, j] & (bad[better].sum(axis=1) == 1)
        if only_j.any():
            names.add(CONSTRAINTS[j])
    if not names and better.size:
        j = better[np.argmin(loss[better])]
        names.update(CONSTRAINTS[i] for i in np.flatnonzero(bad[j]))
    if derived_rounds:
        names.add("time")
    return tuple(c for c in CONSTRAINTS if c in names)


def _infeasible_message(table, bad, lat_stat, latency_budget, time_budget, min_participation, statistic) -> tuple:
    """(message, smallest feasible τ̄)."""
    others = ~bad[:, 1:].any(axis=1)
    what = "mean latency" if statistic == "mean" else "upper end of the latency interval"
    if others.any():
        i = int(np.flatnonzero(others)[np.argmin(lat_stat[others])])
        c = table[i]
        least = float(lat_stat[i])
        msg = (f"no candidate meets latency_budget_s = {latency_budget:.6g} s: the smallest feasible "
               f"latency_budget_s is {least:.6g} s (rank {c.rank}, keep {c.keep}: {what} {least:.6g} s, "
               f"{c.latency_low_s:.4g}–{c.latency_high_s:.4g} s); raise latency_budget_s to at least that, or add "
               f"smaller ranks or keep ratios, or more bandwidth")
        return msg, least
    parts = ["no candidate meets the constraints other than latency, so no latency_budget_s is feasible"]
    if time_budget is not None and bad[:, 1].all():
        need = min(c.rounds * c.latency_s for c in table)
        parts.append(f"time_budget_s = {time_budget:.6g} s is below the least training time {need:.6g} s "
                     f"(rounds × latency); raise time_budget_s to at least that or plan fewer rounds")
    if min_participation > 0 and bad[:, 2].all():
        best = max(c.participation for c in table)
        parts.append(f"min_participation = {min_participation:.6g} exceeds the best participation {best:.4g} "
                     f"under max_latency_s: raise max_latency_s or lower min_participation")
    if len(parts) == 1:
        parts.append("no single candidate meets both the time and the participation constraints")
    return "; ".join(parts), math.inf


def design_offline(
    modules,
    *,
    cell: Cell,
    clients: Clients,
    compute_s,
    latency_budget_s: float,
    ranks: Sequence[int],
    keep_ratios: Sequence[float],
    predict: Callable[[np.ndarray, np.ndarray, np.ndarray], Mapping[str, np.ndarray]],
    rounds: int | Sequence[int] | None = None,
    time_budget_s: float | None = None,
    downlink_rate_bps: float | None = None,
    max_latency_s: float | None = None,
    min_participation: float = 0.9,
    latency_statistic: str = "mean",
    draws: int = 200,
    confidence: float = 0.95,
    rng: np.random.Generator | int | None = 0,
    backend: str = "fast",
    method: str = "milp",
    choose_weight_v: bool = True,
    v_grid: Sequence[float] = DEFAULT_V_GRID,
    v_rounds: int = 100,
    v_refine: int = 2,
    online_cap_factor: float | None = 3.0,
    online_drift: str = "linear",
    error_model: ErrorModel | None = None,
    data_weight=None,
) -> OfflinePlan:
    """TSFA's offline stage: choose rank, nominal keep ratio, rounds and V (module docstring).

    Args:
        modules: the adapted modules: a :class:`LoraShape` (its rank is ignored; its
            ``bits_per_value`` and ``header_bits`` are used) or a sequence of
            :class:`ModuleShape`. No weights are needed (e.g. ``tsfa.llama_7b_qv()``).
        cell, clients: the radio cell and the client population; only channel *statistics*
            are used (large-scale gains; the fading is drawn).
        compute_s: T^cmp_k per client, seconds: an array (K,), or a callable
            ``f(shape: LoraShape) -> (K,)`` if it depends on the rank.
        latency_budget_s: τ̄, the long-term average round latency budget, s.
        ranks: candidate structural ranks (distinct positive ints ≤ the smallest module side).
        keep_ratios: candidate nominal keep ratios ρ ∈ (0, 1]; s = ⌈ρ r⌉ clipped to 1..r.
        predict: ``predict(rank, keep_ratio, rounds) -> {term: array}`` with a "total"
            entry, the predicted final loss; arguments are 1-D arrays over candidates (ints,
            floats in (0, 1], ints).
        rounds: a round count, a grid of counts to choose from, or None to derive the most
            rounds that fit ``time_budget_s`` per candidate.
        time_budget_s: training wall-clock budget, s: rounds · latency ≤ time_budget_s.
        downlink_rate_bps: broadcast rate of the global adapter (T^dl = r·M·q / rate per
            round); None: the downlink takes no time.
        max_latency_s: τ_max, a per-round cap in the SAA (module docstring); None: every
            client uploads every round (the mean then diverges slowly with ``draws``).
        min_participation: least mean share of uploading clients (only binds with a cap).
        latency_statistic: "mean" (SAA mean ≤ τ̄) or "upper" (interval's upper end ≤ τ̄);
            the same statistic sets the training time.
        draws, confidence: SAA draws D ≥ 2 and interval level.
        rng: seed or Generator; the SAA draws come first, then the V simulation's seed.
        backend: SAA kernel, "fast", "cvxpy" or "loop".
        method: "milp" (Pyomo + HiGHS, cross-checked by enumeration) or "enumerate".
        choose_weight_v: run the V sweep on the chosen rank.
        v_grid, v_rounds, v_refine, online_cap_factor, error_model, data_weight: the V
            sweep's scale-free V values, simulated rounds (min(rounds, v_rounds)), geometric
            bisection steps after the grid (between the best V that meets τ̄ and the next
            larger one that does not), the online hard
            cap as a multiple of τ̄ (None: no cap), the error-profile model
            (default ``ErrorModel()``) and the data weights p_k (default uniform).
        online_drift: the online stage's per-round objective, "linear" or "exact"
            (:class:`~tsfa.allocator.OnlineAllocator`), simulated by the V sweep.

    Returns:
        An :class:`OfflinePlan`. No candidate feasible → ``Status.INFEASIBLE`` with the
        smallest feasible τ̄ in the message (and ``min_latency_budget_s``).
    """
    t0 = time.perf_counter()
    base = _base_shape(modules)
    for name, obj, typ in (("cell", cell, Cell), ("clients", clients, Clients)):
        if not isinstance(obj, typ):
            raise ValueError(f"{name} must be a {typ.__name__}; got {type(obj).__name__}")
    K = len(clients)
    latency_budget = as_scalar("latency_budget_s", latency_budget_s, lower=0, strict=True)
    rank_grid = _int_grid("ranks", ranks, 1)
    max_rank = min(min(m.out_features, m.in_features) for m in base.modules)
    if rank_grid[-1] > max_rank:
        raise ValueError(f"ranks must be <= {max_rank} (the smallest module side); got ranks = {list(ranks)!r}")
    ratio_grid = as_array("keep_ratios", keep_ratios, lower=0, strict=True)
    if np.any(ratio_grid > 1):
        raise ValueError(f"keep_ratios must lie in (0, 1]; got keep_ratios = {list(keep_ratios)!r}")
    if len(np.unique(ratio_grid)) != len(ratio_grid):
        raise ValueError(f"keep_ratios must not repeat values; got keep_ratios = {list(keep_ratios)!r}")
    ratio_grid = np.sort(ratio_grid)
    if not callable(predict):
        raise ValueError(f"predict must be callable; got {predict!r}")
    time_budget = None if time_budget_s is None else as_scalar("time_budget_s", time_budget_s, lower=0, strict=True)
    derived = rounds is None
    if derived:
        if time_budget is None:
            raise ValueError("give rounds (an int or a grid) or time_budget_s (rounds derived from it); got neither")
        round_grid = None
    else:
        round_grid = _int_grid("rounds", [rounds] if np.ndim(rounds) == 0 else rounds, 1)
    rate = None if downlink_rate_bps is None else as_scalar("downlink_rate_bps", downlink_rate_bps, lower=0,
                                                            strict=True)
    cap = _check_cap(max_latency_s)
    min_part = as_scalar("min_participation", min_participation, lower=0)
    if min_part > 1:
        raise ValueError(f"min_participation must lie in [0, 1]; got min_participation = {min_participation!r}")
    if latency_statistic not in LATENCY_STATISTICS:
        raise ValueError(f"latency_statistic must be one of {LATENCY_STATISTICS}; got {latency_statistic!r}")
    draws = as_scalar("draws", draws, lower=2, integer=True)
    confidence = _check_confidence(confidence)
    backend = _check_backend(backend)
    if method not in DESIGN_METHODS:
        raise ValueError(f"method must be one of {DESIGN_METHODS}; got method = {method!r}")
    v_values = as_array("v_grid", v_grid, lower=0, strict=True)
    v_rounds = as_scalar("v_rounds", v_rounds, lower=1, integer=True)
    v_refine = as_scalar("v_refine", v_refine, lower=0, integer=True)
    if online_drift not in ("linear", "exact"):
        raise ValueError(f"online_drift must be 'linear' or 'exact'; got online_drift = {online_drift!r}")
    cap_factor = None if online_cap_factor is None else as_scalar("online_cap_factor", online_cap_factor, lower=0,
                                                                  strict=True)
    if error_model is not None and not isinstance(error_model, ErrorModel):
        raise ValueError(f"error_model must be an ErrorModel; got {type(error_model).__name__}")
    if data_weight is not None:
        data_weight = as_array("data_weight", data_weight, lower=0)
        if len(data_weight) != K:
            raise ValueError(f"mismatched lengths: len(data_weight) = {len(data_weight)}, len(clients) = {K}")

    # -- (rank, keep) pairs, their payloads, offsets and SAA latency -----------------------
    pairs, nominal = [], []  # (r, s); the nominal ratios mapping to each
    for r in rank_grid:
        for rho in ratio_grid:
            s = int(min(max(math.ceil(rho * r - 1e-9), 1), r))
            if (int(r), s) not in pairs:
                pairs.append((int(r), s))
                nominal.append([])
            nominal[pairs.index((int(r), s))].append(float(rho))
    shapes = {int(r): base.with_rank(int(r)) for r in rank_grid}
    comp = {}
    for r, sh in shapes.items():
        comp[r] = _check_compute(compute_s(sh) if callable(compute_s) else compute_s, K)
    down = {r: (0.0 if rate is None else sh.downlink_bits / rate) for r, sh in shapes.items()}
    S = np.array([[shapes[r].payload_bits(s)] * K for r, s in pairs], dtype=float)
    T = np.array([down[r] + comp[r] for r, _ in pairs])
    gen = np.random.default_rng(rng)
    snr = cell.sample_snr_hz(clients, rng=gen, rounds=draws)
    v_seed = int(gen.integers(2**63 - 1))
    lat, part = _saa(S, T, snr, cell.total_bandwidth_hz, np.array([down[r] for r, _ in pairs]), cap, backend)
    mean, low, high, _ = _summaries(lat, confidence)
    stat = mean if latency_statistic == "mean" else high
    part_mean = part.mean(axis=1)

    # -- candidates: (pair, rounds) in tie-break order (pairs are already sorted by r, s) ----
    rows = []  # (pair index, rounds)
    for p in sorted(range(len(pairs)), key=lambda q: pairs[q]):
        if derived:
            rows.append((p, max(1, int(math.floor(time_budget / max(stat[p], 1e-300))))))
        else:
            rows.extend((p, int(x)) for x in round_grid)
    pi = np.array([t[0] for t in rows])
    rk = np.array([pairs[p][0] for p in pi], dtype=np.int64)
    kp = np.array([pairs[p][1] for p in pi], dtype=np.int64)
    nr = np.array([t[1] for t in rows], dtype=np.int64)
    ratio = kp / rk
    total, terms = _predict(predict, rk, ratio, nr)
    lat_c = stat[pi]
    bad = _violations(lat_c, nr, part_mean[pi], latency_budget, time_budget, min_part)
    table = []
    for i, (p, n_r) in enumerate(rows):
        r, s = pairs[p]
        table.append(Candidate(
            i, r, s, s / r, tuple(nominal[p]), n_r, int(S[p, 0]), down[r], float(total[i]),
            types.MappingProxyType({k: float(v[i]) for k, v in terms.items()}),
            float(mean[p]), float(low[p]), float(high[p]), float(stat[p]), float(part_mean[p]),
            float(n_r * stat[p]), tuple(CONSTRAINTS[j] for j in np.flatnonzero(bad[i])),
        ))
    table = tuple(table)

    # -- the choice ------------------------------------------------------------------------
    kw = dict(latency_budget=latency_budget, time_budget=time_budget, min_participation=min_part)
    enum = _choose_enumerate(total, lat_c, nr, part_mean[pi], **kw)
    cross = None
    if method == "milp":
        choice = _choose_milp(total, lat_c, nr, part_mean[pi], **kw)
        name = "milp:appsi_highs"
        if choice.status in (Status.OPTIMAL, Status.INFEASIBLE):
            cross = choice.status is enum.status and choice.index == enum.index
            if not cross:
                choice = _Choice(Status.ERROR, None, f"the MILP ({choice.status.value}, candidate {choice.index}) "
                                                     f"and enumeration ({enum.status.value}, candidate "
                                                     f"{enum.index}) disagree")
    else:
        choice, name = enum, "enumerate"
    name = f"{name}/{backend}"
    others = ~bad[:, 1:].any(axis=1)
    least = float(lat_c[others].min()) if others.any() else math.inf
    common = dict(latency_budget_s=latency_budget, time_budget_s=time_budget, max_latency_s=cap,
                  min_participation=min_part, min_latency_budget_s=least, table=table, draws=draws,
                  confidence=confidence, latency_statistic=latency_statistic, cross_check=cross, backend=name)
    note = ""
    if cap is None:
        note = (" (no max_latency_s: under Rayleigh fading the uncapped mean latency has no finite limit and the "
                "SAA value grows slowly with draws; consider a per-round cap)")
    if choice.index is None:
        if choice.status is Status.INFEASIBLE:
            msg, least = _infeasible_message(table, bad, lat_c, latency_budget, time_budget, min_part,
                                             latency_statistic)
        else:
            msg = choice.message
        return OfflinePlan(choice.status, msg + note, None, None, None, None, None, None, math.nan,
                           types.MappingProxyType({}), math.nan, math.nan, math.nan, math.nan, binding=(),
                           chosen=None, v_sweep=(), objective=math.nan, solve_time_s=time.perf_counter() - t0,
                           **common)

    i = choice.index
    c = table[i]
    binding = _binding(total, bad, i, derived)
    sweep, v, v_note = (), None, ""
    if choose_weight_v:
        sweep = _sweep_v(shapes[c.rank], cell, clients, comp[c.rank], latency_budget=latency_budget,
                         downlink_s=c.downlink_s, v_grid=v_values, refine=v_refine, rounds=min(c.rounds, v_rounds),
                         cap_factor=cap_factor, drift=online_drift, error_model=error_model,
                         data_weight=data_weight, seed=v_seed)
        best = _pick_v(sweep)
        if best is None:
            v = float(v_values.min())
            v_note = (f"; no V in the sweep kept the simulated latency within τ̄ over {min(c.rounds, v_rounds)} "
                      f"rounds, so V = {v:.3g} (the smallest tried)")
        else:
            v = best.weight_v
            v_note = (f"; V = {v:.3g} (simulated latency {best.time_average_latency_s:.4g} s, dropped energy "
                      f"{best.average_dropped_energy:.3g} of dense)")
    msg = (f"rank {c.rank}, keep {c.keep}/{c.rank}, {c.rounds} rounds: predicted loss {c.predicted_loss:.6g}, "
           f"{'mean' if latency_statistic == 'mean' else 'upper-CI'} latency {c.latency_s:.6g} s ≤ τ̄ = "
           f"{latency_budget:.6g} s "
           f"({confidence:.0%} CI {c.latency_low_s:.4g}–{c.latency_high_s:.4g} s, {draws} draws); "
           f"binding: {', '.join(binding) or 'none'}; {choice.message}" + v_note + note)
    return OfflinePlan(
        Status.OPTIMAL, msg, c.rank, c.keep, c.keep_ratio, c.rounds, v,
        None if v is None else v * latency_budget**2, c.predicted_loss, c.loss_terms, c.latency_mean_s,
        c.latency_low_s, c.latency_high_s, c.participation, binding=binding, chosen=i, v_sweep=sweep,
        objective=c.predicted_loss, solve_time_s=time.perf_counter() - t0, **common,
    )
