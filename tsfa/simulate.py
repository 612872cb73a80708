"""Allocation-only simulator (no training): the online stage over thousands of rounds.

Each round draws Rayleigh fading for every client (``Cell.sample_snr_hz``) and error
profiles from :class:`ErrorModel`, asks a policy for an allocation, and feeds back the
realised latency. It reports the time-average latency, the average dropped energy
Σ_k p_k e_k(s_k) and the queue trajectory, which shows the Lyapunov trade-off: larger V
drops less energy and lets the queue grow, while the time-average latency stays ≤ τ̄
(up to O(1/T) and the O(1/V) penalty-gap terms of drift-plus-penalty).

The V sweep of the offline stage (step 5 of :func:`tsfa.design_offline`) runs here too:
:func:`sweep_v` simulates the online stage for a grid of scale-free V (``relative_v``) and
:func:`pick_v` applies the rule. With ``VSweepSettings(latency_model="online")`` the
offline stage also chooses the rank on these simulations (step 6 of
:func:`tsfa.design_offline`); :func:`sweep_v_runs` gives it the per-round traces.

:meth:`ErrorModel.from_profile` fits the model's decay to a measured mean error profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tsfa._validate import as_array, as_rng, as_scalar
from tsfa.bandwidth import min_latency_bandwidth_batch
from tsfa.model import Cell, Clients, LoraShape, sent_share

__all__ = [
    "ErrorModel",
    "SimulationResult",
    "simulate_allocation",
    "dense_latency_s",
    "VSweepSettings",
    "VPoint",
    "sweep_v",
    "sweep_v_runs",
    "v_point",
    "pick_v",
    "DEFAULT_V_GRID",
    "LATENCY_MODELS",
    "ONLINE_LATENCY_TESTS",
]

#: The scale-free V values (``relative_v``) swept by default.
DEFAULT_V_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Relative slack with which a simulated time-average latency meets τ̄.
FEASIBILITY_RTOL = 1e-9
#: The offline stage's latency models (``VSweepSettings.latency_model``).
LATENCY_MODELS = ("nominal", "online")
#: How a simulated online point's latency is tested against τ̄ (``VSweepSettings.online_latency_test``).
ONLINE_LATENCY_TESTS = ("interval", "mean", "upper")
#: A measured profile may rise by this much (relative to its first entry) between entries.
PROFILE_RTOL = 1e-6


@dataclass(frozen=True)
class ErrorModel:
    """Stated model of per-round error profiles.

    Client k's rank-component energies in round t are
    σ²_{k,i}(t) = a_k · u_{k,t} · i^(−decay), i = 1..r (sorted, decreasing), with a fixed
    client scale a_k ~ LogNormal(0, client_spread) and a round factor
    u_{k,t} ~ LogNormal(0, round_jitter). The profile is e_k(s) = Σ_{i>s} σ²_{k,i}, so
    e_k(r) = 0 and e_k is convex and decreasing in s.
    """

    decay: float = 1.0
    client_spread: float = 0.5
    round_jitter: float = 0.3

    def __post_init__(self):
        as_scalar("decay", self.decay, lower=0)
        as_scalar("client_spread", self.client_spread, lower=0)
        as_scalar("round_jitter", self.round_jitter, lower=0)

    @classmethod
    def from_profile(cls, profile, *, client_spread: float = 0.5, round_jitter: float = 0.3) -> ErrorModel:
        """The model whose decay fits a measured mean error profile.

        ``profile`` is e(s)/e(0) for s = 0..r (any positive scale is accepted: it is divided
        by its first entry), decreasing to e(r) ≈ 0. Its component energies are
        σ²_i = e(i−1) − e(i), i = 1..r; the decay is the least-squares slope of
        log σ²_i against −log i over the components with positive energy (components whose
        energy is zero up to rounding carry no slope information and are left out). A fitted
        slope below 0 (energies growing with i, i.e. components not sorted) gives decay 0.

        ``client_spread`` and ``round_jitter`` are not identified by a mean profile; they keep
        their defaults unless given.

        Raises:
            ValueError (naming ``profile``): not 1-D, fewer than 3 entries (rank ≥ 2 is needed
            for a slope), not finite, a first entry ≤ 0, an entry that rises by more than
            PROFILE_RTOL · profile[0] over the one before, or fewer than two components with
            positive energy.
        """
        e = as_array("profile", profile)
        if len(e) < 3:
            raise ValueError(f"profile must hold e(s) for s = 0..r with r >= 2 (at least 3 entries) to fit a decay; "
                             f"got profile = {e.tolist()!r}")
        if e[0] <= 0:
            raise ValueError(f"profile must start with e(0) > 0; got profile[0] = {e[0]!r}")
        e = e / e[0]
        rise = np.diff(e)
        if np.any(rise > PROFILE_RTOL):
            i = int(np.flatnonzero(rise > PROFILE_RTOL)[0])
            raise ValueError(f"profile must be non-increasing (within {PROFILE_RTOL:g} of profile[0]); got "
                             f"profile[{i + 1}] / profile[0] = {e[i + 1]!r} > profile[{i}] / profile[0] = {e[i]!r}")
        energy = -rise
        ok = energy > PROFILE_RTOL
        if ok.sum() < 2:
            raise ValueError(f"profile must have at least two components with positive energy "
                             f"(e(i-1) - e(i) > {PROFILE_RTOL:g} e(0)) to fit a decay; got profile = {e.tolist()!r}")
        x = np.log(np.arange(1, len(energy) + 1)[ok])
        y = np.log(energy[ok])
        slope = float(np.polyfit(x, y, 1)[0])
        return cls(decay=max(0.0, -slope), client_spread=client_spread, round_jitter=round_jitter)

    def client_scales(self, num_clients: int, rng) -> np.ndarray:
        return as_rng(rng).lognormal(0.0, self.client_spread, num_clients)

    def sample(self, rank: int, scales: np.ndarray, rng) -> np.ndarray:
        """Error profiles, shape (K, rank + 1)."""
        rng = as_rng(rng)
        energy = scales[:, None] * rng.lognormal(0.0, self.round_jitter, (len(scales), 1))
        energy = energy * np.arange(1, rank + 1) ** (-self.decay)
        tail = np.cumsum(energy[:, ::-1], axis=1)[:, ::-1]  # e(s) = Σ_{i>s}
        return np.concatenate([tail, np.zeros((len(scales), 1))], axis=1)


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Per-round traces (length T) and their summaries.

    ``participation`` is the share of clients scheduled (keep > 0) in each round;
    ``scheduled`` (T, K) whether each client was; ``max_keep`` (T,) the largest keep of each
    round (0 when nobody is scheduled) and ``profile`` (T, r + 1) each round's data-weighted
    mean error profile ē(s)/ē(0): the components some client sent are the top ``max_keep``
    of the norm ranking's common order (:meth:`sent_share`).
    """

    latency_s: np.ndarray
    dropped_energy: np.ndarray
    queue: np.ndarray
    mean_keep: np.ndarray
    uplink_bits: np.ndarray
    fallbacks: int
    latency_budget_s: float | None
    participation: np.ndarray | None = None
    scheduled: np.ndarray | None = None
    max_keep: np.ndarray | None = None
    profile: np.ndarray | None = None

    def sent_share(self, rounds: int | None = None) -> float:
        """The share of the update energy in components some client sent in some round of the
        first ``rounds`` rounds (None: all): 1 − ē(s_max)/ē(0), ē the rounds' mean profile and
        s_max the largest keep (the components the aggregate ever applied; what no client ever
        sends stays unlearned). NaN when not recorded."""
        if self.max_keep is None or self.profile is None:
            return math.nan
        h = len(self.max_keep) if rounds is None else rounds
        return sent_share(self.profile[:h].mean(axis=0), int(self.max_keep[:h].max()))

    @property
    def time_average_latency_s(self) -> float:
        return float(self.latency_s.mean())

    @property
    def average_dropped_energy(self) -> float:
        return float(self.dropped_energy.mean())

    @property
    def average_queue(self) -> float:
        return float(self.queue.mean())


def dense_latency_s(cell: Cell, clients: Clients, shape: LoraShape, compute_s, *, downlink_s=0.0,
                    rounds: int = 200, rng=None, statistic: str = "median") -> float:
    """Median (or mean) least round latency when every client uploads densely (Monte Carlo
    over fading). The mean is dominated by rare deep fades; the median is the typical round."""
    rng = as_rng(rng)
    snr = cell.sample_snr_hz(clients, rng=rng, rounds=rounds)
    bits = np.full(snr.shape, float(shape.dense_payload_bits))
    lat = min_latency_bandwidth_batch(bits, snr, compute_s, cell.total_bandwidth_hz, downlink_s=downlink_s).latency_s
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean'; got {statistic!r}")
    return float(np.median(lat) if statistic == "median" else np.mean(lat))


def simulate_allocation(policy, cell: Cell, clients: Clients, *, rounds: int, compute_s,
                        error_model: ErrorModel | None = None, data_weight=None, rng=None,
                        progress: bool = False) -> SimulationResult:
    """Run ``policy`` (an OnlineAllocator or a baseline) for ``rounds`` rounds."""
    rounds = as_scalar("rounds", rounds, lower=1, integer=True)
    rng = as_rng(rng)
    em = error_model or ErrorModel()
    scales = em.client_scales(len(clients), rng)
    r = policy.shape.rank
    out = {k: np.zeros(rounds) for k in ("latency", "dropped", "queue", "keep", "bits", "part")}
    sched = np.zeros((rounds, len(clients)), dtype=bool)
    max_keep = np.zeros(rounds, dtype=np.int64)
    profiles = np.zeros((rounds, r + 1))
    p = np.full(len(clients), 1.0 / len(clients)) if data_weight is None else np.asarray(data_weight, dtype=float)
    fallbacks = 0
    it = range(rounds)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="rounds", leave=False)
    for t in it:
        snr = cell.sample_snr_hz(clients, rng=rng)
        profile = em.sample(r, scales, rng)
        alloc = policy.step(snr, compute_s, profile, data_weight).raise_for_status()
        fallbacks += bool(alloc.fallback)
        out["queue"][t] = getattr(policy, "queue", 0.0)
        policy.observe(alloc.latency_s)
        out["latency"][t] = alloc.latency_s
        out["dropped"][t] = alloc.dropped_energy
        out["keep"][t] = alloc.keep.mean()
        out["bits"][t] = alloc.payload_bits.sum()
        keep = np.asarray(alloc.keep)
        sched[t] = keep > 0
        out["part"][t] = float(np.mean(sched[t]))
        max_keep[t] = int(keep.max())
        mean_profile = p @ profile
        profiles[t] = mean_profile / mean_profile[0] if mean_profile[0] > 0 else 0.0
    return SimulationResult(latency_s=out["latency"], dropped_energy=out["dropped"], queue=out["queue"],
                            mean_keep=out["keep"], uplink_bits=out["bits"], fallbacks=fallbacks,
                            latency_budget_s=getattr(policy, "latency_budget_s", None), participation=out["part"],
                            scheduled=sched, max_keep=max_keep, profile=profiles)


# --------------------------------------------------------------------------------------
# The V sweep of the offline stage: the online stage simulated for a grid of scale-free V
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class VSweepSettings:
    """Settings of the offline stage's V sweep (step 5 of :func:`tsfa.design_offline`) and
    of its online latency model (step 6).

    Attributes:
        choose_v: run the sweep on the chosen rank (False: the plan has no V).
        v_grid: the scale-free V values (``relative_v``) tried; absolute V = relative_v · τ̄².
        v_rounds: simulated rounds, at most (the plan's rounds if fewer).
        v_refine: geometric bisection steps after the grid, between the largest V that meets
            τ̄ and the next larger V that does not.
        online_cap_factor: the online hard cap as a multiple of τ̄ (None: no cap).
        online_drift: the online stage's per-round objective, "linear" or "exact"
            (:class:`~tsfa.allocator.OnlineAllocator`).
        error_model: the error-profile model (None: ``ErrorModel()``).
        data_weight: the data weights p_k (None: uniform); checked against the clients by
            :class:`~tsfa.offline.OfflineProblem`.
        latency_model: how the offline stage judges a rank's latency. ``"nominal"``: by the
            SAA of steps 1–4 alone (every client uploads the nominal keep; the sweep runs on
            the chosen rank only). ``"online"``: steps 1–4 become a screen, and the ranks that
            could improve on the screen's choice are simulated on the online stage over this
            V grid (skipping, the cap, the queue), each (rank, V) judged by its simulated
            time-average latency and kept energy (step 6 of :func:`tsfa.design_offline`).
            Needs ``choose_v=True``.
        online_min_participation: with ``latency_model="online"``, the least simulated mean
            share of scheduled clients a (rank, V) point needs (in [0, 1]; 0: none). The online
            stage can meet a small τ̄ by skipping nearly everyone; a predictor that takes
            ``kept_share`` prices that, one that does not sees it only through the mean keep
            (floored at 1/r), so a floor here rules such points out. ``Budgets.min_participation``
            applies to the nominal screen (steps 1–4) only.
        online_latency_test: with ``latency_model="online"``, how a point's simulated
            time-average latency is held against τ̄. ``"interval"`` (the default): the point
            breaks τ̄ only when its whole batch-means interval lies above τ̄, i.e. the
            simulated stage runs significantly slower than τ̄. The queue steers every point's
            average towards τ̄ and guarantees it only in the long run (over a finite horizon
            the average may exceed τ̄ by Q(T)/T), so over a short horizon the points differ
            from τ̄ by a transient and by noise, and a point estimate would choose whichever
            point happens to dip under. ``"mean"``: the point estimate ≤ τ̄ (the strict
            finite-horizon reading of the budget). ``"upper"``: the interval's upper end ≤ τ̄
            (conservative). With fewer than 4 simulated rounds there is no interval and every
            test uses the point estimate.
        online_replicates: with ``latency_model="online"``, the independent trajectories
            (channel and error-profile draws; the same for every rank and V) each (rank, V) is
            simulated on. A point's statistics are the replicates' means and its latency
            interval is Student-t over the replicates' time-averages, so the interval measures
            what another draw of the channel would give, not only the scatter of one
            trajectory's rounds. 1: one trajectory and a batch-means interval over its rounds.
        online_initial_queue: the simulated allocator's Q(0), seconds, or ``"auto"`` (at the
            first round, the smallest Q whose allocation meets τ̄:
            :class:`~tsfa.allocator.OnlineAllocator`'s ``queue``); the online stage the plan is
            for should start the same way (``fedloop``'s ``initial_queue``). From Q = 0 the
            first rounds ignore latency, and over a short horizon that transient alone can
            put the time average above τ̄.
    """

    choose_v: bool = True
    v_grid: tuple[float, ...] = DEFAULT_V_GRID
    v_rounds: int = 100
    v_refine: int = 2
    online_cap_factor: float | None = 3.0
    online_drift: str = "linear"
    error_model: ErrorModel | None = None
    data_weight: np.ndarray | None = None
    latency_model: str = "nominal"
    online_min_participation: float = 0.0
    online_latency_test: str = "interval"
    online_replicates: int = 4
    online_initial_queue: float | str = 0.0

    def __post_init__(self):
        if not isinstance(self.choose_v, (bool, np.bool_)):
            raise ValueError(f"choose_v must be a bool; got choose_v = {self.choose_v!r}")
        if not isinstance(self.latency_model, str) or self.latency_model not in LATENCY_MODELS:
            raise ValueError(f"latency_model must be one of {LATENCY_MODELS}; got latency_model = "
                             f"{self.latency_model!r}")
        if not isinstance(self.online_latency_test, str) or self.online_latency_test not in ONLINE_LATENCY_TESTS:
            raise ValueError(f"online_latency_test must be one of {ONLINE_LATENCY_TESTS}; got online_latency_test = "
                             f"{self.online_latency_test!r}")
        part = as_scalar("online_min_participation", self.online_min_participation, lower=0)
        if part > 1:
            raise ValueError(f"online_min_participation must lie in [0, 1]; got online_min_participation = {part!r}")
        object.__setattr__(self, "online_min_participation", part)
        q0 = self.online_initial_queue
        if isinstance(q0, str) and q0 != "auto":
            raise ValueError(f"online_initial_queue must be 'auto' or a number >= 0; got online_initial_queue = "
                             f"{q0!r:.40}")
        if q0 != "auto":
            q0 = as_scalar("online_initial_queue", q0, lower=0)
        object.__setattr__(self, "online_initial_queue", q0)
        object.__setattr__(self, "online_replicates", as_scalar("online_replicates", self.online_replicates, lower=1,
                                                                integer=True))
        if self.latency_model == "online" and not self.choose_v:
            raise ValueError("latency_model = 'online' simulates the online stage over the V grid and chooses V; "
                             "it needs choose_v = True; got latency_model = 'online' with choose_v = False")
        object.__setattr__(self, "v_grid", tuple(float(v) for v in as_array("v_grid", self.v_grid, lower=0,
                                                                              strict=True)))
        object.__setattr__(self, "v_rounds", as_scalar("v_rounds", self.v_rounds, lower=1, integer=True))
        object.__setattr__(self, "v_refine", as_scalar("v_refine", self.v_refine, lower=0, integer=True))
        if self.online_drift not in ("linear", "exact"):
            raise ValueError(f"online_drift must be 'linear' or 'exact'; got online_drift = {self.online_drift!r}")
        if self.online_cap_factor is not None:
            object.__setattr__(self, "online_cap_factor", as_scalar("online_cap_factor", self.online_cap_factor,
                                                                    lower=0, strict=True))
        if self.error_model is not None and not isinstance(self.error_model, ErrorModel):
            raise ValueError(f"error_model must be an ErrorModel; got {type(self.error_model).__name__}")
        if self.data_weight is not None:
            object.__setattr__(self, "data_weight", as_array("data_weight", self.data_weight, lower=0))


@dataclass(frozen=True)
class VPoint:
    """One V of the sweep: the online stage simulated for the chosen rank.

    ``relative_v`` is scale-free (profiles relative to the mean dense energy; the allocator's
    absolute V is relative_v · τ̄²); latency in s; dropped energy relative to the dense
    update energy.
    """

    relative_v: float
    time_average_latency_s: float
    average_dropped_energy: float
    average_queue_s: float
    mean_keep: float
    meets_budget: bool


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


def sweep_v_runs(shape: LoraShape, cell: Cell, clients: Clients, compute_s, *, latency_budget_s: float,
                 downlink_s: float, rounds: int, settings: VSweepSettings,
                 seed) -> tuple[tuple[float, SimulationResult], ...]:
    """The simulations behind :func:`sweep_v`: (relative_v, :class:`SimulationResult`) for every
    V tried, sorted by V (the per-round traces, for summaries over a prefix of the rounds).

    Every V runs on the same draws (``seed``): the client scales, then each round's fading and
    error profiles, in that order. The draws do not depend on V or on the rank, so a run of
    fewer rounds is a prefix of a longer one and every rank sees the same channels.
    """
    from tsfa.allocator import OnlineAllocator

    cap = None if settings.online_cap_factor is None else settings.online_cap_factor * latency_budget_s

    def run(v: float) -> SimulationResult:
        policy = OnlineAllocator.from_relative_v(
            shape, latency_budget_s=latency_budget_s, relative_v=v, total_bandwidth_hz=cell.total_bandwidth_hz,
            downlink_s=downlink_s, max_latency_s=cap, allow_skip=True, drift=settings.online_drift,
            queue=settings.online_initial_queue)
        return simulate_allocation(_RelativeProfiles(policy), cell, clients, rounds=rounds, compute_s=compute_s,
                                   error_model=settings.error_model, data_weight=settings.data_weight, rng=seed)

    def meets(res: SimulationResult) -> bool:
        return bool(res.time_average_latency_s <= latency_budget_s * (1 + FEASIBILITY_RTOL))

    runs = {float(v): run(float(v)) for v in np.sort(settings.v_grid)}
    for _ in range(settings.v_refine):
        # Bracket the budget's edge: the largest V that meets τ̄ and the next larger V that does
        # not (at small V the dropped energy is flat up to simulation noise, so bisecting from
        # the least-energy point could stall there).
        ok = [v for v, res in runs.items() if meets(res)]
        if not ok:
            break
        lo = max(ok)
        above = [v for v, res in runs.items() if not meets(res) and v > lo]
        if not above:
            break
        v = math.sqrt(lo * min(above))
        runs[v] = run(v)
    return tuple(sorted(runs.items()))


def v_point(relative_v: float, res: SimulationResult, latency_budget_s: float, rounds: int | None = None) -> VPoint:
    """The :class:`VPoint` of one simulation, over its first ``rounds`` rounds (None: all)."""
    h = len(res.latency_s) if rounds is None else rounds
    lat = float(res.latency_s[:h].mean())
    return VPoint(relative_v=float(relative_v), time_average_latency_s=lat,
                  average_dropped_energy=float(res.dropped_energy[:h].mean()),
                  average_queue_s=float(res.queue[:h].mean()), mean_keep=float(res.mean_keep[:h].mean()),
                  meets_budget=bool(lat <= latency_budget_s * (1 + FEASIBILITY_RTOL)))


def sweep_v(shape: LoraShape, cell: Cell, clients: Clients, compute_s, *, latency_budget_s: float,
            downlink_s: float, rounds: int, settings: VSweepSettings, seed) -> tuple[VPoint, ...]:
    """Simulate the online stage for every V of ``settings.v_grid`` over ``rounds`` rounds (the
    same draws, from ``seed``, for every V), then bisect (geometrically, ``settings.v_refine``
    times) between the largest V that meets τ̄ and the next larger V that does not.

    Each V runs an :class:`~tsfa.allocator.OnlineAllocator` built by
    :meth:`~tsfa.allocator.OnlineAllocator.from_relative_v` (skipping allowed, hard cap
    ``online_cap_factor`` · τ̄) on error profiles divided by the round's Σ_k p_k e_k(0).
    """
    runs = sweep_v_runs(shape, cell, clients, compute_s, latency_budget_s=latency_budget_s, downlink_s=downlink_s,
                        rounds=rounds, settings=settings, seed=seed)
    return tuple(v_point(v, res, latency_budget_s) for v, res in runs)


def pick_v(sweep: tuple[VPoint, ...]) -> VPoint | None:
    """Least dropped energy among the V that meet τ̄ (ties: the larger V); None if none does."""
    ok = [p for p in sweep if p.meets_budget]
    if not ok:
        return None
    return min(ok, key=lambda p: (p.average_dropped_energy, -p.relative_v))
