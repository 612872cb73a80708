"""Step 6 of the offline stage, the online latency model (``VSweepSettings.latency_model = "online"``).

Steps 1–4 of :func:`tsfa.design_offline` judge a rank by a *nominal* latency (every client
uploads one keep); the online stage skips clients in deep fades, lowers keep client by
client and lets its queue trade a slow round for faster ones, so it runs, within τ̄, ranks
whose nominal latency is above τ̄. With the online model the nominal steps are a screen:
:func:`online_plan` simulates the online allocator (skipping, cap, queue; the same seed for
every rank and V) for the screen's rank and every rank that could improve on it, prices each
(rank, V, rounds) point with ``predict`` — passing, when the predictor accepts them
(:func:`accepts_kept_share`), the aggregate's kept share ``kept_share`` and the clients'
participation divergence ``participation`` (χ², :func:`tsfa.participation_divergence`), or
without ``participation`` the clients' mean kept share (a skipped client keeps nothing) — and chooses
the least predicted loss among the points whose simulated time-average latency passes
``VSweepSettings.online_latency_test`` against τ̄ (by default: not significantly above it).
docs/model.md ("The online latency model") states the rules.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import types
from dataclasses import dataclass

import numpy as np

from tsfa.choice import CONSTRAINTS, FEASIBILITY_RTOL, Choice, binding, tie_tol, violations
from tsfa.model import participation_divergence
from tsfa.offline import MAX_ROUNDS, OfflineProblem, _PairLatency, _predicted_loss
from tsfa.plan import OfflinePlan, OnlinePoint
from tsfa.saa import summaries
from tsfa.simulate import SimulationResult, VPoint, sweep_v_runs
from tsfa.status import Status

__all__ = ["online_plan", "accepts_kept_share", "latency_tested", "replicate_seeds", "LATENCY_BATCHES"]


def accepts_kept_share(predict, name: str = "kept_share") -> bool:
    """Whether ``predict`` takes a keyword ``name`` (``kept_share``, or ``participation``: a
    parameter of that name that is not positional-only, or ``**kwargs``); False if its
    signature cannot be read."""
    try:
        params = inspect.signature(predict).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD
               or (p.name == name and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY))
               for p in params)


#: Batches of the batch-means interval of a simulated time-average latency.
LATENCY_BATCHES = 10


def _batch_means_interval(x: np.ndarray, confidence: float) -> tuple[float, float]:
    """Student-t interval of the mean of the series ``x`` from the means of (at most)
    LATENCY_BATCHES contiguous batches (the rounds are correlated through the queue, so the
    per-round spread would understate the error); (NaN, NaN) with fewer than 2 batches of 2."""
    b = min(LATENCY_BATCHES, len(x) // 2)
    if b < 2:
        return math.nan, math.nan
    means = np.array([part.mean() for part in np.array_split(np.asarray(x, dtype=float), b)])
    _, low, high, _ = summaries(means[None, :], confidence)
    centre, half = float(np.mean(x)), 0.5 * float(high[0] - low[0])
    return centre - half, centre + half


def latency_tested(points, test: str) -> np.ndarray:
    """The latency each point is held against τ̄ under ``test`` (``VSweepSettings.online_latency_test``):
    "interval" the lower end of its batch-means interval, "upper" the upper end, "mean" the
    time-average; the time-average wherever the interval is NaN (fewer than 4 rounds).
    ``points``: OnlinePoints or dicts with their fields."""
    get = (lambda p, k: p[k]) if points and isinstance(points[0], dict) else getattr
    mean = np.array([get(p, "time_average_latency_s") for p in points], dtype=float)
    if test == "mean":
        return mean
    end = np.array([get(p, "latency_low_s" if test == "interval" else "latency_high_s") for p in points], dtype=float)
    return np.where(np.isfinite(end), end, mean)


def _online_ranks(problem: OfflineProblem, table, choice: Choice) -> list[int]:
    """Step 6's ranks: the screen's choice and every rank whose best predicted loss in the
    table is below the screen's choice (every rank when the screen found none)."""
    if choice.index is None:
        return list(problem.grid.ranks)
    loss = np.array([c.predicted_loss for c in table])
    best = loss[choice.index]
    tol = tie_tol(loss)
    ranks = {table[choice.index].rank}
    ranks.update(c.rank for c in table if c.predicted_loss < best - tol)
    return sorted(ranks)


@dataclass(frozen=True, eq=False)
class _OnlineModel:
    """Step 6's output: the points, the chosen one, the simulations per rank and the horizon."""

    points: tuple[OnlinePoint, ...]
    chosen: int | None
    bad: np.ndarray
    runs: dict[int, tuple[tuple[float, list[SimulationResult]], ...]]  # per rank: (V, one result per replicate)
    ranks: list[int]
    horizon: int
    kept_share_passed: bool
    participation_passed: bool = False


def replicate_seeds(seed, replicates: int) -> list[int]:
    """The seeds of ``replicates`` independent simulated trajectories: ``seed`` itself first
    (one replicate is the single trajectory of ``seed``), then children of its SeedSequence."""
    extra = np.random.SeedSequence(int(seed)).spawn(replicates - 1) if replicates > 1 else []
    return [int(seed)] + [int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)) for child in extra]


def _replicated_runs(problem: OfflineProblem, pl: _PairLatency, r: int, horizon: int, seeds: list[int]):
    """Rank ``r``'s V sweep on every replicate seed: the first replicate runs the V grid (and its
    refinement); the others run exactly the V values the first one ended with, so every V has
    every replicate. Returns (V, [SimulationResult per replicate]) sorted by V."""
    vs, tau = problem.vsweep, problem.budgets.latency_budget_s

    def sweep(settings, seed):
        return sweep_v_runs(pl.shapes[r], problem.system.cell, problem.system.clients, pl.compute[r],
                            latency_budget_s=tau, downlink_s=pl.downlink[r], rounds=horizon, settings=settings,
                            seed=seed)

    first = sweep(vs, seeds[0])
    fixed = dataclasses.replace(vs, v_grid=tuple(v for v, _ in first), v_refine=0)
    rest = [dict(sweep(fixed, seed)) for seed in seeds[1:]]
    return tuple((v, [res] + [other[v] for other in rest]) for v, res in first)


def _point_row(problem: OfflineProblem, r: int, v: float, reps, n: int, h: int) -> dict:
    """One (rank, V, rounds) point over the first ``h`` simulated rounds of every replicate:
    the replicates' mean statistics, and the interval of the time-average latency (Student-t
    over the replicates' time-averages; one replicate: batch means over its rounds)."""
    conf, K = problem.saa.confidence, len(problem.system.clients)
    averages = np.array([res.latency_s[:h].mean() for res in reps])
    if len(reps) > 1:
        _, low, high, _ = summaries(averages[None, :], conf)
        low, high = float(low[0]), float(high[0])
    else:
        low, high = _batch_means_interval(reps[0].latency_s[:h], conf)
    mean = lambda f: float(np.mean([f(res) for res in reps]))  # noqa: E731
    mk = mean(lambda res: res.mean_keep[:h].mean())
    dropped = mean(lambda res: res.dropped_energy[:h].mean())
    sent = mean(lambda res: res.sent_share(h))
    shares = np.mean([res.scheduled[:h].mean(axis=0) if res.scheduled is not None else np.ones(K)
                      for res in reps], axis=0)
    return dict(rank=r, relative_v=float(v), rounds=n, simulated_rounds=h, replicates=len(reps),
                time_average_latency_s=float(averages.mean()), latency_low_s=low, latency_high_s=high,
                average_queue_s=mean(lambda res: res.queue[:h].mean()),
                participation=mean(lambda res: (res.participation[:h] if res.participation is not None
                                                else np.ones(h)).mean()),
                mean_keep=mk, mean_keep_ratio=float(np.clip(mk / r, 1.0 / r, 1.0)),
                keep=int(np.clip(math.floor(mk + 0.5), 1, r)),
                kept_share=float(np.clip(1.0 - dropped, 0.0, 1.0)),
                sent_share=sent if math.isfinite(sent) else float(1.0 - dropped),
                participation_divergence=float(participation_divergence(shares, problem.vsweep.data_weight)))


def _online_model(problem: OfflineProblem, pl: _PairLatency, ranks: list[int], predict, seed) -> _OnlineModel:
    """Step 6: simulate the online stage for every rank in ``ranks`` over the V grid on
    ``online_replicates`` independent trajectories (the same draws for every rank and V), predict
    every (rank, V, rounds) point's loss from its kept energy share, and choose the least
    predicted loss among the feasible points (latency, time and participation; ties: smaller
    rank, then larger V, then fewer rounds)."""
    vs, b = problem.vsweep, problem.budgets
    tau = b.latency_budget_s
    grid_rounds = problem.grid.rounds
    horizon = vs.v_rounds if grid_rounds is None else min(vs.v_rounds, max(grid_rounds))
    seeds = replicate_seeds(seed, vs.online_replicates)
    runs, rows = {}, []
    for r in ranks:
        runs[r] = _replicated_runs(problem, pl, r, horizon, seeds)
        for v, reps in runs[r]:
            if grid_rounds is None:
                lat = float(np.mean([res.latency_s.mean() for res in reps]))
                fit = b.time_budget_s / max(lat, 1e-300)
                options = [(max(1, int(math.floor(min(fit, MAX_ROUNDS)))), horizon)]
            else:
                options = [(int(n), min(int(n), horizon)) for n in grid_rounds]
            rows += [_point_row(problem, r, v, reps, n, h) for n, h in options]
    rk = np.array([x["rank"] for x in rows], dtype=np.int64)
    nr = np.array([x["rounds"] for x in rows], dtype=np.int64)
    ratio = np.array([x["mean_keep_ratio"] for x in rows])
    passed = accepts_kept_share(predict)
    extra = {}
    if passed and accepts_kept_share(predict, "participation"):  # the aggregate's κ and the skipping's χ²
        extra = {"kept_share": np.array([x["sent_share"] for x in rows]),
                 "participation": np.array([x["participation_divergence"] for x in rows])}
    elif passed:  # the clients' mean κ prices skipping as dropped energy
        extra = {"kept_share": np.array([x["kept_share"] for x in rows])}
    total, terms = _predicted_loss(predict, rk, ratio, nr, **extra)
    lat = np.array([x["time_average_latency_s"] for x in rows])
    part = np.array([x["participation"] for x in rows])
    bad = violations(lat, nr, part, tau, b.time_budget_s, vs.online_min_participation)
    bad[:, 0] = latency_tested(rows, vs.online_latency_test) > tau * (1 + FEASIBILITY_RTOL)
    points = tuple(OnlinePoint(
        index=i, **x, keep_ratio=x["keep"] / x["rank"],
        training_time_s=float(x["rounds"] * x["time_average_latency_s"]),
        predicted_loss=float(total[i]), loss_terms=types.MappingProxyType({k: float(t[i]) for k, t in terms.items()}),
        violated=tuple(CONSTRAINTS[j] for j in np.flatnonzero(bad[i]))) for i, x in enumerate(rows))
    ok = ~bad.any(axis=1)
    chosen = None
    if ok.any():
        best = float(total[ok].min())
        tied = np.flatnonzero(ok & (total <= best + tie_tol(total)))
        chosen = int(min(tied, key=lambda i: (points[i].rank, -points[i].relative_v, points[i].rounds)))
    return _OnlineModel(points=points, chosen=chosen, bad=bad, runs=runs, ranks=ranks, horizon=horizon,
                        kept_share_passed=passed, participation_passed="participation" in extra)


def _screen_note(table, choice: Choice, p: OnlinePoint | None) -> str:
    """How the nominal screen's choice relates to the online choice ``p``, in words."""
    if choice.index is None:
        return f"the nominal screen (steps 1–4) found no feasible candidate ({choice.message})"
    c = table[choice.index]
    if p is not None and (c.rank, c.keep, c.rounds) == (p.rank, p.keep, p.rounds):
        return "the nominal screen (steps 1–4) chose the same rank, keep and rounds"
    return (f"the nominal screen (steps 1–4: every client at one nominal keep, SAA latency) chose rank {c.rank}, "
            f"keep {c.keep}/{c.rank}, {c.rounds} rounds (predicted loss {c.predicted_loss:.6g}, latency "
            f"{c.latency_s:.4g} s)")


def _interval_words(p: OnlinePoint) -> str:
    """How a point's latency interval was formed, in words."""
    if p.replicates > 1:
        return f"over {p.replicates} independent trajectories of {p.simulated_rounds} simulated rounds"
    return f"batch means over {p.simulated_rounds} simulated rounds of one trajectory"


_LATENCY_TEST_WORDS = {"mean": "test: the time-average ≤ τ̄",
                       "interval": "test: τ̄ not below the whole interval",
                       "upper": "test: the interval's upper end ≤ τ̄"}


def _online_infeasible_message(problem: OfflineProblem, om: _OnlineModel) -> str:
    b = problem.budgets
    pts = om.points
    test = problem.vsweep.online_latency_test
    tested = latency_tested(pts, test)
    i = min(range(len(pts)), key=lambda j: (tested[j], pts[j].rank))
    p = pts[i]
    what = {"mean": "time-average latency", "interval": "lower end of a time-average latency's interval",
            "upper": "upper end of a time-average latency's interval"}[test]
    parts = [f"no (rank, V) simulated on the online stage meets the budgets: the least simulated {what} "
             f"(online_latency_test = {test!r}) is {tested[i]:.6g} s (rank {p.rank}, V = {p.relative_v:.3g}, "
             f"{p.simulated_rounds} rounds simulated) against latency_budget_s = {b.latency_budget_s:.6g} s"]
    fast = [q for q in pts if "latency" not in q.violated]
    if fast and all("participation" in q.violated for q in fast):
        best = max(q.participation for q in fast)
        parts.append(f"the points within τ̄ schedule at most {best:.4g} of the clients on average, below "
                     f"online_min_participation = {problem.vsweep.online_min_participation:.6g} (they meet τ̄ "
                     f"by skipping)")
    if b.time_budget_s is not None and om.bad[:, 1].all():
        need = min(q.training_time_s for q in pts)
        parts.append(f"time_budget_s = {b.time_budget_s:.6g} s is below the least simulated training time "
                     f"{need:.6g} s (rounds × latency)")
    parts.append("raise latency_budget_s (or time_budget_s), add smaller ranks or more bandwidth")
    return "; ".join(parts)



def online_plan(problem: OfflineProblem, pl: _PairLatency, table, choice: Choice, predict, seed, note: str,
                 least_screen: float, t0: float, common: dict) -> OfflinePlan:
    """Step 6 and the plan of ``latency_model="online"`` (module docstring)."""
    b = problem.budgets
    om = _online_model(problem, pl, _online_ranks(problem, table, choice), predict, seed)   # 6. online model
    screen = _screen_note(table, choice, None if om.chosen is None else om.points[om.chosen])
    how = ("the aggregate's kept_share and the participation χ² passed to predict" if om.participation_passed
           else "kept_share passed to predict" if om.kept_share_passed
           else "predict takes no kept_share: keep_ratio = simulated mean keep / r")
    if om.chosen is None:
        msg = f"{_online_infeasible_message(problem, om)}; {screen}" + note
        return OfflinePlan(
            status=Status.INFEASIBLE, message=msg, rank=None, keep=None, keep_ratio=None, rounds=None,
            relative_v=None, predicted_loss=math.nan, loss_terms=types.MappingProxyType({}),
            expected_latency_s=math.nan, latency_low_s=math.nan, latency_high_s=math.nan, participation=math.nan,
            min_latency_budget_s=least_screen, binding=(), chosen=None, v_sweep=(), objective=math.nan,
            solve_time_s=time.perf_counter() - t0, online_table=om.points, online_chosen=None, simulation_seed=seed,
            **common)
    p = om.points[om.chosen]
    loss = np.array([q.predicted_loss for q in om.points])
    bind = binding(loss, om.bad, om.chosen, problem.grid.rounds is None)
    same = {}  # each V's point over the chosen point's horizon (its rounds where the grid has them)
    for q in om.points:
        if q.rank == p.rank and q.simulated_rounds == p.simulated_rounds and \
                (q.rounds == p.rounds or q.relative_v not in same):
            same[q.relative_v] = q
    sweep = tuple(VPoint(relative_v=q.relative_v, time_average_latency_s=q.time_average_latency_s,
                         average_dropped_energy=1.0 - q.kept_share, average_queue_s=q.average_queue_s,
                         mean_keep=q.mean_keep, meets_budget="latency" not in q.violated)  # the online test
                  for _, q in sorted(same.items()))
    msg = (f"rank {p.rank}, keep {p.keep}/{p.rank} (mean keep {p.mean_keep:.3g}), {p.rounds} rounds, "
           f"V = {p.relative_v:.3g}: predicted loss {p.predicted_loss:.6g}; chosen on the simulated online stage "
           f"(skipping, cap, queue): time-average latency {p.time_average_latency_s:.6g} s against τ̄ = "
           f"{b.latency_budget_s:.6g} s ({problem.saa.confidence:.0%} CI {p.latency_low_s:.4g}–"
           f"{p.latency_high_s:.4g} s, "
           f"{_interval_words(p)}; "
           f"{_LATENCY_TEST_WORDS[problem.vsweep.online_latency_test]}), kept energy share "
           f"{p.kept_share:.4g}, participation {p.participation:.3f}; {len(om.points)} (rank, V, rounds) points "
           f"over ranks {', '.join(map(str, om.ranks))} ({how}); binding: {', '.join(bind) or 'none'}; {screen}"
           + note)
    return OfflinePlan(
        status=Status.OPTIMAL, message=msg, rank=p.rank, keep=p.keep, keep_ratio=p.keep_ratio, rounds=p.rounds,
        relative_v=p.relative_v, predicted_loss=p.predicted_loss, loss_terms=p.loss_terms,
        expected_latency_s=p.time_average_latency_s, latency_low_s=p.latency_low_s, latency_high_s=p.latency_high_s,
        participation=p.participation, min_latency_budget_s=least_screen, binding=bind, chosen=None, v_sweep=sweep,
        objective=p.predicted_loss, solve_time_s=time.perf_counter() - t0, online_table=om.points,
        online_chosen=om.chosen, simulation_seed=seed, **common)
