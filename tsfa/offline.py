"""TSFA stage 1 — the offline design (spec §6).

Before training, with channel *statistics* only (no realised gains), choose the structural
rank r, a nominal keep count s (keep ratio ρ = s/r), the number of rounds and the Lyapunov
weight V so that the predicted final loss is least while the expected round latency stays
within τ̄ (and the training fits a wall-clock budget, if one is given).

The inputs form an :class:`OfflineProblem` (the system, the candidate grid, the budgets, the
SAA and V-sweep settings); :func:`design_offline` solves it in five steps over the
candidates, the grid ranks × keep_ratios (× a rounds grid), and a sixth with
``VSweepSettings(latency_model="online")``:

1. **Expected latency by sample-average approximation (SAA)** (:mod:`tsfa.saa`): D fading
   draws, the same for every candidate (common random numbers), the latency-optimal split
   of each draw for every (rank, keep) pair at once, the sample mean and its Student-t
   interval. With ``max_latency_s`` (τ_max) only the largest set of clients that can finish
   by τ_max uploads in a draw (without it the mean is infinite under Rayleigh fading); the
   share of uploading clients (``participation``) is reported and constrained
   (``min_participation``) — otherwise a huge payload that nobody can send would look fast.

2. **Rounds.** ``rounds`` fixed (an int, or a grid the design chooses from, subject to
   rounds · latency ≤ ``time_budget_s``), or, with ``rounds=None``, derived from the time
   budget per candidate: rounds = max(1, ⌊time_budget_s / latency⌋) (the most that fit;
   a candidate slower than the whole budget violates the time constraint).

3. **Predicted loss.** ``predict(rank, keep_ratio, rounds)`` (numpy arrays, broadcast)
   returns named terms and their "total"; the table keeps every term. The keep ratio passed
   is the one actually sent, s/r, with s = :func:`~tsfa.model.keep_from_ratio` (⌈ρ r⌉
   clipped to 1..r).

4. **Choice** (:mod:`tsfa.choice`): minimise total over candidates subject to latency ≤ τ̄,
   rounds · latency ≤ time budget, participation ≥ min_participation: a MILP (Pyomo + HiGHS)
   or plain enumeration, with the same tie-break (smaller rank, then smaller keep, then
   fewer rounds); the MILP is always cross-checked against enumeration.
   ``latency_statistic`` says which latency the constraints use: the SAA mean ("mean", the
   spec's expectation) or the interval's upper end ("upper", guarding against an
   optimistic sample).

5. **V** (:func:`tsfa.simulate.sweep_v`): the allocation-only simulator runs the online stage
   for the chosen rank on fresh channel draws, with error profiles normalised by the round's
   mean dense energy Σ_k p_k e_k(0), over a log grid of the scale-free V (``relative_v``;
   the allocator's absolute V is relative_v · τ̄²), refined by a few geometric bisections
   between the best V that meets τ̄ and the next larger V that does not. The chosen V has
   the least simulated dropped energy among those whose time-average latency is ≤ τ̄ over
   min(rounds, v_rounds) rounds (the planned horizon: a large V's queue transient must fit
   in it). Larger V drops less energy and lets the queue, hence the latency, run higher.

6. **Online latency model** (``latency_model="online"``; with "nominal", the default, the
   design ends at step 5). Steps 1–4 assume every client uploads one nominal keep; the
   online stage instead skips clients in deep fades and lowers keep per client, so it can
   run ranks the SAA calls infeasible. Steps 1–4 then serve as a screen: the screen's
   choice's rank and every rank whose best predicted loss in the table is below the
   choice's (every rank when the screen has no choice) are simulated as in step 5, with
   one seed for every rank and V (common random numbers), over
   H = min(v_rounds, the largest rounds) rounds (v_rounds with derived rounds), on the V
   grid and its refinement. Each (rank, V, rounds) point
   (:class:`~tsfa.plan.OnlinePoint`, ``OfflinePlan.online_table``) gets, over the first
   min(rounds, H) simulated rounds (a prefix: the draws do not depend on the horizon) of each
   of ``online_replicates`` independent trajectories, the mean over the replicates of the
   time-average latency with a Student-t interval over them, the mean keep, the participation and
   the kept energy share κ = 1 − mean_t Σ_k p_k e_k(s_k) / Σ_k p_k e_k(0) (a skipped client
   drops all). Its loss is ``predict(rank, keep_ratio, rounds, kept_share=κ)`` if
   ``predict`` takes ``kept_share`` (:func:`tsfa.online_model.accepts_kept_share`), else
   ``predict(rank, keep_ratio, rounds)``, with keep_ratio = clip(mean keep / r, 1/r, 1)
   either way; derived rounds are max(1, ⌊time_budget_s / simulated latency⌋). The choice
   is the least predicted loss among the points whose simulated latency passes
   ``online_latency_test`` against τ̄ (by default, τ̄ is not below its whole interval), training
   time ≤ time_budget_s and simulated participation ≥ ``online_min_participation`` (0 by
   default; the online stage can meet a small τ̄ by skipping nearly everyone, which a
   ``kept_share`` predictor prices); ties go to the smaller rank, then the larger V, then
   fewer rounds. ``min_participation`` and ``latency_statistic`` apply to the screen only.
   The plan takes the point's rank, rounded mean keep, rounds and V, its simulated latency
   and the chosen rank's V sweep; with no feasible point it is INFEASIBLE, with the least
   simulated latency (the tested statistic) in the message.

Symbols (spec → code): r ``rank``; s ``keep``; ρ ``keep_ratio``; τ̄ ``latency_budget_s``;
τ_max ``max_latency_s``; D ``draws``; V ``relative_v`` (scale-free) and ``weight_v``
(absolute); T^dl ``downlink_s`` = r·M·q / ``downlink_rate_bps``; T^cmp_k ``compute_s``.

``cvxpy``, ``pyomo`` and ``scipy.special`` are imported lazily, inside the functions.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from tsfa._validate import as_array, as_rng, as_scalar
from tsfa.choice import (
    CONSTRAINTS,
    FEASIBILITY_RTOL,
    TIE_RTOL,
    Choice,
    binding,
    choose_enumerate,
    choose_milp,
    infeasible_message,
    violations,
)
from tsfa.model import Cell, Clients, LoraShape, keep_from_ratio
from tsfa.plan import Candidate, OfflinePlan, OnlinePoint, base_shape
from tsfa.saa import (
    LATENCY_BACKENDS,
    LatencyEstimate,
    check_backend,
    check_cap,
    check_compute,
    check_confidence,
    expected_latency,
    saa_latency,
    summaries,
)
from tsfa.simulate import (
    DEFAULT_V_GRID,
    LATENCY_MODELS,
    VPoint,
    VSweepSettings,
    pick_v,
    sweep_v,
)
from tsfa.status import Status

__all__ = [
    "SystemSpec",
    "CandidateGrid",
    "Budgets",
    "SaaSettings",
    "VSweepSettings",
    "OfflineProblem",
    "design_offline",
    "LatencyEstimate",
    "Candidate",
    "VPoint",
    "OnlinePoint",
    "OfflinePlan",
    "expected_latency",
    "LATENCY_BACKENDS",
    "DESIGN_METHODS",
    "DEFAULT_V_GRID",
    "LATENCY_MODELS",
    "CONSTRAINTS",
    "FEASIBILITY_RTOL",
    "TIE_RTOL",
]

DESIGN_METHODS = ("milp", "enumerate")
LATENCY_STATISTICS = ("mean", "upper")


# --------------------------------------------------------------------------------------
# The problem: grouped, validated settings
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SystemSpec:
    """The system the plan is for; only channel *statistics* are used.

    Attributes:
        modules: the adapted modules: a :class:`LoraShape` (its rank is ignored; its
            ``bits_per_value`` and ``header_bits`` are used) or a sequence of
            :class:`~tsfa.model.ModuleShape`; stored as the shape at rank 1. No weights are
            needed (e.g. ``tsfa.llama_7b_qv()``).
        cell, clients: the radio cell and the client population (large-scale gains; the
            fading is drawn).
        compute_s: T^cmp_k per client, seconds: an array (K,) (copied, read-only), or a
            callable ``f(shape: LoraShape) -> (K,)`` if it depends on the rank.
        downlink_rate_bps: broadcast rate of the global adapter, bit/s (T^dl = r·M·q / rate
            per round); None: the downlink takes no time.
    """

    modules: LoraShape
    cell: Cell
    clients: Clients
    compute_s: np.ndarray | Callable[[LoraShape], np.ndarray]
    downlink_rate_bps: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "modules", base_shape(self.modules))
        for name, typ in (("cell", Cell), ("clients", Clients)):
            if not isinstance(getattr(self, name), typ):
                raise ValueError(f"{name} must be a {typ.__name__}; got {type(getattr(self, name)).__name__}")
        if not callable(self.compute_s):
            object.__setattr__(self, "compute_s", check_compute(self.compute_s, len(self.clients)))
        if self.downlink_rate_bps is not None:
            object.__setattr__(self, "downlink_rate_bps",
                               as_scalar("downlink_rate_bps", self.downlink_rate_bps, lower=0, strict=True))

    @property
    def max_rank(self) -> int:
        """The smallest module side: the largest structural rank."""
        return min(min(m.out_features, m.in_features) for m in self.modules.modules)

    def compute_time_s(self, shape: LoraShape) -> np.ndarray:
        """T^cmp_k at ``shape``'s rank, seconds (K,)."""
        t = self.compute_s(shape) if callable(self.compute_s) else self.compute_s
        return check_compute(t, len(self.clients))

    def downlink_s(self, shape: LoraShape) -> float:
        """T^dl at ``shape``'s rank, seconds."""
        return 0.0 if self.downlink_rate_bps is None else shape.downlink_bits / self.downlink_rate_bps


def _int_grid(name: str, values, lower: int) -> tuple[int, ...]:
    arr = as_array(name, values, integer=True, lower=lower)
    if len(np.unique(arr)) != len(arr):
        raise ValueError(f"{name} must not repeat values; got {name} = {list(values)!r}")
    return tuple(int(v) for v in np.sort(arr))


@dataclass(frozen=True)
class CandidateGrid:
    """The candidates: ranks × keep_ratios (× rounds).

    Attributes:
        ranks: distinct positive structural ranks (stored sorted).
        keep_ratios: distinct nominal keep ratios ρ ∈ (0, 1] (stored sorted); the keep count
            is :func:`~tsfa.model.keep_from_ratio` (⌈ρ r⌉ clipped to 1..r).
        rounds: a round count, a grid of counts to choose from (stored as a sorted tuple), or
            None to derive the most rounds that fit ``Budgets.time_budget_s`` per candidate.
    """

    ranks: tuple[int, ...]
    keep_ratios: tuple[float, ...]
    rounds: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "ranks", _int_grid("ranks", self.ranks, 1))
        ratios = as_array("keep_ratios", self.keep_ratios, lower=0, strict=True)
        if np.any(ratios > 1):
            raise ValueError(f"keep_ratios must lie in (0, 1]; got keep_ratios = {list(self.keep_ratios)!r}")
        if len(np.unique(ratios)) != len(ratios):
            raise ValueError(f"keep_ratios must not repeat values; got keep_ratios = {list(self.keep_ratios)!r}")
        object.__setattr__(self, "keep_ratios", tuple(float(v) for v in np.sort(ratios)))
        if self.rounds is not None:
            grid = [self.rounds] if np.ndim(self.rounds) == 0 else self.rounds
            object.__setattr__(self, "rounds", _int_grid("rounds", grid, 1))

    def pairs(self) -> tuple[list[tuple[int, int]], list[list[float]]]:
        """The distinct (rank, keep) pairs in (rank, keep) order, and the ratios giving each."""
        pairs, nominal = [], []
        for r in self.ranks:
            for rho in self.keep_ratios:
                s = keep_from_ratio(r, rho)
                if (r, s) not in pairs:
                    pairs.append((r, s))
                    nominal.append([])
                nominal[pairs.index((r, s))].append(rho)
        return pairs, nominal


@dataclass(frozen=True)
class Budgets:
    """The constraints of the choice.

    Attributes:
        latency_budget_s: τ̄, the long-term average round latency budget, s.
        time_budget_s: training wall-clock budget, s: rounds · latency ≤ time_budget_s.
        max_latency_s: τ_max, a per-round cap in the SAA (:mod:`tsfa.saa`); None: every
            client uploads every round (the mean then diverges slowly with the draws).
        min_participation: least mean share of uploading clients (only binds with a cap).
        latency_statistic: "mean" (SAA mean ≤ τ̄) or "upper" (interval's upper end ≤ τ̄);
            the same statistic sets the training time.
    """

    latency_budget_s: float
    time_budget_s: float | None = None
    max_latency_s: float | None = None
    min_participation: float = 0.9
    latency_statistic: str = "mean"

    def __post_init__(self):
        object.__setattr__(self, "latency_budget_s",
                           as_scalar("latency_budget_s", self.latency_budget_s, lower=0, strict=True))
        if self.time_budget_s is not None:
            object.__setattr__(self, "time_budget_s", as_scalar("time_budget_s", self.time_budget_s, lower=0,
                                                                strict=True))
        object.__setattr__(self, "max_latency_s", check_cap(self.max_latency_s))
        part = as_scalar("min_participation", self.min_participation, lower=0)
        if part > 1:
            raise ValueError(f"min_participation must lie in [0, 1]; got min_participation = {part!r}")
        object.__setattr__(self, "min_participation", part)
        if self.latency_statistic not in LATENCY_STATISTICS:
            raise ValueError(f"latency_statistic must be one of {LATENCY_STATISTICS}; "
                             f"got {self.latency_statistic!r}")


@dataclass(frozen=True)
class SaaSettings:
    """The SAA of step 1: ``draws`` D ≥ 2 fading draws, the interval level ``confidence`` and
    the kernel ``backend`` ("fast", "cvxpy" or "loop", :data:`tsfa.saa.LATENCY_BACKENDS`)."""

    draws: int = 200
    confidence: float = 0.95
    backend: str = "fast"

    def __post_init__(self):
        object.__setattr__(self, "draws", as_scalar("draws", self.draws, lower=2, integer=True))
        object.__setattr__(self, "confidence", check_confidence(self.confidence))
        check_backend(self.backend)


_GROUPS = {"system": SystemSpec, "grid": CandidateGrid, "budgets": Budgets, "saa": SaaSettings,
           "vsweep": VSweepSettings}


@dataclass(frozen=True, eq=False)
class OfflineProblem:
    """The inputs of :func:`design_offline`, validated, in five groups.

    Attributes:
        system: :class:`SystemSpec` (modules, cell, clients, compute_s, downlink_rate_bps).
        grid: :class:`CandidateGrid` (ranks, keep_ratios, rounds).
        budgets: :class:`Budgets` (latency_budget_s, time_budget_s, max_latency_s,
            min_participation, latency_statistic).
        saa: :class:`SaaSettings` (draws, confidence, backend).
        vsweep: :class:`~tsfa.simulate.VSweepSettings` (choose_v, v_grid, v_rounds, v_refine,
            online_cap_factor, online_drift, error_model, data_weight, latency_model,
            online_min_participation, online_latency_test, online_replicates).

    Field names are unique across the groups, so :meth:`replace` takes them flat.
    """

    system: SystemSpec
    grid: CandidateGrid
    budgets: Budgets
    saa: SaaSettings = field(default_factory=SaaSettings)
    vsweep: VSweepSettings = field(default_factory=VSweepSettings)

    def __post_init__(self):
        for name, typ in _GROUPS.items():
            if not isinstance(getattr(self, name), typ):
                raise ValueError(f"{name} must be a {typ.__name__}; got {type(getattr(self, name)).__name__}")
        if self.grid.ranks[-1] > self.system.max_rank:
            raise ValueError(f"ranks must be <= {self.system.max_rank} (the smallest module side); "
                             f"got ranks = {list(self.grid.ranks)!r}")
        if self.grid.rounds is None and self.budgets.time_budget_s is None:
            raise ValueError("give rounds (an int or a grid) or time_budget_s (rounds derived from it); got neither")
        w, k = self.vsweep.data_weight, len(self.system.clients)
        if w is not None and len(w) != k:
            raise ValueError(f"mismatched lengths: len(data_weight) = {len(w)}, len(clients) = {k}")

    def replace(self, **changes) -> OfflineProblem:
        """A copy with some settings changed, by their (flat) field names, e.g.
        ``problem.replace(draws=100, latency_budget_s=0.8)``; everything is validated again."""
        per_group: dict[str, dict] = {}
        for key, value in changes.items():
            group = next((g for g, typ in _GROUPS.items() if key in {f.name for f in dataclasses.fields(typ)}), None)
            if group is None:
                raise ValueError(f"unknown setting {key!r}; the settings are the fields of "
                                 f"{', '.join(t.__name__ for t in _GROUPS.values())}")
            per_group.setdefault(group, {})[key] = value
        return OfflineProblem(**{g: dataclasses.replace(getattr(self, g), **per_group.get(g, {})) for g in _GROUPS})


# --------------------------------------------------------------------------------------
# The design: five steps
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _PairLatency:
    """Step 1's output: the (rank, keep) pairs and their SAA latency (arrays over pairs)."""

    pairs: list[tuple[int, int]]
    nominal: list[list[float]]
    shapes: dict[int, LoraShape]
    compute: dict[int, np.ndarray]
    downlink: dict[int, float]
    bits: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    stat: np.ndarray  # the statistic the constraints use (mean or upper end)
    participation: np.ndarray


def _expected_latencies(problem: OfflineProblem, gen: np.random.Generator) -> _PairLatency:
    """Step 1: the SAA latency of every (rank, keep) pair on the same D fading draws."""
    sys_, K = problem.system, len(problem.system.clients)
    pairs, nominal = problem.grid.pairs()
    shapes = {r: sys_.modules.with_rank(r) for r in problem.grid.ranks}
    comp = {r: sys_.compute_time_s(sh) for r, sh in shapes.items()}
    down = {r: sys_.downlink_s(sh) for r, sh in shapes.items()}
    S = np.array([[shapes[r].payload_bits(s)] * K for r, s in pairs], dtype=float)
    snr = sys_.cell.sample_snr_hz(sys_.clients, rng=gen, rounds=problem.saa.draws)
    lat, part = saa_latency(S, np.array([comp[r] for r, _ in pairs]), snr, sys_.cell.total_bandwidth_hz,
                            np.array([down[r] for r, _ in pairs]), problem.budgets.max_latency_s,
                            problem.saa.backend)
    mean, low, high, _ = summaries(lat, problem.saa.confidence)
    stat = mean if problem.budgets.latency_statistic == "mean" else high
    return _PairLatency(pairs=pairs, nominal=nominal, shapes=shapes, compute=comp, downlink=down, bits=S[:, 0],
                        mean=mean, low=low, high=high, stat=stat, participation=part.mean(axis=1))


#: The most rounds a time budget can derive (beyond it a budget is a mistake, not a plan).
MAX_ROUNDS = 2**31 - 1


def _plan_rounds(problem: OfflineProblem, pl: _PairLatency) -> list[tuple[int, int]]:
    """Step 2: the candidates as (pair index, rounds), in tie-break order (rank, keep, rounds)."""
    rows = []
    for p in sorted(range(len(pl.pairs)), key=lambda q: pl.pairs[q]):
        if problem.grid.rounds is None:
            fit = problem.budgets.time_budget_s / max(pl.stat[p], 1e-300)
            rows.append((p, max(1, int(min(math.floor(min(fit, MAX_ROUNDS)), MAX_ROUNDS)))))
        else:
            rows.extend((p, int(x)) for x in problem.grid.rounds)
    return rows


def _predicted_loss(predict, rank, keep_ratio, rounds, **extra) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Step 3: ``predict(rank, keep_ratio, rounds, **extra)`` over the candidates, checked:
    (total, terms). ``extra`` is ``kept_share`` in step 6, for predictors that accept it."""
    n = len(rank)
    call = "predict(rank, keep_ratio, rounds" + "".join(f", {k}=..." for k in extra) + ")"
    try:
        out = predict(rank, keep_ratio, rounds, **extra)
    except Exception as exc:
        raise ValueError(f"{call} raised {type(exc).__name__}: {exc}") from exc
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


def _table(problem: OfflineProblem, pl: _PairLatency, rows, predict) -> tuple[tuple[Candidate, ...], np.ndarray]:
    """Steps 3 and the table: predicted loss and violated constraints of every candidate."""
    pi = np.array([p for p, _ in rows])
    rk = np.array([pl.pairs[p][0] for p in pi], dtype=np.int64)
    kp = np.array([pl.pairs[p][1] for p in pi], dtype=np.int64)
    nr = np.array([n for _, n in rows], dtype=np.int64)
    total, terms = _predicted_loss(predict, rk, kp / rk, nr)
    b = problem.budgets
    bad = violations(pl.stat[pi], nr, pl.participation[pi], b.latency_budget_s, b.time_budget_s, b.min_participation)
    table = []
    for i, (p, n_r) in enumerate(rows):
        r, s = pl.pairs[p]
        table.append(Candidate(
            index=i, rank=r, keep=s, keep_ratio=s / r, nominal_keep_ratios=tuple(pl.nominal[p]), rounds=n_r,
            payload_bits=int(pl.bits[p]), downlink_s=pl.downlink[r], predicted_loss=float(total[i]),
            loss_terms=types.MappingProxyType({k: float(v[i]) for k, v in terms.items()}),
            latency_mean_s=float(pl.mean[p]), latency_low_s=float(pl.low[p]), latency_high_s=float(pl.high[p]),
            latency_s=float(pl.stat[p]), participation=float(pl.participation[p]),
            training_time_s=float(n_r * pl.stat[p]), violated=tuple(CONSTRAINTS[j] for j in np.flatnonzero(bad[i])),
        ))
    return tuple(table), bad


def _choose(problem: OfflineProblem, table, method: str) -> tuple[Choice, bool | None, str]:
    """Step 4: (choice, cross-check, method name): the MILP cross-checked by enumeration, or enumeration."""
    loss = np.array([c.predicted_loss for c in table])
    args = (loss, np.array([c.latency_s for c in table]), np.array([c.rounds for c in table]),
            np.array([c.participation for c in table]))
    b = problem.budgets
    kw = dict(latency_budget=b.latency_budget_s, time_budget=b.time_budget_s, min_participation=b.min_participation)
    enum = choose_enumerate(*args, **kw)
    if method == "enumerate":
        return enum, None, "enumerate"
    choice, cross = choose_milp(*args, **kw), None
    if choice.status in (Status.OPTIMAL, Status.INFEASIBLE):
        cross = choice.status is enum.status and choice.index == enum.index
        if not cross:
            choice = Choice(Status.ERROR, None, f"the MILP ({choice.status.value}, candidate {choice.index}) "
                                                f"and enumeration ({enum.status.value}, candidate {enum.index}) "
                                                f"disagree")
    return choice, cross, "milp:appsi_highs"


def _choose_v(problem: OfflineProblem, pl: _PairLatency, c: Candidate, seed) -> tuple[tuple, float | None, str]:
    """Step 5: (V sweep, chosen relative_v, note for the message) on the chosen candidate."""
    vs = problem.vsweep
    if not vs.choose_v:
        return (), None, ""
    rounds = min(c.rounds, vs.v_rounds)
    sweep = sweep_v(pl.shapes[c.rank], problem.system.cell, problem.system.clients, pl.compute[c.rank],
                    latency_budget_s=problem.budgets.latency_budget_s, downlink_s=c.downlink_s, rounds=rounds,
                    settings=vs, seed=seed)
    best = pick_v(sweep)
    if best is None:
        v = float(min(vs.v_grid))
        return sweep, v, (f"; no V in the sweep kept the simulated latency within τ̄ over {rounds} "
                          f"rounds, so V = {v:.3g} (the smallest tried)")
    return sweep, best.relative_v, (f"; V = {best.relative_v:.3g} (simulated latency {best.time_average_latency_s:.4g}"
                                    f" s, dropped energy {best.average_dropped_energy:.3g} of dense)")


def design_offline(problem: OfflineProblem, predict: Callable[[np.ndarray, np.ndarray, np.ndarray],
                   Mapping[str, np.ndarray]], *, method: str = "milp",
                   rng: np.random.Generator | int | None = 0) -> OfflinePlan:
    """TSFA's offline stage: choose rank, nominal keep ratio, rounds and V (module docstring).

    Args:
        problem: the :class:`OfflineProblem`.
        predict: ``predict(rank, keep_ratio, rounds) -> {term: array}`` with a "total"
            entry, the predicted final loss; arguments are 1-D arrays over candidates (ints,
            floats in (0, 1], ints). With ``latency_model="online"``, step 6 calls it again
            on the simulated points, with ``kept_share=`` (κ, floats in [0, 1]) if it accepts
            that keyword (:func:`tsfa.online_model.accepts_kept_share`), and with the simulated mean keep ratio
            as ``keep_ratio`` (it must then treat a missing ``kept_share`` as "derive the
            dropped share from keep_ratio", as in steps 3 and 4).
        method: "milp" (Pyomo + HiGHS, cross-checked by enumeration) or "enumerate".
        rng: seed or Generator; the SAA draws come first, then the V simulation's seed
            (with "online", the one seed of every rank's simulation).

    Returns:
        An :class:`OfflinePlan`. No candidate feasible → ``Status.INFEASIBLE`` with the
        smallest feasible τ̄ in the message (and ``min_latency_budget_s``); with "online",
        no simulated (rank, V) feasible → ``Status.INFEASIBLE`` with the least simulated
        latency in the message.
    """
    t0 = time.perf_counter()
    if not isinstance(problem, OfflineProblem):
        raise ValueError(f"problem must be an OfflineProblem; got {type(problem).__name__}")
    if not callable(predict):
        raise ValueError(f"predict must be callable; got {predict!r}")
    if method not in DESIGN_METHODS:
        raise ValueError(f"method must be one of {DESIGN_METHODS}; got method = {method!r}")
    gen = as_rng(rng)
    pl = _expected_latencies(problem, gen)                    # 1. SAA expected latency
    v_seed = int(gen.integers(2**63 - 1))
    rows = _plan_rounds(problem, pl)                          # 2. rounds
    table, bad = _table(problem, pl, rows, predict)           # 3. predicted loss (and the table)
    choice, cross, name = _choose(problem, table, method)     # 4. the choice
    b = problem.budgets
    lat = np.array([c.latency_s for c in table])
    others = ~bad[:, 1:].any(axis=1)
    common = dict(latency_budget_s=b.latency_budget_s, time_budget_s=b.time_budget_s, max_latency_s=b.max_latency_s,
                  min_participation=b.min_participation, table=table, draws=problem.saa.draws,
                  confidence=problem.saa.confidence, latency_statistic=b.latency_statistic, cross_check=cross,
                  backend=f"{name}/{problem.saa.backend}")
    note = "" if b.max_latency_s is not None else (
        " (no max_latency_s: under Rayleigh fading the uncapped mean latency has no finite limit and the "
        "SAA value grows slowly with draws; consider a per-round cap)")
    common["latency_model"] = problem.vsweep.latency_model
    common["screen_chosen"] = choice.index
    least_screen = float(lat[others].min()) if others.any() else math.inf
    if problem.vsweep.latency_model == "online" and choice.status is not Status.ERROR:
        from tsfa.online_model import online_plan

        return online_plan(problem, pl, table, choice, predict, v_seed, note, least_screen, t0, common)
    if choice.index is None:
        msg, least = choice.message, least_screen
        if choice.status is Status.INFEASIBLE:
            msg, least = infeasible_message(table, bad, lat, b.latency_budget_s, b.time_budget_s,
                                            b.min_participation, b.latency_statistic)
        return OfflinePlan(
            status=choice.status, message=msg + note, rank=None, keep=None, keep_ratio=None, rounds=None,
            relative_v=None, predicted_loss=math.nan, loss_terms=types.MappingProxyType({}),
            expected_latency_s=math.nan, latency_low_s=math.nan, latency_high_s=math.nan, participation=math.nan,
            min_latency_budget_s=least, binding=(), chosen=None, v_sweep=(), objective=math.nan,
            solve_time_s=time.perf_counter() - t0, **common)
    c = table[choice.index]
    bind = binding(np.array([x.predicted_loss for x in table]), bad, choice.index, problem.grid.rounds is None)
    sweep, v, v_note = _choose_v(problem, pl, c, v_seed)     # 5. the V sweep
    msg = (f"rank {c.rank}, keep {c.keep}/{c.rank}, {c.rounds} rounds: predicted loss {c.predicted_loss:.6g}, "
           f"{'mean' if b.latency_statistic == 'mean' else 'upper-CI'} latency {c.latency_s:.6g} s ≤ τ̄ = "
           f"{b.latency_budget_s:.6g} s ({problem.saa.confidence:.0%} CI {c.latency_low_s:.4g}–"
           f"{c.latency_high_s:.4g} s, {problem.saa.draws} draws); binding: {', '.join(bind) or 'none'}; "
           f"{choice.message}" + v_note + note)
    return OfflinePlan(
        status=Status.OPTIMAL, message=msg, rank=c.rank, keep=c.keep, keep_ratio=c.keep_ratio, rounds=c.rounds,
        relative_v=v, predicted_loss=c.predicted_loss, loss_terms=c.loss_terms, expected_latency_s=c.latency_mean_s,
        latency_low_s=c.latency_low_s, latency_high_s=c.latency_high_s, participation=c.participation,
        min_latency_budget_s=least_screen, binding=bind, chosen=choice.index, v_sweep=sweep,
        objective=c.predicted_loss, solve_time_s=time.perf_counter() - t0,
        simulation_seed=v_seed if problem.vsweep.choose_v else None, **common)
