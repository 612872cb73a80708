"""The online allocator's uncertified fast path (``allocate(..., certify=False)``) and its kernels."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tsfa.test_online import _default_cell_problem, check_feasible, make, problems
from tsfa import Status, min_latency_bandwidth, minilm_l6_qv
from tsfa.allocator import OnlineAllocator
from tsfa.fast import allocate_uncertified
from tsfa.mckp_lp import _hull, mckp_greedy, mckp_relaxation
from tsfa.online import _min_bandwidth_grid, allocate
from tsfa.rate import min_bandwidth


def check_feasible_uncertified(p, a):
    check_feasible(p, a, certified=False)


@pytest.mark.parametrize("k", [20, 100])
def test_fast_path_equals_certified_on_default_cell(k):
    p = _default_cell_problem(k)
    certified, fast = allocate(p), allocate_uncertified(p, min_clients=0)
    exact = allocate(p, backend="milp")
    check_feasible_uncertified(p, fast)
    np.testing.assert_array_equal(fast.keep, certified.keep)
    assert fast.objective <= exact.objective * (1 + 1e-3)
    assert fast.objective >= exact.lower_bound * (1 - 1e-9)


@settings(max_examples=40)
@given(problems, st.sampled_from([None, 0.5, 1.0, 2.0]))
def test_fast_path_within_0_1_percent_of_exact(p, hint_scale):
    exact = allocate(p, backend="milp")
    hint = None if hint_scale is None else exact.latency_s * hint_scale
    fast = allocate_uncertified(p, tau_hint=hint, min_clients=0)
    assert fast.objective <= exact.objective * (1 + 1e-3) + 1e-12
    assert fast.objective >= exact.lower_bound * (1 - 1e-7) - 1e-12
    if math.isnan(fast.lower_bound):
        check_feasible_uncertified(p, fast)


@pytest.mark.parametrize("seed", range(8))
def test_fast_path_within_0_1_percent_on_random_cells(seed):
    """Seeded default-cell draws: K, Q, V, skipping and the warm start vary."""
    rng = np.random.default_rng(seed)
    k = int(rng.choice([30, 60, 150, 400]))
    p = _default_cell_problem(k, seed=100 + seed)
    import dataclasses

    p = dataclasses.replace(p, queue=float(rng.choice([0.1, 1.0, 3.0])), weight_v=float(rng.choice([1.0, 10.0])),
                            allow_skip=bool(seed % 2))
    certified = allocate(p)
    fast = allocate_uncertified(p, tau_hint=certified.latency_s * float(rng.uniform(0.7, 1.3)), min_clients=0)
    assert fast.success
    assert fast.objective <= certified.objective * (1 + 1e-3)
    assert fast.objective >= certified.lower_bound * (1 - 1e-9)


def test_fast_path_with_cap_and_infeasible():
    p = make(k=5, r=4, queue=0.0)
    dense = allocate(p).latency_s
    least = min_latency_bandwidth(p.shape.payload_bits(np.ones(5, int)), p.snr_hz, p.compute_s,
                                  p.total_bandwidth_hz, downlink_s=p.downlink_s).latency_s
    cap = 0.5 * (least + dense)
    for queue in (0.0, 0.05, 0.5):
        capped = make(k=5, r=4, queue=queue, cap=cap)
        a, b = allocate(capped, backend="milp"), allocate_uncertified(capped, min_clients=0)
        assert b.success and b.latency_s <= cap * (1 + 1e-9)
        assert b.objective <= a.objective * (1 + 1e-3)
    bad = allocate_uncertified(make(k=5, r=4, cap=1e-3), min_clients=0)
    assert bad.status is Status.INFEASIBLE and "min_keep = 1" in bad.message


def test_certify_false_needs_the_fast_backend():
    with pytest.raises(ValueError, match="certify=False needs backend='fast'"):
        allocate(make(), backend="milp", certify=False)
    with pytest.raises(ValueError, match="certify must be True or False"):
        allocate(make(), certify="no")


def test_online_allocator_certifies_every_n_rounds():
    p = _default_cell_problem(200)
    kw = dict(latency_budget_s=2.0, weight_v=10.0, total_bandwidth_hz=p.total_bandwidth_hz, downlink_s=0.02,
              allow_skip=True)
    every, sparse = (OnlineAllocator(minilm_l6_qv(16), certify_every=n, **kw) for n in (1, 3))
    rng = np.random.default_rng(0)
    uncertified = 0
    for t in range(6):
        snr = p.snr_hz * rng.exponential(1.0, p.num_clients)
        a = every.step(snr, p.compute_s, p.error_profile, p.data_weight)
        b = sparse.step(snr, p.compute_s, p.error_profile, p.data_weight)
        assert math.isfinite(a.lower_bound)
        if t % 3 == 0:
            assert math.isfinite(b.lower_bound)
        uncertified += math.isnan(b.lower_bound)  # the other rounds: fast (certified only if its guard asks)
        assert b.objective <= a.objective * (1 + 1e-3)
        every.observe(a.latency_s)
        sparse.observe(a.latency_s)  # the same queue path, so the rounds stay comparable
    assert uncertified >= 2
    with pytest.raises(ValueError, match="certify_every"):
        OnlineAllocator(minilm_l6_qv(16), certify_every=-1, **kw)


# --- kernels -------------------------------------------------------------------------------


@given(problems, st.floats(0.0, 3.0))
def test_grid_kernel_equals_min_bandwidth(p, frac):
    bits = p.shape.payload_bits(np.arange(1, p.shape.rank + 1)).astype(float)
    tau = p.downlink_s + float(p.compute_s.max()) * frac
    slack = tau - (p.compute_s + p.downlink_s)
    b1, d1 = min_bandwidth(bits[None, :], p.snr_hz[:, None], slack[:, None], slope=True)
    b2, d2 = _min_bandwidth_grid(bits, p.snr_hz, slack)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(d1, d2)


def _hull_general(W, C):
    import tsfa.mckp_lp as kn

    quick = kn._hull_if_chains_are_convex
    kn._hull_if_chains_are_convex = lambda *a: None
    try:
        return kn._hull(W, C)
    finally:
        kn._hull_if_chains_are_convex = quick


@given(problems, st.floats(0.05, 3.0))
def test_hull_shortcut_equals_general_loop(p, frac):
    W = p.item_weights(float(p.compute_s.max()) * (1 + frac) + p.downlink_s)
    C = p.item_costs()
    for x, y in zip(_hull(W, C), _hull_general(W, C), strict=True):
        np.testing.assert_array_equal(x, y)


@given(problems, st.floats(0.05, 3.0), st.floats(0.01, 100.0))
def test_relaxation_with_a_hint_is_the_same_lp(p, frac, hint_scale):
    W = p.item_weights(float(p.compute_s.max()) * (1 + frac) + p.downlink_s)
    C = p.item_costs()
    full = mckp_relaxation(W, C, p.total_bandwidth_hz)
    if full.choice is None:
        return
    hinted = mckp_relaxation(W, C, p.total_bandwidth_hz, multiplier_hint=max(full.multiplier, 1e-30) * hint_scale)
    assert hinted.value == pytest.approx(full.value, rel=1e-12, abs=1e-15)
    assert hinted.multiplier == full.multiplier and hinted.split == full.split
    np.testing.assert_array_equal(hinted.whole, full.whole)
    rows = np.arange(p.num_clients)
    assert W[rows, hinted.choice].sum() <= p.total_bandwidth_hz * (1 + 1e-12)
    lp, choice, lam = mckp_greedy(W, C, p.total_bandwidth_hz)
    assert (lp, lam) == (full.value, full.multiplier)
    np.testing.assert_array_equal(choice, full.choice)


def test_relaxation_sample_estimate_on_many_increments():
    """Above 8192 increments the kernel estimates λ from a sample: the LP is unchanged."""
    p = _default_cell_problem(800)
    W, C = p.item_weights(3.0), p.item_costs()
    full = mckp_relaxation(W, C, p.total_bandwidth_hz, multiplier_hint=-1.0)  # a non-positive hint: full sort
    est = mckp_relaxation(W, C, p.total_bandwidth_hz)
    assert est.value == pytest.approx(full.value, rel=1e-12)
    assert est.multiplier == full.multiplier and est.split == full.split
    np.testing.assert_array_equal(est.whole, full.whole)


def test_allocate_uncertified_is_allocate_certify_false():
    p = _default_cell_problem(40)
    a, b = allocate(p, certify=False, tau_hint=1.0), allocate_uncertified(p, tau_hint=1.0)
    np.testing.assert_array_equal(a.keep, b.keep)
    assert a.objective == b.objective


@pytest.mark.parametrize("seed", range(6))
def test_working_set_gives_the_answer_of_every_item(seed, monkeypatch):
    """The fast path's windows of keep counts (K ≥ 500, r = 16) against its knapsacks over every
    item: the same allocation on seeded default-cell draws (queue, V, skipping, min_keep, a cap and
    the warm start vary), with the windows in use (some evaluations answered by them)."""
    import dataclasses

    import tsfa.fast as fast

    rng = np.random.default_rng(seed)
    p = _default_cell_problem(int(rng.choice([500, 1200])), seed=200 + seed)
    p = dataclasses.replace(p, queue=float(rng.choice([0.3, 1.0, 3.0])), weight_v=float(rng.choice([1.0, 10.0])),
                            allow_skip=bool(seed % 2), min_keep=int(rng.choice([1, 2])))
    if seed >= 4:  # a cap just above the answer (a binding cap ends the search at the cap, one knapsack)
        p = dataclasses.replace(p, queue=0.3, allow_skip=True)
        p = dataclasses.replace(p, max_latency_s=1.1 * allocate(p).latency_s)
    certified = allocate(p)
    hint = certified.latency_s * float(rng.uniform(0.85, 1.2))
    answered = []
    evaluate = fast._WorkingSet.evaluate

    def counted(self, tau, lam):
        out = evaluate(self, tau, lam)
        answered.append(out is not None)
        return out

    monkeypatch.setattr(fast._WorkingSet, "evaluate", counted)
    windows = allocate_uncertified(p, tau_hint=hint)
    every = allocate_uncertified(p, tau_hint=hint, working_set=False)
    assert any(answered), answered
    np.testing.assert_array_equal(windows.keep, every.keep)
    assert windows.latency_s == pytest.approx(every.latency_s, rel=1e-12)
    check_feasible(p, windows, certified=not math.isnan(windows.lower_bound))
    assert windows.objective <= certified.objective * (1 + 1e-3)


def test_working_set_needs_convex_profiles():
    """A profile that is not convex in the keep count turns the windows off (every item is used)."""
    import dataclasses

    from tsfa.fast import _WorkingSet

    p = _default_cell_problem(600, seed=3)
    assert _WorkingSet.build(p, p.item_costs()) is not None
    prof = p.error_profile.copy()
    prof[0, 5] = 0.5 * (prof[0, 4] + prof[0, 5])  # a bump: the second difference turns negative at s = 5
    q = dataclasses.replace(p, error_profile=prof)
    assert _WorkingSet.build(q, q.item_costs()) is None


def test_fast_path_with_a_cap_below_the_downlink_reports_infeasible():
    """A cap that leaves no time at all: the fast path answers as the certified search does
    (INFEASIBLE, naming the downlink), not with an error from its search."""
    import dataclasses

    p = dataclasses.replace(_default_cell_problem(200, seed=4), max_latency_s=0.018)
    fast, certified = allocate(p, certify=False), allocate(p)
    assert fast.status is Status.INFEASIBLE and certified.status is Status.INFEASIBLE
    assert "downlink" in fast.message


@pytest.mark.parametrize("skip", [False, True])
def test_item_availability_is_where_the_weights_are_finite(skip):
    """The windows' cheap test of which items fit (S ln2 < c (τ − T)) against b^min itself."""
    import dataclasses

    p = dataclasses.replace(_default_cell_problem(300, seed=7), allow_skip=skip, min_keep=2)
    top = allocate(p).latency_s
    for tau in np.linspace(0.0, 3 * top, 25):
        np.testing.assert_array_equal(p.item_availability(tau), np.isfinite(p.item_weights(tau)))


def test_trusted_kernel_equals_min_bandwidth_on_pairs():
    """The least-latency Newton's shape (one payload per client, zeros for skipped clients) and
    the odd ranges the trusted kernel hands to min_bandwidth: equal results, bit for bit."""
    from tsfa.rate import min_bandwidth_trusted

    rng = np.random.default_rng(3)
    S = rng.choice([0.0, 1e3, 1e6, 3e7], size=(4, 200))
    c = 10 ** rng.uniform(5, 9, size=(4, 200))
    w = rng.uniform(-0.1, 2.0, size=(4, 200))
    w[1, :5] = np.inf  # unlimited time
    S[2, :5] = 1e-300  # a quotient below the normal range
    w[3, :5] = 1e-310  # a subnormal slack
    for row in range(4):
        b1, d1 = min_bandwidth(S[row], c[row], w[row], slope=True)
        b2, d2 = min_bandwidth_trusted(S[row], c[row], w[row])
        np.testing.assert_array_equal(b1, b2)
        np.testing.assert_array_equal(d1, d2)
