"""int8/int4 payloads: bit-exact round trips, 8·len(bytes) = payload_bits, unbiased stochastic
rounding, the rounding-variance bound, and hostile payloads."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soft import WireFormatError, decode, sparsify
from soft.quantise import decode_quantised, levels, quantise
from tsfa import LoraShape, ModuleShape, minilm_l6_qv

from .test_soft import rand_factors


def update(seed=0, shapes=((24, 20), (16, 30)), r=6, keep=3, scale=1.0):
    old = rand_factors(seed, shapes, r, dtype=torch.float32)
    new = {k: (A + 0.1 * scale * torch.randn_like(A), B + 0.1 * scale * torch.randn_like(B))
           for k, (A, B) in old.items()}
    return sparsify(old, new, keep)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([8, 4]), keep=st.integers(1, 5), seed=st.integers(0, 10_000),
       shapes=st.sampled_from([((24, 20), (16, 30)), ((5, 7),), ((9, 3), (3, 9), (4, 4))]))
def test_round_trip_is_bit_exact_and_the_length_is_payload_bits(bits, keep, seed, shapes):
    torch.manual_seed(seed)
    u = update(seed, shapes, r=3 if min(min(s) for s in shapes) < 6 else 6, keep=min(keep, 3))
    q = quantise(u, bits, torch.Generator().manual_seed(seed))
    data = q.encode()
    assert 8 * len(data) == q.payload_bits == q.shape.payload_bits(q.keep)
    back = decode_quantised(data, u.shape)
    assert back.encode() == data
    for a, b in zip(back.codes_b + back.codes_a + back.scale_b + back.scale_a,
                    q.codes_b + q.codes_a + q.scale_b + q.scale_a, strict=True):
        assert torch.equal(a, b)
    deq = back.dequantised()
    lv = levels(bits)
    for db, x, sb in zip(deq.delta_b, u.delta_b, q.scale_b, strict=True):
        assert torch.all((db - x).abs() <= sb[None, :] * (1 + 1e-6))  # within one step of the value
        assert torch.all(sb * lv >= x.abs().amax(dim=0) * (1 - 1e-6))


def test_payload_bits_at_every_precision():
    shape = LoraShape((ModuleShape("q", 24, 20), ModuleShape("v", 16, 30)), 6)
    M, L = shape.values_per_component, shape.num_modules
    for q in (32, 16, 8, 4):
        s = LoraShape(shape.modules, 6, q)
        bits = s.payload_bits(np.arange(7))
        assert bits[0] == 0
        values = np.arange(1, 7) * M * q
        scales = np.arange(1, 7) * 64 * L if q < 16 else 0
        np.testing.assert_array_equal(bits[1:], 8 * -(-values // 8) + scales + s.mask_bits + s.header_bits)
    # on MiniLM's q, v modules (384 × 384) int8 is a quarter of fp32 plus 2·32/(2·384·8) = 1 % of scales,
    # and int4 an eighth plus 2 %
    mini = minilm_l6_qv(rank=8)
    fp32 = LoraShape(mini.modules, 8, 32).payload_bits(4)
    assert LoraShape(mini.modules, 8, 8).payload_bits(4) / fp32 == pytest.approx(0.25 * 1.0104, rel=0.01)
    assert LoraShape(mini.modules, 8, 4).payload_bits(4) / fp32 == pytest.approx(0.125 * 1.0208, rel=0.01)


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_is_unbiased_and_within_its_variance_bound(bits):
    u = update(1)
    draws = 400
    gen = torch.Generator().manual_seed(7)
    total = [torch.zeros_like(x, dtype=torch.float64) for x in u.delta_b]
    sq = 0.0
    bound = None
    for _ in range(draws):
        q = quantise(u, bits, gen)
        d = q.dequantised()
        for t, x in zip(total, d.delta_b, strict=True):
            t += x.double()
        sq += sum(float(((x.double() - y.double()) ** 2).sum()) for x, y in
                  zip(d.delta_b + d.delta_a, u.delta_b + u.delta_a, strict=True))
        bound = q.rounding_variance()
    for t, x, s in zip(total, u.delta_b, quantise(u, bits).scale_b, strict=True):
        # the mean of 400 draws sits within 5 standard errors (σ ≤ Δ/2 per value) of the value
        assert torch.all((t / draws - x.double()).abs() <= 5 * (s.double()[None, :] / 2) / np.sqrt(draws) + 1e-9)
    assert sq / draws <= bound * 1.05  # the bound from the scales holds on average
    assert sq / draws >= 0.3 * bound  # and is not vacuous


def test_same_generator_state_rounds_the_same_way():
    u = update(2)
    a = quantise(u, 4, torch.Generator().manual_seed(11)).encode()
    b = quantise(u, 4, torch.Generator().manual_seed(11)).encode()
    c = quantise(u, 4, torch.Generator().manual_seed(12)).encode()
    assert a == b and a != c


def test_hostile_quantised_payloads_are_refused():
    u = update(3)
    q = quantise(u, 4, torch.Generator().manual_seed(0))
    data = bytearray(q.encode())
    with pytest.raises(WireFormatError, match="checksum"):
        decode_quantised(bytes(data[:-1]) + bytes([data[-1] ^ 1]), u.shape)
    with pytest.raises(WireFormatError, match="length"):
        decode_quantised(bytes(data[:-1]), u.shape)
    with pytest.raises(WireFormatError, match="quantised"):
        decode_quantised(u.encode(), u.shape)  # a float payload
    with pytest.raises(WireFormatError):
        decode(bytes(data), u.shape)  # the float decoder does not read int codes
    with pytest.raises(ValueError, match="bits"):
        quantise(u, 6)


def test_rotated_residual_keeps_the_product_through_reorthogonalisation():
    """(B + e_B)(A + e_A) is unchanged when the factors are re-orthogonalised and the residual
    is re-expressed with the same change of basis."""
    from soft import reorthogonalize_factors
    from soft.feedback import basis_change, rotate_residuals

    before = rand_factors(5, dtype=torch.float64)
    after = reorthogonalize_factors(before)
    g = torch.Generator().manual_seed(1)
    res = {n: (0.1 * torch.randn(A.shape, generator=g, dtype=torch.float64),
               0.1 * torch.randn(B.shape, generator=g, dtype=torch.float64)) for n, (A, B) in before.items()}
    (rot,) = rotate_residuals([res], before, after)
    for n, (A, B) in before.items():
        A2, B2 = after[n]
        M, Minv = basis_change(before, after)[n]
        assert torch.allclose(M @ A, A2, atol=1e-9) and torch.allclose(B @ Minv, B2, atol=1e-9)
        assert torch.allclose((B + res[n][1]) @ (A + res[n][0]), (B2 + rot[n][1]) @ (A2 + rot[n][0]), atol=1e-9)
    assert rotate_residuals([None], before, after) == [None]


def _pair(seed=0, shapes=((24, 20), (16, 30)), r=6, scale=1.0):
    old = rand_factors(seed, shapes, r, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    new = {k: (A + 0.1 * scale * torch.randn(A.shape, generator=gen), B + 0.1 * scale * torch.randn(B.shape,
                                                                                                    generator=gen))
           for k, (A, B) in old.items()}
    return old, new


def _product_error(old, exact, noisy) -> float:
    """Σ_ℓ ‖B̃Ã − B'A'‖² between two applied updates, in float64."""
    total = 0.0
    for n in old:
        (A1, B1), (A2, B2) = exact[n], noisy[n]
        total += float(((B2.double() @ A2.double() - B1.double() @ A1.double()) ** 2).sum())
    return total


@pytest.mark.parametrize("scope", ["module", "global"])
def test_rounding_profile_shape_and_order(scope):
    from soft.quantise import rounding_profile

    old, new = _pair(shapes=((20, 20), (20, 20)))
    v = rounding_profile(old, new, (32, 16, 8, 4), scope=scope)
    assert v.shape == (7, 4)
    assert np.all(v[0] == 0) and np.all(v[:, 0] == 0)  # nothing sent; float32 is the reference
    assert np.all(np.diff(v, axis=0) >= 0)  # more components, more rounding
    assert np.all(v[1:, 1] < v[1:, 2]) and np.all(v[1:, 2] < v[1:, 3])  # fewer bits, more rounding
    # int4 against int8: the 1/L² term dominates, so the ratio is about (127/7)²
    assert np.allclose(v[1:, 3] / v[1:, 2], (127 / 7) ** 2, rtol=0.05)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("keep", [1, 4])
def test_rounding_profile_bounds_the_monte_carlo_product_error(bits, keep):
    """The mean over 300 seeded roundings of the product error lies below v(s, q) (a bound:
    f(1 − f) ≤ 1/4) and above half of it (f uniform gives 1/6 against 1/4 on average)."""
    from soft.quantise import rounding_profile

    old, new = _pair(seed=3)
    upd = sparsify(old, new, keep)
    exact = upd.apply_to(old)
    v = rounding_profile(old, new, (bits,))[keep, 0]
    gen = torch.Generator().manual_seed(11)
    mc = np.mean([_product_error(old, exact, quantise(upd, bits, gen).dequantised().apply_to(old))
                  for _ in range(300)])
    assert 0.5 * v <= mc <= v * 1.05, (mc, v)


def test_rounding_profile_bounds_float16():
    from soft.quantise import rounding_profile

    old, new = _pair(seed=5)
    for keep in (1, 3, 6):
        exact = sparsify(old, new, keep).apply_to(old)
        half = sparsify(old, new, keep, dtype=torch.float16)
        err = _product_error(old, exact, half.apply_to(old))
        assert 0 < err <= rounding_profile(old, new, (16,))[keep, 0] * 1.01


def test_rounding_profile_refuses_bad_arguments():
    from soft.quantise import rounding_profile

    old, new = _pair()
    with pytest.raises(ValueError, match="value_bits"):
        rounding_profile(old, new, (8, 12))
    with pytest.raises(ValueError, match="value_bits"):
        rounding_profile(old, new, ())
    with pytest.raises(ValueError, match="scope"):
        rounding_profile(old, new, (8,), scope="layer")
