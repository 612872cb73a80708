import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import soft
from soft import (
    WireFormatError,
    aggregate,
    component_importance,
    covariance_norm,
    covariance_norm_dense,
    decode,
    dropped_error,
    error_profile,
    orthogonality_penalty,
    product_error,
    product_error_dense,
    reorthogonalize,
    shape_of,
    sparsify,
    svd_truncation_dense,
    svd_truncation_qr,
)
from soft.baselines import random_components, topk_budget, topk_elementwise


def rand_factors(seed, shapes=((24, 20), (16, 30)), r=6, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {f"m{i}": (scale * torch.randn(r, n, generator=g, dtype=dtype), scale * torch.randn(m, r, generator=g,
                                                                                                    dtype=dtype))
            for i, (m, n) in enumerate(shapes)}


def orthogonal_pair(seed, m=24, n=20, r=6, delta=None):
    """old, new with A shared orthonormal rows and B = U diag(β), B' = U diag(β + δ): D = U diag(δ) Vᵀ."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    beta = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
    if delta is None:
        delta = torch.randn(r, generator=g, dtype=torch.float64)
    A = V.T.contiguous()
    return (A, U * beta), (A.clone(), U * (beta + delta)), delta


# --- penalty and re-orthogonalisation ----------------------------------------------------------


def test_penalty_zero_iff_orthogonal_and_differentiable():
    (A, B), _, _ = orthogonal_pair(0)
    assert float(orthogonality_penalty(A, B)) == pytest.approx(0.0, abs=1e-20)
    A2 = (A + 0.1 * torch.randn_like(A)).requires_grad_(True)
    B2 = (B + 0.1 * torch.randn_like(B)).requires_grad_(True)
    pen = orthogonality_penalty(A2, B2)
    ga = A2 @ A2.T - torch.eye(6, dtype=A2.dtype)
    gb = B2.T @ B2
    ref = (ga**2).sum() + ((gb - torch.diag(torch.diag(gb))) ** 2).sum()
    assert pen.item() == pytest.approx(ref.item(), rel=1e-12) and pen.item() > 0
    pen.backward()
    assert A2.grad is not None and float(A2.grad.norm()) > 0 and float(B2.grad.norm()) > 0


@pytest.mark.parametrize("scaling", ["a-orthonormal", "balanced"])
def test_reorthogonalize_keeps_product(scaling):
    A, B = rand_factors(1)["m0"]
    A2, B2 = reorthogonalize(A, B, scaling)
    torch.testing.assert_close(B2 @ A2, B @ A, rtol=1e-10, atol=1e-10)
    ga, gb = A2 @ A2.T, B2.T @ B2
    assert float((gb - torch.diag(torch.diag(gb))).abs().max()) < 1e-9 * float(gb.abs().max())
    if scaling == "a-orthonormal":
        torch.testing.assert_close(ga, torch.eye(6, dtype=ga.dtype), rtol=0, atol=1e-10)
    norms = B2.norm(dim=0) * A2.norm(dim=1)
    assert torch.all(norms[:-1] >= norms[1:] - 1e-12)  # sorted like singular values


def test_reorthogonalize_at_peft_init_keeps_b_zero():
    A = torch.rand(4, 30, dtype=torch.float64) - 0.5
    B = torch.zeros(20, 4, dtype=torch.float64)
    A2, B2 = reorthogonalize(A, B)
    assert float(B2.abs().max()) == 0.0
    torch.testing.assert_close(A2 @ A2.T, torch.eye(4, dtype=A2.dtype), rtol=0, atol=1e-12)


# --- importances, error profile, equivalence with SVD truncation -------------------------------


def test_importance_matches_dense():
    old, new = rand_factors(2), rand_factors(3)
    for name in old:
        imp = component_importance(*old[name], *new[name])
        (A0, B0), (A1, B1) = old[name], new[name]
        dense = torch.stack([torch.linalg.matrix_norm(torch.outer(B1[:, i], A1[i]) - torch.outer(B0[:, i], A0[i]))
                             for i in range(A0.shape[0])])
        torch.testing.assert_close(imp, dense, rtol=1e-10, atol=1e-10)


@given(st.integers(0, 10_000), st.integers(0, 6))
def test_orthogonal_factors_soft_equals_svd_truncation(seed, keep):
    old0, new0, delta = orthogonal_pair(seed)
    old, new = {"m": old0}, {"m": new0}
    upd = sparsify(old, new, keep)
    # SVD truncation keeps the |δ| largest; so does SOFT
    expected = torch.sort(torch.sort(delta.abs(), descending=True, stable=True).indices[:keep]).values
    assert torch.equal(upd.indices[0], expected)
    e = error_profile(old, new)
    err = dropped_error(*old0, *new0, upd.indices[0])
    assert err == pytest.approx(e[keep], rel=1e-6, abs=1e-12)
    svd_err = product_error(old, new, factored=svd_truncation_qr(old, new, keep))
    assert err == pytest.approx(svd_err, rel=1e-6, abs=1e-10)


def test_near_orthogonal_gap_shrinks_with_penalty():
    """Perturbing exactly orthogonal factors by ε: SOFT's error approaches the SVD optimum."""
    old0, new0, _ = orthogonal_pair(7, m=40, n=36, r=8)
    g = torch.Generator().manual_seed(1)
    gaps, pens = [], []
    for eps in (1e-1, 1e-2, 1e-3):
        A1 = new0[0] + eps * torch.randn(new0[0].shape, generator=g, dtype=torch.float64)
        B1 = new0[1] + eps * torch.randn(new0[1].shape, generator=g, dtype=torch.float64)
        old, new = {"m": old0}, {"m": (A1, B1)}
        upd = sparsify(old, new, 2)
        err = dropped_error(*old0, A1, B1, upd.indices[0])
        opt = product_error(old, new, factored=svd_truncation_qr(old, new, 2))
        total = soft.update_energy(*old0, A1, B1)
        gaps.append(abs(err - opt) / total)
        pens.append(float(orthogonality_penalty(A1, B1)))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3
    assert pens[0] > pens[1] > pens[2]


def test_error_profile_shape():
    old, new = rand_factors(4), rand_factors(5)
    e = error_profile(old, new)
    assert e.shape == (7,) and e[-1] == 0.0
    total = sum(float((component_importance(*old[n], *new[n]) ** 2).sum()) for n in old)
    assert e[0] == pytest.approx(total, rel=1e-12)
    d = np.diff(e)
    assert np.all(d <= 1e-12) and np.all(np.diff(d) >= -1e-9)  # non-increasing, convex


# --- wire format ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shapes,r", [(((24, 20), (16, 30)), 6), (((9, 7),), 3), (((12, 10),) * 3, 5)])
def test_encode_decode_roundtrip_bit_exact(dtype, shapes, r):
    old = rand_factors(8, shapes, r, dtype=torch.float32)
    new = {k: (A + 0.1 * torch.randn_like(A), B + 0.1 * torch.randn_like(B)) for k, (A, B) in old.items()}
    shape = shape_of(old, bits_per_value=32 if dtype == torch.float32 else 16)
    for keep in range(1, r + 1):
        upd = sparsify(old, new, keep, dtype=dtype)
        data = upd.encode()
        assert 8 * len(data) == upd.payload_bits == shape.payload_bits(keep)
        back = decode(data, shape)
        assert back.keep == keep and back.dtype == dtype
        for i in range(len(shapes)):
            assert torch.equal(back.indices[i], upd.indices[i])
            assert torch.equal(back.delta_b[i], upd.delta_b[i]) and torch.equal(back.delta_a[i], upd.delta_a[i])
        assert back.encode() == data
    assert sparsify(old, new, 0).encode() == b"" and sparsify(old, new, 0).payload_bits == 0


def test_decode_rejects_corruption():
    old = rand_factors(9, r=4, dtype=torch.float32)
    new = {k: (A + 1, B + 1) for k, (A, B) in old.items()}
    shape = shape_of(old)
    data = sparsify(old, new, 2).encode()
    with pytest.raises(WireFormatError, match="truncated|length"):
        decode(data[:-1], shape)
    with pytest.raises(WireFormatError, match="truncated"):
        decode(data[:10], shape)
    flipped = bytearray(data)
    flipped[40] ^= 0x10
    with pytest.raises(WireFormatError, match="checksum"):
        decode(bytes(flipped), shape)
    with pytest.raises(WireFormatError, match="magic"):
        decode(b"XX" + data[2:], shape)
    with pytest.raises(WireFormatError, match="empty"):
        decode(b"", shape)
    other = shape_of(rand_factors(9, shapes=((24, 20), (16, 31)), r=4))
    with pytest.raises(WireFormatError, match="shape tag"):
        decode(data, other)
    with pytest.raises(WireFormatError, match="rank"):
        decode(data, shape.with_rank(3))


def test_bad_input_names_the_problem():
    old = rand_factors(10, r=4)
    new = rand_factors(11, r=4)
    with pytest.raises(ValueError, match="keep must be an integer in 0..4"):
        sparsify(old, new, 5)
    with pytest.raises(ValueError, match="keep"):
        sparsify(old, new, -1)
    bad = dict(new)
    bad["m0"] = (new["m0"][0].clone(), new["m0"][1][:-1].clone())
    with pytest.raises(ValueError, match="shape mismatch in 'm0'"):
        sparsify(old, bad, 1)
    nan = {k: (A.clone(), B.clone()) for k, (A, B) in new.items()}
    nan["m1"][0][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        sparsify(old, nan, 1)
    with pytest.raises(ValueError, match="rank mismatch"):
        sparsify({"m": (torch.ones(3, 4), torch.ones(5, 2))}, {"m": (torch.ones(3, 4), torch.ones(5, 2))}, 1)
    with pytest.raises(ValueError, match="same modules"):
        sparsify(old, {"x": new["m0"], "m1": new["m1"]}, 1)


# --- aggregation and covariance --------------------------------------------------------------------


def test_aggregate_matches_hand_computed_averages():
    g = {"m": (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, 3, dtype=torch.float64))}
    c1 = {"m": (torch.ones(3, 4, dtype=torch.float64), 2 * torch.ones(5, 3, dtype=torch.float64))}
    c2 = {"m": (3 * torch.ones(3, 4, dtype=torch.float64), 4 * torch.ones(5, 3, dtype=torch.float64))}
    u1 = soft.update.updates_from_indices(g, c1, [torch.tensor([0, 1])], 2, torch.float32)
    u2 = soft.update.updates_from_indices(g, c2, [torch.tensor([1, 2])], 2, torch.float32)
    out = aggregate(g, [u1, u2], [1.0, 3.0])
    A, B = out["m"]
    # index 0: only client 1 → 1; index 1: (1·1 + 3·3)/4 = 2.5; index 2: only client 2 → 3
    torch.testing.assert_close(A[:, 0], torch.tensor([1.0, 2.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(B[0], torch.tensor([2.0, 3.5, 4.0], dtype=torch.float64))
    z = aggregate(g, [u1, u2], [1.0, 3.0], fill="zero")
    torch.testing.assert_close(z["m"][0][:, 0], torch.tensor([0.25, 2.5, 2.25], dtype=torch.float64))
    # an index nobody sent stays unchanged
    u3 = soft.update.updates_from_indices(g, c1, [torch.tensor([0])], 1, torch.float32)
    assert float(aggregate(g, [u3], [1.0])["m"][0][2].abs().max()) == 0.0
    with pytest.raises(ValueError, match="weights"):
        aggregate(g, [u1, u2], [1.0])


def test_covariance_identity_and_gram_formula():
    g = torch.Generator().manual_seed(3)
    K, r, m, n = 5, 4, 30, 25
    As = [torch.randn(r, n, generator=g, dtype=torch.float64) for _ in range(K)]
    Bs = [torch.randn(m, r, generator=g, dtype=torch.float64) for _ in range(K)]
    p = np.random.default_rng(0).uniform(0.1, 1, K)
    pn = torch.as_tensor(p / p.sum())
    lhs = sum(pk * (B @ A) for pk, A, B in zip(pn, As, Bs, strict=True))
    abar = sum(pk * A for pk, A in zip(pn, As, strict=True))
    bbar = sum(pk * B for pk, B in zip(pn, Bs, strict=True))
    C = sum(pk * (B - bbar) @ (A - abar) for pk, A, B in zip(pn, As, Bs, strict=True))
    torch.testing.assert_close(lhs, bbar @ abar + C, rtol=1e-12, atol=1e-12)
    dense = float(torch.linalg.matrix_norm(C))
    assert covariance_norm(As, Bs, p) == pytest.approx(dense, rel=1e-10)
    assert covariance_norm_dense(As, Bs, p) == pytest.approx(dense, rel=1e-10)
    assert covariance_norm([As[0]] * 3, [Bs[0]] * 3, [1, 1, 1]) == pytest.approx(0.0, abs=1e-9)


# --- baselines -----------------------------------------------------------------------------------


def test_svd_truncation_qr_equals_dense_and_product_error_matches():
    old, new = rand_factors(12), rand_factors(13)
    for keep in (1, 3, 6):
        qr, dense = svd_truncation_qr(old, new, keep), svd_truncation_dense(old, new, keep)
        for (P1, Q1), (P2, Q2) in zip(qr, dense, strict=True):
            torch.testing.assert_close(P1 @ Q1, P2 @ Q2, rtol=1e-9, atol=1e-9)
    upd = sparsify(old, new, 3, dtype=torch.float32)
    approx = upd.apply_to(old)
    assert product_error(old, new, approx) == pytest.approx(product_error_dense(old, new, approx), rel=1e-9)


def test_baselines_respect_the_bit_budget():
    old = rand_factors(14, r=6, dtype=torch.float32)
    new = {k: (A + torch.randn_like(A), B + torch.randn_like(B)) for k, (A, B) in old.items()}
    shape = shape_of(old)
    for keep in (1, 3):
        tk = topk_elementwise(old, new, keep)
        k, bits, _ = topk_budget(old, keep)
        assert 0 < tk.k == k and bits <= shape.payload_bits(keep)
        nz = sum(int((d != 0).sum()) for d in tk.delta_a + tk.delta_b)
        assert nz == k
        rc = random_components(old, new, keep, torch.Generator().manual_seed(0))
        assert rc.payload_bits == shape.payload_bits(keep)


def test_peft_read_write_roundtrip():
    peft = pytest.importorskip("peft")

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(10, 8)
            self.v = torch.nn.Linear(10, 8)

        def forward(self, x):
            return self.q(x) + self.v(x)

    model = peft.get_peft_model(Toy(), peft.LoraConfig(r=3, target_modules=["q", "v"]))
    f = soft.read_lora(model)
    assert list(f) == ["q", "v"] and f["q"][0].shape == (3, 10) and f["q"][1].shape == (8, 3)
    new = {k: (torch.randn_like(A), torch.randn_like(B)) for k, (A, B) in f.items()}
    soft.write_lora(model, new)
    for k in f:
        assert torch.equal(soft.read_lora(model)[k][0], new[k][0])
    with pytest.raises(ValueError, match="shape mismatch"):
        soft.write_lora(model, {"q": (torch.ones(3, 11), torch.ones(8, 3)), "v": new["v"]})


def test_global_scope_same_bits_more_energy():
    g = torch.Generator().manual_seed(5)
    old = rand_factors(20, shapes=((20, 20),) * 4, r=6, dtype=torch.float32)
    # module 0 moves a lot, the others barely
    new = {k: (A + (1.0 if i == 0 else 0.01) * torch.randn(A.shape, generator=g),
               B + (1.0 if i == 0 else 0.01) * torch.randn(B.shape, generator=g))
           for i, (k, (A, B)) in enumerate(old.items())}
    shape = shape_of(old)
    per_module, glob = sparsify(old, new, 2), sparsify(old, new, 2, scope="global")
    assert [len(i) for i in per_module.indices] == [2, 2, 2, 2]
    assert sum(len(i) for i in glob.indices) == 8 and len(glob.indices[0]) > 2
    data = glob.encode()
    assert 8 * len(data) == shape.payload_bits(2)
    back = decode(data, shape)
    for a, b in zip(back.delta_b, glob.delta_b, strict=True):
        assert torch.equal(a, b)
    assert product_error(old, new, glob.apply_to(old)) < product_error(old, new, per_module.apply_to(old))
    with pytest.raises(ValueError, match="equal size"):
        sparsify(rand_factors(1, r=4, dtype=torch.float32), rand_factors(2, r=4, dtype=torch.float32), 1,
                 scope="global")


def test_tensorwise_adam_first_step_and_convergence():
    from soft.optim import TensorwiseAdam

    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=torch.float64))
    opt = TensorwiseAdam([p], lr=0.1)
    g = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    p.grad = g.clone()
    before = p.detach().clone()
    opt.step()
    step = before - p.detach()
    rms = float(g.pow(2).mean().sqrt())
    torch.testing.assert_close(step, 0.1 * g / rms, rtol=1e-9, atol=1e-12)  # the gradient's direction, RMS = lr
    # unlike Adam, entries keep their relative sizes (Adam's first step is lr·sign(g))
    x = torch.nn.Parameter(torch.tensor([5.0, -3.0], dtype=torch.float64))
    opt = TensorwiseAdam([x], lr=0.05)
    for _ in range(2000):
        opt.zero_grad()
        ((x - torch.tensor([1.0, 2.0], dtype=torch.float64)) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(x.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=0, atol=1e-2)
    with pytest.raises(ValueError, match="lr"):
        TensorwiseAdam([x], lr=0)


@pytest.mark.parametrize("keep,shapes,r", [(1, ((24, 20), (16, 30)), 6), (3, ((24, 20), (16, 30)), 6),
                                          (1, ((400, 300),), 16)])
@pytest.mark.parametrize("dtype_bits", [32, 16])
def test_topk_codec_round_trips_within_softs_bits(keep, shapes, r, dtype_bits):
    from soft.baselines import decode_topk

    old = rand_factors(30, shapes, r, dtype=torch.float32)
    new = {k: (A + torch.randn_like(A), B + torch.randn_like(B)) for k, (A, B) in old.items()}
    tk = topk_elementwise(old, new, keep, bits_per_value=dtype_bits)
    data = tk.encode()
    shape = shape_of(old, bits_per_value=dtype_bits)
    assert 8 * len(data) == tk.bits <= shape.payload_bits(keep)
    back = decode_topk(data, shape)
    for a, b in zip(back.delta_a + back.delta_b, tk.delta_a + tk.delta_b, strict=True):
        assert torch.equal(a, b.float())
    flipped = bytearray(data)
    flipped[-1] ^= 1
    with pytest.raises(soft.WireFormatError, match="checksum"):
        decode_topk(bytes(flipped), shape)
    with pytest.raises(soft.WireFormatError, match="length"):
        decode_topk(data[:-1], shape)
