"""TSFA stage 2 — the online, per-round allocation (SPEC §7).

Each round t, given channel SNRs c_k, compute times T_k, data weights p_k, error profiles
e_k(s) (update energy dropped if client k keeps s of its r components) and the virtual
queue Q(t), choose keep counts s_k and bandwidths b_k to

    minimise   V · Σ_k p_k e_k(s_k)  +  Q(t) · τ
    over       s_k ∈ {min_keep..r}  (∪ {0} if allow_skip),  b_k ≥ 0,  τ
    subject to Σ_k b_k ≤ B_total,
               T^dl + T_k + S(s_k) / R_k(b_k) ≤ τ   for every scheduled k (s_k ≥ 1),
               τ ≤ τ_max  (optional hard cap),

then update Q(t+1) = max(Q(t) + τ(t) − τ̄, 0).

For fixed τ the least bandwidth that lets k send s components, b^min_k(s, τ), is known
in closed form up to one scalar root (``tsfa.model``); the problem becomes a
multiple-choice knapsack (MCKP): item (k, s) weighs b^min_k(s, τ) and costs V p_k e_k(s).
Its LP relaxation is the convex hull of each client's items, solved exactly by a greedy
over incremental efficiencies (one multiplier); the MILP is solved by HiGHS. τ is searched
by interval branch-and-bound: on [τ_a, τ_b] the round objective is at least
Q τ_a + KP(τ_b), since weights only shrink as τ grows. Every discrete choice is polished
by its exact least latency (``min_latency_bandwidth``), which never raises its cost.

Symbols (SPEC → code): V ``weight_v``; Q ``queue``; τ̄ ``latency_budget_s``;
τ_max ``max_latency_s``; s_k ``keep``; e_k(s) ``error_profile[k, s]``; p_k ``data_weight``.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from tsfa._validate import as_array, as_scalar
from tsfa.bandwidth import min_latency_bandwidth
from tsfa.model import LN2, LoraShape, _inverse_x
from tsfa.status import ResultMixin, Status

__all__ = ["RoundProblem", "Allocation", "allocate", "ALLOCATION_BACKENDS"]


@dataclass(frozen=True, eq=False)
class RoundProblem:
    """One round's inputs (arrays of length K; ``error_profile`` is K × (r+1)).

    Attributes:
        shape: the :class:`~tsfa.model.LoraShape` (payload bits per keep count).
        snr_hz: c_k = P_k g_k(t) / N_0 this round, Hz.
        compute_s: T^cmp_k, seconds.
        data_weight: p_k ≥ 0 (e.g. dataset fractions).
        error_profile: e_k(s) for s = 0..r, dropped update energy, ≥ 0.
        queue: Q(t) ≥ 0, seconds (the virtual latency queue).
        weight_v: V > 0, the Lyapunov penalty weight.
        total_bandwidth_hz: B_total, Hz.
        downlink_s: T^dl, seconds.
        max_latency_s: optional hard cap τ_max, seconds.
        min_keep: least number of components a scheduled client sends (1..r).
        allow_skip: whether s_k = 0 (client not scheduled this round) is allowed.
    """

    shape: LoraShape
    snr_hz: np.ndarray
    compute_s: np.ndarray
    data_weight: np.ndarray
    error_profile: np.ndarray
    queue: float
    weight_v: float
    total_bandwidth_hz: float
    downlink_s: float = 0.0
    max_latency_s: float | None = None
    min_keep: int = 1
    allow_skip: bool = False

    def __post_init__(self):
        if not isinstance(self.shape, LoraShape):
            raise ValueError(f"shape must be a LoraShape; got {type(self.shape).__name__}")
        c = as_array("snr_hz", self.snr_hz, lower=0, strict=True)
        k = len(c)
        arrays = {"snr_hz": c}
        for name in ("compute_s", "data_weight"):
            arr = as_array(name, getattr(self, name), lower=0)
            if len(arr) != k:
                raise ValueError(f"mismatched lengths: len({name}) = {len(arr)}, len(snr_hz) = {k}")
            arrays[name] = arr
        e = as_array("error_profile", self.error_profile, ndim=2, lower=0)
        if e.shape != (k, self.shape.rank + 1):
            raise ValueError(f"error_profile must have shape (K, r+1) = ({k}, {self.shape.rank + 1}); got {e.shape}")
        arrays["error_profile"] = e
        for name, arr in arrays.items():
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "queue", as_scalar("queue", self.queue, lower=0))
        object.__setattr__(self, "weight_v", as_scalar("weight_v", self.weight_v, lower=0, strict=True))
        object.__setattr__(
            self, "total_bandwidth_hz", as_scalar("total_bandwidth_hz", self.total_bandwidth_hz, lower=0, strict=True)
        )
        object.__setattr__(self, "downlink_s", as_scalar("downlink_s", self.downlink_s, lower=0))
        if self.max_latency_s is not None:
            cap = as_scalar("max_latency_s", self.max_latency_s, lower=0, strict=True)
            object.__setattr__(self, "max_latency_s", cap)
        mk = as_scalar("min_keep", self.min_keep, lower=1, integer=True)
        if mk > self.shape.rank:
            raise ValueError(f"min_keep must be <= rank {self.shape.rank}; got min_keep = {self.min_keep}")
        object.__setattr__(self, "min_keep", mk)
        if not isinstance(self.allow_skip, (bool, np.bool_)):
            raise ValueError(f"allow_skip must be a bool; got {self.allow_skip!r}")

    @property
    def num_clients(self) -> int:
        return len(self.snr_hz)

    @property
    def allowed_keep(self) -> np.ndarray:
        """Boolean mask over s = 0..r of the allowed keep counts."""
        s = np.arange(self.shape.rank + 1)
        return (s >= self.min_keep) | ((s == 0) & bool(self.allow_skip))

    def item_costs(self) -> np.ndarray:
        """C[k, s] = V · p_k · e_k(s)."""
        return self.weight_v * self.data_weight[:, None] * self.error_profile

    def item_weights(self, tau: float) -> np.ndarray:
        """W[k, s] = b^min_k(s, τ) in Hz; ``inf`` where not allowed or not feasible at τ."""
        bits = self.shape.payload_bits(np.arange(self.shape.rank + 1)).astype(float)
        slack = tau - self.downlink_s - self.compute_s
        W = np.full((self.num_clients, len(bits)), np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            a = bits[None, :] * LN2 / (self.snr_hz[:, None] * slack[:, None])
        ok = (slack[:, None] > 0) & (a < 1.0) & self.allowed_keep[None, :] & (bits[None, :] > 0)
        if ok.any():
            x, _ = _inverse_x(a[ok])
            W[ok] = self.snr_hz[:, None].repeat(len(bits), 1)[ok] / x
        if self.allow_skip:
            W[:, 0] = 0.0
        return W


@dataclass(frozen=True, eq=False)
class Allocation(ResultMixin):
    """One round's decision (SPEC §7). Arrays have length K.

    Attributes:
        keep: s_k, components kept per module (0 = not scheduled).
        keep_ratio: s_k / r.
        bandwidth_hz: b_k, Hz.
        latency_s: τ, the round latency (downlink + slowest scheduled client), s.
        upload_time_s: S_k / R_k(b_k), s (0 if unscheduled).
        payload_bits: S_k, bits.
        dropped_energy: Σ_k p_k e_k(s_k).
        objective: V · dropped_energy + Q · τ.
        lower_bound: certified lower bound on the optimal objective (NaN where none).
        gap: objective − lower_bound (≥ 0 up to rounding).
        status, message, backend, solve_time_s: as for every result.
        tau_evaluations: knapsacks solved in the τ search.
        fallback: "" or a description of the fallback the OnlineAllocator applied.
    """

    status: Status
    message: str
    keep: np.ndarray
    keep_ratio: np.ndarray
    bandwidth_hz: np.ndarray
    latency_s: float
    upload_time_s: np.ndarray
    payload_bits: np.ndarray
    dropped_energy: float
    objective: float
    lower_bound: float
    gap: float
    solve_time_s: float
    backend: str
    tau_evaluations: int = 0
    fallback: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def relative_gap(self) -> float:
        return self.gap / max(abs(self.objective), 1e-300)


# --------------------------------------------------------------------------------------
# Knapsack oracles at fixed τ. Each maps (W, C, B) to (bound, choice) where ``bound`` is a
# lower bound on the MCKP value at this τ and ``choice`` a feasible item per client (or
# None if the knapsack is infeasible). W: K × (r+1) weights in Hz (inf = not allowed).
# --------------------------------------------------------------------------------------


def _hull(W: np.ndarray, C: np.ndarray):
    """Lower convex hull of each client's allowed items in the (weight, cost) plane.

    Returns ``mask`` (hull vertices), ``prev`` (the previous vertex of each vertex, −1 for
    the lightest) and the efficiencies −ΔC/ΔW of each non-base vertex (strictly
    decreasing along each chain). Vertices that do not lower the cost are dropped.
    """
    K, J = W.shape
    mask = np.isfinite(W)
    idx = np.arange(J)
    rows = np.arange(K)[:, None]
    for _ in range(2 * J + 1):
        last = np.maximum.accumulate(np.where(mask, idx, -1), axis=1)
        prev = np.concatenate([np.full((K, 1), -1), last[:, :-1]], axis=1)
        has = mask & (prev >= 0)
        pj = np.where(has, prev, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            dW = np.where(has, W - W[rows, pj], 1.0)
            dC = np.where(has, C - C[rows, pj], 0.0)
            eff = np.where(has, -dC / dW, np.nan)
        useless = has & ~(eff > 0)
        if useless.any():
            mask &= ~useless
            continue
        # Convexity: a vertex whose successor is at least as efficient lies above the hull.
        succ_eff = np.full((K, J), -np.inf)
        kk, jj = np.nonzero(has)
        succ_eff[kk, prev[kk, jj]] = eff[kk, jj]
        above = mask & (prev >= 0) & (succ_eff >= eff)
        if not above.any():
            return mask, np.where(mask, prev, -1), np.where(has, eff, np.nan), dW, dC
        mask &= ~above
    raise RuntimeError("convex hull did not converge")  # pragma: no cover


def _greedy(W: np.ndarray, C: np.ndarray, budget: float, fill: int = 256):
    """MCKP LP relaxation (exact, one multiplier) and a greedy integer solution.

    Returns (lp_value, choice, multiplier) or (inf, None, nan) if even the lightest items
    do not fit. ``multiplier`` is the efficiency of the split item (the LP's λ).
    """
    K = W.shape[0]
    mask, prev, eff, dW, dC = _hull(W, C)
    if not mask.any(axis=1).all():
        return math.inf, None, math.nan
    base = np.argmax(mask, axis=1)
    rows = np.arange(K)
    left = budget - W[rows, base].sum()
    base_cost = C[rows, base].sum()
    if left < -1e-12 * budget:
        return math.inf, None, math.nan
    kk, jj = np.nonzero(mask & (prev >= 0))
    e = eff[kk, jj]
    order = np.lexsort((jj, kk, -e))  # by efficiency, ties in chain order
    kk, jj, e = kk[order], jj[order], e[order]
    w, c = dW[kk, jj], dC[kk, jj]
    cum = np.cumsum(w)
    n = int(np.searchsorted(cum, left, side="right"))
    choice = base.copy()
    if n:
        np.maximum.at(choice, kk[:n], jj[:n])
    lp = base_cost + c[:n].sum()
    mult = 0.0
    if n < len(w):
        rem = left - (cum[n - 1] if n else 0.0)
        lp += c[n] * rem / w[n]
        mult = float(e[n])
        # Integer fill: later increments that still fit, in order, keeping each chain intact.
        for i in range(n + 1, min(len(w), n + 1 + fill)):
            if w[i] <= rem and prev[kk[i], jj[i]] == choice[kk[i]]:
                choice[kk[i]] = jj[i]
                rem -= w[i]
    return float(lp), choice, mult


def _oracle_fast(W, C, budget):
    lp, choice, _ = _greedy(W, C, budget)
    return lp, choice


_LP_CACHE: dict = {}


def _oracle_cvxpy(W, C, budget):
    """The same LP relaxation as a DPP linear program (compiled once per K × J)."""
    import cvxpy as cp

    K, J = W.shape
    allowed = np.isfinite(W)
    if not allowed.any(axis=1).all():
        return math.inf, None
    if (K, J) not in _LP_CACHE:
        x = cp.Variable((K, J), nonneg=True)
        pw = cp.Parameter((K, J), nonneg=True)
        pc = cp.Parameter((K, J))
        pa = cp.Parameter((K, J), nonneg=True)
        prob = cp.Problem(
            cp.Minimize(cp.sum(cp.multiply(pc, x))),
            [cp.sum(x, axis=1) == 1, x <= pa, cp.sum(cp.multiply(pw, x)) <= 1],
        )
        assert prob.is_dcp(dpp=True)
        _LP_CACHE[(K, J)] = (prob, x, pw, pc, pa)
    prob, x, pw, pc, pa = _LP_CACHE[(K, J)]
    scale = max(float(np.abs(C[allowed]).max()), 1e-300)
    pw.value = np.where(allowed, W / budget, 0.0)
    pc.value = np.where(allowed, C / scale, 0.0)
    pa.value = allowed.astype(float)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    if prob.status in ("infeasible", "infeasible_inaccurate"):
        return math.inf, None
    if x.value is None:
        from tsfa.status import SolverError

        raise SolverError(f"cvxpy/CLARABEL returned status {prob.status!r}")
    xv = np.where(allowed, x.value, 0.0)
    # Round down: the lightest item in each client's support keeps the budget.
    choice = np.argmax(xv > 1e-7, axis=1)
    return float(prob.value) * scale, choice


def _oracle_milp(W, C, budget):
    from tsfa.knapsack import solve_mckp_highspy

    sol = solve_mckp_highspy(W, C, budget)
    if sol.status is Status.INFEASIBLE:
        return math.inf, None
    return sol.lower_bound, sol.choice


def _oracle_pyomo(W, C, budget):
    from tsfa.knapsack import solve_mckp_pyomo

    sol = solve_mckp_pyomo(W, C, budget)
    if sol.status is Status.INFEASIBLE:
        return math.inf, None
    return sol.lower_bound, sol.choice


ALLOCATION_BACKENDS: dict[str, Callable] = {
    "fast": _oracle_fast,
    "cvxpy": _oracle_cvxpy,
    "milp": _oracle_milp,
    "pyomo": _oracle_pyomo,
}


def relaxation_value(problem: RoundProblem, tau: float, *, backend: str = "fast") -> float:
    """MCKP LP-relaxation value Σ_k V p_k e_k at fixed τ (``inf`` if nothing fits)."""
    fn = {"fast": _oracle_fast, "cvxpy": _oracle_cvxpy}[backend]
    return fn(problem.item_weights(tau), problem.item_costs(), problem.total_bandwidth_hz)[0]


# --------------------------------------------------------------------------------------
# τ search (interval branch-and-bound) and the public entry point
# --------------------------------------------------------------------------------------


def _polish(problem: RoundProblem, keep: np.ndarray):
    """Exact least-latency split for a keep vector: (τ, BandwidthAllocation)."""
    bits = problem.shape.payload_bits(keep)
    res = min_latency_bandwidth(
        bits, problem.snr_hz, problem.compute_s, problem.total_bandwidth_hz,
        downlink_s=problem.downlink_s, deadline_s=problem.max_latency_s,
    )
    return res


def allocate(
    problem: RoundProblem,
    *,
    backend: str | Callable = "fast",
    max_evaluations: int = 40,
    rel_tol: float | None = None,
    tau_hint: float | None = None,
) -> Allocation:
    """Solve one round of the drift-plus-penalty problem (module docstring).

    Args:
        problem: the round's inputs.
        backend: "fast" (greedy LP relaxation + greedy integer; exact relaxation bound),
            "cvxpy" (the LP relaxation as a DPP program, rounded down), "milp" (exact MCKP
            per τ by HiGHS through highspy) or "pyomo" (the same MILP in Pyomo, HiGHS), or a
            callable ``oracle(W, C, budget) -> (lower_bound, choice | None)``.
        max_evaluations: knapsacks solved in the τ search, at most.
        rel_tol: stop when the certified lower bound is within this relative distance of
            the incumbent; default 1e-3 for the relaxation bounds ("fast", "cvxpy"), whose
            integrality gap never closes, and 1e-6 for the exact MILP backends.
        tau_hint: a τ to evaluate first (e.g. the previous round's), seconds.

    Returns:
        An :class:`Allocation`; ``INFEASIBLE`` (with the cause) if no allocation meets
        ``max_latency_s`` even with every client at ``min_keep``.
    """
    if callable(backend):
        oracle, name = backend, getattr(backend, "__name__", "custom")
    elif backend in ALLOCATION_BACKENDS:
        oracle, name = ALLOCATION_BACKENDS[backend], backend
    else:
        raise ValueError(f"backend must be one of {sorted(ALLOCATION_BACKENDS)} or a callable; got {backend!r}")
    max_evaluations = as_scalar("max_evaluations", max_evaluations, lower=2, integer=True)
    if rel_tol is None:
        rel_tol = 1e-6 if name in ("milp", "pyomo") else 1e-3
    rel_tol = as_scalar("rel_tol", rel_tol, lower=0)
    t0 = time.perf_counter()
    p = problem
    K, r = p.num_clients, p.shape.rank
    C = p.item_costs()
    Q = p.queue
    # τ range: below tau_lo nothing fits; above tau_hi every client can send everything.
    dense = _polish(p, np.full(K, r))
    if p.allow_skip:
        tau_lo = p.downlink_s
        if p.max_latency_s is not None and tau_lo > p.max_latency_s:
            return _infeasible(p, f"downlink_s = {p.downlink_s:.6g} s exceeds max_latency_s = "
                                  f"{p.max_latency_s:.6g} s: raise max_latency_s above the downlink time", name, t0)
    else:
        least = _polish(p, np.full(K, p.min_keep))
        if least.status is Status.INFEASIBLE:
            return _infeasible(p, f"even with every client at min_keep = {p.min_keep}: {least.message}; "
                                  "or allow skipping clients (allow_skip=True)", name, t0)
        tau_lo = least.latency_s
    tau_hi = dense.latency_s if p.max_latency_s is None else min(dense.latency_s, p.max_latency_s)
    tau_hi = max(tau_hi, tau_lo)

    evaluated: dict[float, float] = {}
    best = {"obj": math.inf, "keep": None, "alloc": None}
    seen: set[bytes] = set()

    def consider(keep):
        key = keep.astype(np.int8).tobytes()
        if key in seen:
            return
        seen.add(key)
        cost = float(C[np.arange(K), keep].sum())
        if cost + Q * tau_lo >= best["obj"]:
            return  # cannot beat the incumbent whatever its latency
        res = _polish(p, keep)
        if not res.success:
            return
        obj = cost + Q * res.latency_s
        if obj < best["obj"]:
            best.update(obj=obj, keep=keep.copy(), alloc=res)

    def evaluate(tau):
        if tau not in evaluated:
            bound, keep = oracle(p.item_weights(tau), C, p.total_bandwidth_hz)
            evaluated[tau] = float(bound)
            if keep is not None:
                consider(np.asarray(keep, dtype=np.int64))
        return evaluated[tau]

    consider(np.full(K, r))  # dense, if it fits
    points = np.linspace(tau_lo, tau_hi, 5).tolist()
    if tau_hint is not None and tau_lo < tau_hint < tau_hi:
        points.append(float(tau_hint))
    points = sorted(set(points))
    for tau in points:
        evaluate(tau)
    heap = []
    for a, b in zip(points[:-1], points[1:], strict=True):
        heapq.heappush(heap, (Q * a + evaluated[b], a, b))
    # Beyond tau_hi the cost cannot fall below every client's cheapest item.
    allowed_cost = np.where(p.allowed_keep[None, :], C, np.inf)
    beyond = Q * tau_hi + float(allowed_cost.min(axis=1).sum())
    if p.max_latency_s is not None and tau_hi >= p.max_latency_s:
        beyond = math.inf
    point_lb = Q * tau_hi + evaluated[tau_hi] if len(points) == 1 else math.inf
    tol_abs = 1e-12 * (float(C.max(axis=1).sum()) + Q * tau_hi)
    while heap and len(evaluated) < max_evaluations:
        lb, a, b = heap[0]
        if lb >= best["obj"] - rel_tol * abs(best["obj"]) - tol_abs:
            break
        heapq.heappop(heap)
        if b - a <= 1e-12 * b:
            heapq.heappush(heap, (lb, a, b))
            break
        m = 0.5 * (a + b)
        evaluate(m)
        heapq.heappush(heap, (Q * a + evaluated[m], a, m))
        heapq.heappush(heap, (Q * m + evaluated[b], m, b))
    lower = min([heap[0][0]] if heap else [math.inf])
    lower = min(lower, beyond, point_lb)
    if best["alloc"] is None:  # no discrete choice fitted (cannot happen once tau_lo is feasible)
        return _infeasible(p, "no discrete allocation found in the τ search", name, t0)
    return _assemble(p, best["keep"], best["alloc"], min(lower, best["obj"]), name, t0, len(evaluated))


def _assemble(p: RoundProblem, keep, bw, lower, name, t0, evals) -> Allocation:
    r = p.shape.rank
    keep = np.asarray(keep, dtype=np.int64)
    dropped = float(np.sum(p.data_weight * p.error_profile[np.arange(p.num_clients), keep]))
    objective = p.weight_v * dropped + p.queue * bw.latency_s
    gap = max(objective - lower, 0.0)
    msg = (f"{int(np.sum(keep > 0))}/{p.num_clients} clients scheduled, mean keep {keep.mean():.2f}/{r}, "
           f"τ = {bw.latency_s:.6g} s, gap {gap:.3g}")
    arrays = [keep, keep / r, bw.bandwidth_hz, bw.upload_time_s, p.shape.payload_bits(keep)]
    for arr in arrays:
        arr.setflags(write=False)
    return Allocation(
        Status.OPTIMAL, msg, arrays[0], arrays[1], arrays[2], bw.latency_s, arrays[3], arrays[4],
        dropped, objective, lower, gap, time.perf_counter() - t0, name, evals,
    )


def _infeasible(p: RoundProblem, why: str, name: str, t0: float) -> Allocation:
    K = p.num_clients
    nan = np.full(K, np.nan)
    zeros = np.zeros(K, dtype=np.int64)
    return Allocation(
        Status.INFEASIBLE, why, zeros, zeros / p.shape.rank, nan, math.nan, nan, zeros, math.nan, math.nan,
        math.nan, math.nan, time.perf_counter() - t0, name,
    )
