"""The offline stage's online latency model (``VSweepSettings.latency_model="online"``, step 6 of
tsfa.design_offline) and ErrorModel.from_profile."""

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import t as student_t

import tsfa
from tsfa.online_model import accepts_kept_share, latency_tested, replicate_seeds
from tsfa.simulate import ErrorModel, VSweepSettings, sweep_v

from .test_offline import predict  # favours larger ranks: the rank term dominates the sparsification term

V_GRID = (0.01, 0.1, 1.0)


def problem(latency_budget_s=0.43, **changes):
    """8 clients; with keep ratio 1 only, the SAA puts ranks 8 and 16 above τ̄ = 0.43 s."""
    cell = tsfa.Cell()
    clients = cell.sample_clients(8, rng=0)
    base = tsfa.OfflineProblem(
        system=tsfa.SystemSpec(tsfa.minilm_l6_qv(), cell, clients, clients.compute_time_s(2e11),
                               downlink_rate_bps=100e6),
        grid=tsfa.CandidateGrid(ranks=[1, 2, 4, 8, 16], keep_ratios=[1.0], rounds=[200]),
        budgets=tsfa.Budgets(latency_budget_s, max_latency_s=1.0),
        saa=tsfa.SaaSettings(draws=60),
        vsweep=tsfa.VSweepSettings(v_grid=V_GRID, v_rounds=30, v_refine=1, latency_model="online", online_replicates=2),
    )
    return base.replace(**changes) if changes else base


def design(predictor=predict, **changes):
    return tsfa.design_offline(problem(**changes), predictor, method="enumerate", rng=3)


@pytest.fixture(scope="module")
def online_plan():
    return design()


def test_online_model_runs_a_rank_the_nominal_screen_calls_infeasible(online_plan):
    plan = online_plan
    screen = plan.table[plan.screen_chosen]
    # the screen: every client at keep = r is too slow at ranks 8 and 16, so it settles for rank 4
    assert screen.rank == 4 and all(not c.feasible for c in plan.table if c.rank > 4)
    assert plan.success and plan.latency_model == "online" and plan.chosen is None
    # the simulated online stage runs rank 16 within τ̄ by skipping and lowering keep, and the
    # predictor favours larger ranks, so the plan takes it
    assert plan.rank == 16
    p = plan.chosen_point
    assert p.feasible and p.rank == plan.rank and p.relative_v == plan.relative_v
    # the default test: τ̄ is not below the point's whole batch-means interval
    assert plan.expected_latency_s == p.time_average_latency_s and p.latency_low_s <= plan.latency_budget_s
    assert p.latency_low_s <= p.time_average_latency_s <= p.latency_high_s
    assert plan.keep == min(max(math.floor(p.mean_keep + 0.5), 1), 16) and plan.keep_ratio == plan.keep / 16
    assert plan.predicted_loss == p.predicted_loss < screen.predicted_loss
    # ranks simulated: the screen's and those whose best table loss is below it (not 1 or 2)
    assert sorted({q.rank for q in plan.online_table}) == [4, 8, 16]
    assert "simulated online stage" in plan.message and "nominal screen" in plan.message
    assert "rank 4, keep 4/4" in plan.message  # the screen's differing choice is named
    # the least predicted loss among the feasible points, ties to the larger V
    ok = [q for q in plan.online_table if q.feasible]
    assert p.predicted_loss == min(q.predicted_loss for q in ok)
    # v_sweep is the chosen rank's sweep, the chosen V in it
    assert {v.relative_v for v in plan.v_sweep} == {q.relative_v for q in plan.online_table if q.rank == 16}
    assert any(v.relative_v == plan.relative_v and v.meets_budget for v in plan.v_sweep)


def test_nominal_model_is_the_default_and_has_no_online_points():
    assert VSweepSettings().latency_model == "nominal"
    plan = design(latency_model="nominal")
    assert plan.success and plan.latency_model == "nominal"
    assert plan.online_table == () and plan.online_chosen is None and plan.chosen_point is None
    assert plan.chosen == plan.screen_chosen is not None and plan.rank == 4  # the screen is the plan
    assert plan.expected_latency_s == plan.chosen_candidate.latency_mean_s
    assert "screen_chosen" not in plan.table_rows()[0]


def test_every_online_point_agrees_with_resimulating_it(online_plan):
    plan = online_plan
    prob = problem()
    sys_ = prob.system
    for p in plan.online_table:
        shape = sys_.modules.with_rank(p.rank)
        settings = dataclasses.replace(prob.vsweep, v_grid=(p.relative_v,), v_refine=0)
        seeds = replicate_seeds(plan.simulation_seed, p.replicates)
        assert p.replicates == prob.vsweep.online_replicates and len(set(seeds)) == p.replicates
        again = [sweep_v(shape, sys_.cell, sys_.clients, sys_.compute_time_s(shape),
                         latency_budget_s=plan.latency_budget_s, downlink_s=sys_.downlink_s(shape),
                         rounds=p.simulated_rounds, settings=settings, seed=seed)[0] for seed in seeds]
        lat = [a.time_average_latency_s for a in again]
        assert np.mean(lat) == pytest.approx(p.time_average_latency_s, rel=1e-12)
        # the interval is Student-t over the replicates' time-averages
        half = student_t.ppf(0.5 + prob.saa.confidence / 2, p.replicates - 1) * np.std(lat, ddof=1) / math.sqrt(
            p.replicates)
        assert (p.latency_low_s, p.latency_high_s) == pytest.approx((np.mean(lat) - half, np.mean(lat) + half),
                                                                    rel=1e-9)
        assert 1.0 - np.mean([a.average_dropped_energy for a in again]) == pytest.approx(p.kept_share, rel=1e-12)
        assert np.mean([a.mean_keep for a in again]) == pytest.approx(p.mean_keep, rel=1e-12)


def test_kept_share_reaches_predictors_that_accept_it():
    calls = []

    def with_share(rank, keep_ratio, rounds, kept_share=None):
        calls.append(None if kept_share is None else np.asarray(kept_share).copy())
        out = predict(rank, keep_ratio, rounds)
        if kept_share is not None:  # the realised share replaces the nominal sparsification
            out["sparsification"] = 0.05 * (1.0 - np.asarray(kept_share))
            out["total"] = out["rank_term"] + out["optimisation"] + out["sparsification"]
        return out

    plan = design(with_share)
    assert calls[0] is None  # the screen's call (steps 3 and 4)
    assert len(calls) == 2 and calls[1].shape == (len(plan.online_table),)
    np.testing.assert_array_equal(calls[1], [p.kept_share for p in plan.online_table])
    assert all(0.0 <= p.kept_share <= 1.0 for p in plan.online_table)
    for p in plan.online_table:
        assert p.loss_terms["sparsification"] == pytest.approx(0.05 * (1.0 - p.kept_share))
    assert "kept_share passed" in plan.message


def test_aggregate_kept_share_and_participation_reach_predictors_that_take_both():
    calls = []

    def with_both(rank, keep_ratio, rounds, kept_share=None, participation=None):
        calls.append((kept_share, participation))
        out = predict(rank, keep_ratio, rounds)
        if participation is not None:
            out["participation"] = 0.1 * np.asarray(participation)
            out["total"] = out["total"] + out["participation"]
        return out

    plan = design(with_both)
    kappa, chi2 = calls[-1]
    np.testing.assert_array_equal(kappa, [p.sent_share for p in plan.online_table])
    np.testing.assert_array_equal(chi2, [p.participation_divergence for p in plan.online_table])
    # what some client sent in some round is at least what the clients keep on average (skipped: 0)
    assert all(p.sent_share >= p.kept_share - 1e-12 for p in plan.online_table)
    assert all(p.participation_divergence >= 0 for p in plan.online_table)
    assert any(p.participation_divergence > 0 for p in plan.online_table if p.participation < 1)
    assert "participation χ² passed" in plan.message
    # each point's χ² is that of its clients' shares of scheduled rounds in the simulation
    prob = problem()
    p = max(plan.online_table, key=lambda q: q.participation_divergence)
    reps = [r for seed in replicate_seeds(plan.simulation_seed, p.replicates)
            for v, r in tsfa.simulate.sweep_v_runs(
                prob.system.modules.with_rank(p.rank), prob.system.cell, prob.system.clients,
                prob.system.compute_time_s(prob.system.modules.with_rank(p.rank)),
                latency_budget_s=plan.latency_budget_s,
                downlink_s=prob.system.downlink_s(prob.system.modules.with_rank(p.rank)), rounds=p.simulated_rounds,
                settings=dataclasses.replace(prob.vsweep, v_grid=(p.relative_v,), v_refine=0), seed=seed)]
    shares = np.mean([res.scheduled.mean(axis=0) for res in reps], axis=0)  # each client's share over replicates
    assert p.participation_divergence == pytest.approx(float(tsfa.participation_divergence(shares)), rel=1e-12)
    res = reps[0]
    np.testing.assert_allclose(res.participation, res.scheduled.mean(axis=1))
    assert p.sent_share == pytest.approx(np.mean([q.sent_share(p.simulated_rounds) for q in reps]), rel=1e-12)
    assert res.profile.shape == (p.simulated_rounds, p.rank + 1) and np.allclose(res.profile[:, 0], 1.0)
    top = res.max_keep == p.rank  # a round where some client sent every component applied all of them
    assert res.sent_share() == pytest.approx(1.0) if top.any() else res.sent_share() < 1.0


def test_predictors_without_kept_share_get_the_mean_keep_ratio():
    seen = []

    def plain(rank, keep_ratio, rounds):
        seen.append((np.asarray(rank).copy(), np.asarray(keep_ratio).copy()))
        return predict(rank, keep_ratio, rounds)

    plan = design(plain)
    rank, ratio = seen[-1]
    assert len(seen) == 2
    np.testing.assert_array_equal(rank, [p.rank for p in plan.online_table])
    expected = [min(max(p.mean_keep / p.rank, 1.0 / p.rank), 1.0) for p in plan.online_table]
    np.testing.assert_allclose(ratio, expected, rtol=0, atol=0)
    assert all(p.mean_keep_ratio == e for p, e in zip(plan.online_table, expected, strict=True))
    assert "takes no kept_share" in plan.message


def test_accepts_kept_share_reads_the_signature():
    assert accepts_kept_share(lambda r, k, t, kept_share=None: None)
    assert accepts_kept_share(lambda r, k, t, *, kept_share: None)
    assert accepts_kept_share(lambda r, k, t, **kw: None)
    assert not accepts_kept_share(lambda r, k, t: None)
    assert not accepts_kept_share(lambda r, k, t, kept_share=None, /: None)  # positional-only
    assert not accepts_kept_share(lambda r, k, t, share=None: None)


def test_ties_go_to_the_smaller_rank_then_the_larger_v():
    # a loss that depends on the rank only: every V of a rank ties
    def rank_only(rank, keep_ratio, rounds):
        return {"total": -np.minimum(np.asarray(rank), 8).astype(float)}

    plan = design(rank_only)
    assert plan.success and plan.rank == 8  # ranks 8 and 16 tie; the smaller wins
    feasible_v = [p.relative_v for p in plan.online_table if p.rank == 8 and p.feasible]
    assert plan.relative_v == max(feasible_v)


def test_no_feasible_online_point_is_infeasible_with_the_least_simulated_latency():
    plan = design(latency_budget_s=0.05, online_min_participation=0.5)
    assert plan.status is tsfa.Status.INFEASIBLE and plan.rank is None and plan.online_chosen is None
    assert plan.online_table and not any(p.feasible for p in plan.online_table)
    assert {p.rank for p in plan.online_table} == {1, 2, 4, 8, 16}  # the screen had no choice
    least = min(p.latency_low_s for p in plan.online_table)  # the default test holds the interval's lower end
    assert f"{least:.6g} s" in plan.message and "latency_budget_s = 0.05 s" in plan.message
    assert "online_latency_test = 'interval'" in plan.message
    assert "nominal screen" in plan.message
    with pytest.raises(tsfa.InfeasibleError, match="online stage"):
        plan.raise_for_status()
    # the points that meet τ̄ do so by skipping most clients: the participation floor rules them out
    fast = [p for p in plan.online_table if "latency" not in p.violated]
    assert fast and all(p.participation < 0.5 and "participation" in p.violated for p in fast)
    assert "online_min_participation = 0.5" in plan.message


def test_latency_tests_hold_the_interval_the_mean_or_the_upper_end_against_tau(online_plan):
    tau = online_plan.latency_budget_s
    pts = online_plan.online_table
    # the default: a point breaks τ̄ only when its whole interval lies above it
    assert all(("latency" in p.violated) == (p.latency_low_s > tau * (1 + 1e-9)) for p in pts)
    # the fixture's points straddle τ̄: some are above it on average but not significantly
    assert any(p.latency_low_s <= tau < p.time_average_latency_s for p in pts)
    # the chosen V's sweep entry follows the same test
    same = {p.relative_v: p for p in pts if p.rank == online_plan.rank}
    assert all(v.meets_budget == ("latency" not in same[v.relative_v].violated) for v in online_plan.v_sweep)
    for test, stat in (("interval", "latency_low_s"), ("mean", "time_average_latency_s"),
                       ("upper", "latency_high_s")):
        assert np.array_equal(latency_tested(pts, test), [getattr(p, stat) for p in pts])
    strict = design(online_latency_test="mean")  # the same simulations, judged by the point estimate
    assert [(p.rank, p.relative_v) for p in strict.online_table] == [(p.rank, p.relative_v) for p in pts]
    assert all(("latency" in p.violated) == (p.time_average_latency_s > tau * (1 + 1e-9))
               for p in strict.online_table)
    ok = {(p.rank, p.relative_v) for p in strict.online_table if p.feasible}
    assert ok < {(p.rank, p.relative_v) for p in pts if p.feasible}  # a stricter test admits a subset
    assert strict.success and strict.chosen_point.time_average_latency_s <= tau
    assert "test: the time-average ≤ τ̄" in strict.message and "test: τ̄ not below" in online_plan.message
    with pytest.raises(ValueError, match="online_latency_test must be one of"):
        VSweepSettings(online_latency_test="median")


def test_online_min_participation_rules_out_points_that_meet_the_budget_by_skipping():
    starved = design(latency_budget_s=0.05)  # no floor (the default): the stage meets τ̄ by skipping
    assert starved.success and starved.participation < 0.5
    assert all("participation" not in p.violated for p in starved.online_table)
    # the screen's min_participation (0.9) does not apply to the online points
    plan = design()
    assert any(p.feasible and p.participation < 0.9 for p in plan.online_table)


def test_time_budget_with_derived_rounds():
    plan = design(rounds=None, time_budget_s=60.0)
    assert plan.success and plan.binding and "time" in plan.binding
    for p in plan.online_table:
        assert p.simulated_rounds == 30
        assert p.rounds == max(1, math.floor(60.0 / p.time_average_latency_s))
        assert p.training_time_s <= 60.0 * (1 + 1e-9)
    assert plan.rounds == plan.chosen_point.rounds


def test_rounds_grid_points_are_prefixes_of_one_simulation(online_plan):
    plan = design(rounds=[10, 200])
    by_key = {(p.rank, p.relative_v, p.rounds): p for p in plan.online_table}
    for (r, v, n), p in by_key.items():
        assert p.simulated_rounds == min(n, 30)
        if n == 200:  # 200 rounds planned, 30 simulated: the same numbers as the fixed-rounds plan
            same = next(q for q in online_plan.online_table if (q.rank, q.relative_v) == (r, v))
            assert p.time_average_latency_s == same.time_average_latency_s
    assert [p.index for p in plan.online_table] == list(range(len(plan.online_table)))


def test_rows_and_text_export_the_online_points(online_plan):
    plan = online_plan
    rows = plan.online_rows()
    assert len(rows) == len(plan.online_table) and sum(r["chosen"] for r in rows) == 1
    assert {"rank", "relative_v", "rounds", "time_average_latency_s", "mean_keep", "kept_share", "predicted_loss",
            "feasible", "loss_rank_term"} <= set(rows[0])
    table = plan.table_rows()
    assert sum(r["chosen"] for r in table) == 0 and sum(r["screen_chosen"] for r in table) == 1
    text = plan.format_online_table()
    assert text.count("\n") == len(rows) and text.count("*") == 1
    assert plan.format_table().splitlines()[1 + plan.screen_chosen].startswith("s")


def test_bad_latency_model_settings_name_the_argument():
    with pytest.raises(ValueError, match="latency_model"):
        VSweepSettings(latency_model="exact")
    with pytest.raises(ValueError, match="choose_v"):
        VSweepSettings(latency_model="online", choose_v=False)
    with pytest.raises(ValueError, match="latency_model"):
        problem().replace(latency_model=None)
    with pytest.raises(ValueError, match="online_min_participation"):
        VSweepSettings(online_min_participation=1.5)
    for bad in ("soon", -1.0, math.nan, True):
        with pytest.raises(ValueError, match="online_initial_queue"):
            VSweepSettings(online_initial_queue=bad)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="online_replicates"):
            VSweepSettings(online_replicates=bad)


def test_the_simulated_stage_starts_from_the_configured_queue():
    """From Q = 0 the first round ignores latency and runs above τ̄; with ``"auto"`` it starts
    at the smallest Q whose allocation meets τ̄, so its first round does."""
    prob = problem()
    sys_ = prob.system
    shape = sys_.modules.with_rank(16)
    tau = prob.budgets.latency_budget_s

    def first_rounds(q0):
        settings = dataclasses.replace(prob.vsweep, v_grid=(0.1, 1.0), v_refine=0, online_initial_queue=q0)
        return [res for _, res in tsfa.simulate.sweep_v_runs(
            shape, sys_.cell, sys_.clients, sys_.compute_time_s(shape), latency_budget_s=tau,
            downlink_s=sys_.downlink_s(shape), rounds=5, settings=settings, seed=1)]

    cold, warm = first_rounds(0.0), first_rounds("auto")
    assert all(res.latency_s[0] > tau and res.queue[0] == 0 for res in cold)
    assert all(res.latency_s[0] <= tau * (1 + 1e-9) and res.queue[0] > 0 for res in warm)
    assert problem(online_initial_queue="auto").vsweep.online_initial_queue == "auto"


# --------------------------------------------------------------------------------------
# ErrorModel.from_profile

#: The fit is exact for profiles of the model itself (every client's e(s)/e(0) is the same).
DECAY_TOL = 1e-9


@pytest.mark.parametrize("decay", [0.0, 0.5, 1.0, 2.0])
def test_from_profile_recovers_the_decay_of_sampled_profiles(decay):
    em = ErrorModel(decay=decay)
    rng = np.random.default_rng(7)
    scales = em.client_scales(20, rng)
    rounds = np.stack([em.sample(16, scales, rng) for _ in range(25)])  # (T, K, r + 1)
    mean_profile = rounds.mean(axis=(0, 1))
    fit = ErrorModel.from_profile(mean_profile / mean_profile[0])
    assert abs(fit.decay - decay) <= DECAY_TOL
    assert (fit.client_spread, fit.round_jitter) == (0.5, 0.3)
    assert abs(ErrorModel.from_profile(mean_profile, client_spread=0.1, round_jitter=0.0).decay - decay) <= DECAY_TOL


def test_from_profile_on_a_noisy_measured_profile():
    rng = np.random.default_rng(1)
    energy = np.arange(1, 33, dtype=float) ** -1.3 * rng.lognormal(0.0, 0.05, 32)
    profile = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])
    assert ErrorModel.from_profile(profile).decay == pytest.approx(1.3, abs=0.05)
    # growing component energies (unsorted components) fit no decay
    assert ErrorModel.from_profile([1.0, 0.9, 0.7, 0.4, 0.0]).decay == 0.0


@pytest.mark.parametrize("bad", [
    [[1.0, 0.5, 0.0]],            # 2-D
    [1.0, 0.0],                   # rank 1: no slope
    [1.0, np.nan, 0.0],           # not finite
    [0.0, 0.0, 0.0],              # e(0) = 0
    [-1.0, -2.0, -3.0],           # e(0) < 0
    [1.0, 0.5, 0.6, 0.0],         # rises
    [1.0, 0.0, 0.0, 0.0],         # a single component carries the energy
    [1.0, True, 0.0],             # not a number
])
def test_from_profile_rejects_bad_profiles(bad):
    with pytest.raises(ValueError, match="profile"):
        ErrorModel.from_profile(bad)
