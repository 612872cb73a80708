"""Every solver family returns the same result contract, on every backend, feasible or not.

``status`` is a :class:`tsfa.Status`; ``message`` a string (non-empty unless OPTIMAL);
``backend`` the name asked for; ``solve_time_s`` a float ≥ 0; ``success`` equals
``status.success``; ``raise_for_status()`` returns the result itself on success and raises
:class:`tsfa.InfeasibleError` (INFEASIBLE) or :class:`tsfa.SolverError` (other failures).
"""

import math

import numpy as np
import pytest

import tsfa
from tsfa.knapsack import solve_mckp_highspy, solve_mckp_pyomo
from tsfa.online import RoundProblem, allocate

B = 20e6


def check_contract(result, backend: str, *, feasible: bool):
    assert isinstance(result.status, tsfa.Status)
    assert isinstance(result.message, str)
    if result.status is not tsfa.Status.OPTIMAL:
        assert result.message
    assert result.backend == backend
    assert isinstance(result.solve_time_s, float) and result.solve_time_s >= 0.0 and math.isfinite(result.solve_time_s)
    assert result.success == result.status.success
    assert result.success is feasible, result.message
    if result.success:
        assert result.raise_for_status() is result
    else:
        expected = tsfa.InfeasibleError if result.status is tsfa.Status.INFEASIBLE else tsfa.SolverError
        with pytest.raises(expected) as info:
            result.raise_for_status()
        assert info.value.status is result.status
        assert result.status is tsfa.Status.INFEASIBLE  # the infeasible instances here are infeasible, not errors


# --- min_latency_bandwidth -------------------------------------------------------------------------


@pytest.mark.parametrize("backend", sorted(tsfa.bandwidth.BANDWIDTH_BACKENDS))
@pytest.mark.parametrize("feasible", [True, False])
def test_min_latency_bandwidth(backend, feasible):
    deadline = None if feasible else 1e-3  # a 1 ms deadline is below every client's compute time
    res = tsfa.min_latency_bandwidth([1e6, 2e6, 5e5], [1e8, 3e7, 5e8], [0.05, 0.1, 0.02], B, downlink_s=0.01,
                                     deadline_s=deadline, backend=backend)
    check_contract(res, backend, feasible=feasible)


# --- allocate --------------------------------------------------------------------------------------


def round_problem(max_latency_s):
    shape = tsfa.minilm_l6_qv(4)
    snr = np.array([1e8, 3e7, 5e8, 2e7])
    profile = np.tile(np.array([1.0, 0.5, 0.2, 0.05, 0.0]), (4, 1))
    return RoundProblem(shape=shape, snr_hz=snr, compute_s=np.full(4, 0.05), data_weight=np.full(4, 0.25),
                        error_profile=profile, queue=1.0, weight_v=2.0, total_bandwidth_hz=B, downlink_s=0.01,
                        max_latency_s=max_latency_s, min_keep=1, allow_skip=False)


@pytest.mark.parametrize("backend", tsfa.online.ALLOCATION_BACKENDS)
@pytest.mark.parametrize("feasible", [True, False])
def test_allocate(backend, feasible):
    res = allocate(round_problem(None if feasible else 0.02), backend=backend)
    check_contract(res, backend, feasible=feasible)


# --- the knapsack MILPs ----------------------------------------------------------------------------

KNAPSACKS = {"highspy": solve_mckp_highspy, "pyomo:appsi_highs": solve_mckp_pyomo}


@pytest.mark.parametrize("backend", sorted(KNAPSACKS))
@pytest.mark.parametrize("feasible", [True, False])
def test_knapsack(backend, feasible):
    W = np.array([[1.0, 2.0, 4.0], [1.0, 3.0, 5.0]])
    C = np.array([[3.0, 2.0, 0.0], [4.0, 1.0, 0.0]])
    res = KNAPSACKS[backend](W, C, 6.0 if feasible else 1.5)
    check_contract(res, backend, feasible=feasible)


# --- design_offline --------------------------------------------------------------------------------


def predict(rank, keep_ratio, rounds):
    total = 1.0 / np.asarray(rank) + 0.1 * (1.0 - np.asarray(keep_ratio)) + 1.0 / np.asarray(rounds)
    return {"total": total}


@pytest.fixture(scope="module")
def offline_problem():
    cell = tsfa.Cell()
    clients = cell.sample_clients(4, rng=0)
    return tsfa.OfflineProblem(
        system=tsfa.SystemSpec(tsfa.minilm_l6_qv(), cell, clients, clients.compute_time_s(2e11)),
        grid=tsfa.CandidateGrid(ranks=[1, 4], keep_ratios=[0.5, 1.0], rounds=[20]),
        budgets=tsfa.Budgets(5.0, max_latency_s=2.0, min_participation=0.0),
        saa=tsfa.SaaSettings(draws=4),
        vsweep=tsfa.VSweepSettings(choose_v=False),
    )


@pytest.mark.parametrize("saa_backend", tsfa.saa.LATENCY_BACKENDS)
@pytest.mark.parametrize("method", ["milp", "enumerate"])
@pytest.mark.parametrize("feasible", [True, False])
def test_design_offline(offline_problem, method, saa_backend, feasible):
    problem = offline_problem.replace(backend=saa_backend, latency_budget_s=5.0 if feasible else 1e-4)
    plan = tsfa.design_offline(problem, predict, method=method, rng=1)
    name = "milp:appsi_highs" if method == "milp" else "enumerate"  # the choice's solver, then the SAA kernel
    check_contract(plan, f"{name}/{saa_backend}", feasible=feasible)
    assert (plan.chosen is not None) is feasible
