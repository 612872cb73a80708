import importlib.util
import pathlib

import numpy as np
import pytest

import tsfa
from tsfa.allocator import FixedPolicy, OnlineAllocator
from tsfa.online import allocate
from tsfa.simulate import ErrorModel, dense_latency_s, simulate_allocation

ROOT = pathlib.Path(__file__).resolve().parents[2]


def setup(seed=0):
    cell = tsfa.Cell()
    clients = cell.sample_clients(20, rng=seed)
    shape = tsfa.minilm_l6_qv(8)
    compute = clients.compute_time_s(5e11)
    budget = 0.8 * dense_latency_s(cell, clients, shape, compute, downlink_s=0.02, rng=seed + 1)
    return cell, clients, shape, compute, budget


def policy(shape, budget, v):
    return OnlineAllocator(shape, latency_budget_s=budget, weight_v=v, total_bandwidth_hz=20e6, downlink_s=0.02,
                           max_latency_s=2 * budget, allow_skip=True)


def test_error_model_profiles_convex_decreasing():
    em = ErrorModel()
    rng = np.random.default_rng(0)
    e = em.sample(8, em.client_scales(50, rng), rng)
    assert e.shape == (50, 9) and np.all(e[:, -1] == 0)
    d = np.diff(e, axis=1)
    assert np.all(d < 0) and np.all(np.diff(d, axis=1) >= -1e-15)


@pytest.mark.slow
def test_time_average_latency_meets_budget_2000_rounds():
    cell, clients, shape, compute, budget = setup()
    res = simulate_allocation(policy(shape, budget, 3.0), cell, clients, rounds=2000, compute_s=compute, rng=2)
    assert res.time_average_latency_s <= 1.02 * budget
    # the budget binds: a dense policy would exceed it
    assert np.median(res.mean_keep) < 8
    fixed = FixedPolicy(shape, keep=8, bandwidth="min_latency", total_bandwidth_hz=20e6, downlink_s=0.02)
    dense = simulate_allocation(fixed, cell, clients, rounds=300, compute_s=compute, rng=2)
    assert dense.time_average_latency_s > 1.1 * budget


@pytest.mark.slow
def test_v_sweep_is_monotone():
    cell, clients, shape, compute, budget = setup()
    runs = [simulate_allocation(policy(shape, budget, v), cell, clients, rounds=500, compute_s=compute, rng=2)
            for v in (0.3, 3.0, 30.0)]
    dropped = [r.average_dropped_energy for r in runs]
    queue = [r.average_queue for r in runs]
    assert dropped[0] > dropped[1] > dropped[2]
    assert queue[0] < queue[1] < queue[2]


def test_example_runs_shortened(tmp_path):
    spec = importlib.util.spec_from_file_location("ex02", ROOT / "examples" / "02_online_v_tradeoff.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    budget, results = mod.run(rounds=30, v_values=(1.0, 100.0))
    assert budget > 0 and set(results) == {1.0, 100.0}
    assert all(len(r.latency_s) == 30 for r in results.values())


def _exact(policy_, a, queue):
    return policy_.weight_v * a.dropped_energy + 0.5 * max(queue + a.latency_s - policy_.latency_budget_s, 0.0) ** 2


def test_exact_drift_is_never_worse_than_the_linear_choice_and_does_not_alternate():
    """drift="exact" minimises V·P + ½Q(t+1)² over the price search's allocations: it is never
    worse than the linear drift-plus-penalty choice at the same queue, keeps the time-average
    latency within τ̄, and with a small V does not alternate between everything and nothing."""
    cell, clients, shape, compute, budget = setup()
    kw = dict(latency_budget_s=budget, weight_v=0.05 * budget**2, total_bandwidth_hz=20e6, downlink_s=0.02,
              max_latency_s=3 * budget, allow_skip=True)
    exact, linear = OnlineAllocator(shape, drift="exact", **kw), OnlineAllocator(shape, **kw)
    rng = np.random.default_rng(5)
    em = ErrorModel()
    scales = em.client_scales(len(clients.distance_m), rng)
    for _ in range(30):
        snr = cell.sample_snr_hz(clients, rng=rng)
        prof = em.sample(8, scales, rng)
        prof = prof / prof[:, 0].mean()
        linear.queue = exact.queue
        a, b = exact.step(snr, compute, prof), linear.step(snr, compute, prof)
        assert _exact(exact, a, exact.queue) <= _exact(exact, b, exact.queue) * (1 + 1e-9) + 1e-15
        exact.observe(a.latency_s)
    res = {d: simulate_allocation(OnlineAllocator(shape, drift=d, **kw), cell, clients, rounds=150,
                                  compute_s=compute, rng=3) for d in ("exact", "linear")}
    assert res["exact"].time_average_latency_s <= 1.05 * budget
    skipped = {d: int(np.sum(r.mean_keep == 0)) for d, r in res.items()}
    assert skipped["linear"] >= 20 and skipped["exact"] <= 2  # linear alternates: whole rounds skipped
    assert np.max(res["exact"].latency_s) <= 2.0 * budget < np.max(res["linear"].latency_s)


def test_exact_step_finds_the_best_price_of_a_fine_grid(monkeypatch):
    """The exact step's breakpoint search against brute force: no allocation that answers the linear
    problem at any of 400 prices in [0, Q + τ(0) − τ̄] (best there among all 400 answers) has a
    lower exact objective, and the search takes about half the 32 solves of a bisection on the price."""
    cell, clients, shape, compute, budget = setup()
    kw = dict(latency_budget_s=budget, total_bandwidth_hz=20e6, downlink_s=0.02, max_latency_s=3 * budget,
              allow_skip=True)
    rng = np.random.default_rng(11)
    em = ErrorModel()
    scales = em.client_scales(len(clients.distance_m), rng)
    solves = []
    for v, queue in ((0.05, 0.0), (0.05, 0.3), (1.0, 0.5), (0.01, 2.0), (0.2, 0.1)):
        pol = OnlineAllocator(shape, drift="exact", weight_v=v * budget**2, queue=queue * budget, **kw)
        snr = cell.sample_snr_hz(clients, rng=rng)
        prof = em.sample(8, scales, rng)
        prof = prof / prof[:, 0].mean()
        solves.append(0)

        def counted(*args, **kwargs):
            solves[-1] += 1
            return allocate(*args, **kwargs)

        monkeypatch.setattr(tsfa.allocator, "allocate", counted)
        a = pol.step(snr, compute, prof)
        monkeypatch.undo()
        assert a.objective == pytest.approx(_exact(pol, a, pol.queue), rel=1e-12)
        top = pol.queue + allocate(pol.problem(snr, compute, prof, queue=0.0, weight_v=pol.weight_v)).latency_s - budget
        prices = np.linspace(0.0, max(top, 0.0), 400)
        answers = [allocate(pol.problem(snr, compute, prof, queue=q, weight_v=pol.weight_v)) for q in prices]
        for q, b in zip(prices, answers, strict=True):
            line = [pol.weight_v * c.dropped_energy + q * c.latency_s for c in answers]
            if line[answers.index(b)] <= min(line) * (1 + 1e-9):  # b answers q (near-optimal answers aside)
                assert a.objective <= _exact(pol, b, pol.queue) * (1 + 1e-9) + 1e-15, (v, queue, q)
    print("solves per exact step:", solves)
    assert max(solves) <= 18, solves  # about 10 on the price pieces + 6 on caps


def test_auto_initial_queue_meets_the_budget_in_the_first_round():
    cell, clients, shape, compute, budget = setup()
    kw = dict(latency_budget_s=budget, weight_v=0.5 * budget**2, total_bandwidth_hz=20e6, downlink_s=0.02,
              max_latency_s=3 * budget, allow_skip=True)
    rng = np.random.default_rng(1)
    snr = cell.sample_snr_hz(clients, rng=rng)
    prof = ErrorModel().sample(8, np.ones(len(compute)), rng)
    auto, zero = OnlineAllocator(shape, queue="auto", **kw), OnlineAllocator(shape, **kw)
    a, z = auto.step(snr, compute, prof), zero.step(snr, compute, prof)
    assert z.latency_s > budget  # from Q = 0 latency is free
    assert a.latency_s <= budget * (1 + 1e-9) and auto.queue > 0
    q = auto.queue
    below = OnlineAllocator(shape, queue=0.9 * q, **kw).step(snr, compute, prof)
    assert below.latency_s > budget  # the smallest such queue, to the bisection's precision
    state = auto.state_dict()
    assert state["calibrating"] is False and state["drift"] == "linear"
    fresh = OnlineAllocator(shape, queue="auto", **kw)
    fresh.load_state_dict(state)
    assert fresh.queue == q and not fresh.calibrating


def test_sweep_runs_of_fewer_rounds_are_prefixes_and_record_participation():
    """The online latency model reads a rank's statistics over a prefix of one simulation: a
    shorter run on the same seed must be exactly that prefix."""
    from tsfa.simulate import VSweepSettings, sweep_v, sweep_v_runs

    cell, clients, shape, compute, budget = setup()
    settings = VSweepSettings(v_grid=(0.1, 10.0), v_refine=0)
    kw = dict(latency_budget_s=budget, downlink_s=0.02, settings=settings, seed=4)
    long = dict(sweep_v_runs(shape, cell, clients, compute, rounds=12, **kw))
    short = dict(sweep_v_runs(shape, cell, clients, compute, rounds=5, **kw))
    assert set(long) == set(short) == {0.1, 10.0}
    for v, res in short.items():
        for trace in ("latency_s", "dropped_energy", "queue", "mean_keep", "participation"):
            np.testing.assert_array_equal(getattr(res, trace), getattr(long[v], trace)[:5])
        part = long[v].participation
        assert np.all((part >= 0) & (part <= 1)) and np.all((part == 0) == (long[v].mean_keep == 0))
    # sweep_v summarises the same runs
    points = sweep_v(shape, cell, clients, compute, rounds=12, **kw)
    assert [p.time_average_latency_s for p in points] == [long[v].time_average_latency_s for v in (0.1, 10.0)]
