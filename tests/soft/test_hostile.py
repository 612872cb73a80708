"""Hostile and out-of-range inputs to the SOFT codecs and the server: non-finite values,
float16 overflow, malformed updates, a mutation fuzz of the wire formats, and the norm
helper a server uses to screen updates."""

import hashlib
import math
import struct
import zlib

import numpy as np
import pytest
import torch

import soft
from soft import RankSparseUpdate, WireFormatError, aggregate, decode, shape_of, sparsify, update_norm
from soft.baselines import (
    TopKUpdate,
    decode_topk,
    ffa_update,
    random_components,
    svd_truncation_qr,
    topk_elementwise,
)

F16_MAX = 65504.0


def rand_factors(seed, shapes=((24, 20), (16, 30)), r=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": (torch.randn(r, n, generator=g, dtype=dtype), torch.randn(m, r, generator=g, dtype=dtype))
            for i, (m, n) in enumerate(shapes)}


def moved(old, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: (A + scale * torch.randn(A.shape, generator=g, dtype=A.dtype),
                B + scale * torch.randn(B.shape, generator=g, dtype=B.dtype)) for k, (A, B) in old.items()}


def recrc(data) -> bytes:
    """The payload with its CRC-32 (bytes 12..15, over bytes 0..11 and 16..) recomputed.

    SOFT's and the top-k codec's headers put the CRC in the same place."""
    b = bytearray(data)
    b[12:16] = struct.pack("<I", zlib.crc32(bytes(b[16:]), zlib.crc32(bytes(b[:12]))))
    return bytes(b)


def nonfinite_bytes(kind: str, q: int) -> bytes:
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[kind]
    return np.array([value], dtype="<f2" if q == 2 else "<f4").tobytes()


def soft_value_offset(shape, module: int, component: int, part: str, keep: int, q: int) -> int:
    """Byte offset of the first value of Δb/Δa of the ``component``-th kept component."""
    off = 16 + shape.mask_bits // 8
    for ell, mod in enumerate(shape.modules):
        m, n = mod.out_features, mod.in_features
        if ell == module:
            return off + q * (component * m if part == "b" else keep * m + component * n)
        off += q * keep * (m + n)
    raise AssertionError(module)


# --- byte identity for finite, in-range inputs -------------------------------------------------


def golden_digest():
    h = hashlib.sha256()
    for seed, shapes, r in ((0, ((24, 20), (16, 30)), 6), (1, ((12, 12),) * 3, 4), (2, ((9, 7),), 3)):
        g = torch.Generator().manual_seed(seed)
        old = {f"m{i}": (torch.randn(r, n, generator=g), torch.randn(m, r, generator=g))
               for i, (m, n) in enumerate(shapes)}
        new = {k: (A + 0.3 * torch.randn(A.shape, generator=torch.Generator().manual_seed(seed + 100)),
                   B + 0.3 * torch.randn(B.shape, generator=torch.Generator().manual_seed(seed + 200)))
               for k, (A, B) in old.items()}
        for dtype in (torch.float32, torch.float16):
            for keep in range(0, r + 1):
                h.update(sparsify(old, new, keep, dtype=dtype).encode())
                if len(set(shapes)) == 1:
                    h.update(sparsify(old, new, keep, dtype=dtype, scope="global").encode())
                h.update(random_components(old, new, keep, seed, dtype=dtype).encode())
            for keep in (1, r // 2 + 1):
                bits = 32 if dtype == torch.float32 else 16
                h.update(topk_elementwise(old, new, keep, bits).encode())
                h.update(topk_elementwise(old, new, keep, bits, joint=True).encode())
    return h.hexdigest()


def test_payload_bytes_unchanged_by_the_hardening():
    # recorded with the codecs before the finiteness / range checks were added
    assert golden_digest() == "c9c535478494fb0f53d5abb4c59fcdd1c5c59baee0239efa1102d7a97c19ec79"


# --- finding 1: non-finite values with a correct CRC ------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("module,part", [(0, "b"), (1, "a")])
def test_decode_rejects_nonfinite_values_with_a_valid_crc(dtype, kind, module, part):
    old = rand_factors(1)
    upd = sparsify(old, moved(old, 2), 2, dtype=dtype)
    q = 2 if dtype == torch.float16 else 4
    shape = shape_of(old, 8 * q)
    data = bytearray(upd.encode())
    off = soft_value_offset(shape, module, 1, part, 2, q) + q  # second value of the second kept component
    data[off:off + q] = nonfinite_bytes(kind, q)
    bad = recrc(data)
    comp = int(upd.indices[module][1])
    with pytest.raises(WireFormatError, match="non-finite") as err:
        decode(bad, shape)
    msg = str(err.value)
    assert f"'m{module}'" in msg and f"component {comp}" in msg and f"Δ{part}" in msg and "non-finite" in msg


def test_encode_refuses_nonfinite_values():
    old = rand_factors(3)
    upd = sparsify(old, moved(old, 4), 2)
    db = upd.delta_b[1].clone()
    db[3, 1] = float("nan")
    nan_upd = RankSparseUpdate(upd.shape, 2, upd.indices, (upd.delta_b[0], db), upd.delta_a)
    with pytest.raises(ValueError, match=rf"'m1'.*component {int(upd.indices[1][1])}.*Δb.*non-finite"):
        nan_upd.encode()


def test_aggregate_rejects_nonfinite_updates_and_factors():
    old = rand_factors(5)
    good = sparsify(old, moved(old, 6), 2)
    da = good.delta_a[1].clone()
    da[0, 2] = float("inf")
    bad = RankSparseUpdate(good.shape, 2, good.indices, good.delta_b, (good.delta_a[0], da))
    with pytest.raises(ValueError, match=r"updates\[1\].*'m1'.*Δa.*non-finite"):
        aggregate(old, [good, bad], [1.0, 1.0])
    # a zero weight does not make a NaN update acceptable
    with pytest.raises(ValueError, match=r"updates\[1\]"):
        aggregate(old, [good, bad], [1.0, 0.0])
    nan_global = {k: (A.clone(), B.clone()) for k, (A, B) in old.items()}
    nan_global["m0"][1][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'m0'.*non-finite"):
        aggregate(nan_global, [good], [1.0])


def test_aggregate_rejects_malformed_updates():
    old = rand_factors(7)
    good = sparsify(old, moved(old, 8), 2)
    out_of_range = (good.indices[0], torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"updates\[0\].*'m1'.*indices"):
        aggregate(old, [RankSparseUpdate(good.shape, 2, out_of_range, good.delta_b, good.delta_a)], [1.0])
    wrong = (good.delta_b[0][:-1], good.delta_b[1])
    with pytest.raises(ValueError, match=r"updates\[0\].*'m0'.*Δb"):
        aggregate(old, [RankSparseUpdate(good.shape, 2, good.indices, wrong, good.delta_a)], [1.0])


def test_aggregate_rejects_an_overflowing_result():
    g = {"m": (torch.full((2, 5), 3e38), torch.zeros(6, 2))}
    u = RankSparseUpdate(shape_of(g), 1, (torch.tensor([0]),), (torch.zeros(6, 1),), (torch.full((1, 5), 3e38),))
    with pytest.raises(ValueError, match=r"'m'.*overflow"):
        aggregate(g, [u], [1.0])


# --- finding 2: float16 range --------------------------------------------------------------------


def test_fp16_refuses_values_outside_its_range():
    old = rand_factors(9, r=4)
    new = {k: (A.clone(), B.clone()) for k, (A, B) in old.items()}
    new["m1"][0][2, 3] += 7e4  # Δa of component 2 of m1: beyond float16
    upd32 = sparsify(old, new, 4)  # float32 carries it
    assert float(upd32.delta_a[1].abs().max()) > F16_MAX
    with pytest.raises(ValueError, match=r"'m1'.*component 2.*Δa.*float16"):
        sparsify(old, new, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"'m1'.*component 2.*Δa.*float16"):
        random_components(old, new, 4, 0, dtype=torch.float16)
    # an update built by hand with float32 increments and a float16 wire type: refused at encode
    hand = RankSparseUpdate(shape_of(old, 16), 4, upd32.indices, upd32.delta_b, upd32.delta_a, torch.float16)
    with pytest.raises(ValueError, match=r"'m1'.*component 2.*Δa.*float16"):
        hand.encode()


def test_fp16_boundary_rounds_like_float16():
    old = {"m": (torch.zeros(2, 5), torch.zeros(6, 2))}
    ok = {"m": (torch.zeros(2, 5), torch.zeros(6, 2))}
    ok["m"][1][0, 0] = 65519.0  # rounds to 65504, the largest finite float16
    upd = sparsify(old, ok, 1, dtype=torch.float16)
    assert float(upd.delta_b[0].abs().max()) == F16_MAX
    assert decode(upd.encode(), shape_of(old, 16)).delta_b[0][0, 0] == F16_MAX
    over = {"m": (torch.zeros(2, 5), torch.zeros(6, 2))}
    over["m"][1][0, 0] = 65520.0  # rounds to inf
    with pytest.raises(ValueError, match=r"'m'.*component 0.*Δb.*float16"):
        sparsify(old, over, 1, dtype=torch.float16)


def test_float32_increment_overflow_is_refused():
    old = {"m": (torch.full((2, 5), -3e38), torch.zeros(6, 2))}
    new = {"m": (torch.full((2, 5), 3e38), torch.ones(6, 2))}
    with pytest.raises(ValueError, match=r"'m'.*component 0.*Δa"):
        sparsify(old, new, 1)
    with pytest.raises(ValueError, match=r"'m'.*Δa"):
        random_components(old, new, 1, 0)


# --- finding 3: the baselines -------------------------------------------------------------------


def test_topk_refuses_out_of_range_and_nonfinite_values():
    old = rand_factors(10, r=4)
    new = {k: (A.clone(), B.clone()) for k, (A, B) in old.items()}
    new["m1"][1][3, 1] += 1e5
    with pytest.raises(ValueError, match=r"'m1'.*ΔB.*float16"):
        topk_elementwise(old, new, 1, bits_per_value=16)
    tk = topk_elementwise(old, new, 1)  # float32 carries it
    hand = TopKUpdate(tk.delta_a, tk.delta_b, tk.k, tk.bits, tk.coding, torch.float16)
    with pytest.raises(ValueError, match=r"ΔB.*float16"):
        hand.encode()
    nan_b = [d.clone() for d in tk.delta_b]
    nan_b[0][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"ΔB.*non-finite"):
        TopKUpdate(tk.delta_a, nan_b, tk.k, tk.bits, tk.coding, torch.float32).encode()


@pytest.mark.parametrize("bits", [32, 16])
@pytest.mark.parametrize("shapes,r,keep", [(((24, 20), (16, 30)), 6, 1), (((400, 300),), 16, 1)])
def test_decode_topk_rejects_nonfinite_values_with_a_valid_crc(bits, shapes, r, keep):
    old = rand_factors(11, shapes, r)
    tk = topk_elementwise(old, moved(old, 12), keep, bits_per_value=bits)
    data = bytearray(tk.encode())
    q = bits // 8
    data[-q:] = nonfinite_bytes("nan", q)  # the value at the last position: in m_last's ΔB
    with pytest.raises(WireFormatError, match=rf"'m{len(shapes) - 1}'.*ΔB.*non-finite"):
        decode_topk(recrc(data), shape_of(old, bits))


def test_ffa_update_refuses_overflow():
    old = {"m": (torch.zeros(2, 5), torch.full((6, 2), -3e38))}
    new = {"m": (torch.zeros(2, 5), torch.full((6, 2), 3e38))}
    with pytest.raises(ValueError, match=r"'m'.*ΔB.*non-finite"):
        ffa_update(old, new)
    big = {"m": (torch.zeros(2, 5), torch.full((6, 2), 7e4))}
    with pytest.raises(ValueError, match=r"'m'.*ΔB.*float16"):
        ffa_update({"m": (torch.zeros(2, 5), torch.zeros(6, 2))}, big, bits_per_value=16)
    db, bits = ffa_update({"m": (torch.zeros(2, 5), torch.zeros(6, 2))}, big)  # float32: fine
    assert float(db[0].max()) == 7e4 and bits == 2 * 6 * 32 + 128


def test_svd_truncation_qr_overflow_names_the_module():
    g = torch.Generator().manual_seed(0)
    old = {"ok": (torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g,
                                                                                 dtype=torch.float64)),
           "huge": (1e200 * torch.randn(3, 8, generator=g, dtype=torch.float64),
                    1e200 * torch.randn(7, 3, generator=g, dtype=torch.float64))}
    new = {k: (2 * A, 2 * B) for k, (A, B) in old.items()}
    with pytest.raises(ValueError, match=r"'huge'.*overflow"):
        svd_truncation_qr(old, new, 1)


# --- finding 6: the norm a server screens updates with -----------------------------------------


def test_update_norm_equals_the_dense_norm_of_the_increments():
    old = rand_factors(13, dtype=torch.float64)
    for dtype in (torch.float32, torch.float16):
        for scope, shapes in (("module", ((24, 20), (16, 30))), ("global", ((12, 12),) * 3)):
            o = rand_factors(13, shapes, 4, dtype=torch.float64)
            upd = sparsify(o, moved(o, 14), 2, dtype=dtype, scope=scope)
            zero = {k: (torch.zeros_like(A), torch.zeros_like(B)) for k, (A, B) in o.items()}
            dense = upd.apply_to(zero)  # ΔA, ΔB with the unsent components 0
            ref = math.sqrt(sum(float(A.double().pow(2).sum() + B.double().pow(2).sum()) for A, B in dense.values()))
            assert update_norm(upd) == pytest.approx(ref, rel=1e-12)
            # the server's view (decoded) is the client's
            assert update_norm(decode(upd.encode(), shape_of(o, 32 if dtype == torch.float32 else 16))) == \
                update_norm(upd)
            # and it is what the update adds to the global factors
            applied = upd.apply_to(o)
            diff = math.sqrt(sum(float((applied[k][0] - o[k][0]).pow(2).sum() + (applied[k][1] - o[k][1]).pow(2).sum())
                                 for k in o))
            assert update_norm(upd) == pytest.approx(diff, rel=1e-9)
    tk = topk_elementwise(old, moved(old, 15), 2)
    ref = math.sqrt(sum(float(d.double().pow(2).sum()) for d in tk.delta_a + tk.delta_b))
    assert update_norm(tk) == pytest.approx(ref, rel=1e-12)
    assert update_norm(sparsify(old, old, 3)) == 0.0


def test_update_norm_is_exact_at_extreme_magnitudes_and_refuses_nonfinite():
    idx = (torch.tensor([0]),)
    huge = RankSparseUpdate(shape_of({"m": (torch.zeros(1, 2), torch.zeros(2, 1))}), 1, idx,
                            (torch.full((2, 1), 3e38),), (torch.full((1, 2), 3e38),))
    assert update_norm(huge) == pytest.approx(2 * 3e38, rel=1e-6)  # no overflow of Σx²
    tiny = RankSparseUpdate(huge.shape, 1, idx, (torch.full((2, 1), 1e-40),), (torch.zeros(1, 2),))
    assert update_norm(tiny) == pytest.approx(math.sqrt(2) * float(torch.tensor(1e-40)), rel=1e-6)
    nan = RankSparseUpdate(huge.shape, 1, idx, (torch.tensor([[float("nan")], [0.0]]),), (torch.zeros(1, 2),))
    with pytest.raises(ValueError, match=r"'m'.*non-finite"):
        update_norm(nan)  # a NaN norm would pass any "norm > c · median" test
    with pytest.raises(ValueError, match="update must be"):
        update_norm({"m": (torch.zeros(1, 2), torch.zeros(2, 1))})


# --- finding 4: mutation fuzz of the wire formats -------------------------------------------------

_SOFT_FIELDS = {"magic": (0, "2s"), "version": (2, "B"), "dtype": (3, "B"), "rank": (4, "H"), "modules": (6, "H"),
                "keep": (8, "H"), "tag": (10, "H")}
_TOPK_FIELDS = {"magic": (0, "2s"), "version": (2, "B"), "dtype": (3, "B"), "coding": (4, "B"), "pad": (5, "B"),
                "tensors": (6, "H"), "k": (8, "I")}


def soft_corpus():
    out = []
    for seed, shapes, r, scope in ((20, ((24, 20), (16, 30)), 6, "module"), (21, ((9, 7),), 3, "module"),
                                   (22, ((12, 12),) * 3, 4, "global"), (23, ((10, 6), (8, 8)), 5, "module")):
        old = rand_factors(seed, shapes, r)
        new = moved(old, seed + 50)
        if scope == "global":  # one module moves much more: uneven counts per module
            new["m0"] = (old["m0"][0] + 3 * (new["m0"][0] - old["m0"][0]), old["m0"][1] + 3 * (new["m0"][1]
                                                                                              - old["m0"][1]))
        for dtype in (torch.float32, torch.float16):
            shape = shape_of(old, 32 if dtype == torch.float32 else 16)
            for keep in sorted({1, (r + 1) // 2, r}):
                upd = sparsify(old, new, keep, dtype=dtype, scope=scope)
                out.append((upd.encode(), shape, 16 + shape.mask_bits // 8, 2 if dtype == torch.float16 else 4))
    return out


def topk_corpus():
    out = []
    for seed, shapes, r, keep in ((30, ((24, 20), (16, 30)), 6, 1), (31, ((24, 20), (16, 30)), 6, 3),
                                  (32, ((400, 300),), 16, 1), (33, ((9, 7),), 3, 2)):
        old = rand_factors(seed, shapes, r)
        new = moved(old, seed + 50)
        for bits in (32, 16):
            for joint in (False, True):
                tk = topk_elementwise(old, new, keep, bits, joint=joint)
                out.append((tk.encode(), shape_of(old, bits), len(tk.encode()) - tk.k * bits // 8, bits // 8))
    return out


def mutate(rng, data: bytes, values_at: int, q: int, fields: dict):
    """One mutation: (kind, bytes, must_fail). ``must_fail``: a CRC-protected change (CRC-32
    detects every error of ≤ 3 bits and, with this fixed seed, every random change here)."""
    b = bytearray(data)
    kind = rng.choice(["flip", "insert", "delete", "truncate", "random", "field", "flip_crc", "prefix_crc",
                       "move_crc", "nonfinite", "random_values_crc", "garbage"])
    if kind == "flip":
        for _ in range(rng.integers(1, 4)):
            pos = int(rng.integers(0, 8 * len(b)))
            b[pos // 8] ^= 1 << (pos % 8)
        return kind, bytes(b), True
    if kind == "insert":
        at = int(rng.integers(0, len(b) + 1))
        return kind, bytes(b[:at] + rng.bytes(int(rng.integers(1, 5))) + b[at:]), True
    if kind == "delete":
        at = int(rng.integers(0, len(b)))
        return kind, bytes(b[:at] + b[at + int(rng.integers(1, 5)):]), True
    if kind == "truncate":
        return kind, bytes(b[:int(rng.integers(0, len(b)))]), True
    if kind == "random":
        at = int(rng.integers(0, len(b)))
        n = int(rng.integers(1, 9))
        b[at:at + n] = rng.bytes(len(b[at:at + n]))
        return kind, bytes(b), bytes(b) != data
    if kind == "garbage":
        n = int(rng.choice([len(b), int(rng.integers(0, 64))]))
        return kind, rng.bytes(n), False  # a random 16-byte-or-shorter string may even be "empty"
    if kind == "field":
        name = list(fields)[int(rng.integers(0, len(fields)))]
        off, fmt = fields[name]
        (old,) = struct.unpack_from("<" + fmt, b, off)
        if fmt == "2s":
            new = rng.bytes(2)
        else:
            top = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF}[fmt]
            choices = [old + 1, old - 1, 0, 1, top, int(rng.integers(0, top + 1, dtype=np.int64))]
            new = int(choices[int(rng.integers(0, len(choices)))]) & top
        struct.pack_into("<" + fmt, b, off, new)
        return f"field:{name}", recrc(b), False
    if kind == "flip_crc":  # anywhere after the header (mask/positions or values), CRC fixed
        pos = int(rng.integers(8 * 16, 8 * len(b)))
        b[pos // 8] ^= 1 << (pos % 8)
        return kind, recrc(b), False
    if kind == "prefix_crc":  # in the mask / positions, CRC fixed
        pos = int(rng.integers(8 * 16, 8 * values_at))
        b[pos // 8] ^= 1 << (pos % 8)
        return kind, recrc(b), False
    if kind == "move_crc":  # one set mask / position bit moved elsewhere (counts kept), CRC fixed
        bits = np.unpackbits(np.frombuffer(bytes(b[16:values_at]), np.uint8))
        ones, zeros = np.flatnonzero(bits), np.flatnonzero(bits == 0)
        if len(ones) and len(zeros):
            bits[int(rng.choice(ones))], bits[int(rng.choice(zeros))] = 0, 1
            b[16:values_at] = np.packbits(bits).tobytes()
        return kind, recrc(b), False
    if kind == "nonfinite":
        slot = int(rng.integers(0, (len(b) - values_at) // q))
        pat = nonfinite_bytes(str(rng.choice(["nan", "inf", "-inf"])), q)
        if rng.random() < 0.5:  # any NaN payload, any sign
            word = int.from_bytes(pat, "little") | int(rng.integers(1, 1 << (10 if q == 2 else 23)))
            word |= int(rng.integers(0, 2)) << (8 * q - 1)
            pat = word.to_bytes(q, "little")
        b[values_at + q * slot:values_at + q * (slot + 1)] = pat
        return kind, recrc(b), True
    at = int(rng.integers(values_at, len(b)))  # random_values_crc
    n = int(rng.integers(1, 9))
    b[at:at + n] = rng.bytes(len(b[at:at + n]))
    return kind, recrc(b), False


def try_decode(fn, data, shape, kind):
    try:
        return fn(data, shape)
    except WireFormatError:
        return None
    except Exception as e:  # noqa: BLE001 - the point: nothing but WireFormatError
        pytest.fail(f"{kind}: {fn.__name__} raised {type(e).__name__}: {e}")


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def test_wire_format_mutation_fuzz():
    rng = np.random.default_rng(20240611)
    counts = {"soft": 0, "topk": 0, "decoded": 0, "nonfinite": 0}
    for codec, corpus, fn, fields, n in (("soft", soft_corpus(), decode, _SOFT_FIELDS, 2400),
                                         ("topk", topk_corpus(), decode_topk, _TOPK_FIELDS, 1200)):
        for _ in range(n):
            data, shape, values_at, q = corpus[int(rng.integers(0, len(corpus)))]
            kind, bad, must_fail = mutate(rng, data, values_at, q, fields)
            out = try_decode(fn, bad, shape, f"{codec}/{kind}")
            counts[codec] += 1
            counts["nonfinite"] += kind == "nonfinite"
            if out is None:
                continue
            assert not must_fail, f"{codec}/{kind}: a corrupted payload decoded"
            counts["decoded"] += 1
            assert all_finite(out.delta_a + out.delta_b), f"{codec}/{kind}: non-finite values decoded"
            if codec == "soft":
                # every payload decode accepts is canonical: it re-encodes to the same bytes
                assert out.encode() == bad, f"{kind}: decoded payload does not re-encode to itself"
                assert update_norm(out) < math.inf
            else:
                assert out.k >= sum(int((d != 0).sum()) for d in out.delta_a + out.delta_b)
    assert counts["soft"] >= 2000 and counts["topk"] >= 1000 and counts["nonfinite"] > 200
    assert counts["decoded"] > 100  # the CRC-fixed mutations do exercise the accepting path


def test_decode_topk_rejects_structural_oddities():
    old = rand_factors(40)
    tk = topk_elementwise(old, moved(old, 41), 1)
    shape = shape_of(old)
    data = tk.encode()
    with pytest.raises(WireFormatError, match="empty"):
        decode_topk(b"", shape)
    padded = bytearray(data)
    padded[5] = 1
    with pytest.raises(WireFormatError, match="pad"):
        decode_topk(recrc(padded), shape)
    with pytest.raises(ValueError, match="data must be bytes"):
        decode_topk("not bytes", shape)


def test_decode_rejects_nonzero_mask_padding():
    old = rand_factors(42, shapes=((9, 7),), r=3)  # 3 mask bits, 5 of padding
    data = bytearray(sparsify(old, moved(old, 43), 1).encode())
    data[16] |= 0x01  # the last bit of the mask byte is padding
    with pytest.raises(WireFormatError, match="padding"):
        decode(recrc(data), shape_of(old))


def test_public_api_lists_the_norm_helper():
    assert "update_norm" in soft.__all__ and soft.update_norm is update_norm


def test_encode_checks_the_structure_it_writes():
    old = rand_factors(7)
    good = sparsify(old, moved(old, 8), 2)
    descending = (good.indices[0].flip(0), good.indices[1])
    for indices, b in ((descending, good.delta_b), ((good.indices[0], torch.tensor([0, 6])), good.delta_b),
                       (good.indices, (good.delta_b[0][:-1], good.delta_b[1]))):
        with pytest.raises(ValueError, match="cannot encode"):
            RankSparseUpdate(good.shape, 2, indices, b, good.delta_a).encode()
    assert decode(good.encode(), good.shape).keep == 2


def test_an_update_changed_after_sparsify_is_checked_again_when_encoded():
    """sparsify checks values once while building and encode trusts that; an update rebuilt with
    dataclasses.replace (new tensors) is checked again, so a NaN never reaches the bytes."""
    import dataclasses

    g = torch.Generator().manual_seed(0)
    old = {"m": (torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g))}
    new = {"m": (old["m"][0] + 0.1, old["m"][1] + 0.1)}
    upd = sparsify(old, new, 2)
    assert 8 * len(upd.encode()) == upd.payload_bits
    bad = dataclasses.replace(upd, delta_b=(torch.full_like(upd.delta_b[0], float("nan")),))
    with pytest.raises(ValueError, match="Δb has non-finite values"):
        bad.encode()
