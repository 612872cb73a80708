"""Hostile input for tsfa: extremes of the rate model, the Σb ≤ B contract, state that must not
go wrong quietly, booleans/complex numbers, and `tsfa allocate`'s one-line error contract.

Every call either returns a valid result (finite, feasible, Σ b ≤ B, each scheduled client
done by the reported latency) or raises ValueError naming the argument."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tsfa
from tsfa import LoraShape, ModuleShape, OnlineAllocator, RoundProblem, allocate
from tsfa.bandwidth import min_latency_bandwidth, min_latency_bandwidth_batch
from tsfa.cli import main
from tsfa.jsonio import allocate_json
from tsfa.rate import bandwidth_for_deadline, log1p_ratio_root, min_bandwidth, rate_bps
from tsfa.status import Status

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "round.json"
SETTINGS = settings(derandomize=True, deadline=None, max_examples=40,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
pos = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)
wide = st.one_of(pos, st.sampled_from([1e-300, 1e-30, 1.0, 1e7, 2e7, 1e30, 1e300]))


def _valid_split(res, S, c, T, B):
    """A success: finite τ, Σ b ≤ B in every summation order, every scheduled client done by τ."""
    bw = np.asarray(res.bandwidth_hz)
    assert np.all(bw >= 0) and np.all(np.isfinite(bw))
    assert sum(bw.tolist()) <= B and float(np.sum(bw)) <= B and math.fsum(bw) <= B
    assert math.isfinite(res.latency_s)
    sch = np.asarray(S) > 0
    finish = np.asarray(T) + np.asarray(S) / np.asarray(rate_bps(np.where(sch, bw, 1.0), c))
    assert np.all(finish[sch] <= res.latency_s * (1 + 1e-9))


# -- finding 1: extremes in the rate model ---------------------------------------------------
def test_rate_does_not_overflow_at_tiny_bandwidth():
    # old: c/b overflowed and rate_bps(1e-300, 1e10) was inf
    r = rate_bps(1e-300, 1e10)
    assert math.isfinite(r) and r == pytest.approx(1e-300 * (math.log(1e10) - math.log(1e-300)) / math.log(2))
    assert rate_bps(1e300, 1e-300) == pytest.approx(1e-300 / math.log(2))


def test_min_bandwidth_across_the_float_range():
    for S, c, w in [(1e7, 1e10, 1e304), (1e8, 1e200, 1e200), (1e-300, 1e10, 1.0), (1e6, 1e8, 0.1)]:
        b = min_bandwidth(S, c, w)
        assert 0 < b < math.inf
        assert S / rate_bps(b, c) == pytest.approx(w, rel=1e-12)  # old: b = 0 or c/inf, wrong
    assert bandwidth_for_deadline(1e7, 1e10, 0.0, 1e304) == min_bandwidth(1e7, 1e10, 1e304)
    x, _ = log1p_ratio_root(np.array([1e-300, 1e-20]))
    assert np.all(np.isfinite(x)) and np.allclose(np.log1p(x), np.array([1e-300, 1e-20]) * x, rtol=1e-13)
    with pytest.raises(ValueError, match="snr_hz"):
        min_bandwidth(1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="payload_bits"):
        min_bandwidth(math.nan, 1.0, 1.0)


def test_allocate_json_tiny_bandwidth_reports_the_true_latency():
    # old: "optimal", keep 8 for everyone, τ = 1.01 s, while each upload took ~1e304 s
    d = json.loads(EXAMPLE.read_text())
    d.update(total_bandwidth_hz=1e-300, allow_skip=False)
    out = allocate_json(json.dumps(d))
    if out["status"] == "optimal":
        assert out["latency_s"] > 1e290
        assert all(u <= out["latency_s"] for u in out["upload_time_s"])
        assert sum(out["bandwidth_hz"]) <= 1e-300
    else:
        assert out["status"] == "infeasible" and out["message"]


def test_unservable_round_is_infeasible_not_optimal():
    res = min_latency_bandwidth([1e300, 1e300], [1e-300, 1e-300], [0.0, 0.0], 1e-300)
    assert res.status is Status.INFEASIBLE and "cannot be served" in res.message


def test_split_sums_to_at_most_the_total_in_float():
    # old: Σ b exceeded total_bandwidth_hz by 1-2 ulp in ~13 % of optimal answers
    rng = np.random.default_rng(3)
    for _ in range(200):
        k = int(rng.integers(2, 30))
        B = float(10 ** rng.uniform(-3, 12))
        res = min_latency_bandwidth(rng.uniform(1e5, 1e7, k), 10 ** rng.uniform(6, 11, k), rng.uniform(0, 1, k), B)
        assert res.success
        assert sum(res.bandwidth_hz.tolist()) <= B and math.fsum(res.bandwidth_hz) <= B


@SETTINGS
@given(k=st.integers(1, 12), B=wide, seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 1e6, 1e12]))
def test_property_min_latency_bandwidth(k, B, seed, scale):
    rng = np.random.default_rng(seed)
    S = rng.uniform(0, 1e7, k) * scale * (rng.random(k) > 0.2)
    c = 10 ** rng.uniform(-10, 15, k)
    T = rng.uniform(0, 2, k)
    res = min_latency_bandwidth(S, c, T, B)
    assert res.status in (Status.OPTIMAL, Status.INFEASIBLE)
    if res.success:
        _valid_split(res, S, c, T, B)
    else:
        assert res.message
    batch = min_latency_bandwidth_batch(S[None], c[None], T[None], B)
    bw = batch.bandwidth_hz[0]
    assert float(np.sum(bw)) <= B and sum(bw.tolist()) <= B


@SETTINGS
@given(value=st.one_of(st.booleans(), st.complex_numbers(allow_nan=False, allow_infinity=False), st.text(max_size=3),
                       st.just(math.nan), st.just(-1.0), st.just([1.0, True])))
def test_property_bad_numbers_raise_value_error_naming_the_argument(value):
    with pytest.raises(ValueError, match="total_bandwidth_hz"):
        min_latency_bandwidth([1e6], [1e8], [0.1], value)
    with pytest.raises(ValueError, match="snr_hz"):
        min_latency_bandwidth([1e6, 1e6], [1e8, value], [0.1, 0.1], 2e7)


# -- finding 3: state that goes wrong quietly ---------------------------------------------------
def _allocator():
    shape = LoraShape((ModuleShape("q", 16, 16),), 4)
    return OnlineAllocator(shape, latency_budget_s=1.0, weight_v=1.0, total_bandwidth_hz=1e6)


def test_load_state_dict_is_all_or_nothing():
    # old: queue and round were overwritten before weight_v raised
    a = _allocator()
    before = a.state_dict()
    with pytest.raises(ValueError, match="weight_v"):
        a.load_state_dict({"queue": 5.0, "round": 7, "latency_budget_s": 1.0, "weight_v": -1.0})
    assert a.state_dict() == before


def test_observe_keeps_the_queue_finite():
    # old: two observe(1e308) made the queue inf
    a = _allocator()
    a.observe(1e308)
    before = a.state_dict()
    with pytest.raises(ValueError, match="latency_s"):
        a.observe(1e308)
    assert a.state_dict() == before and math.isfinite(a.queue)


# -- finding 4: validation ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"total_bandwidth_hz": True}, "total_bandwidth_hz"),
    ({"radius_m": 1 + 2j}, "radius_m"),
    ({"compute_flops_per_s_range": 5}, "compute_flops_per_s_range"),
    ({"compute_flops_per_s_range": (1.0,)}, "compute_flops_per_s_range"),
    ({"noise_psd_dbm_hz": 1e308}, "noise_psd_dbm_hz"),
])
def test_cell_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tsfa.Cell(**kwargs)


@pytest.mark.parametrize("config,match", [
    ({"hidden_size": "x", "num_hidden_layers": 2, "num_attention_heads": 2}, "hidden_size"),
    ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": None, "num_hidden_layers": 2, "num_attention_heads": 2}, "hidden_size"),
    ({"hidden_size": 64, "num_hidden_layers": True, "num_attention_heads": 2}, "num_hidden_layers"),
    ({"hidden_size": 64.5, "num_hidden_layers": 2, "num_attention_heads": 2}, "hidden_size"),
    ([1, 2], "config must be a mapping"),
])
def test_from_config_errors_name_the_argument(config, match):
    with pytest.raises(ValueError, match=match):
        LoraShape.from_config(config, 2)


def test_booleans_and_complex_are_not_numbers():
    from tsfa._validate import as_array, as_scalar

    for v in (True, 1 + 0j, np.bool_(True)):
        with pytest.raises(ValueError, match="x must be a number"):
            as_scalar("x", v)
    for v in ([True, 1.0], [1 + 0j], np.array([True])):
        with pytest.raises(ValueError, match="y must be numeric"):
            as_array("y", v)
    with pytest.raises(ValueError, match="bits_per_value"):
        LoraShape((ModuleShape("q", 16, 16),), 4, bits_per_value=2**50)


# -- finding 5: the CLI contract -----------------------------------------------------------------
def _run_cli(tmp_path, capsys, doc, *extra):
    p = tmp_path / "in.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    rc = main(["allocate", "--input", str(p), *extra])
    err = capsys.readouterr().err
    return rc, err


def _example():
    return json.loads(EXAMPLE.read_text())


@pytest.mark.parametrize("make,match", [
    (lambda: json.dumps(_example()).replace('"queue": 1.5', '"queue": ' + "9" * 400), "queue must be finite"),
    (lambda: '{"shape": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
    (lambda: {**_example(), "backend": ["fast"]}, "backend must be one of"),
    (lambda: {**_example(), "shape": {**_example()["shape"], "bits_per_value": 2**70}}, "bits_per_value"),
    (lambda: {**_example(), "shape": {**_example()["shape"], "colour": 1}}, "unknown fields in shape"),
])
def test_cli_hostile_documents(tmp_path, capsys, make, match):
    rc, err = _run_cli(tmp_path, capsys, make())
    assert rc == 2 and err.startswith("tsfa: error: ") and err.count("\n") == 1 and match in err, err


def test_cli_output_into_missing_directory(tmp_path, capsys):
    rc, err = _run_cli(tmp_path, capsys, _example(), "--output", str(tmp_path / "no" / "such" / "out.json"))
    assert rc == 2 and err.startswith("tsfa: error: cannot write --output") and err.count("\n") == 1


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=5)),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=12)


@settings(derandomize=True, deadline=None, max_examples=60, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(sorted(_example())), value=json_values)
def test_property_cli_random_documents(tmp_path_factory, capsys, key, value):
    doc = {**_example(), key: value}
    tmp = tmp_path_factory.mktemp("cli")
    p = tmp / "in.json"
    p.write_text(json.dumps(doc))
    rc = main(["allocate", "--input", str(p), "--output", str(tmp / "out.json")])
    err = capsys.readouterr().err
    assert rc in (0, 2)
    assert "Traceback" not in err
    if rc == 2:
        assert err.startswith("tsfa: error: ") and err.count("\n") == 1
    else:
        out = json.loads((tmp / "out.json").read_text())
        if out["status"] == "optimal":
            B = doc["total_bandwidth_hz"]
            assert sum(out["bandwidth_hz"]) <= B
            assert all(u is not None and u <= out["latency_s"] for u in out["upload_time_s"])


# -- entry points on tiny random instances -----------------------------------------------------
@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), B=st.sampled_from([1e-300, 1e-3, 1e6, 2e7, 1e300]),
       queue=st.sampled_from([0.0, 1.0, 1e6]), skip=st.booleans())
def test_property_allocate(seed, B, queue, skip):
    rng = np.random.default_rng(seed)
    shape = LoraShape((ModuleShape("q", 16, 16),), 3)
    k = int(rng.integers(1, 5))
    prof = np.sort(rng.uniform(0, 1, (k, 4)), axis=1)[:, ::-1]
    prob = RoundProblem(shape, 10 ** rng.uniform(3, 12, k), rng.uniform(0, 1, k), np.full(k, 1 / k), prof, queue, 1.0,
                        B, allow_skip=skip)
    a = allocate(prob)
    if a.success:
        assert math.isfinite(a.latency_s) and float(np.sum(a.bandwidth_hz)) <= B
        assert sum(a.bandwidth_hz.tolist()) <= B
        assert np.all(a.upload_time_s[a.keep > 0] <= a.latency_s)
    else:
        assert a.status is Status.INFEASIBLE and a.message


@SETTINGS
@given(state=st.dictionaries(st.sampled_from(["queue", "round", "latency_budget_s", "weight_v", "last_latency_s",
                                              "calibrating", "drift"]),
                             st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-5, 2**60),
                                       st.text(max_size=3)), max_size=7),
       lat=st.one_of(st.floats(), st.booleans(), st.integers(-3, 3)))
def test_property_online_state(state, lat):
    a = _allocator()
    before = a.state_dict()
    try:
        a.load_state_dict(state)
    except ValueError:
        assert a.state_dict() == before
    s2 = a.state_dict()
    try:
        a.observe(lat)
    except ValueError as exc:
        assert "latency_s" in str(exc) and a.state_dict() == s2
    assert math.isfinite(a.queue) and a.queue >= 0


def test_design_offline_tiny_with_a_time_budget_reaches_the_closed_form_bound():
    # old: the bound's per-round Python loop made rounds=None with a large budget hang
    from convergence import BoundConstants
    from convergence.calibration import make_predictor

    c = BoundConstants(step_size=0.05, local_steps=4, smoothness=10.0, product_smoothness=2.0, noise=1.0,
                       gradient_bound=1.0, pl=0.1, initial_gap=2.0, spectrum=[1.0, 0.5, 0.25, 0.1])
    predict = make_predictor(c, {"update_energy": 0.05, "covariance_sq": 0.0})
    out = predict(np.array([1, 2, 4] * 5), np.full(15, 0.5), np.full(15, 10**7))
    assert np.all(np.isfinite(out["total"]))


# -- found by a second adversarial pass ---------------------------------------------------------
def test_integer_grids_never_wrap():
    with pytest.raises(ValueError, match="magnitude"):
        tsfa.CandidateGrid((1, 2), (0.5, 1.0), rounds=1e20)
    with pytest.raises(ValueError, match="magnitude"):
        tsfa.CandidateGrid((1e20,), (1.0,))


@pytest.mark.parametrize("kw, name", [({"payload_bits": [np.nan, 1e6]}, "payload_bits"),
                                      ({"payload_bits": [-1e6, 1e6]}, "payload_bits"),
                                      ({"payload_bits": [True, True]}, "payload_bits"),
                                      ({"payload_bits": []}, "payload_bits"),
                                      ({"payload_bits": [10**400, 1]}, "payload_bits"),
                                      ({"snr_hz": [0.0, 1e7]}, "snr_hz"), ({"compute_s": [np.nan, 0]}, "compute_s"),
                                      ({"downlink_s": -1.0}, "downlink_s"), ({"snr_hz": [1e7] * 3}, "broadcast")])
def test_the_batch_kernel_validates_its_inputs(kw, name):
    args = {"payload_bits": [1e6, 1e6], "snr_hz": [1e7, 1e7], "compute_s": [0.0, 0.0], "downlink_s": 0.0, **kw}
    with pytest.raises(ValueError, match=name):
        min_latency_bandwidth_batch(args["payload_bits"], args["snr_hz"], args["compute_s"], 1e6,
                                    downlink_s=args["downlink_s"])


def test_a_fixed_choice_that_misses_the_cap_is_not_optimal():
    shape = LoraShape([ModuleShape("a", 8, 8), ModuleShape("b", 8, 8)], 4)
    ep = np.tile([1, 0.5, 0.2, 0.1, 0.0], (3, 1))
    ok = tsfa.FixedPolicy(shape, keep=2, total_bandwidth_hz=1e5).step([1e7, 2e7, 3e7], [0.01, 0.02, 0.03], ep)
    assert ok.status is Status.OPTIMAL
    capped = tsfa.FixedPolicy(shape, keep=2, total_bandwidth_hz=1e5, max_latency_s=1e-3).step(
        [1e7, 2e7, 3e7], [0.01, 0.02, 0.03], ep)
    assert capped.status is Status.INFEASIBLE and "max_latency_s" in capped.message
    with pytest.raises(ValueError, match="latency_s"):
        tsfa.FixedPolicy(shape, keep=2, total_bandwidth_hz=1e5).observe(float("nan"))


@pytest.mark.parametrize("args", [(4, float("nan")), (4, None), (0, 0.5), (-3, 0.5), (True, 0.5), ("4", 0.5),
                                  (4, 1 + 1j), (2**70, 0.5), (4, 1.5)])
def test_keep_from_ratio_validates(args):
    with pytest.raises(ValueError):
        tsfa.keep_from_ratio(*args)


def test_no_clients_is_a_value_error():
    shape = LoraShape([ModuleShape("a", 8, 8)], 4)
    alloc = OnlineAllocator(shape, latency_budget_s=1.0, weight_v=1.0, total_bandwidth_hz=1e6)
    with pytest.raises(ValueError, match="snr_hz"):
        alloc.step([], [], np.zeros((0, 5)))


@pytest.mark.parametrize("make", [
    lambda: LoraShape(None, 2), lambda: LoraShape(5, 2), lambda: LoraShape("abc", 2), lambda: LoraShape([("a", 4)], 2),
    lambda: tsfa.Cell().sample_clients(3, rng="abc"), lambda: tsfa.Cell().sample_clients(3, rng=1.5),
    lambda: OnlineAllocator(tsfa.minilm_l6_qv(4), latency_budget_s=1, weight_v=1, total_bandwidth_hz=1e6, min_keep=9),
    lambda: OnlineAllocator(tsfa.minilm_l6_qv(4), latency_budget_s=1, weight_v=1, total_bandwidth_hz=1e6,
                            backend="nope"),
    lambda: OnlineAllocator(tsfa.minilm_l6_qv(4), latency_budget_s=1, weight_v=1, total_bandwidth_hz=1e6,
                            allow_skip="no"),
])
def test_wrong_arguments_are_value_errors_at_construction(make):
    with pytest.raises(ValueError):
        make()


def test_policy_downlink_time_is_validated_when_set():
    from tsfa.allocator import FixedPolicy
    from tsfa.model import LoraShape, ModuleShape

    pol = FixedPolicy(LoraShape((ModuleShape("m", 8, 8),), 2), keep=1, total_bandwidth_hz=1e6, downlink_s=0.5)
    pol.downlink_s = 0.25
    assert pol.downlink_s == 0.25 and pol.problem([1e3], [0.1], [[1.0, 0.5, 0.0]]).downlink_s == 0.25
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="downlink_s"):
            pol.downlink_s = bad
