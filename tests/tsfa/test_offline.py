"""TSFA stage 1 (tsfa.offline): SAA latency kernels, the MILP against enumeration, the budget
properties, INFEASIBLE reporting, the V rule, bad inputs, and the 7B example."""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tsfa
from tsfa.choice import choose_enumerate, choose_milp
from tsfa.rate import rate_bps
from tsfa.saa import saa_latency

ROOT = pathlib.Path(__file__).resolve().parents[2]

SPECTRUM = np.arange(1, 385, dtype=float) ** -1.5
TAIL = np.concatenate([np.cumsum(SPECTRUM[::-1])[::-1], [0.0]])  # TAIL[r] = Σ_{i>r} λ_i


def predict(rank, keep_ratio, rounds):
    """Monotone stand-in: rank term falls with r, optimisation with rounds, sparsification with ρ."""
    rank_term = 0.5 * TAIL[np.asarray(rank)]
    optimisation = 2.0 / np.asarray(rounds)
    sparsification = 0.05 * (1.0 - np.asarray(keep_ratio))
    return {"rank_term": rank_term, "optimisation": optimisation, "sparsification": sparsification,
            "total": rank_term + optimisation + sparsification}


def setup(k=8, seed=0):
    cell = tsfa.Cell()
    clients = cell.sample_clients(k, rng=seed)
    return cell, clients, clients.compute_time_s(2e11)


def problem(latency_budget_s=0.8):
    cell, clients, compute = setup()
    return tsfa.OfflineProblem(
        system=tsfa.SystemSpec(tsfa.minilm_l6_qv(), cell, clients, compute, downlink_rate_bps=100e6),
        grid=tsfa.CandidateGrid(ranks=[1, 2, 4, 8, 16], keep_ratios=[0.25, 0.5, 1.0], rounds=[50, 200]),
        budgets=tsfa.Budgets(latency_budget_s, time_budget_s=None, max_latency_s=1.0),
        saa=tsfa.SaaSettings(draws=100),
        vsweep=tsfa.VSweepSettings(choose_v=False),
    )


def design(latency_budget_s, **kw):
    """design_offline on the test system; ``kw``: settings by name, or predict / method / rng."""
    run = {"predict": predict, "method": "enumerate", "rng": 3}
    run.update({k: kw.pop(k) for k in list(kw) if k in run})
    base = problem()
    return tsfa.design_offline(base.replace(latency_budget_s=latency_budget_s, **kw), run.pop("predict"), **run)


# --------------------------------------------------------------------------------------
# SAA kernels


@pytest.mark.parametrize("cap", [None, 0.6])
def test_vectorised_kernel_matches_per_draw_solver(cap):
    cell, clients, compute = setup(k=10)
    shape = tsfa.minilm_l6_qv(8)
    S = np.array([[shape.payload_bits(s)] * 10 for s in (1, 4, 8)], dtype=float)
    T = np.tile(compute, (3, 1))  # compute times; the downlink 0.02 s is the next argument
    snr = cell.sample_snr_hz(clients, rng=1, rounds=40)
    fast, pf = saa_latency(S, T, snr, cell.total_bandwidth_hz, np.full(3, 0.02), cap, "fast")
    loop, pl = saa_latency(S, T, snr, cell.total_bandwidth_hz, np.full(3, 0.02), cap, "loop")
    np.testing.assert_allclose(fast, loop, rtol=1e-12)
    np.testing.assert_array_equal(pf, pl)
    if cap is not None:
        assert np.all(fast <= cap * (1 + 1e-9)) and pf.min() < 1.0


def test_kernel_closed_forms():
    B = 20e6
    # one client: all the bandwidth; K identical clients: the equal split; nobody: zero bandwidth
    S = np.array([[3e6, 0, 0], [2e6, 2e6, 2e6], [0, 0, 0]])
    c = np.array([[5e7, 1e7, 1e7], [3e7, 3e7, 3e7], [1e7, 1e7, 1e7]])
    T = np.full((3, 3), 0.1)
    b = tsfa.min_latency_bandwidth_batch(S, c, T, B).bandwidth_hz
    np.testing.assert_allclose(b[0], [B, 0, 0])
    np.testing.assert_allclose(b[1], B / 3, rtol=1e-12)
    assert np.all(b[2] == 0)
    # generic rows: every scheduled client finishes at the same τ and the band is used up
    rng = np.random.default_rng(0)
    S = rng.uniform(1e5, 5e6, (50, 6)) * (rng.random((50, 6)) < 0.8)
    S[:, 0] = 1e6
    c = rng.lognormal(17, 1.5, (50, 6))
    T = rng.uniform(0, 0.5, (50, 6))
    b = tsfa.min_latency_bandwidth_batch(S, c, T, B).bandwidth_hz
    with np.errstate(divide="ignore", invalid="ignore"):
        finish = np.where(S > 0, T + S / rate_bps(b, c), np.nan)
    spread = (np.nanmax(finish, axis=1) - np.nanmin(finish, axis=1)) / np.nanmax(finish, axis=1)
    assert spread.max() < 1e-9
    np.testing.assert_allclose(b.sum(axis=1), B, rtol=1e-12)


@pytest.mark.parametrize("cap", [None, 0.8])
def test_fast_and_cvxpy_saa_agree(cap):
    cell, clients, compute = setup(k=5)
    shape = tsfa.minilm_l6_qv(4)
    kw = dict(draws=12, rng=2, downlink_s=0.01, max_latency_s=cap)
    fast = tsfa.expected_latency(shape, cell, clients, compute, 2, backend="fast", **kw)
    cvx = tsfa.expected_latency(shape, cell, clients, compute, 2, backend="cvxpy", **kw)
    np.testing.assert_allclose(cvx.per_draw_s, fast.per_draw_s, rtol=1e-5)
    assert fast.participation == cvx.participation
    assert math.isclose(cvx.mean_s, fast.mean_s, rel_tol=1e-5)


def test_interval_shrinks_with_draws_and_covers_the_long_run_mean():
    cell, clients, compute = setup(k=10)
    shape = tsfa.minilm_l6_qv(8)
    kw = dict(downlink_s=0.02, max_latency_s=1.0)
    est = {d: tsfa.expected_latency(shape, cell, clients, compute, 2, draws=d, rng=5, **kw) for d in (50, 200, 800)}
    hw = [est[d].half_width_s for d in (50, 200, 800)]
    assert hw[0] > hw[1] > hw[2] > 0
    assert 2.0 < hw[0] / hw[2] < 8.0  # ≈ √16 = 4 for a bounded latency
    long_run = tsfa.expected_latency(shape, cell, clients, compute, 2, draws=20_000, rng=6, **kw).mean_s
    # one fixed seed: the 95 % interval of 200 draws holds the 20 000-draw mean
    assert est[200].low_s <= long_run <= est[200].high_s
    assert est[200].draws == 200 and est[200].confidence == 0.95
    assert est[200].low_s < est[200].mean_s < est[200].high_s


def test_uncapped_everyone_uploads_and_cap_bounds_latency():
    cell, clients, compute = setup(k=10)
    shape = tsfa.minilm_l6_qv(8)
    free = tsfa.expected_latency(shape, cell, clients, compute, 8, draws=200, rng=1)
    capped = tsfa.expected_latency(shape, cell, clients, compute, 8, draws=200, rng=1, max_latency_s=0.5)
    assert free.participation == 1.0 and free.max_latency_s is None
    assert capped.max_s <= 0.5 * (1 + 1e-9) and capped.participation < 1.0
    assert capped.mean_s < free.mean_s


# --------------------------------------------------------------------------------------
# The discrete choice


@settings(max_examples=30)
@given(
    n=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    loss_levels=st.integers(1, 6),
    tau=st.floats(0.2, 1.5),
    use_time=st.booleans(),
    min_part=st.sampled_from([0.0, 0.5, 0.9]),
)
def test_milp_matches_enumeration(n, seed, loss_levels, tau, use_time, min_part):
    rng = np.random.default_rng(seed)
    loss = rng.integers(0, loss_levels, n).astype(float) * 0.1 + 1.0  # few levels: many ties
    lat = rng.uniform(0.1, 1.2, n)
    rounds = rng.integers(1, 100, n)
    part = rng.uniform(0.4, 1.0, n)
    kw = dict(latency_budget=tau, time_budget=40.0 if use_time else None, min_participation=min_part)
    enum = choose_enumerate(loss, lat, rounds, part, **kw)
    milp = choose_milp(loss, lat, rounds, part, **kw)
    assert milp.status is enum.status
    assert milp.index == enum.index
    if enum.index is not None:  # the least loss among feasible candidates, lowest index on ties
        ok = (lat <= tau) & (part >= min_part) & ((rounds * lat <= 40.0) if use_time else True)
        assert loss[enum.index] == loss[ok].min() and enum.index == np.flatnonzero(ok & (loss == loss[ok].min()))[0]


@pytest.mark.parametrize("rounds,time_budget", [([50, 200], None), (None, 120.0), ([20, 100, 400], 150.0)])
def test_design_milp_equals_enumeration(rounds, time_budget):
    kw = dict(rounds=rounds, time_budget_s=time_budget)
    a = design(0.75, method="milp", **kw)
    b = design(0.75, method="enumerate", **kw)
    assert a.status is b.status is tsfa.Status.OPTIMAL
    assert a.chosen == b.chosen and (a.rank, a.keep, a.rounds) == (b.rank, b.keep, b.rounds)
    assert a.cross_check is True and b.cross_check is None
    assert a.backend.startswith("milp") and b.backend.startswith("enumerate")


@pytest.mark.parametrize("mode", [dict(rounds=[50, 200]), dict(rounds=None, time_budget_s=120.0),
                                  dict(rounds=200, time_budget_s=200.0, latency_statistic="upper")])
def test_tightening_the_latency_budget_never_improves_the_plan(mode):
    budgets = [2.0, 1.0, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.3]
    plans = [design(t, **mode) for t in budgets]
    losses = [p.predicted_loss if p.success else math.inf for p in plans]
    assert all(b >= a for a, b in zip(losses, losses[1:], strict=False))
    assert losses[0] < losses[-1]  # the budget matters on this grid
    feasible = [{c.index for c in p.table if c.feasible} for p in plans]
    assert all(later <= earlier for earlier, later in zip(feasible, feasible[1:], strict=False))
    # the same draws for every budget: the latency table does not depend on τ̄
    assert [c.latency_mean_s for c in plans[0].table] == [c.latency_mean_s for c in plans[-1].table]


@pytest.mark.parametrize("method", ["enumerate", "milp"])
def test_infeasible_budget_reports_the_smallest_feasible_budget(method):
    plan = design(0.05, method=method)
    assert plan.status is tsfa.Status.INFEASIBLE and not plan.success and plan.chosen is None
    least = min(c.latency_s for c in plan.table if c.participation >= 0.9)
    assert plan.min_latency_budget_s == least
    assert f"{least:.6g}" in plan.message and "latency_budget_s" in plan.message
    with pytest.raises(tsfa.InfeasibleError, match="smallest feasible"):
        plan.raise_for_status()
    # at that budget, exactly the fastest candidate (rank 1, keep 1) becomes feasible
    fixed = design(plan.min_latency_budget_s, method=method)
    assert fixed.success and (fixed.rank, fixed.keep) == (1, 1)
    assert fixed.binding == ("latency",)


def test_infeasible_time_budget_is_named():
    plan = design(5.0, rounds=[500], time_budget_s=10.0)
    assert plan.status is tsfa.Status.INFEASIBLE
    assert "time_budget_s = 10 s" in plan.message and math.isinf(plan.min_latency_budget_s)


def test_participation_constraint_and_binding():
    # A tight cap starves the big candidates; without min_participation they would look fast.
    loose = design(5.0, max_latency_s=0.45, min_participation=0.0)
    strict = design(5.0, max_latency_s=0.45, min_participation=0.95)
    starved = [c for c in strict.table if c.participation < 0.95]
    assert starved and all("participation" in c.violated for c in starved)
    assert loose.predicted_loss < strict.predicted_loss
    assert "participation" in strict.binding and loose.binding == ()


def test_plan_fields_and_predict_arguments():
    seen = {}

    def spy(rank, keep_ratio, rounds):
        seen.update(rank=rank, keep_ratio=keep_ratio, rounds=rounds)
        return predict(rank, keep_ratio, rounds)

    plan = design(0.8, predict=spy, rounds=None, time_budget_s=100.0)
    n = len(plan.table)
    assert seen["rank"].shape == seen["keep_ratio"].shape == seen["rounds"].shape == (n,)
    assert seen["rank"].dtype.kind == "i" and seen["rounds"].dtype.kind == "i"
    # keep = ⌈ρ r⌉ (≥ 1), duplicates merged: (r, keep) pairs are unique and ordered
    pairs = [(c.rank, c.keep) for c in plan.table]
    assert pairs == sorted(set(pairs)) and (1, 1) in pairs and (16, 4) in pairs
    for c in plan.table:
        assert c.keep_ratio == c.keep / c.rank and 1 <= c.keep <= c.rank
        assert all(math.ceil(rho * c.rank - 1e-9) == c.keep or c.keep == 1 for rho in c.nominal_keep_ratios)
        assert c.rounds == max(1, math.floor(100.0 / c.latency_s))
        assert c.loss_terms["total"] == c.predicted_loss
        assert math.isclose(sum(v for k, v in c.loss_terms.items() if k != "total"), c.predicted_loss)
    best = plan.chosen_candidate
    assert plan.predicted_loss == min(c.predicted_loss for c in plan.table if c.feasible) == best.predicted_loss
    assert plan.expected_latency_s == best.latency_mean_s <= 0.8
    assert plan.shape(tsfa.minilm_l6_qv()).rank == plan.rank
    assert len(plan.table_rows()) == n and sum(r["chosen"] for r in plan.table_rows()) == 1
    text = plan.format_table()
    assert text.count("\n") == n and "rank_term" in text
    assert "time" in plan.binding  # rounds derived from the time budget


def test_v_rule_picks_least_dropped_energy_within_budget():
    plan = design(0.8, choose_v=True, v_grid=(0.01, 1.0, 100.0), v_rounds=40, v_refine=1)
    assert plan.success and plan.v_sweep
    ok = [p for p in plan.v_sweep if p.meets_budget]
    assert ok, "the online stage must be able to meet τ̄ at some V"
    chosen = next(p for p in plan.v_sweep if p.relative_v == plan.relative_v)
    assert chosen.meets_budget and chosen.time_average_latency_s <= 0.8
    assert chosen.average_dropped_energy == min(p.average_dropped_energy for p in ok)
    assert plan.weight_v == pytest.approx(plan.relative_v * 0.8**2)
    assert len(plan.v_sweep) in (3, 4)  # the grid plus at most one refinement


BAD = [
    (dict(ranks=[0, 2]), "ranks"),
    (dict(ranks=[2, 2]), "ranks"),
    (dict(ranks=[1, 500]), "ranks"),
    (dict(keep_ratios=[0.5, 1.5]), "keep_ratios"),
    (dict(keep_ratios=[0.0]), "keep_ratios"),
    (dict(latency_budget_s=-1.0), "latency_budget_s"),
    (dict(draws=1), "draws"),
    (dict(confidence=1.0), "confidence"),
    (dict(method="simplex"), "method"),
    (dict(backend="gpu"), "backend"),
    (dict(latency_statistic="median"), "latency_statistic"),
    (dict(min_participation=1.5), "min_participation"),
    (dict(max_latency_s=0.0), "max_latency_s"),
    (dict(rounds=None, time_budget_s=None), "time_budget_s"),
    (dict(rounds=[0]), "rounds"),
    (dict(compute_s=np.ones(3)), "compute_s"),
    (dict(predict=lambda r, k, t: {"rank": r}), "total"),
    (dict(predict=lambda r, k, t: {"total": np.ones(2)}), "broadcast"),
    (dict(predict=lambda r, k, t: {"total": np.full(r.shape, np.nan)}), "finite"),
    (dict(predict=None), "predict"),
    (dict(cell="cell"), "cell"),
]


@pytest.mark.parametrize("kw,name", BAD)
def test_bad_inputs_name_the_argument(kw, name):
    with pytest.raises(ValueError, match=name):
        design(**{"latency_budget_s": 0.8, **kw})


def test_bad_inputs_expected_latency():
    cell, clients, compute = setup()
    shape = tsfa.minilm_l6_qv(4)
    with pytest.raises(ValueError, match="keep"):
        tsfa.expected_latency(shape, cell, clients, compute, 0)
    with pytest.raises(ValueError, match="keep"):
        tsfa.expected_latency(shape, cell, clients, compute, 5)
    with pytest.raises(ValueError, match="backend"):
        tsfa.expected_latency(shape, cell, clients, compute, 1, backend="magic")
    with pytest.raises(ValueError, match="compute_s"):
        tsfa.expected_latency(shape, cell, clients, compute[:2], 1)
    with pytest.raises(ValueError, match="modules"):
        tsfa.SystemSpec([], cell, clients, compute)


def test_7b_example_plans_from_shapes_alone(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("plan_7b", ROOT / "examples" / "07_plan_7b.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    plan = mod.main(["--quick", "--out", str(tmp_path)])
    assert plan.success and plan.cross_check is True and plan.rank in mod.RANKS
    assert plan.expected_latency_s <= mod.LATENCY_BUDGET_S
    assert plan.rounds * plan.table[plan.chosen].latency_s <= mod.TIME_BUDGET_S
    assert len(plan.table) == len({(c.rank, c.keep) for c in plan.table}) == 22
    out = capsys.readouterr().out
    assert all(t in out for t in ("contraction", "sparsification", "rank")) and out.count("*") >= 1
    assert (tmp_path / "plan_7b.csv").read_text().count("\n") == 23
    assert (tmp_path / "plan_7b.png").stat().st_size > 10_000


def test_uncapped_design_warns_about_the_heavy_tail():
    plan = design(5.0, max_latency_s=None)
    assert plan.success and plan.max_latency_s is None
    assert all(c.participation == 1.0 for c in plan.table)
    assert "no finite limit" in plan.message
    assert "no finite limit" not in design(5.0).message
