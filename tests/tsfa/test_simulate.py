import importlib.util
import pathlib

import numpy as np
import pytest

import tsfa
from tsfa.allocator import FixedPolicy, OnlineAllocator
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
