"""The offline stage's discrete choice (spec §6, step 4): enumeration and the MILP.

Minimise the predicted loss over candidates subject to latency ≤ τ̄, rounds · latency ≤ the
time budget and participation ≥ the least share: a MILP (one binary per candidate, Σ x = 1,
the constraints as linear rows; Pyomo + HiGHS) or plain enumeration. Both break ties the
same way (the lowest index: smaller rank, then smaller keep, then fewer rounds; the MILP by
a second, lexicographic solve). Also here: which constraints bind, and the message of an
infeasible design. ``pyomo`` is imported inside :func:`choose_milp`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tsfa._pyomo import solve_pyomo
from tsfa.status import Status

__all__ = ["Choice", "CONSTRAINTS", "choose_enumerate", "choose_milp", "violations", "binding",
           "infeasible_message", "FEASIBILITY_RTOL", "TIE_RTOL"]

#: Relative slack with which a candidate meets a budget (the MILP's rows use HiGHS at 1e-10).
FEASIBILITY_RTOL = 1e-9
#: Two predicted losses within this relative distance (of the largest |loss|) tie.
TIE_RTOL = 1e-9
#: The constraints, in the column order of :func:`violations`.
CONSTRAINTS = ("latency", "time", "participation")


@dataclass(frozen=True)
class Choice:
    status: Status
    index: int | None
    message: str


def violations(lat, rounds, part, latency_budget, time_budget, min_participation) -> np.ndarray:
    """Boolean (N, 3): candidate i breaks latency / time / participation (FEASIBILITY_RTOL slack)."""
    bad = np.zeros((len(lat), 3), dtype=bool)
    bad[:, 0] = lat > latency_budget * (1 + FEASIBILITY_RTOL)
    if time_budget is not None:
        bad[:, 1] = rounds * lat > time_budget * (1 + FEASIBILITY_RTOL)
    if min_participation > 0:
        bad[:, 2] = part < min_participation - FEASIBILITY_RTOL
    return bad


def tie_tol(loss: np.ndarray) -> float:
    return TIE_RTOL * max(float(np.max(np.abs(loss))), 1e-300)


def choose_enumerate(loss, lat, rounds, part, *, latency_budget, time_budget=None, min_participation=0.0) -> Choice:
    """Least loss among feasible candidates; ties (within TIE_RTOL) go to the lowest index."""
    loss = np.asarray(loss, dtype=float)
    ok = ~violations(lat, rounds, part, latency_budget, time_budget, min_participation).any(axis=1)
    if not ok.any():
        return Choice(Status.INFEASIBLE, None, "enumeration: no candidate meets the constraints")
    best = float(loss[ok].min())
    idx = int(np.flatnonzero(ok & (loss <= best + tie_tol(loss)))[0])
    return Choice(Status.OPTIMAL, idx, f"enumeration over {len(loss)} candidates")


def choose_milp(loss, lat, rounds, part, *, latency_budget, time_budget=None, min_participation=0.0,
                solver: str = "appsi_highs") -> Choice:
    """The same choice as a MILP: binaries x_i, Σ x = 1, the budgets as linear rows.

    Stage 1 minimises Σ loss_i x_i; stage 2 adds Σ loss_i x_i ≤ optimum + tie tolerance and
    minimises Σ i x_i, which breaks ties exactly as :func:`choose_enumerate` does. Rows are
    scaled (latency by τ̄, time by its budget, loss by max |loss|). Pyomo + HiGHS through
    :func:`tsfa._pyomo.solve_pyomo`, the helper of every MILP of the library.
    """
    import pyomo.environ as pe

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

    def solve(stage: str):
        out = solve_pyomo(m, solver)
        if out.status is not Status.OPTIMAL:
            status = out.status if out.status is Status.INFEASIBLE else Status.ERROR
            return status, None, f"{out.message} ({stage})"
        x = np.array([m.x[i].value if m.x[i].value is not None else np.nan for i in idx])
        pick = np.flatnonzero(np.rint(x) == 1)
        if len(pick) != 1:
            return Status.ERROR, None, f"Pyomo {solver}: the solution does not pick one candidate ({stage})"
        return Status.OPTIMAL, int(pick[0]), out.message

    status, first, msg = solve("least loss")
    if first is None:
        return Choice(status, None, msg)
    m.loss.deactivate()
    m.tie = pe.Constraint(expr=pe.quicksum(float(loss[i] / scale) * m.x[i] for i in idx)
                          <= float((loss[first] + tie_tol(loss)) / scale))
    m.order = pe.Objective(expr=pe.quicksum((i / N) * m.x[i] for i in idx), sense=pe.minimize)
    status, second, msg2 = solve("tie-break")
    if second is None:
        return Choice(status, None, msg2)
    return Choice(Status.OPTIMAL, second, f"MILP over {N} candidates ({msg}; lexicographic tie-break)")


def binding(loss, bad, chosen, derived_rounds) -> tuple[str, ...]:
    tol = tie_tol(loss)
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


def infeasible_message(table, bad, lat_stat, latency_budget, time_budget, min_participation, statistic) -> tuple:
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
