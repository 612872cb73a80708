import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tsfa import (
    LLAMA2_7B_CONFIG,
    Cell,
    LoraShape,
    ModuleShape,
    bandwidth_for_deadline,
    bandwidth_for_rate,
    llama_7b_qv,
    minilm_l6_qv,
    rate_bps,
    rate_cap_bps,
)

# ---------------------------------------------------------------- payloads (hand counts)


def test_minilm_payload_hand_count():
    shape = minilm_l6_qv(8)
    # 6 layers x {query, value}, each 384x384: one rank index = 12 * (384 + 384) values.
    assert shape.num_modules == 12
    assert shape.values_per_component == 12 * 768 == 9216
    assert shape.num_parameters == 8 * 9216
    # s = 1: 9216 values * 32 bit + 12 modules * 8-bit mask + 128-bit header.
    assert shape.payload_bits(1) == 9216 * 32 + 96 + 128 == 295_136
    assert shape.payload_bits(8) == 8 * 9216 * 32 + 96 + 128
    assert shape.payload_bits(0) == 0
    assert shape.downlink_bits == 8 * 9216 * 32
    assert shape.dense_payload_bits == shape.payload_bits(8)
    assert shape.modules[0].name == "encoder.layer.0.attention.self.query"


def test_payload_vectorised_and_bits_per_value():
    shape = minilm_l6_qv(4, bits_per_value=16, header_bits=0)
    keep = np.array([[0, 1], [2, 4]])
    bits = shape.payload_bits(keep)
    assert bits.shape == (2, 2) and bits.dtype == np.int64
    expected = np.where(keep > 0, keep * 9216 * 16 + 12 * 4, 0)
    np.testing.assert_array_equal(bits, expected)


def test_llama_7b_shapes():
    shape = llama_7b_qv(16)
    assert shape.num_modules == 64
    assert shape.values_per_component == 64 * 8192
    assert shape.modules[1].name == "model.layers.0.self_attn.v_proj"
    # 16 * 524288 * 32 + 64*16 + 128 bits
    assert shape.dense_payload_bits == 16 * 524288 * 32 + 1024 + 128


def test_gqa_config_shapes():
    cfg = dict(LLAMA2_7B_CONFIG, num_key_value_heads=8)  # Mistral-7B-like
    shape = LoraShape.from_config(cfg, 8, targets=("q", "k", "v", "o"))
    by_name = {m.name: m for m in shape.modules}
    assert by_name["model.layers.0.self_attn.v_proj"] == ModuleShape("model.layers.0.self_attn.v_proj", 1024, 4096)
    assert by_name["model.layers.0.self_attn.o_proj"].out_features == 4096


@pytest.mark.parametrize("keep", [-1, 9, 1.5, [0, 10]])
def test_payload_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        minilm_l6_qv(8).payload_bits(keep)


def test_shape_validation_names_argument():
    with pytest.raises(ValueError, match="rank"):
        LoraShape((ModuleShape("a", 4, 4),), 0)
    with pytest.raises(ValueError, match="rank = 5 exceeds module 'a'"):
        LoraShape((ModuleShape("a", 4, 6),), 5)
    with pytest.raises(ValueError, match="out_features"):
        ModuleShape("a", 0, 3)
    with pytest.raises(ValueError, match="unique"):
        LoraShape((ModuleShape("a", 4, 4), ModuleShape("a", 4, 4)), 2)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LoraShape.from_config({"hidden_size": 8, "num_attention_heads": 2}, 2)
    with pytest.raises(ValueError, match="targets"):
        LoraShape.from_config(LLAMA2_7B_CONFIG, 2, targets=("x",))


# ---------------------------------------------------------------- rate


def test_rate_limits():
    c = 3e7
    assert rate_bps(0.0, c) == 0.0
    assert rate_bps(np.inf, c) == pytest.approx(c / math.log(2))
    assert rate_bps(1e15, c) == pytest.approx(rate_cap_bps(c), rel=1e-7)
    assert rate_bps(1e6, c) == pytest.approx(1e6 * math.log2(1 + 30))


@given(
    c=st.floats(1e3, 1e12),
    b=st.floats(1e2, 1e9),
    scale=st.floats(1.01, 10.0),
)
def test_rate_monotone_concave(c, b, scale):
    b2, b3 = b * scale, b * scale * scale
    r1, r2, r3 = rate_bps(np.array([b, b2, b3]), c)
    assert r1 < r2 < r3 <= c / math.log(2) * (1 + 1e-12)
    # concavity: slope on [b, b2] >= slope on [b2, b3]
    assert (r2 - r1) / (b2 - b) >= (r3 - r2) / (b3 - b2) * (1 - 1e-9)


@given(c=st.floats(1e3, 1e13), b=st.floats(1.0, 1e10))
def test_bandwidth_for_rate_inverts_rate(c, b):
    r = rate_bps(b, c)
    if r >= 0.999999 * c / math.log(2):  # too close to the cap: ill-conditioned inverse
        return
    assert bandwidth_for_rate(r, c) == pytest.approx(b, rel=1e-8)


def test_bandwidth_for_rate_edges():
    c = 1e7
    cap = c / math.log(2)
    out = bandwidth_for_rate(np.array([0.0, cap, 2 * cap, 0.5 * cap]), c)
    assert out[0] == 0 and np.isinf(out[1]) and np.isinf(out[2]) and np.isfinite(out[3])
    # deadline form: impossible slack -> inf, zero payload -> 0
    b = bandwidth_for_deadline([1e6, 0.0, 1e6], [1e7, 1e7, 1e7], [0.5, 0.5, 2.0], 1.0)
    assert b[0] > 0 and b[1] == 0 and np.isinf(b[2])


# ---------------------------------------------------------------- cell


def test_path_loss_reference():
    cell = Cell()
    assert cell.path_loss_db(1000.0) == pytest.approx(128.1)
    assert cell.path_loss_db(100.0) == pytest.approx(128.1 - 37.6)
    assert cell.noise_psd_w_hz == pytest.approx(10 ** (-20.4))


def test_sample_clients_reproducible_and_in_cell():
    cell = Cell()
    a = cell.sample_clients(500, rng=7)
    b = cell.sample_clients(500, rng=7)
    np.testing.assert_array_equal(a.large_scale_gain, b.large_scale_gain)
    assert np.all((a.distance_m >= cell.min_distance_m) & (a.distance_m <= cell.radius_m))
    lo, hi = cell.compute_flops_per_s_range
    assert np.all((a.compute_flops_per_s >= lo) & (a.compute_flops_per_s <= hi))
    with pytest.raises(ValueError):
        a.distance_m[0] = 1.0  # read-only


def test_uniform_in_area_and_shadowing_monte_carlo():
    cell = Cell()
    n = 200_000
    cl = cell.sample_clients(n, rng=1)
    p_inner = (250**2 - 10**2) / (500**2 - 10**2)
    se = math.sqrt(p_inner * (1 - p_inner) / n)
    assert abs(np.mean(cl.distance_m <= 250) - p_inner) < 4 * se
    assert abs(np.std(cl.shadowing_db) - 8.0) < 0.05
    assert abs(np.mean(cl.shadowing_db)) < 4 * 8.0 / math.sqrt(n)


def test_rayleigh_fading_monte_carlo():
    cell = Cell()
    cl = cell.sample_clients(4, rng=0)
    snr = cell.sample_snr_hz(cl, rng=3, rounds=100_000)
    h2 = snr / cell.mean_snr_hz(cl)
    assert h2.shape == (100_000, 4)
    # |h|^2 ~ Exp(1): mean 1, P(|h|^2 > 1) = e^-1, per client.
    np.testing.assert_allclose(h2.mean(axis=0), 1.0, atol=4 / math.sqrt(100_000))
    np.testing.assert_allclose((h2 > 1).mean(axis=0), math.exp(-1), atol=0.006)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"total_bandwidth_hz": -1.0}, "total_bandwidth_hz"),
        ({"transmit_power_w": float("nan")}, "transmit_power_w"),
        ({"radius_m": float("inf")}, "radius_m"),
        ({"shadowing_std_db": -2.0}, "shadowing_std_db"),
        ({"min_distance_m": 600.0}, "min_distance_m"),
    ],
)
def test_cell_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Cell(**kwargs)


def test_clients_compute_time():
    cl = Cell().sample_clients(3, rng=0)
    t = cl.compute_time_s(1e12)
    np.testing.assert_allclose(t, 1e12 / cl.compute_flops_per_s)
    with pytest.raises(ValueError, match="num_clients"):
        Cell().sample_clients(0)


def test_participation_divergence_closed_forms_and_invariances():
    from tsfa import participation_divergence as chi2

    assert chi2(np.ones(5)) == pytest.approx(0.0, abs=1e-12)
    assert chi2(np.full(5, 0.2)) == pytest.approx(0.0, abs=1e-12)  # rare but even participation: no bias
    assert chi2([1.0, 0.0, 0.0, 0.0]) == pytest.approx(3.0)  # one client carries everything: K − 1
    assert chi2([0.0, 0.0]) == pytest.approx(1.0)  # nobody: the largest value the clients allow
    p = np.array([0.2, 0.8])
    assert chi2([1.0, 0.5], p) == pytest.approx((1 / 3) ** 2 / 0.2 + (2 / 3) ** 2 / 0.8 - 1)
    assert chi2([1.0, 1.0, 0.3], [0.5, 0.5, 0.0]) == pytest.approx(0.0, abs=1e-12)  # no data: no weight
    rng = np.random.default_rng(0)
    pi = rng.uniform(0.05, 1, (50, 6))
    w = rng.uniform(0.1, 1, 6)
    out = chi2(pi, w)
    assert out.shape == (50,) and np.all(out >= 0)
    np.testing.assert_allclose(out, chi2(pi * 0.5, w))  # a common factor is not a bias
    with pytest.raises(ValueError, match="shares"):
        chi2([1.2, 0.5])
    with pytest.raises(ValueError, match="data_weight"):
        chi2([1.0, 0.5], [1.0, 1.0, 1.0])


def test_sent_share_is_the_energy_outside_the_largest_keep():
    from tsfa import sent_share

    profiles = np.array([[1.0, 0.5, 0.2, 0.0], [1.0, 0.7, 0.3, 0.1]])
    mean = profiles.mean(axis=0)
    assert sent_share(mean, 2) == pytest.approx(1 - 0.25) and sent_share(mean, 0) == 0.0
    assert sent_share(mean, 3) == pytest.approx(0.95)
    assert sent_share(np.array([1.0, 1.2]), 1) == 0.0  # clipped to [0, 1]
    with pytest.raises(ValueError, match="max_keep must lie in 0..3"):
        sent_share(mean, 4)
    with pytest.raises(ValueError, match="mean_profile"):
        sent_share([1.0], 0)
