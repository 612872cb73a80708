"""Exact multiple-choice knapsack (MCKP) oracles: HiGHS directly and through Pyomo.

The online stage picks, for each of K clients (groups), one of J = r + 1 options j = 0..r
(items). Option j of client k needs ``W[k, j]`` Hz of bandwidth and costs ``C[k, j]``;
``W[k, j] = inf`` marks an option that is not allowed. With a total budget B (Hz):

    minimise    Σ_k Σ_j C[k, j] x[k, j]
    subject to  Σ_j x[k, j] = 1                for every group k     (``one_item``)
                Σ_k Σ_j W[k, j] x[k, j] ≤ B                          (``bandwidth``)
                x[k, j] ∈ {0, 1}, only for allowed items (finite W[k, j]).

Both backends solve this binary program with HiGHS to a relative gap of 0 by default, so
they serve as exact references for faster heuristics:

* :func:`solve_mckp_highspy`: ``highspy.Highs`` with a column-wise ``HighsLp``.
* :func:`solve_mckp_pyomo`: the Pyomo model of :func:`build_mckp_pyomo`, solved by a Pyomo
  HiGHS interface (``"appsi_highs"`` or ``"highs"``). Users can export that model with
  ``model.write("mckp.lp", io_options={"symbolic_solver_labels": True})`` (or ``.mps``);
  without that option Pyomo writes anonymous names (x1, c_e_x7_, ...).

Scaling: the solvers see weights and budget divided by B (so the ``bandwidth`` row reads
``≤ 1``) and costs divided by max |C| over allowed items (1 if that is 0). The reported
``objective`` is recomputed from the unscaled C at the rounded choice, and the choice is
checked against the unscaled budget (``Σ W ≤ B (1 + 1e-9)``); a violation is reported as
``Status.ERROR`` rather than silently returned.

Infeasibility is detected before any solver is called (a group with no allowed item, or the
lightest item of every group already over the budget) and the message names the cause.

``highspy`` and ``pyomo`` are imported inside the functions: ``import tsfa`` needs neither.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from tsfa._pyomo import HIGHS_FEASIBILITY_TOL, solve_pyomo
from tsfa._validate import as_array, as_scalar
from tsfa.mckp_lp import Relaxation, mckp_greedy, mckp_relaxation, reduce_mckp
from tsfa.status import ResultMixin, Status, highs_status_table, status_from_table

if TYPE_CHECKING:  # pragma: no cover
    import pyomo.environ

__all__ = [
    "KnapsackSolution",
    "Relaxation",
    "mckp_relaxation",
    "mckp_greedy",
    "solve_mckp_highspy",
    "build_mckp_pyomo",
    "solve_mckp_pyomo",
    "PYOMO_MCKP_SOLVERS",
    "new_highs",
]

#: Relative slack on the budget when checking a returned choice (and when declaring infeasibility).
#: HiGHS runs with a feasibility tolerance of ``HIGHS_FEASIBILITY_TOL`` = 1e-10 on the scaled
#: ``bandwidth`` row (``≤ 1``), below this, so that a choice HiGHS accepts passes the check.
FEASIBILITY_RTOL = 1e-9
#: Pyomo solver names accepted by :func:`solve_mckp_pyomo` (both drive HiGHS, so the options match).
PYOMO_MCKP_SOLVERS = ("appsi_highs", "highs")


@dataclass(frozen=True, eq=False)
class KnapsackSolution(ResultMixin):
    """Result of an MCKP solve.

    Attributes:
        status: OPTIMAL (solved to the requested gap), INFEASIBLE, ITERATION_LIMIT (a time or
            other limit stopped the solver with a feasible choice) or ERROR.
        choice: int64 array (K,), the item index j chosen in each group; None without a solution.
        objective: Σ_k C[k, choice[k]], computed from C (nan without a solution).
        lower_bound: the solver's dual bound on the optimal cost (equal to ``objective`` when
            solved to gap 0; +inf when infeasible; -inf when unknown).
        message: what happened, in words.
        solve_time_s: wall time of building and solving the model, seconds.
        backend: ``"highspy"`` or ``"pyomo:<solver name>"``.
    """

    status: Status
    choice: np.ndarray | None
    objective: float
    lower_bound: float
    message: str
    solve_time_s: float
    backend: str = "highspy"

    def weight(self, W) -> float:
        """Σ_k W[k, choice[k]] (Hz) of the choice; nan without a solution."""
        if self.choice is None:
            return math.nan
        W = np.asarray(W, dtype=float)
        return math.fsum(W[np.arange(len(self.choice)), self.choice])


# ---------------------------------------------------------------------------------------------
# Validation, infeasibility pre-check, scaling, and turning solver values into a choice.


@dataclass(frozen=True)
class _Instance:
    W: np.ndarray  # (K, J), read-only, inf = not allowed
    C: np.ndarray  # (K, J), read-only, finite where W is finite
    budget: float
    allowed: np.ndarray  # (K, J) bool
    cost_scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.W.shape


def _validate(W, C, budget) -> _Instance:
    W = as_array("W", W, ndim=2, lower=0, allow_inf=True, allow_empty=True)
    C = as_array("C", C, ndim=2, allow_inf=True, allow_empty=True)
    if W.shape != C.shape:
        raise ValueError(f"W and C must have the same shape; got W.shape = {W.shape}, C.shape = {C.shape}")
    if W.shape[0] == 0:
        raise ValueError(f"W must have at least one group (row); got W.shape = {W.shape}")
    if W.shape[1] == 0:
        raise ValueError(f"W must have at least one item (column); got W.shape = {W.shape}")
    allowed = np.isfinite(W)
    bad = allowed & ~np.isfinite(C)
    if bad.any():
        k, j = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"C must be finite where W is finite; got C[{k}, {j}] = {float(C[k, j])!r} "
            f"with W[{k}, {j}] = {float(W[k, j])!r}"
        )
    budget = as_scalar("budget", budget, lower=0, strict=True)
    cmax = float(np.max(np.abs(C[allowed]), initial=0.0))
    return _Instance(W=W, C=C, budget=budget, allowed=allowed, cost_scale=cmax if cmax > 0 else 1.0)


def _infeasibility(inst: _Instance) -> str | None:
    """The reason the instance has no feasible choice, or None if it has one."""
    empty = ~inst.allowed.any(axis=1)
    if empty.any():
        groups = np.flatnonzero(empty)
        more = f" (and {len(groups) - 1} more)" if len(groups) > 1 else ""
        return f"group {int(groups[0])}{more} has no allowed item: every W[{int(groups[0])}, j] is inf"
    lightest = math.fsum(inst.W.min(axis=1))
    if lightest > inst.budget * (1 + FEASIBILITY_RTOL):
        return f"the lightest items need {lightest:.6g} Hz > budget {inst.budget:.6g} Hz"
    return None


def _check_time_and_gap(time_limit_s, mip_rel_gap) -> tuple[float, float]:
    t = as_scalar("time_limit_s", time_limit_s, lower=0, strict=True, allow_inf=True)
    g = as_scalar("mip_rel_gap", mip_rel_gap, lower=0)
    return t, g


def _no_solution(status: Status, message: str, t0: float, backend: str, lower_bound: float) -> KnapsackSolution:
    return KnapsackSolution(status=status, choice=None, objective=math.nan, lower_bound=lower_bound, message=message,
                            solve_time_s=time.perf_counter() - t0, backend=backend)


def _failed(status: Status, message: str, t0: float, backend: str) -> KnapsackSolution | None:
    """The result to return for a solver outcome without a usable choice, else None."""
    if status is Status.INFEASIBLE:
        return _no_solution(status, message, t0, backend, math.inf)
    if status is Status.ERROR:
        return _no_solution(Status.ERROR, message, t0, backend, -math.inf)
    return None


def _finish(
    inst: _Instance,
    x: np.ndarray,
    status: Status,
    scaled_bound: float,
    message: str,
    t0: float,
    backend: str,
) -> KnapsackSolution:
    """Round solver values ``x`` (K, J; nan where not allowed) to a choice and check it."""
    K, _ = inst.shape
    xr = np.where(inst.allowed, np.rint(np.nan_to_num(x, nan=-1.0)), 0.0)
    ones = (xr == 1).sum(axis=1)
    if np.any((xr != 0) & (xr != 1)) or np.any(ones != 1):
        k = int(np.flatnonzero(ones != 1)[0]) if np.any(ones != 1) else int(np.argwhere((xr != 0) & (xr != 1))[0, 0])
        return _no_solution(
            Status.ERROR,
            f"{message}; the solver's values do not pick exactly one item in group {k}: x[{k}] = {x[k].tolist()}",
            t0,
            backend,
            -math.inf,
        )
    choice = np.argmax(xr, axis=1).astype(np.int64)
    rows = np.arange(K)
    weight = math.fsum(inst.W[rows, choice])
    objective = math.fsum(inst.C[rows, choice])
    if weight > inst.budget * (1 + FEASIBILITY_RTOL):
        return _no_solution(
            Status.ERROR,
            f"{message}; the rounded choice {choice.tolist()} (cost {objective:.12g}) needs {weight:.12g} Hz "
            f"> budget {inst.budget:.12g} Hz (relative excess {weight / inst.budget - 1:.3g})",
            t0,
            backend,
            -math.inf,
        )
    bound = scaled_bound * inst.cost_scale if math.isfinite(scaled_bound) else -math.inf
    # A dual bound cannot exceed a feasible cost; within rounding noise of it, it is the cost.
    if bound >= objective - 1e-9 * inst.cost_scale:
        bound = objective
    return KnapsackSolution(status=status, choice=choice, objective=objective, lower_bound=bound, message=message,
                            solve_time_s=time.perf_counter() - t0, backend=backend)


# ---------------------------------------------------------------------------------------------
# Reduced-cost fixing around the exact backends (the relaxation itself: tsfa.mckp_lp)


def _maybe_reduce(inst: _Instance, reduce: bool, cutoff: float | None):
    if cutoff is not None:
        cutoff = as_scalar("cutoff", cutoff, allow_inf=True)
        if not reduce:
            raise ValueError(f"cutoff needs reduce=True; got cutoff = {cutoff!r} with reduce = False")
    if not reduce:
        return inst, None
    Wr, start = reduce_mckp(inst.W, inst.C, inst.budget, cutoff=cutoff)
    return replace(inst, W=Wr, allowed=np.isfinite(Wr)), start


def _apply_cutoff(sol: KnapsackSolution, cutoff: float | None) -> KnapsackSolution:
    """Above the cutoff the reduced model's optimum proves only that nothing beats the cutoff."""
    if cutoff is None or sol.choice is None or sol.objective <= cutoff:
        return sol
    return replace(sol, lower_bound=min(sol.lower_bound, float(cutoff)),
                   message=f"{sol.message}; no choice costs less than the cutoff {float(cutoff):.12g}")


# ---------------------------------------------------------------------------------------------
# highspy


def new_highs():
    """A ``highspy.Highs`` whose output is off, without HiGHS's banner on stdout.

    HiGHS prints its banner ("Running HiGHS ...") to the C-level stdout when the first
    ``Highs`` of a process is built, before any option can be set; that one construction
    runs with file descriptor 1 pointed at ``os.devnull``. Later ones print nothing.
    """
    import highspy

    global _HIGHS_BANNER_SHOWN
    if not _HIGHS_BANNER_SHOWN:
        _HIGHS_BANNER_SHOWN = True
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):  # no usable stdout: nothing to protect
            saved = None
        if saved is not None:
            try:
                with open(os.devnull, "w") as null:
                    os.dup2(null.fileno(), 1)
                    h = highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            h.setOptionValue("output_flag", False)
            return h
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    return h


_HIGHS_BANNER_SHOWN = False


def solve_mckp_highspy(
    W, C, budget, *, time_limit_s: float = 60.0, mip_rel_gap: float = 0.0, reduce: bool = True,
    cutoff: float | None = None,
) -> KnapsackSolution:
    """Solve the MCKP exactly with ``highspy.Highs`` (see the module docstring for the model).

    Args:
        W: (K, J) item weights, Hz (≥ 0; ``inf`` = item not allowed).
        C: (K, J) item costs (finite wherever W is finite).
        budget: total bandwidth, Hz (> 0).
        time_limit_s: HiGHS ``time_limit``, seconds (``inf`` for none).
        mip_rel_gap: HiGHS ``mip_rel_gap``; 0 (default) proves optimality.
        reduce: drop items by reduced-cost fixing first (:func:`reduce_mckp`; exact) and give
            HiGHS the greedy choice as its starting incumbent.
        cutoff: only choices cheaper than this matter (requires ``reduce``): items that can only
            be in costlier choices are dropped too. If the optimum exceeds the cutoff, the result
            is a feasible choice with ``lower_bound = cutoff`` (a valid bound, below its cost).

    Returns:
        A :class:`KnapsackSolution`. Infeasible instances give ``Status.INFEASIBLE``; nothing raises
        except bad input (``ValueError``).
    """
    inst = _validate(W, C, budget)
    time_limit_s, mip_rel_gap = _check_time_and_gap(time_limit_s, mip_rel_gap)
    t0 = time.perf_counter()
    backend = "highspy"
    reason = _infeasibility(inst)
    if reason is not None:
        return _no_solution(Status.INFEASIBLE, reason, t0, backend, math.inf)

    import highspy

    inst, start = _maybe_reduce(inst, reduce, cutoff)
    K, J = inst.shape
    kk, jj = np.nonzero(inst.allowed)  # columns in row-major (k, j) order
    n = len(kk)
    lp = highspy.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = K + 1
    lp.col_cost_ = inst.C[kk, jj] / inst.cost_scale
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.ones(n)
    lp.row_lower_ = np.concatenate([np.ones(K), [-highspy.kHighsInf]])
    lp.row_upper_ = np.ones(K + 1)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * n
    # Column-wise matrix: column (k, j) has 1 in row k (one_item) and W/B in row K (bandwidth).
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.num_col_ = n
    lp.a_matrix_.num_row_ = K + 1
    lp.a_matrix_.start_ = np.arange(0, 2 * n + 1, 2, dtype=np.int32)
    lp.a_matrix_.index_ = np.column_stack([kk, np.full(n, K)]).ravel().astype(np.int32)
    lp.a_matrix_.value_ = np.column_stack([np.ones(n), inst.W[kk, jj] / inst.budget]).ravel()

    h = new_highs()
    options = {
        "output_flag": False,
        "mip_rel_gap": mip_rel_gap,
        "mip_abs_gap": 0.0,  # the default 1e-6 (on costs scaled to max 1) would stop short of optimal
        "mip_feasibility_tolerance": HIGHS_FEASIBILITY_TOL,
        "time_limit": time_limit_s,
        "random_seed": 0,
        # Not "threads": HiGHS has one global thread scheduler per process, and run() fails
        # (kError, model status kNotset) when "threads" differs from the count it was started
        # with; the default 0 accepts whatever is running. The MIP search is serial anyway.
    }
    for name, value in options.items():
        if h.setOptionValue(name, value) != highspy.HighsStatus.kOk:
            return _no_solution(Status.ERROR, f"HiGHS rejected option {name} = {value!r}", t0, backend, -math.inf)
    if h.passModel(lp) == highspy.HighsStatus.kError:
        return _no_solution(Status.ERROR, "HiGHS rejected the model (passModel)", t0, backend, -math.inf)
    if start is not None:
        sol = highspy.HighsSolution()
        sol.col_value = (jj == start[kk]).astype(float).tolist()
        h.setSolution(sol)
    run_status = h.run()
    model_status = h.getModelStatus()
    info = h.getInfo()
    message = f"HiGHS: {h.modelStatusToString(model_status)}"
    if run_status == highspy.HighsStatus.kError and model_status == highspy.HighsModelStatus.kNotset:
        return _no_solution(Status.ERROR, f"HiGHS run() failed: {message}", t0, backend, -math.inf)

    has_solution = info.primal_solution_status == int(highspy.SolutionStatus.kSolutionStatusFeasible)
    status = status_from_table(highs_status_table(), model_status, has_solution)
    failed = _failed(status, message, t0, backend)
    if failed is not None:
        return failed

    x = np.full((K, J), np.nan)
    x[kk, jj] = np.asarray(h.getSolution().col_value)
    return _apply_cutoff(_finish(inst, x, status, float(info.mip_dual_bound), message, t0, backend), cutoff)


# ---------------------------------------------------------------------------------------------
# Pyomo


def build_mckp_pyomo(W, C, budget) -> pyomo.environ.ConcreteModel:
    """The MCKP as a Pyomo ``ConcreteModel`` (scaled as in the module docstring).

    Components: ``groups`` (0..K-1), ``allowed`` (the (k, j) pairs with finite W), ``x``
    (Binary over ``allowed``), constraints ``one_item[k]`` and ``bandwidth``, objective
    ``cost`` (Σ C x / ``cost_scale``), and the immutable Params ``budget_hz`` and
    ``cost_scale`` that undo the scaling. Export with ``model.write("mckp.lp")`` or ``.mps``,
    adding ``io_options={"symbolic_solver_labels": True}`` to keep these names in the file.

    Raises:
        ValueError: bad input, or a group with no allowed item (its ``one_item`` row would be 0 = 1).
    """
    inst = _validate(W, C, budget)
    return _build_pyomo(inst)


def _build_pyomo(inst: _Instance):
    import pyomo.environ as pe

    empty = np.flatnonzero(~inst.allowed.any(axis=1))
    if len(empty):
        k = int(empty[0])
        raise ValueError(f"W must allow at least one item per group; group {k} has none (every W[{k}, j] is inf)")
    K, _ = inst.shape
    kk, jj = np.nonzero(inst.allowed)
    pairs = list(zip(kk.tolist(), jj.tolist(), strict=True))
    w = dict(zip(pairs, (inst.W[kk, jj] / inst.budget).tolist(), strict=True))
    c = dict(zip(pairs, (inst.C[kk, jj] / inst.cost_scale).tolist(), strict=True))
    by_group: list[list[tuple[int, int]]] = [[] for _ in range(K)]
    for p in pairs:
        by_group[p[0]].append(p)

    m = pe.ConcreteModel(name="mckp")
    m.groups = pe.Set(initialize=range(K), ordered=True)
    m.allowed = pe.Set(initialize=pairs, dimen=2, ordered=True)
    m.x = pe.Var(m.allowed, domain=pe.Binary)
    m.budget_hz = pe.Param(initialize=inst.budget, within=pe.PositiveReals)
    m.cost_scale = pe.Param(initialize=inst.cost_scale, within=pe.PositiveReals)
    m.one_item = pe.Constraint(m.groups, rule=lambda m, k: pe.quicksum(m.x[p] for p in by_group[k]) == 1)
    m.bandwidth = pe.Constraint(expr=pe.quicksum(w[p] * m.x[p] for p in pairs) <= 1)
    m.cost = pe.Objective(expr=pe.quicksum(c[p] * m.x[p] for p in pairs), sense=pe.minimize)
    return m


def solve_mckp_pyomo(
    W,
    C,
    budget,
    *,
    solver: str = "appsi_highs",
    time_limit_s: float = 60.0,
    mip_rel_gap: float = 0.0,
    reduce: bool = True,
    cutoff: float | None = None,
) -> KnapsackSolution:
    """Solve the MCKP with Pyomo: the model of :func:`build_mckp_pyomo` and a HiGHS interface.

    Args:
        W, C, budget: as in :func:`solve_mckp_highspy`.
        solver: a name from :data:`PYOMO_MCKP_SOLVERS` for ``pyomo.environ.SolverFactory``:
            ``"appsi_highs"`` (pyomo.contrib.appsi) or ``"highs"`` (pyomo.contrib.solver).
        time_limit_s, mip_rel_gap, reduce, cutoff: as in :func:`solve_mckp_highspy` (no starting incumbent).

    Non-optimal terminations do not raise: results are requested with ``load_solutions=False``
    and a solution is loaded only when the solver returned one.
    """
    if solver not in PYOMO_MCKP_SOLVERS:
        raise ValueError(f"solver must be one of {PYOMO_MCKP_SOLVERS}; got solver = {solver!r}")
    inst = _validate(W, C, budget)
    time_limit_s, mip_rel_gap = _check_time_and_gap(time_limit_s, mip_rel_gap)
    t0 = time.perf_counter()
    backend = f"pyomo:{solver}"
    reason = _infeasibility(inst)
    if reason is not None:
        return _no_solution(Status.INFEASIBLE, reason, t0, backend, math.inf)

    inst, _ = _maybe_reduce(inst, reduce, cutoff)
    m = _build_pyomo(inst)
    outcome = solve_pyomo(m, solver, mip_rel_gap=mip_rel_gap, time_limit_s=time_limit_s)
    failed = _failed(outcome.status, outcome.message, t0, backend)
    if failed is not None:
        return failed
    K, J = inst.shape
    x = np.full((K, J), np.nan)
    for (k, j), var in m.x.items():
        x[k, j] = np.nan if var.value is None else var.value
    return _apply_cutoff(_finish(inst, x, outcome.status, outcome.lower_bound, outcome.message, t0, backend), cutoff)
