"""One way to solve a Pyomo model with HiGHS, shared by every MILP of the library
(:func:`tsfa.knapsack.solve_mckp_pyomo` and the offline stage's choice).

The model is solved with ``load_solutions=False``; a solution is loaded only when the
solver returned one, and the termination condition is read through
:func:`tsfa.status.pyomo_status_table`. Nothing raises: a missing solver or a solver
exception is ``Status.ERROR`` with the reason. ``pyomo`` is imported inside the function.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from tsfa.status import Status, pyomo_status_table, status_from_table

__all__ = ["PyomoOutcome", "HIGHS_FEASIBILITY_TOL", "solve_pyomo"]

#: HiGHS's MIP feasibility tolerance on rows scaled to O(1). The default 1e-6 would let a
#: choice overshoot a budget by 1e-6 of it (e.g. 20 Hz of 20 MHz), where optima usually sit;
#: 1e-10 keeps every accepted choice within the library's 1e-9 relative feasibility checks.
HIGHS_FEASIBILITY_TOL = 1e-10


class PyomoOutcome(NamedTuple):
    """What :func:`solve_pyomo` found.

    Attributes:
        status: OPTIMAL, ITERATION_LIMIT (a limit stopped the solver with a solution, which is
            loaded), INFEASIBLE or ERROR.
        message: "Pyomo <solver>: <termination condition>", or why the solve failed.
        lower_bound: the solver's bound on the (scaled) objective; -inf when unknown.
    """

    status: Status
    message: str
    lower_bound: float


def solve_pyomo(model, solver: str, *, mip_rel_gap: float = 0.0, time_limit_s: float = math.inf) -> PyomoOutcome:
    """Solve ``model`` with the Pyomo HiGHS interface ``solver`` ("appsi_highs" or "highs").

    HiGHS runs with ``mip_rel_gap`` (0: prove optimality), ``mip_abs_gap`` 0,
    :data:`HIGHS_FEASIBILITY_TOL` and a fixed random seed. No "threads" option: HiGHS has one
    global thread scheduler per process, and a solve with another thread count silently ends
    with termination condition "unknown".
    """
    import logging

    import pyomo.environ as pe
    from pyomo.common.log import LoggingIntercept

    opt = pe.SolverFactory(solver)
    if opt is None or not opt.available(exception_flag=False):
        return PyomoOutcome(Status.ERROR, f"Pyomo solver {solver!r} is not available", -math.inf)
    options = {"mip_rel_gap": mip_rel_gap, "mip_abs_gap": 0.0, "mip_feasibility_tolerance": HIGHS_FEASIBILITY_TOL,
               "random_seed": 0}
    timelimit = None if math.isinf(time_limit_s) else time_limit_s
    try:
        results = opt.solve(model, load_solutions=False, timelimit=timelimit, options=options)
    except Exception as exc:  # any solver failure becomes Status.ERROR, never an exception
        return PyomoOutcome(Status.ERROR, f"Pyomo {solver} raised {type(exc).__name__}: {exc}", -math.inf)
    cond = results.solver.termination_condition
    status = status_from_table(pyomo_status_table(), cond, len(results.solution) > 0)
    message = f"Pyomo {solver}: {cond}"
    if status in (Status.OPTIMAL, Status.ITERATION_LIMIT):
        # load_from logs a warning when loading the incumbent of an "aborted" (time-limited)
        # solve; the status already says so.
        with LoggingIntercept(level=logging.WARNING, module="pyomo.core"):
            model.solutions.load_from(results)
    lb = results.problem.lower_bound
    return PyomoOutcome(status, message, float(lb) if lb is not None else -math.inf)
