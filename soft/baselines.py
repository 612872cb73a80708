"""Baselines with SOFT's wire accounting (SPEC §1) and product-error measures.

* :func:`random_components`: s random rank indices per module (same bits as SOFT).
* :func:`topk_elementwise`: magnitude top-k of the entries of ΔA and ΔB (per tensor, or jointly),
  with k chosen so that values + positions (bitmap or indices) fit SOFT's bit budget at the same s.
* :func:`svd_truncation_qr`: the best rank-s approximation of each module's product update
  D = B'A' − BA (Eckart–Young), the cheap way: D = [B', B][A'; −A] is rank ≤ 2r, so a
  thin QR of each side and the SVD of a 2r×2r core suffice.
* :func:`svd_truncation_dense`: the same by forming D and running a dense SVD (the naive way).
* :func:`ffa_update`: FFA-LoRA (A frozen): only ΔB is sent, dense.

All return per-module product updates in factored form (P_ℓ m×k, Q_ℓ k×n with D̂_ℓ = P_ℓ Q_ℓ)
or factor increments, plus their bits, so errors are comparable at equal bits.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from soft.factors import Factors, check_same_layout, shape_of
from soft.update import RankSparseUpdate, _check_keep, updates_from_indices

__all__ = [
    "random_components",
    "topk_elementwise",
    "TopKUpdate",
    "svd_truncation_qr",
    "svd_truncation_dense",
    "ffa_update",
    "product_error",
    "product_error_dense",
]


def random_components(old: Factors, new: Factors, keep: int, generator: torch.Generator | int,
                      dtype=torch.float32) -> RankSparseUpdate:
    """``keep`` uniformly random components per module (no importance); SOFT's wire format.

    ``generator`` is a ``torch.Generator`` or an integer seed (randomness is always explicit).
    """
    r = check_same_layout(old, new)
    keep = _check_keep(keep, r)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(int(generator))
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or an int seed; got {type(generator).__name__}")
    idx = [torch.sort(torch.randperm(r, generator=generator)[:keep]).values for _ in old]
    return updates_from_indices(old, new, idx, keep, dtype)


class TopKUpdate:
    """Element-wise sparse increments: per module, sparse ΔA and ΔB (dense tensors with zeros)."""

    def __init__(self, delta_a, delta_b, k: int, bits: int):
        self.delta_a, self.delta_b, self.k, self.bits = delta_a, delta_b, k, bits

    def apply_to(self, factors: Factors) -> dict:
        return {n: (A + da.to(A.dtype), B + db.to(B.dtype))
                for (n, (A, B)), da, db in zip(factors.items(), self.delta_a, self.delta_b, strict=True)}


def topk_budget(old: Factors, keep: int, bits_per_value: int = 32) -> tuple[int, int]:
    """(k, bits): entries affordable within SOFT's budget S(keep), positions counted.

    Positions cost either an N-bit bitmap over all N = r·M factor entries or ⌈log2 N⌉ bits
    per entry, whichever lets more entries fit; plus the same header H.
    """
    shape = shape_of(old, bits_per_value)
    if keep == 0:
        return 0, 0
    budget = shape.payload_bits(keep) - shape.header_bits
    n_total = shape.num_parameters
    idx_bits = max(1, math.ceil(math.log2(n_total)))
    k_index = budget // (bits_per_value + idx_bits)
    k_bitmap = max(0, (budget - n_total) // bits_per_value)
    if k_bitmap >= k_index:
        k, bits = k_bitmap, n_total + k_bitmap * bits_per_value
    else:
        k, bits = k_index, k_index * (bits_per_value + idx_bits)
    k = int(min(k, n_total))
    return k, int(shape.header_bits + bits)


def topk_elementwise(old: Factors, new: Factors, keep: int, bits_per_value: int = 32, *,
                     joint: bool = False) -> TopKUpdate:
    """Largest-magnitude entries of ΔA and ΔB at SOFT's bit budget for ``keep`` (SPEC §8).

    ``joint=False`` (SPEC: "ΔA and ΔB separately"): every factor tensor keeps the same
    fraction k/N of its own entries, its largest; ``joint=True``: the k largest over all
    tensors together.
    """
    r = check_same_layout(old, new)
    keep = _check_keep(keep, r)
    k, bits = topk_budget(old, keep, bits_per_value)
    if bits_per_value not in (16, 32):
        raise ValueError(f"bits_per_value must be 16 or 32; got bits_per_value = {bits_per_value!r}")
    wire = torch.float16 if bits_per_value == 16 else torch.float32
    deltas = []
    for (A0, B0), (A1, B1) in zip(old.values(), new.values(), strict=True):
        # values travel at the wire precision, as SOFT's do
        deltas += [(A1 - A0).detach().to(wire).to(A0.dtype), (B1 - B0).detach().to(wire).to(B0.dtype)]
    n_total = sum(d.numel() for d in deltas)
    out = []
    if joint:
        flat = torch.cat([d.reshape(-1) for d in deltas])
        mask = torch.zeros_like(flat, dtype=torch.bool)
        if k:
            mask[torch.topk(flat.abs(), k, sorted=False).indices] = True
        off = 0
        for d in deltas:
            n = d.numel()
            out.append(torch.where(mask[off:off + n].reshape(d.shape), d, torch.zeros_like(d)))
            off += n
    else:
        # Largest-remainder split of k over the tensors in proportion to their sizes.
        quota = np.array([k * d.numel() / n_total for d in deltas])
        ks = np.floor(quota).astype(int)
        ks[np.argsort(-(quota - ks), kind="stable")[: k - ks.sum()]] += 1
        for d, kt in zip(deltas, ks, strict=True):
            flat = d.reshape(-1)
            mask = torch.zeros_like(flat, dtype=torch.bool)
            if kt:
                mask[torch.topk(flat.abs(), int(kt), sorted=False).indices] = True
            out.append(torch.where(mask.reshape(d.shape), d, torch.zeros_like(d)))
    return TopKUpdate(out[0::2], out[1::2], k, bits)


def _two_sided(A0, B0, A1, B1):
    P = torch.cat([B1, B0], dim=1).double()  # m × 2r
    Q = torch.cat([A1, -A0], dim=0).double()  # 2r × n
    return P, Q


def svd_truncation_qr(old: Factors, new: Factors, keep: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per module (P, Q) with P Q the best rank-``keep`` approximation of D, via QR + 2r×2r SVD."""
    r = check_same_layout(old, new)
    keep = _check_keep(keep, r)
    out = []
    for (A0, B0), (A1, B1) in zip(old.values(), new.values(), strict=True):
        P, Q = _two_sided(A0.detach(), B0.detach(), A1.detach(), B1.detach())
        qp, rp = torch.linalg.qr(P, mode="reduced")
        qq, rq = torch.linalg.qr(Q.transpose(0, 1), mode="reduced")
        u, s, vh = torch.linalg.svd(rp @ rq.transpose(0, 1))
        out.append(((qp @ u[:, :keep]) * s[:keep], vh[:keep] @ qq.transpose(0, 1)))
    return out


def svd_truncation_dense(old: Factors, new: Factors, keep: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same truncation by forming D = B'A' − BA and a dense SVD (reference, slow)."""
    r = check_same_layout(old, new)
    keep = _check_keep(keep, r)
    out = []
    for (A0, B0), (A1, B1) in zip(old.values(), new.values(), strict=True):
        D = B1.double() @ A1.double() - B0.double() @ A0.double()
        u, s, vh = torch.linalg.svd(D, full_matrices=False)
        out.append((u[:, :keep] * s[:keep], vh[:keep]))
    return out


def ffa_update(old: Factors, new: Factors, bits_per_value: int = 32) -> tuple[list[torch.Tensor], int]:
    """FFA-LoRA: the dense ΔB of every module (A stays frozen) and its bits (header included)."""
    check_same_layout(old, new)
    shape = shape_of(old, bits_per_value)
    db = [(B1 - B0).detach() for (_, B0), (_, B1) in zip(old.values(), new.values(), strict=True)]
    bits = shape.rank * sum(m.out_features for m in shape.modules) * bits_per_value + shape.header_bits
    return db, int(bits)


def product_error(old: Factors, new: Factors, approx_factors: Factors | None = None,
                  factored: list | None = None) -> float:
    """Σ_ℓ ‖D_ℓ − D̂_ℓ‖²_F without forming m×n matrices.

    D̂ is either the product change of ``approx_factors`` (what the server reconstructs:
    B̂'Â' − BA) or, with ``factored``, Σ_ℓ P_ℓ Q_ℓ from an SVD truncation.
    """
    check_same_layout(old, new)
    if (approx_factors is None) == (factored is None):
        raise ValueError("product_error needs exactly one of approx_factors (factor set) or factored (list of (P, Q))")
    total = 0.0
    for ell, name in enumerate(old):
        A0, B0 = old[name]
        A1, B1 = new[name]
        if factored is not None:
            Pk, Qk = factored[ell]
            P = torch.cat([B1.double(), -Pk.double()], dim=1)
            Q = torch.cat([A1.double(), Qk.double()], dim=0)
            # D − D̂ = B'A' − BA − PQ: three factored terms
            P = torch.cat([P, B0.double()], dim=1)
            Q = torch.cat([Q, -A0.double()], dim=0)
        else:
            Ah, Bh = approx_factors[name]
            P = torch.cat([B1.double(), -Bh.double()], dim=1)
            Q = torch.cat([A1.double(), Ah.double()], dim=0)
        total += float(((P.transpose(0, 1) @ P) * (Q @ Q.transpose(0, 1))).sum())
    return max(total, 0.0)


def product_error_dense(old: Factors, new: Factors, approx_factors: Factors) -> float:
    """Reference for :func:`product_error` with dense products (tests only)."""
    total = 0.0
    for name in old:
        A1, B1 = new[name]
        Ah, Bh = approx_factors[name]
        total += float(torch.linalg.matrix_norm(B1.double() @ A1.double() - Bh.double() @ Ah.double()) ** 2)
    return total


def energy_fraction_kept(sq_norms: np.ndarray, keep: int) -> float:
    """Share of Σ sq_norms held by the ``keep`` largest entries."""
    s = np.sort(np.asarray(sq_norms))[::-1]
    return float(s[:keep].sum() / max(s.sum(), 1e-300))
