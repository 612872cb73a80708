"""Knapsack oracles of the online stage at fixed τ (spec §7).

At fixed τ the round problem is a multiple-choice knapsack: W (K × (r+1)) weights in Hz
(``inf`` = not allowed), C costs, budget B. An oracle maps (W, C, B) to (bound, choice):
``bound`` a lower bound on the knapsack's value at this τ and ``choice`` a feasible item per
client (None if the knapsack is infeasible). The exact oracles also take a ``cutoff``: only
choices cheaper than it matter.

* ``"fast"``: no oracle here: the τ search calls :func:`tsfa.mckp_lp.mckp_greedy` itself
  (the exact LP relaxation and a greedy integer choice).
* ``"cvxpy"``: the same LP relaxation as a DPP linear program, rounded down.
* ``"milp"`` / ``"pyomo"``: the exact MCKP by HiGHS, through highspy or Pyomo.
"""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np

from tsfa._cache import cached_program
from tsfa.mckp_lp import mckp_greedy
from tsfa.status import SolverError, Status

__all__ = ["ALLOCATION_BACKENDS", "EXACT_BACKENDS", "ORACLES", "relaxation_oracle", "callable_oracle"]

#: Backend names of :func:`tsfa.allocate`.
ALLOCATION_BACKENDS = ("fast", "cvxpy", "milp", "pyomo")
#: Backends whose oracle solves the discrete knapsack exactly (the τ search then certifies the
#: discrete optimum; the others certify the relaxation and report the integer gap).
EXACT_BACKENDS = ("milp", "pyomo")


@cached_program
def _lp_program(K: int, J: int):
    """The MCKP LP relaxation as a DPP program (compiled once per K × J): x ≥ 0 per item,
    Σ_j x = 1 per client, x ≤ allowed, Σ (W/B) x ≤ 1, minimise Σ (C/scale) x."""
    import cvxpy as cp

    x = cp.Variable((K, J), nonneg=True)
    pw = cp.Parameter((K, J), nonneg=True)
    pc = cp.Parameter((K, J))
    pa = cp.Parameter((K, J), nonneg=True)
    prob = cp.Problem(
        cp.Minimize(cp.sum(cp.multiply(pc, x))),
        [cp.sum(x, axis=1) == 1, x <= pa, cp.sum(cp.multiply(pw, x)) <= 1],
    )
    assert prob.is_dcp(dpp=True)
    return prob, x, pw, pc, pa


def _oracle_cvxpy(W, C, budget):
    """The LP relaxation by cvxpy/Clarabel; the choice rounds the LP solution down."""
    K, J = W.shape
    allowed = np.isfinite(W)
    if not allowed.any(axis=1).all():
        return math.inf, None
    prob, x, pw, pc, pa = _lp_program(K, J)
    scale = max(float(np.abs(C[allowed]).max()), 1e-300)
    pw.value = np.where(allowed, W / budget, 0.0)
    pc.value = np.where(allowed, C / scale, 0.0)
    pa.value = allowed.astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prob.solve(solver="CLARABEL", tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
    if prob.status in ("infeasible", "infeasible_inaccurate"):
        return math.inf, None
    if x.value is None:
        raise SolverError(f"cvxpy/CLARABEL returned status {prob.status!r}")
    xv = np.where(allowed, x.value, 0.0)
    # Round down: the lightest item in each client's support keeps the budget.
    choice = np.where(xv > 1e-7, W, np.inf).argmin(axis=1)
    return float(prob.value) * scale, choice


def _oracle_milp(W, C, budget, cutoff=None):
    from tsfa.knapsack import solve_mckp_highspy

    sol = solve_mckp_highspy(W, C, budget, cutoff=cutoff)
    if sol.status is Status.INFEASIBLE:
        return math.inf, None
    return sol.lower_bound, sol.choice


def _oracle_pyomo(W, C, budget, cutoff=None):
    from tsfa.knapsack import solve_mckp_pyomo

    sol = solve_mckp_pyomo(W, C, budget, cutoff=cutoff)
    if sol.status is Status.INFEASIBLE:
        return math.inf, None
    return sol.lower_bound, sol.choice


#: The oracles of the backends other than "fast".
ORACLES = {"cvxpy": _oracle_cvxpy, "milp": _oracle_milp, "pyomo": _oracle_pyomo}


def relaxation_oracle(backend: str):
    """(W, C, B) -> (LP value, choice) of the MCKP relaxation: "fast" (greedy, exact) or "cvxpy"."""
    if backend == "fast":
        return lambda W, C, budget: mckp_greedy(W, C, budget)[:2]
    if backend == "cvxpy":
        return _oracle_cvxpy
    raise ValueError(f"backend must be 'fast' or 'cvxpy'; got backend = {backend!r}")


def callable_oracle(fn):
    """A user's ``fn(W, C, budget[, cutoff=]) -> (lower_bound, choice | None, ...)`` as an exact oracle."""
    try:
        takes_cutoff = "cutoff" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        takes_cutoff = False

    def oracle(W, C, budget, cutoff=None):
        out = fn(W, C, budget, cutoff=cutoff) if takes_cutoff else fn(W, C, budget)
        return out[0], out[1]

    return oracle
