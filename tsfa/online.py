"""TSFA stage 2 — the online, per-round allocation (spec §7).

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

**Value precision as a decision.** With ``value_bits`` = (q_1, ..., q_n) each client also
chooses the precision of its values: items are (s, q) for s ≥ 1 (plus skipping), weighing
b^min_k(S(s, q), τ) and costing V p_k (e_k(s) + v_k(s, q)), with v_k(s, q) ``rounding_profile``
the expected product-space error of rounding the s kept components to q bits
(:func:`soft.rounding_profile`). The knapsack, the τ search and every backend work on this
item set unchanged: internally an allocation is a vector of item indices (``item_keep`` and
``item_value_bits`` map them back); without ``value_bits`` the item index is the keep count.

Symbols (spec → code): V ``weight_v``; Q ``queue``; τ̄ ``latency_budget_s``;
τ_max ``max_latency_s``; s_k ``keep``; e_k(s) ``error_profile[k, s]``; p_k ``data_weight``;
q_k ``value_bits``; v_k(s, q) ``rounding_profile[k, s, i]`` for q = ``value_bits[i]``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tsfa._validate import as_array, as_int_tuple, as_scalar
from tsfa.model import LoraShape
from tsfa.oracles import ALLOCATION_BACKENDS, EXACT_BACKENDS, ORACLES, callable_oracle, relaxation_oracle
from tsfa.rate import LN2, min_bandwidth_trusted
from tsfa.status import ResultMixin, Status
from tsfa.tau_search import TauSearch, _polish

__all__ = ["RoundProblem", "Allocation", "allocate", "relaxation_value", "ALLOCATION_BACKENDS"]


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
        value_bits: the precisions a client may choose among (distinct, ≥ 1 bits; e.g.
            (32, 16, 8, 4)); empty (default): every value travels at ``shape.bits_per_value``.
        rounding_profile: with ``value_bits``, v_k(s, q_i) ≥ 0, K × (r+1) × len(value_bits): the
            error of sending the s kept components at q_i bits, on the scale of ``error_profile``.
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
    value_bits: tuple = ()
    rounding_profile: np.ndarray | None = None

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
        qs = as_int_tuple("value_bits", self.value_bits)
        object.__setattr__(self, "value_bits", qs)
        if qs:
            if self.rounding_profile is None:
                raise ValueError("rounding_profile is required with value_bits (K × (r+1) × len(value_bits))")
            v = as_array("rounding_profile", self.rounding_profile, ndim=3, lower=0)
            if v.shape != (k, self.shape.rank + 1, len(qs)):
                raise ValueError(f"rounding_profile must have shape (K, r+1, len(value_bits)) = "
                                 f"({k}, {self.shape.rank + 1}, {len(qs)}); got {v.shape}")
            object.__setattr__(self, "rounding_profile", v)
            for q in qs:  # each precision's dense payload must stay an exact integer (LoraShape checks)
                dataclasses.replace(self.shape, bits_per_value=q)
        elif self.rounding_profile is not None:
            raise ValueError("rounding_profile is given without value_bits; pass value_bits = the precisions it is for")

    @property
    def num_clients(self) -> int:
        return len(self.snr_hz)

    @property
    def allowed_keep(self) -> np.ndarray:
        """Boolean mask over s = 0..r of the allowed keep counts."""
        s = np.arange(self.shape.rank + 1)
        return (s >= self.min_keep) | ((s == 0) & bool(self.allow_skip))

    def _menu(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(keep count, value bits, payload bits, index into ``value_bits``) of each item j (cached).
        Without ``value_bits`` item j is keep count j at ``shape.bits_per_value``; with them item 0 is s = 0 and item
        1 + (s − 1)·n + i is (s, value_bits[i])."""
        menu = self.__dict__.get("_menu_cache")
        if menu is None:
            r, qs = self.shape.rank, self.value_bits or (self.shape.bits_per_value,)
            if not self.value_bits:
                keep, qi = np.arange(r + 1), np.zeros(r + 1, dtype=np.int64)
                bits = self.shape.payload_bits(keep).astype(float)
            else:
                n = len(qs)
                keep = np.concatenate([[0], np.repeat(np.arange(1, r + 1), n)])
                qi = np.concatenate([[0], np.tile(np.arange(n), r)])
                per_q = [dataclasses.replace(self.shape, bits_per_value=x).payload_bits(np.arange(r + 1)) for x in qs]
                bits = np.concatenate([[0.0], np.stack(per_q, axis=1)[1:].reshape(-1).astype(float)])
            menu = (keep, np.asarray(qs, dtype=np.int64)[qi], bits, qi)
            for a in menu:
                a.setflags(write=False)
            object.__setattr__(self, "_menu_cache", menu)
        return menu

    @property
    def item_keep(self) -> np.ndarray:
        """s of each item (``item_costs`` and ``item_weights`` columns)."""
        return self._menu()[0]

    @property
    def item_value_bits(self) -> np.ndarray:
        """q of each item."""
        return self._menu()[1]

    @property
    def item_payload_bits(self) -> np.ndarray:
        """S(s, q) of each item, bits."""
        return self._menu()[2]

    @property
    def allowed_items(self) -> np.ndarray:
        """Boolean mask over the items (the allowed keep counts at every precision)."""
        return self.allowed_keep[self.item_keep]

    @property
    def dense_item(self) -> int:
        """The allowed item with the largest payload (every component at the finest precision)."""
        return int(np.argmax(np.where(self.allowed_items, self.item_payload_bits, -1.0)))

    @property
    def least_item(self) -> int:
        """The allowed item with the least payload among those that send something."""
        return int(np.argmin(np.where(self.allowed_items & (self.item_payload_bits > 0), self.item_payload_bits,
                                      np.inf)))

    def item_errors(self) -> np.ndarray:
        """E[k, j] = e_k(s_j) + v_k(s_j, q_j): the error of item j (K × items)."""
        keep, _, _, qi = self._menu()
        e = self.error_profile[:, keep]
        if self.value_bits:
            e = e + np.where(keep > 0, self.rounding_profile[:, keep, qi], 0.0)
        return e

    def item_costs(self) -> np.ndarray:
        """C[k, j] = V · p_k · (e_k(s_j) + v_k(s_j, q_j)) (without ``value_bits``: V p_k e_k(s))."""
        return self.weight_v * self.data_weight[:, None] * self.item_errors()

    def item_weights(self, tau: float) -> np.ndarray:
        """W[k, j] = b^min_k(S_j, τ) in Hz; ``inf`` where not allowed or not feasible at τ."""
        return self._weights_and_slopes(tau)[0]

    def item_availability(self, tau: float) -> np.ndarray:
        """Boolean (K, items): the items that are allowed and fit at τ (``item_weights`` finite), found
        without computing b^min: an upload of S bits fits iff S ln2 < c_k (τ − T_k)."""
        bits, cols, t_fixed = self._items()
        available = np.zeros((self.num_clients, len(self.item_keep)), dtype=bool)
        available[:, cols] = (bits * LN2)[None, :] < (self.snr_hz * (tau - t_fixed))[:, None]
        available[:, 0] |= bool(self.allow_skip)
        return available

    def _items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(payload bits of the usable keep counts, those keep counts, T_k + T^dl): usable means
        allowed with a payload (skipping, 0 bits, is handled apart). Cached on the instance."""
        cache = self.__dict__.get("_cache")
        if cache is None:
            bits = self.item_payload_bits
            usable = self.allowed_items & (bits > 0)
            cache = (bits[usable], np.flatnonzero(usable), self.compute_s + self.downlink_s)
            object.__setattr__(self, "_cache", cache)
        return cache

    def _weights_and_slopes(self, tau: float) -> tuple[np.ndarray, np.ndarray]:
        """(W, D): b^min_k(s, τ) and ∂b^min/∂τ (≤ 0; 0 where W is inf or 0), by the one
        kernel of :func:`tsfa.rate.min_bandwidth` (:func:`tsfa.rate.min_bandwidth_trusted`)."""
        bits, cols, t_fixed = self._items()
        K, J = self.num_clients, len(self.item_keep)
        W = np.full((K, J), np.inf)
        D = np.zeros((K, J))
        W[:, cols], D[:, cols] = _min_bandwidth_grid(bits, self.snr_hz, tau - t_fixed)
        if self.allow_skip:
            W[:, 0] = 0.0
            D[:, 0] = 0.0
        return W, D


def _min_bandwidth_grid(bits: np.ndarray, snr_hz: np.ndarray, slack_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b^min, ∂b^min/∂τ) on the (client, payload) grid: :func:`tsfa.rate.min_bandwidth` of
    ``bits[None, :]``, ``snr_hz[:, None]``, ``slack_s[:, None]`` with ``slope=True``, by its
    trusted kernel (inputs come validated from :class:`RoundProblem`; equal results, bit for bit)."""
    return min_bandwidth_trusted(bits[None, :], snr_hz[:, None], slack_s[:, None])


@dataclass(frozen=True, eq=False)
class Allocation(ResultMixin):
    """One round's decision (spec §7). Arrays have length K.

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
        value_bits: q_k, bits per value each client sends at (``shape.bits_per_value`` unless the
            problem offered ``value_bits``).
        rounding_energy: Σ_k p_k v_k(s_k, q_k), the part of ``dropped_energy`` due to rounding.
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
    value_bits: np.ndarray | None = None
    rounding_energy: float = 0.0

    @property
    def relative_gap(self) -> float:
        return self.gap / max(abs(self.objective), 1e-300)


def relaxation_value(problem: RoundProblem, tau: float, *, backend: str = "fast") -> float:
    """MCKP LP-relaxation value Σ_k V p_k e_k at fixed τ (``inf`` if nothing fits)."""
    oracle = relaxation_oracle(backend)
    return oracle(problem.item_weights(tau), problem.item_costs(), problem.total_bandwidth_hz)[0]


# --------------------------------------------------------------------------------------
# the public entry point (the τ search itself: tsfa.tau_search)
# --------------------------------------------------------------------------------------


def allocate(
    problem: RoundProblem,
    *,
    backend: str | Callable = "fast",
    max_evaluations: int = 60,
    rel_tol: float | None = None,
    tau_hint: float | None = None,
    certify: bool = True,
) -> Allocation:
    """Solve one round of the drift-plus-penalty problem (module docstring).

    Args:
        problem: the round's inputs.
        backend: "fast" (greedy LP relaxation + greedy integer; exact relaxation bound),
            "cvxpy" (the LP relaxation as a DPP program, rounded down), "milp" (exact MCKP
            per τ by HiGHS through highspy) or "pyomo" (the same MILP in Pyomo, HiGHS), or a
            callable ``oracle(W, C, budget) -> (lower_bound, choice | None)`` that solves the
            knapsack at fixed τ exactly (it may ignore a ``cutoff`` keyword).
        max_evaluations: knapsacks solved in the τ search, at most.
        rel_tol: stop when the certified lower bound is within this relative distance of
            the incumbent (the best relaxation value for "fast" and "cvxpy", whose integrality
            gap is then reported, not searched); default 1e-3 for those and 1e-6 for exact ones.
        tau_hint: a τ to evaluate first (e.g. the previous round's), seconds.
        certify: True (default): the interval branch-and-bound above, which certifies its
            answer with a lower bound (9–21 knapsack relaxations over the whole τ range at
            K = 100–10 000 clients, each with a full efficiency sort; the cost of
            ``backend="fast"`` is dominated by them). False (``backend="fast"`` only): the
            uncertified fast path of :func:`tsfa.fast.allocate_uncertified`, a safeguarded secant
            search for the root of the relaxation's τ-derivative started at ``tau_hint``;
            it returns the same discrete choice in the default cell (tests) in a fraction of
            the time, with ``lower_bound`` and ``gap`` NaN.

    Returns:
        An :class:`Allocation`; ``INFEASIBLE`` (with the cause) if no allocation meets
        ``max_latency_s`` even with every client at ``min_keep``.
    """
    oracle, name, exact = _resolve_backend(backend)
    if not isinstance(certify, (bool, np.bool_)):
        raise ValueError(f"certify must be True or False; got certify = {certify!r}")
    if not certify:
        if name != "fast" or oracle is not None:
            raise ValueError(f"certify=False needs backend='fast'; got backend = {backend!r}")
        from tsfa.fast import allocate_uncertified  # the fast path falls back on this module's search

        return allocate_uncertified(problem, tau_hint=tau_hint)
    max_evaluations = as_scalar("max_evaluations", max_evaluations, lower=2, integer=True)
    rel_tol = as_scalar("rel_tol", (1e-6 if exact else 1e-3) if rel_tol is None else rel_tol, lower=0)
    if tau_hint is not None:
        tau_hint = as_scalar("tau_hint", tau_hint, lower=0)
    t0 = time.perf_counter()
    p = problem
    K = p.num_clients
    C = p.item_costs()
    dense = _polish(p, np.full(K, p.dense_item))
    tau_lo, why = _least_latency(p)
    if why is not None:
        return _infeasible(p, why, name, t0)
    tau_hi = dense.latency_s if p.max_latency_s is None else min(dense.latency_s, p.max_latency_s)
    tau_hi = max(tau_hi, tau_lo)

    search = TauSearch(p, oracle, exact, lazy=not exact)
    if dense.success:
        search.polish(np.full(K, p.dense_item))
    points = {tau_lo, tau_hi}
    if tau_hint is not None and tau_lo < tau_hint < tau_hi:
        points.add(float(tau_hint))
    tol_abs = 1e-12 * (float(C.max(axis=1).sum()) + p.queue * tau_hi)
    lower = search.run(sorted(points), rel_tol, max_evaluations, tol_abs)
    # Beyond tau_hi the cost cannot fall below every client's cheapest item.
    if p.max_latency_s is None or tau_hi < p.max_latency_s:
        allowed_cost = np.where(p.allowed_items[None, :], C, np.inf)
        lower = min(lower, p.queue * tau_hi + float(allowed_cost.min(axis=1).sum()))
    if search.best_alloc is None:  # no discrete choice fitted (cannot happen once tau_lo is feasible)
        return _infeasible(p, "no discrete allocation found in the τ search", name, t0)
    return assemble_allocation(p, search.best_keep, search.best_alloc, lower=min(lower, search.best_obj), name=name,
                               t0=t0, evals=search.evals)


def _resolve_backend(backend):
    """(oracle or None, name, exact) of an allocation backend name or callable."""
    if callable(backend):
        return callable_oracle(backend), getattr(backend, "__name__", "custom"), True
    if backend not in ALLOCATION_BACKENDS:
        raise ValueError(f"backend must be one of {sorted(ALLOCATION_BACKENDS)} or a callable; got {backend!r}")
    return ORACLES.get(backend), backend, backend in EXACT_BACKENDS  # "fast": the search's own relaxation


def _least_latency(p: RoundProblem) -> tuple[float, str | None]:
    """(τ_lo, None): below τ_lo nothing fits; or (nan, why) if no allocation meets the cap."""
    if p.allow_skip:
        if p.max_latency_s is not None and p.downlink_s > p.max_latency_s:
            return math.nan, (f"downlink_s = {p.downlink_s:.6g} s exceeds max_latency_s = {p.max_latency_s:.6g} s: "
                              "raise max_latency_s above the downlink time")
        return p.downlink_s, None
    least = _polish(p, np.full(p.num_clients, p.least_item))
    if least.status is Status.INFEASIBLE:
        return math.nan, (f"even with every client at min_keep = {p.min_keep}: {least.message}; "
                          "or allow skipping clients (allow_skip=True)")
    return least.latency_s, None


def assemble_allocation(p: RoundProblem, items, bw, *, lower: float, name: str, t0: float, evals: int) -> Allocation:
    """The :class:`Allocation` of an item vector (the keep counts when the problem has no
    ``value_bits``) and its least-latency split ``bw`` (a :class:`BandwidthAllocation`):
    objective, gap to ``lower``, message; ``name`` is the backend, ``t0`` the solve's start
    (perf_counter), ``evals`` the τ evaluations. Policies that choose the keep vector
    themselves (:mod:`tsfa.allocator`) build their result with it."""
    r, rows = p.shape.rank, np.arange(p.num_clients)
    items = np.asarray(items, dtype=np.int64)
    keep, qbits, bits = p.item_keep[items], p.item_value_bits[items], p.item_payload_bits[items].astype(np.int64)
    errors = p.item_errors()[rows, items]
    dropped = float(np.sum(p.data_weight * errors))
    rounding = float(np.sum(p.data_weight * (errors - p.error_profile[rows, keep]))) if p.value_bits else 0.0
    objective = p.weight_v * dropped + p.queue * bw.latency_s
    gap = max(objective - lower, 0.0) if math.isfinite(lower) else math.nan
    sent = keep > 0
    msg = (f"{int(np.sum(sent))}/{p.num_clients} clients scheduled, mean keep {keep.mean():.2f}/{r}, "
           + (f"mean bits/value {qbits[sent].mean():.3g}, " if p.value_bits and sent.any() else "")
           + f"τ = {bw.latency_s:.6g} s, " + (f"gap {gap:.3g}" if math.isfinite(lower) else "not certified"))
    ratio = keep / r
    for arr in (keep, ratio, bw.bandwidth_hz, bw.upload_time_s, bits, qbits):
        arr.setflags(write=False)
    return Allocation(
        status=Status.OPTIMAL, message=msg, keep=keep, keep_ratio=ratio, bandwidth_hz=bw.bandwidth_hz,
        latency_s=bw.latency_s, upload_time_s=bw.upload_time_s, payload_bits=bits, dropped_energy=dropped,
        objective=objective, lower_bound=lower, gap=gap, solve_time_s=time.perf_counter() - t0, backend=name,
        tau_evaluations=evals, value_bits=qbits, rounding_energy=rounding,
    )


def _infeasible(p: RoundProblem, why: str, name: str, t0: float) -> Allocation:
    K = p.num_clients
    nan = np.full(K, np.nan)
    zeros = np.zeros(K, dtype=np.int64)
    return Allocation(
        status=Status.INFEASIBLE, message=why, keep=zeros, keep_ratio=zeros / p.shape.rank, bandwidth_hz=nan,
        latency_s=math.nan, upload_time_s=nan, payload_bits=zeros, dropped_energy=math.nan, objective=math.nan,
        lower_bound=math.nan, gap=math.nan, solve_time_s=time.perf_counter() - t0, backend=name,
        value_bits=zeros.copy(), rounding_energy=math.nan,
    )
