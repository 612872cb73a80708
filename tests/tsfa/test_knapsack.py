"""Exact MCKP oracles (tsfa.knapsack): brute force, backend agreement, export, errors."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tsfa.knapsack as kn
from tsfa import InfeasibleError, Status
from tsfa.knapsack import (
    KnapsackSolution,
    build_mckp_pyomo,
    solve_mckp_highspy,
    solve_mckp_pyomo,
)

MHZ = 1e6
INF = math.inf

SOLVERS = {
    "highspy": solve_mckp_highspy,
    "appsi_highs": lambda W, C, b, **kw: solve_mckp_pyomo(W, C, b, solver="appsi_highs", **kw),
    "highs": lambda W, C, b, **kw: solve_mckp_pyomo(W, C, b, solver="highs", **kw),
}


def brute_force(W, C, budget):
    """Minimum cost over all choices with Σ W ≤ budget, or None if there is none."""
    best = None
    options = [[j for j in range(W.shape[1]) if np.isfinite(W[k, j])] for k in range(W.shape[0])]
    for choice in itertools.product(*options):
        rows = range(len(choice))
        if math.fsum(W[k, j] for k, j in zip(rows, choice, strict=True)) <= budget:
            cost = math.fsum(C[k, j] for k, j in zip(rows, choice, strict=True))
            best = cost if best is None else min(best, cost)
    return best


@st.composite
def small_instances(draw):
    """K ≤ 5, J ≤ 4; integer MHz weights (so no choice sits within rounding of the budget), some inf."""
    k = draw(st.integers(1, 5))
    j = draw(st.integers(1, 4))
    w = draw(st.lists(st.integers(0, 20), min_size=k * j, max_size=k * j))
    blocked = draw(st.lists(st.booleans(), min_size=k * j, max_size=k * j))
    W = np.where(np.array(blocked) & (np.arange(k * j) % 3 == 0), INF, np.array(w, float) * MHZ).reshape(k, j)
    C = np.array(draw(st.lists(st.floats(-10, 100, allow_subnormal=False), min_size=k * j, max_size=k * j)))
    C = C.reshape(k, j)
    budget = draw(st.integers(1, 20 * k)) * MHZ
    return W, C, float(budget)


def _check_against(sol: KnapsackSolution, W, C, budget, best):
    if best is None:
        assert sol.status is Status.INFEASIBLE, sol
        assert sol.choice is None and math.isnan(sol.objective) and sol.lower_bound == INF
        with pytest.raises(InfeasibleError):
            sol.raise_for_status()
        return
    assert sol.status is Status.OPTIMAL, sol
    scale = max(1.0, float(np.abs(C[np.isfinite(W)]).max()))
    assert math.isclose(sol.objective, best, rel_tol=1e-9, abs_tol=1e-9 * scale), (sol.objective, best)
    assert sol.choice.dtype == np.int64 and sol.choice.shape == (W.shape[0],)
    rows = np.arange(W.shape[0])
    assert np.all(np.isfinite(W[rows, sol.choice]))
    assert sol.weight(W) <= budget
    assert sol.objective == math.fsum(C[rows, sol.choice])
    assert sol.lower_bound == sol.objective
    assert sol.raise_for_status() is sol


@settings(max_examples=40)
@given(small_instances())
def test_backends_equal_brute_force(inst):
    W, C, budget = inst
    best = brute_force(W, C, budget)
    for name, solve in SOLVERS.items():
        sol = solve(W, C, budget)
        assert sol.backend.endswith(name)
        _check_against(sol, W, C, budget, best)


def test_brute_force_covers_both_outcomes():
    """The strategy above must produce feasible and infeasible instances (both kinds checked)."""
    rng = np.random.default_rng(0)
    W = np.array([[3, 5], [2, INF]]) * MHZ
    C = rng.uniform(0, 1, (2, 2))
    assert brute_force(W, C, 5 * MHZ) is not None
    assert brute_force(W, C, 4 * MHZ) is None


def convex_instance(seed, K, J, tight=0.5):
    rng = np.random.default_rng(seed)
    j = np.arange(J)
    w = rng.uniform(0.5e5, 2e5, K)
    e = rng.uniform(0.5, 2.0, K)
    W = w[:, None] * j[None, :] ** rng.uniform(1.0, 1.5)
    C = e[:, None] * (J - 1 - j[None, :]) ** 2 / (J - 1) ** 2
    W[rng.uniform(size=(K, J)) < 0.1] = INF  # some options not allowed ...
    W[:, 0] = 0.0  # ... but the free one (no upload) always is
    return W, C, tight * float(np.nanmax(np.where(np.isfinite(W), W, np.nan), axis=1).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_highspy_and_pyomo_agree_medium(seed):
    W, C, budget = convex_instance(seed, K=30, J=9)
    a = solve_mckp_highspy(W, C, budget)
    b = solve_mckp_pyomo(W, C, budget)
    assert a.status is Status.OPTIMAL and b.status is Status.OPTIMAL, (a, b)
    assert math.isclose(a.objective, b.objective, rel_tol=1e-9, abs_tol=1e-9), (a.objective, b.objective)
    for sol in (a, b):
        assert sol.weight(W) <= budget * (1 + 1e-9)
        assert sol.lower_bound == sol.objective


def test_mip_rel_gap_bounds_the_answer():
    W, C, budget = convex_instance(3, K=30, J=9)
    exact = solve_mckp_highspy(W, C, budget).objective
    for solve in (solve_mckp_highspy, solve_mckp_pyomo):
        sol = solve(W, C, budget, mip_rel_gap=0.5)
        assert sol.status is Status.OPTIMAL
        assert sol.lower_bound <= exact + 1e-9 <= sol.objective + 2e-9
        assert sol.objective - sol.lower_bound <= 0.5 * abs(sol.objective) + 1e-9


@pytest.mark.parametrize("time_limit_s", [0.01, 0.3])
def test_time_limit_never_raises(time_limit_s):
    """A hard (strongly correlated) instance under a short time limit: a status, not an exception.

    With 0.01 s HiGHS usually has no incumbent yet (ERROR); with 0.3 s it usually has one
    (ITERATION_LIMIT, which Pyomo reports as an "aborted" result that still loads).
    """
    rng = np.random.default_rng(1)
    W = rng.integers(10**6, 10**7, (300, 17)).astype(float)
    C = -(W + rng.integers(0, 3, W.shape))
    budget = float(W.mean(axis=1).sum()) + 0.5
    for solve in (solve_mckp_highspy, solve_mckp_pyomo):
        sol = solve(W, C, budget, time_limit_s=time_limit_s)
        assert sol.status in (Status.ITERATION_LIMIT, Status.ERROR, Status.OPTIMAL), sol
        if sol.status is Status.ITERATION_LIMIT:
            assert sol.choice is not None and not sol.success
            assert sol.weight(W) <= budget * (1 + 1e-9)
            assert sol.lower_bound <= sol.objective
        if sol.status is not Status.OPTIMAL:
            assert "time" in sol.message.lower(), sol.message


def test_pyomo_model_exports(tmp_path):
    W, C, budget = convex_instance(0, K=5, J=4)
    m = build_mckp_pyomo(W, C, budget)
    assert {c.name for c in m.component_objects()} >= {"x", "one_item", "bandwidth", "cost", "allowed"}
    assert len(m.x) == int(np.isfinite(W).sum())
    assert m.bandwidth.upper == 1
    labels = {"symbolic_solver_labels": True}
    for suffix in ("lp", "mps"):
        path = tmp_path / f"mckp.{suffix}"
        m.write(str(path), io_options=labels)
        assert path.stat().st_size > 0
    text = (tmp_path / "mckp.lp").read_text()
    assert "bandwidth" in text and "one_item" in text and "binary" in text
    assert "bandwidth" in (tmp_path / "mckp.mps").read_text()
    m.write(str(tmp_path / "anon.lp"))  # default labels: still a valid, non-empty file
    assert (tmp_path / "anon.lp").stat().st_size > 0


def test_pyomo_model_unscales():
    import pyomo.environ as pe

    W = np.array([[1.0, 2.0], [1.0, INF]]) * MHZ
    C = np.array([[4.0, -8.0], [2.0, INF]])
    m = build_mckp_pyomo(W, C, 3 * MHZ)
    assert pe.value(m.budget_hz) == 3 * MHZ and pe.value(m.cost_scale) == 8.0
    m.x[0, 1].fix(1)
    m.x[0, 0].fix(0)
    m.x[1, 0].fix(1)
    assert pe.value(m.cost) * pe.value(m.cost_scale) == pytest.approx(-6.0)
    assert pe.value(m.bandwidth.body) * pe.value(m.budget_hz) == pytest.approx(3 * MHZ)


# --- infeasibility ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SOLVERS))
def test_infeasible_messages_name_the_cause(name):
    solve = SOLVERS[name]
    W = np.array([[1.0, 2.0], [1.3, 3.0]]) * 1e7
    C = np.ones((2, 2))
    sol = solve(W, C, 2e7)
    assert sol.status is Status.INFEASIBLE
    assert "lightest items need 2.3e+07 Hz > budget 2e+07 Hz" in sol.message
    W = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0], [INF, INF]])
    sol = solve(W, np.ones((4, 2)), 10.0)
    assert sol.status is Status.INFEASIBLE
    assert "group 3 has no allowed item" in sol.message


def test_build_rejects_group_without_items():
    with pytest.raises(ValueError, match="group 1 has none"):
        build_mckp_pyomo(np.array([[1.0, 2.0], [INF, INF]]), np.ones((2, 2)), 5.0)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_solver_detected_infeasibility(name, monkeypatch):
    """Skip the cheap pre-check: the solver's own verdict maps onto INFEASIBLE."""
    monkeypatch.setattr(kn, "_infeasibility", lambda inst: None)
    sol = SOLVERS[name](np.array([[3.0, 4.0], [2.0, 5.0]]), np.ones((2, 2)), 4.0)
    assert sol.status is Status.INFEASIBLE, sol
    assert "infeasible" in sol.message.lower() and sol.choice is None


def test_status_tables():
    import highspy
    from pyomo.opt import TerminationCondition as tc

    from tsfa.status import highs_status_table, pyomo_status_table

    hs = highs_status_table()
    assert hs[highspy.HighsModelStatus.kOptimal] is Status.OPTIMAL
    assert hs[highspy.HighsModelStatus.kInfeasible] is Status.INFEASIBLE
    assert hs[highspy.HighsModelStatus.kTimeLimit] is None  # ITERATION_LIMIT or ERROR by solution
    ps = pyomo_status_table()
    assert ps[tc.optimal] is Status.OPTIMAL and ps[tc.infeasible] is Status.INFEASIBLE
    assert ps[tc.maxTimeLimit] is None and tc.unknown not in ps


def test_rounded_choice_is_checked():
    """Solver values that break the budget or pick ≠ 1 item per group become ERROR, not a choice."""
    inst = kn._validate(np.array([[1.0, 2.0], [1.0, 2.0]]) * MHZ, np.array([[2.0, 1.0], [2.0, 1.0]]), 3 * MHZ)
    ok = kn._finish(inst, np.array([[1e-12, 1 - 1e-12], [1.0, 0.0]]), Status.OPTIMAL, 0.75, "m", 0.0, "t")
    assert ok.status is Status.OPTIMAL and ok.choice.tolist() == [1, 0] and ok.objective == 3.0
    assert ok.lower_bound == 1.5  # the scaled bound 0.75 times cost_scale 2: valid, loose, kept
    x = np.array([[0.0, 1.0], [1.0, 0.0]])
    for scaled_bound in (1.5 - 1e-12, 1.6):  # within rounding noise of the cost, or above it: the cost
        assert kn._finish(inst, x, Status.OPTIMAL, scaled_bound, "m", 0.0, "t").lower_bound == 3.0
    over = kn._finish(inst, np.array([[0.0, 1.0], [0.0, 1.0]]), Status.OPTIMAL, 1.0, "m", 0.0, "t")
    assert over.status is Status.ERROR and over.choice is None
    assert "needs 4000000 Hz > budget 3000000 Hz" in over.message
    two = kn._finish(inst, np.array([[1.0, 1.0], [1.0, 0.0]]), Status.OPTIMAL, 1.0, "m", 0.0, "t")
    assert two.status is Status.ERROR and "exactly one item in group 0" in two.message


def test_single_item_groups_and_zero_costs():
    W = np.array([[1.0], [2.0], [3.0]])
    for solve in SOLVERS.values():
        sol = solve(W, np.zeros((3, 1)), 6.0)
        assert sol.status is Status.OPTIMAL and sol.choice.tolist() == [0, 0, 0] and sol.objective == 0.0


# --- bad input ------------------------------------------------------------------------------------

W_OK = np.array([[0.0, 1.0, INF], [0.5, 2.0, 3.0]]) * MHZ
C_OK = np.array([[3.0, 1.0, INF], [2.0, 1.0, 0.0]])

BAD = [
    (dict(W=W_OK[:, :2]), "same shape"),
    (dict(W=np.array([1.0, 2.0])), "W must be 2-dimensional"),
    (dict(W=np.where(W_OK == MHZ, np.nan, W_OK)), r"W must be not NaN; got W\[0, 1\] = nan"),
    (dict(W=np.where(W_OK == MHZ, -1.0, W_OK)), r"W must be >= 0; got W\[0, 1\] = -1.0"),
    (dict(W=np.where(W_OK == MHZ, -INF, W_OK)), r"W must be >= 0; got W\[0, 1\] = -inf"),
    (dict(C=np.where(C_OK == 1.0, np.nan, C_OK)), r"C must be not NaN; got C\[0, 1\] = nan"),
    (dict(C=np.where(C_OK == 0.0, INF, C_OK)), r"C must be finite where W is finite; got C\[1, 2\] = inf"),
    (dict(W=np.zeros((0, 3)), C=np.zeros((0, 3))), "at least one group"),
    (dict(W=np.zeros((2, 0)), C=np.zeros((2, 0))), "at least one item"),
    (dict(W="abc"), "W must be numeric"),
    (dict(budget=0.0), "budget must be > 0; got budget = 0.0"),
    (dict(budget=-1e6), "budget must be > 0"),
    (dict(budget=math.nan), "budget must be finite; got budget = nan"),
    (dict(budget=INF), "budget must be finite"),
    (dict(budget="20e6"), "budget must be a number"),
]


@pytest.mark.parametrize("func", [solve_mckp_highspy, solve_mckp_pyomo, build_mckp_pyomo])
@pytest.mark.parametrize("change, match", BAD)
def test_bad_input_names_the_argument(func, change, match):
    args = dict(W=W_OK, C=C_OK, budget=4 * MHZ) | change
    with pytest.raises(ValueError, match=match):
        func(args["W"], args["C"], args["budget"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(time_limit_s=0.0), "time_limit_s must be > 0"),
        (dict(time_limit_s=math.nan), "time_limit_s must be finite"),
        (dict(mip_rel_gap=-0.1), "mip_rel_gap must be >= 0"),
    ],
)
@pytest.mark.parametrize("func", [solve_mckp_highspy, solve_mckp_pyomo])
def test_bad_options_name_the_argument(func, kwargs, match):
    with pytest.raises(ValueError, match=match):
        func(W_OK, C_OK, 4 * MHZ, **kwargs)


def test_unknown_pyomo_solver():
    with pytest.raises(ValueError, match="solver must be one of"):
        solve_mckp_pyomo(W_OK, C_OK, 4 * MHZ, solver="cbc")


def test_infinite_time_limit_and_list_input():
    sol = solve_mckp_highspy(W_OK.tolist(), C_OK.tolist(), 4 * MHZ, time_limit_s=INF)
    ref = solve_mckp_pyomo(W_OK.tolist(), C_OK.tolist(), 4 * MHZ, time_limit_s=INF)
    assert sol.status is ref.status is Status.OPTIMAL
    assert sol.objective == ref.objective == brute_force(W_OK, C_OK, 4 * MHZ)


def test_import_is_light():
    code = (
        "import sys, tsfa, tsfa.knapsack\n"
        "bad = [m for m in ('pyomo', 'highspy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@settings(max_examples=40)
@given(small_instances(), st.floats(0.0, 2.0))
def test_reduction_and_cutoff_are_exact(inst, frac):
    """Reduced-cost fixing never changes the optimum; a cutoff below it gives lower_bound = cutoff."""
    from tsfa.knapsack import reduce_mckp

    W, C, budget = inst
    best = brute_force(W, C, budget)
    if best is None:
        return
    Wr, start = reduce_mckp(W, C, budget)
    assert brute_force(Wr, C, budget) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert start is not None
    full = solve_mckp_highspy(W, C, budget, reduce=False)
    assert full.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    lo_cost = float(np.where(np.isfinite(W), C, np.inf).min(axis=1).sum())
    cutoff = lo_cost + frac * (best - lo_cost) if frac < 1 else best + (frac - 1) * (abs(best) + 1)
    for solve in (solve_mckp_highspy, solve_mckp_pyomo):
        sol = solve(W, C, budget, cutoff=cutoff)
        if best <= cutoff:
            assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
        else:
            assert sol.lower_bound <= best + 1e-12 and sol.lower_bound == pytest.approx(cutoff)


def test_cutoff_needs_reduce():
    with pytest.raises(ValueError, match="cutoff"):
        solve_mckp_highspy(np.ones((2, 2)), np.ones((2, 2)), 3.0, reduce=False, cutoff=1.0)


@pytest.mark.parametrize("first", ["highspy", "pyomo"])
def test_no_solver_banner_on_stdout(first):
    """HiGHS prints a banner on the C-level stdout when a process builds its first Highs object:
    none of it may reach the program's output, whichever interface runs first."""
    code = (
        "import numpy as np\n"
        "from tsfa.knapsack import solve_mckp_highspy, solve_mckp_pyomo\n"
        "W = np.array([[1.0, 2.0, 3.0], [1.0, 2.5, 4.0]]); C = np.array([[3.0, 2.0, 1.0], [3.0, 1.5, 0.0]])\n"
        "print('before', flush=True)\n"
        f"order = ['{first}', 'highspy', 'pyomo']\n"
        "for name in order:\n"
        "    solve = solve_mckp_highspy if name == 'highspy' else solve_mckp_pyomo\n"
        "    assert solve(W, C, 5.0).status.success\n"
        "    print('solved', name, flush=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "HiGHS" not in out.stdout and "Running" not in out.stdout, out.stdout
    assert out.stdout.split() == ["before", "solved", first, "solved", "highspy", "solved", "pyomo"]
