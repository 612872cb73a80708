import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tsfa import (
    Cell,
    InfeasibleError,
    Status,
    min_latency_bandwidth,
    minilm_l6_qv,
    rate_bps,
)
from tsfa.bandwidth import BANDWIDTH_BACKENDS, least_latency_program

B = 20e6


@st.composite
def instances(draw, max_clients=10):
    k = draw(st.integers(1, max_clients))
    payload = draw(st.lists(st.sampled_from([0.0, 1e5, 3e5, 1e6, 2.4e6, 5e6]), min_size=k, max_size=k))
    if not any(payload):
        payload[0] = 1e6
    # c/B between 1e-2 and 1e3 (cell-edge fade to near the base station), and compute times.
    log_snr = draw(st.lists(st.floats(math.log(2e5), math.log(2e10)), min_size=k, max_size=k))
    compute = draw(st.lists(st.floats(0.0, 2.0), min_size=k, max_size=k))
    return np.array(payload), np.exp(log_snr), np.array(compute)


def _solve(inst, backend, **kw):
    s, c, t = inst
    return min_latency_bandwidth(s, c, t, B, backend=backend, **kw)


@given(instances())
@example(inst=(np.array([1e5, 1e5]), np.full(2, 442413.39200892), np.zeros(2)))  # equal clients: Σb = B at the bracket
def test_backends_agree(inst):
    fast = _solve(inst, "fast")
    assert fast.status is Status.OPTIMAL
    for name in ("cvxpy", "scipy"):
        other = _solve(inst, name)
        assert other.success, other.message
        assert other.latency_s == pytest.approx(fast.latency_s, rel=1e-6), name
    ref = _solve(inst, "scipy")
    np.testing.assert_allclose(fast.bandwidth_hz, ref.bandwidth_hz, rtol=1e-7, atol=1e-9 * B)


@given(instances(max_clients=40))
def test_kkt_every_scheduled_client_finishes_at_tau(inst):
    s, c, t = inst
    res = _solve(inst, "fast", downlink_s=0.05)
    sch = s > 0
    assert np.all(res.bandwidth_hz >= 0)
    assert np.all(res.bandwidth_hz[~sch] == 0)
    assert res.bandwidth_hz.sum() == pytest.approx(B, rel=1e-12)  # all bandwidth used
    np.testing.assert_allclose(res.finish_time_s[sch], res.latency_s, rtol=1e-9)
    assert np.all(np.isnan(res.finish_time_s[~sch]))
    # finish times recomputed from the returned split
    fin = 0.05 + t[sch] + s[sch] / rate_bps(res.bandwidth_hz[sch], c[sch])
    assert fin.max() == pytest.approx(res.latency_s, rel=1e-12)


@given(instances(), st.floats(1.05, 4.0))
def test_more_bandwidth_never_raises_latency(inst, factor):
    s, c, t = inst
    a = min_latency_bandwidth(s, c, t, B)
    b = min_latency_bandwidth(s, c, t, B * factor)
    assert b.latency_s <= a.latency_s * (1 + 1e-12)


@given(instances(), st.randoms(use_true_random=False))
def test_permuting_clients_permutes_answer(inst, rnd):
    s, c, t = inst
    perm = np.arange(len(s))
    rnd.shuffle(perm)
    a = min_latency_bandwidth(s, c, t, B)
    b = min_latency_bandwidth(s[perm], c[perm], t[perm], B)
    assert b.latency_s == pytest.approx(a.latency_s, rel=1e-12)
    np.testing.assert_allclose(b.bandwidth_hz, a.bandwidth_hz[perm], rtol=1e-9, atol=1e-9 * B)


def test_identical_clients_closed_form():
    k, s, c, t = 8, 2e6, 5e7, 0.3
    res = min_latency_bandwidth(np.full(k, s), np.full(k, c), np.full(k, t), B)
    np.testing.assert_allclose(res.bandwidth_hz, B / k, rtol=1e-12)
    assert res.latency_s == pytest.approx(t + s / rate_bps(B / k, c), rel=1e-12)


def test_single_client_gets_everything():
    res = min_latency_bandwidth([1e6], [1e8], [0.1], B, downlink_s=0.2)
    assert res.bandwidth_hz[0] == B
    assert res.latency_s == pytest.approx(0.3 + 1e6 / rate_bps(B, 1e8))


def test_two_clients_no_compute_closed_form_high_snr_limit():
    # Equal SNR and no compute: both finish together iff b1/b2 solves S1/R(b1) = S2/R(b2).
    res = min_latency_bandwidth([1e6, 3e6], [1e9, 1e9], [0.0, 0.0], B)
    b1, b2 = res.bandwidth_hz
    assert 1e6 / rate_bps(b1, 1e9) == pytest.approx(3e6 / rate_bps(b2, 1e9), rel=1e-10)
    assert b2 > 2.5 * b1  # roughly proportional to payload at high SNR


def test_default_cell_instance_all_backends():
    cell = Cell()
    cl = cell.sample_clients(20, rng=0)
    snr = cell.sample_snr_hz(cl, rng=1)
    s = np.full(20, minilm_l6_qv(8).dense_payload_bits)
    t = cl.compute_time_s(5e11)
    lat = [min_latency_bandwidth(s, snr, t, B, backend=b).latency_s for b in ("fast", "cvxpy", "scipy")]
    assert lat[1] == pytest.approx(lat[0], rel=1e-6) and lat[2] == pytest.approx(lat[0], rel=1e-9)


def test_nothing_scheduled():
    res = min_latency_bandwidth([0.0, 0.0], [1e7, 1e7], [1.0, 2.0], B, downlink_s=0.1)
    assert res.status is Status.OPTIMAL and res.latency_s == 0.1
    assert np.all(res.bandwidth_hz == 0) and "nothing is scheduled" in res.message


def test_cvxpy_compiled_once_per_size():
    a = least_latency_program(1, 5)
    b = least_latency_program(1, 5)
    assert a[0] is b[0]
    assert a[0].is_dcp(dpp=True)
    assert least_latency_program.cache_info().maxsize is not None  # the cache is bounded


# ---------------------------------------------------------------- infeasible deadlines


def test_infeasible_compute_names_client():
    res = min_latency_bandwidth([1e6, 1e6], [1e8, 1e8], [0.1, 0.6], B, deadline_s=0.5)
    assert res.status is Status.INFEASIBLE and not res.success
    assert "client 1" in res.message and "compute time 0.6" in res.message
    with pytest.raises(InfeasibleError, match="client 1"):
        res.raise_for_status()


def test_infeasible_rate_cap_names_client_and_least_latency():
    # client 2 has a tiny SNR: 1e6 bits at its cap c/ln2 = 1.44e5 bit/s need 6.93 s.
    s, c, t = [1e6, 1e6, 1e6], [1e9, 1e8, 1e5], [0.0, 0.0, 0.0]
    res = min_latency_bandwidth(s, c, t, B, deadline_s=5.0)
    assert res.status is Status.INFEASIBLE
    assert "client 2" in res.message and "capped" in res.message
    least = min_latency_bandwidth(s, c, t, B).latency_s
    assert f"{least:.6g}" in res.message
    assert min_latency_bandwidth(s, c, t, B, deadline_s=least * 1.000001).success


def test_infeasible_bandwidth_reports_needed_bandwidth():
    s, c, t = np.full(5, 2e6), np.full(5, 1e8), np.zeros(5)
    least = min_latency_bandwidth(s, c, t, B).latency_s
    deadline = 0.8 * least
    res = min_latency_bandwidth(s, c, t, B, deadline_s=deadline)
    assert res.status is Status.INFEASIBLE and "total_bandwidth_hz" in res.message
    need = float(res.message.rsplit("at least ", 1)[1].split(" Hz")[0])
    ok = min_latency_bandwidth(s, c, t, need * (1 + 1e-6), deadline_s=deadline)
    assert ok.success and ok.latency_s <= deadline


def test_feasible_deadline_is_optimal():
    res = min_latency_bandwidth([1e6], [1e8], [0.0], B, deadline_s=10.0)
    assert res.status is Status.OPTIMAL and res.raise_for_status() is res


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, match",
    [
        (([1e6, float("nan")], [1e7, 1e7], [0, 0], B), r"payload_bits\[1\] = nan"),
        (([1e6, 1e6], [1e7, -1.0], [0, 0], B), r"snr_hz must be > 0; got snr_hz\[1\] = -1"),
        (([1e6, 1e6], [1e7, float("inf")], [0, 0], B), "snr_hz must be finite"),
        (([1e6, 1e6], [1e7, 1e7], [0, -0.1], B), "compute_s"),
        (([1e6, 1e6], [1e7, 1e7], [0, 0], -5.0), "total_bandwidth_hz"),
        (([1e6, 1e6], [1e7, 1e7], [0, 0], float("nan")), "total_bandwidth_hz"),
        (([1e6, 1e6], [1e7], [0, 0], B), "mismatched lengths"),
        (([], [], [], B), "payload_bits must not be empty"),
        ((["a"], [1e7], [0], B), "payload_bits must be numeric"),
    ],
)
def test_bad_input_names_argument(args, match):
    with pytest.raises(ValueError, match=match):
        min_latency_bandwidth(*args)


def test_bad_deadline_and_downlink():
    with pytest.raises(ValueError, match="deadline_s"):
        min_latency_bandwidth([1e6], [1e7], [0], B, deadline_s=0.0)
    with pytest.raises(ValueError, match="downlink_s"):
        min_latency_bandwidth([1e6], [1e7], [0], B, downlink_s=-1.0)


def test_unknown_backend_lists_valid_ones():
    with pytest.raises(ValueError, match=r"\['cvxpy', 'fast', 'scipy'\]"):
        min_latency_bandwidth([1e6], [1e7], [0], B, backend="gurobi")
    assert set(BANDWIDTH_BACKENDS) == {"fast", "cvxpy", "scipy"}


def test_callable_backend():
    def equal_split(S, c, T, total):
        return np.full(len(S), total / len(S)), 0

    res = min_latency_bandwidth([1e6, 2e6], [1e8, 1e8], [0, 0], B, backend=equal_split)
    assert res.backend == "equal_split"
    np.testing.assert_allclose(res.bandwidth_hz, B / 2)
    assert res.latency_s > min_latency_bandwidth([1e6, 2e6], [1e8, 1e8], [0, 0], B).latency_s


def test_backend_failure_is_a_status_not_a_crash():
    from tsfa import SolverError

    def broken(S, c, T, total):
        raise SolverError("solver crashed")

    res = min_latency_bandwidth([1e6, 2e6], [1e8, 1e8], [0, 0], B, backend=broken)
    assert res.status is Status.ERROR and "solver crashed" in res.message
    assert np.isnan(res.latency_s)
    with pytest.raises(SolverError, match="solver crashed"):
        res.raise_for_status()

    def nonsense(S, c, T, total):
        return -np.ones(len(S)), 0

    res = min_latency_bandwidth([1e6, 2e6], [1e8, 1e8], [0, 0], B, backend=nonsense)
    assert res.status is Status.ERROR and "invalid bandwidth" in res.message
