"""One status enum and one error hierarchy for every solver in the library.

Every backend (our own kernels, cvxpy, HiGHS, Pyomo, scipy) maps its native status onto
:class:`Status` here, in one place, so results from different backends compare directly:
:func:`status_from_cvxpy`, :func:`highs_status_table` and :func:`pyomo_status_table` (read
through :func:`status_from_table`). The solver packages are imported inside the functions.
"""

from __future__ import annotations

import enum

__all__ = [
    "Status",
    "SolverError",
    "InfeasibleError",
    "ResultMixin",
    "status_from_cvxpy",
    "highs_status_table",
    "pyomo_status_table",
    "status_from_table",
]


class Status(str, enum.Enum):
    """Outcome of a solve. ``OPTIMAL`` and ``OPTIMAL_INACCURATE`` count as success."""

    OPTIMAL = "optimal"
    OPTIMAL_INACCURATE = "optimal_inaccurate"
    INFEASIBLE = "infeasible"
    ITERATION_LIMIT = "iteration_limit"
    ERROR = "error"

    @property
    def success(self) -> bool:
        return self in (Status.OPTIMAL, Status.OPTIMAL_INACCURATE)


class SolverError(RuntimeError):
    """A solve did not produce a usable answer (raised by ``raise_for_status``)."""

    def __init__(self, message: str, status: Status = Status.ERROR):
        super().__init__(message)
        self.status = status


class InfeasibleError(SolverError):
    """The problem has no feasible point; the message names the cause and the fix."""

    def __init__(self, message: str):
        super().__init__(message, Status.INFEASIBLE)


class ResultMixin:
    """Shared behaviour of typed results: ``success`` and ``raise_for_status()``.

    Subclasses are dataclasses with ``status``, ``message`` and ``backend`` fields.
    """

    status: Status
    message: str
    backend: str

    @property
    def success(self) -> bool:
        return self.status.success

    def raise_for_status(self):
        """Return ``self`` if the solve succeeded, else raise a :class:`SolverError`."""
        if self.status is Status.INFEASIBLE:
            raise InfeasibleError(f"[{self.backend}] {self.message}")
        if not self.status.success:
            raise SolverError(f"[{self.backend}] {self.status.value}: {self.message}", self.status)
        return self


def status_from_cvxpy(cvxpy_status: str) -> Status:
    """Map a cvxpy problem status string onto :class:`Status`."""
    import cvxpy as cp  # local: keeps `import tsfa` light

    table = {
        cp.OPTIMAL: Status.OPTIMAL,
        cp.OPTIMAL_INACCURATE: Status.OPTIMAL_INACCURATE,
        cp.INFEASIBLE: Status.INFEASIBLE,
        cp.INFEASIBLE_INACCURATE: Status.INFEASIBLE,
        cp.UNBOUNDED: Status.ERROR,
        cp.UNBOUNDED_INACCURATE: Status.ERROR,
        cp.USER_LIMIT: Status.ITERATION_LIMIT,
        cp.SOLVER_ERROR: Status.ERROR,
    }
    return table.get(cvxpy_status, Status.ERROR)


def highs_status_table() -> dict:
    """``highspy.HighsModelStatus`` → :class:`Status`, or None for "a limit stopped the solver"."""
    import highspy

    ms = highspy.HighsModelStatus
    return {
        ms.kOptimal: Status.OPTIMAL,
        ms.kInfeasible: Status.INFEASIBLE,
        # All variables are binary, so the program is bounded: "unbounded or infeasible" is infeasible.
        ms.kUnboundedOrInfeasible: Status.INFEASIBLE,
        ms.kTimeLimit: None,
        ms.kIterationLimit: None,
        ms.kSolutionLimit: None,
        ms.kObjectiveBound: None,
        ms.kObjectiveTarget: None,
        ms.kInterrupt: None,
        ms.kHighsInterrupt: None,
        ms.kMemoryLimit: None,
    }


def pyomo_status_table() -> dict:
    """Pyomo ``TerminationCondition`` → :class:`Status`, or None for "a limit stopped the solver"."""
    from pyomo.opt import TerminationCondition as tc

    return {
        tc.optimal: Status.OPTIMAL,
        tc.globallyOptimal: Status.OPTIMAL,
        tc.infeasible: Status.INFEASIBLE,
        tc.infeasibleOrUnbounded: Status.INFEASIBLE,  # binaries: bounded, so infeasible
        tc.maxTimeLimit: None,
        tc.maxIterations: None,
        tc.maxEvaluations: None,
        tc.feasible: None,
        tc.userInterrupt: None,
        tc.resourceInterrupt: None,
    }


def status_from_table(table: dict, condition, has_solution: bool) -> Status:
    """Read a solver condition through ``table``: a limit (None) is ITERATION_LIMIT with a
    feasible solution, else ERROR; a condition missing from the table is ERROR; a success
    without a solution is ERROR."""
    status = table.get(condition, Status.ERROR)
    if condition in table and status is None:
        status = Status.ITERATION_LIMIT if has_solution else Status.ERROR
    if status is not Status.INFEASIBLE and not has_solution:
        status = Status.ERROR
    return status
