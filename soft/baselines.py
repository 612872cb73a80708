"""Baselines with SOFT's wire accounting (spec §1) and product-error measures.

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

As in SOFT's codec, values are finite: the selectors and :meth:`TopKUpdate.encode` refuse
(ValueError naming the module and the factor) an increment that overflows or that the wire
type cannot hold (float16: |x| > 65 504), and :func:`decode_topk` refuses (WireFormatError)
a payload carrying NaN or inf even under a valid checksum.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import torch

from soft.factors import Factors, check_same_layout, product_norm_sq, shape_of
from soft.update import RankSparseUpdate, WireFormatError, check_keep, dtype_name, payload_bytes, updates_from_indices

__all__ = [
    "random_components",
    "topk_elementwise",
    "TopKUpdate",
    "svd_truncation_qr",
    "svd_truncation_dense",
    "ffa_update",
    "ffa_bits",
    "product_error",
    "product_error_dense",
]


def random_components(old: Factors, new: Factors, keep: int, generator: torch.Generator | int,
                      dtype=torch.float32) -> RankSparseUpdate:
    """``keep`` uniformly random components per module (no importance); SOFT's wire format.

    ``generator`` is a ``torch.Generator`` or an integer seed (randomness is always explicit).
    """
    r = check_same_layout(old, new)
    keep = check_keep(keep, r)
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(int(generator))
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or an int seed; got {type(generator).__name__}")
    idx = [torch.sort(torch.randperm(r, generator=generator)[:keep]).values for _ in old]
    return updates_from_indices(old, new, idx, keep, dtype)


_TK_HEAD = struct.Struct("<2sBBBBHI")  # magic, version, dtype, coding, pad, tensors, k: 12 bytes (+ CRC-32)
_TK_BITMAP, _TK_INDEX = 0, 1


def _tensor_problem(name: str, label: str, t: torch.Tensor, wire_dtype: torch.dtype | None = None,
                    nonfinite: str = "has non-finite values (NaN or inf)") -> str | None:
    """What is wrong with one dense increment tensor (ΔA or ΔB of module ``name``), or None:
    a value that is not finite, or (with ``wire_dtype``) one the wire type rounds to ±inf."""
    t = t.detach()
    if t.numel() == 0:
        return None
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        at = torch.nonzero(bad)[0].tolist()
        return f"module {name!r}: {label} {nonfinite} (first at {at})"
    if wire_dtype is not None and t.dtype != wire_dtype:
        over = ~torch.isfinite(t.to(wire_dtype))
        if bool(over.any()):
            at = torch.nonzero(over)[0].tolist()
            return (f"module {name!r}: {label} has values outside {dtype_name(wire_dtype)}'s finite range "
                    f"(|x| ≤ {torch.finfo(wire_dtype).max:g}; first at {at}, |x| = {abs(float(t[tuple(at)])):.6g})")
    return None


class TopKUpdate:
    """Element-wise sparse increments of ΔA and ΔB (per module, dense tensors with zeros),
    with a real wire format: :meth:`encode` / :func:`decode_topk`.

    Wire format (little-endian): 16-byte header (b"TK", version 1, dtype code 0 fp32 /
    1 fp16, position coding 0 = bitmap / 1 = indices, pad, tensor count u16, k u32,
    CRC-32 of the first 12 bytes and the body); positions (an N-bit bitmap over all N
    factor entries in the order A₁, B₁, A₂, B₂, …, or k indices of ⌈log2 N⌉ bits each,
    bit-packed, padded to whole bytes); the k values in position order. Padding bits and
    the pad byte are zero; the values are finite.

    ``names`` (optional) are the module names, used in error messages.
    """

    def __init__(self, delta_a, delta_b, k: int, bits: int, coding: int = _TK_BITMAP, dtype=torch.float32,
                 names=None):
        self.delta_a, self.delta_b, self.k, self.bits = delta_a, delta_b, k, bits
        self.coding, self.dtype = coding, dtype
        self.names = tuple(names) if names is not None else tuple(f"#{i}" for i in range(len(delta_a)))

    def values_problem(self, wire_dtype: torch.dtype | None = None) -> str | None:
        """What is wrong with the increments (not finite; with ``wire_dtype``, outside its
        finite range), naming the module and ΔA/ΔB; None when they can be sent."""
        for name, da, db in zip(self.names, self.delta_a, self.delta_b, strict=True):
            problem = _tensor_problem(name, "ΔA", da, wire_dtype) or _tensor_problem(name, "ΔB", db, wire_dtype)
            if problem:
                return problem
        return None

    def apply_to(self, factors: Factors) -> dict:
        return {n: (A + da.to(A.dtype), B + db.to(B.dtype))
                for (n, (A, B)), da, db in zip(factors.items(), self.delta_a, self.delta_b, strict=True)}

    def _tensors(self):
        out = []
        for da, db in zip(self.delta_a, self.delta_b, strict=True):
            out += [da, db]
        return out

    def encode(self) -> bytes:
        """The payload; 8·len(bytes) == :attr:`bits` (the budget :func:`topk_budget` chose).

        Raises ValueError, naming the module and ΔA/ΔB, if an increment is not finite or
        lies outside the wire type's finite range (float16: |x| > 65 504).
        """
        if self.k == 0:
            return b""
        problem = self.values_problem(self.dtype)
        if problem:
            raise ValueError(f"cannot encode the top-k update: {problem}")
        flat = torch.cat([d.reshape(-1) for d in self._tensors()])
        pos = torch.nonzero(flat != 0).reshape(-1).numpy()
        if len(pos) < self.k:  # a selected increment that is exactly 0: send it anyway, as a 0
            rest = np.setdiff1d(np.arange(len(flat)), pos)[: self.k - len(pos)]
            pos = np.sort(np.concatenate([pos, rest]))
        n = len(flat)
        if self.coding == _TK_BITMAP:
            bitmap = np.zeros(n, dtype=np.uint8)
            bitmap[pos] = 1
            positions = np.packbits(bitmap).tobytes()
        else:
            ib = _index_bits(n)
            bits = ((pos[:, None].astype(np.uint64) >> np.arange(ib - 1, -1, -1, dtype=np.uint64)) & 1)
            positions = np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()
        code = 1 if self.dtype == torch.float16 else 0
        values = flat[torch.as_tensor(pos)].to(self.dtype).numpy().astype("<f2" if code else "<f4").tobytes()
        head = _TK_HEAD.pack(b"TK", 1, code, self.coding, 0, len(self._tensors()), self.k)
        body = positions + values
        out = head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body
        assert 8 * len(out) == self.bits, (8 * len(out), self.bits)
        return out


def _index_bits(n_total: int) -> int:
    return max(1, math.ceil(math.log2(n_total)))


def decode_topk(data: bytes, shape) -> TopKUpdate:
    """Parse :meth:`TopKUpdate.encode`'s bytes for a :class:`tsfa.LoraShape`; raises
    :class:`soft.WireFormatError` naming the problem (magic, version, dtype, coding, pad
    byte, tensor count, k, length, checksum, positions, padding bits, or a value that is
    not finite — named by module and ΔA/ΔB — even under a valid checksum)."""
    data = payload_bytes(data, shape)
    if len(data) == 0:
        raise WireFormatError("empty top-k payload: a client keeping 0 entries sends nothing, there is nothing "
                              "to decode")
    if len(data) < 16:
        raise WireFormatError(f"top-k payload truncated: {len(data)} bytes, shorter than the 16-byte header")
    magic, version, code, coding, pad, tensors, k = _TK_HEAD.unpack_from(data, 0)
    (crc,) = struct.unpack_from("<I", data, 12)
    if magic != b"TK" or version != 1 or code not in (0, 1) or coding not in (0, 1):
        raise WireFormatError(f"not a top-k payload (magic {magic!r}, version {version}, dtype {code}, "
                              f"coding {coding})")
    if pad != 0:
        raise WireFormatError(f"top-k header pad byte is {pad}, must be 0")
    sizes = []
    for m in shape.modules:
        sizes += [shape.rank * m.in_features, m.out_features * shape.rank]
    if tensors != len(sizes):
        raise WireFormatError(f"payload has {tensors} tensors; the adapter has {len(sizes)}")
    n = sum(sizes)
    if not 1 <= k <= n:
        raise WireFormatError(f"top-k payload has k = {k} entries; expected 1..{n}")
    q = 2 if code else 4
    pos_bytes = -(-n // 8) if coding == _TK_BITMAP else -(-(k * _index_bits(n)) // 8)
    if len(data) != 16 + pos_bytes + k * q:
        raise WireFormatError(f"top-k payload length {len(data)} bytes, expected {16 + pos_bytes + k * q}")
    if zlib.crc32(data[16:], zlib.crc32(data[:12])) != crc:
        raise WireFormatError("checksum mismatch: the top-k payload is corrupted")
    raw = np.unpackbits(np.frombuffer(data, np.uint8, pos_bytes, 16))
    used = n if coding == _TK_BITMAP else k * _index_bits(n)
    if raw[used:].any():
        raise WireFormatError(f"top-k position padding bits (after the {used} position bits) must be zero")
    if coding == _TK_BITMAP:
        pos = np.flatnonzero(raw[:n])
    else:
        ib = _index_bits(n)
        bits = raw[: k * ib].reshape(k, ib).astype(np.uint64)
        pos = (bits << np.arange(ib - 1, -1, -1, dtype=np.uint64)).sum(axis=1).astype(np.int64)
    if len(pos) != k or (len(pos) and (pos.max() >= n or np.any(np.diff(pos) <= 0))):
        raise WireFormatError("top-k positions are inconsistent with k or the adapter size")
    values = np.frombuffer(data, "<f2" if code else "<f4", k, 16 + pos_bytes).astype(np.float32)
    flat = torch.zeros(n)
    flat[torch.as_tensor(pos)] = torch.from_numpy(values)
    out, off = [], 0
    dims = []
    for m in shape.modules:
        dims += [(shape.rank, m.in_features), (m.out_features, shape.rank)]
    for size, dim in zip(sizes, dims, strict=True):
        out.append(flat[off:off + size].reshape(dim))
        off += size
    bits = 8 * len(data)
    upd = TopKUpdate(out[0::2], out[1::2], k, bits, coding, torch.float16 if code else torch.float32,
                     names=[m.name for m in shape.modules])
    problem = upd.values_problem()
    if problem:
        raise WireFormatError(f"{problem}: the top-k payload carries values no client can send")
    return upd


def topk_budget(old: Factors, keep: int, bits_per_value: int = 32) -> tuple[int, int, int]:
    """(k, bits, coding): entries affordable within SOFT's budget S(keep), positions counted.

    The payload (:meth:`TopKUpdate.encode`) is a 16-byte header, the positions — an N-bit
    bitmap over all N = r·M factor entries, or k indices of ⌈log2 N⌉ bits — padded to whole
    bytes, and k values; the coding that lets more entries fit is used. ``bits`` is the
    payload's exact size.
    """
    shape = shape_of(old, bits_per_value)
    if keep == 0:
        return 0, 0, _TK_BITMAP
    budget = shape.payload_bits(keep) // 8  # bytes
    n = shape.num_parameters
    qb = bits_per_value // 8
    k_bitmap = max(0, (budget - 16 - (-(-n // 8))) // qb)
    ib = _index_bits(n)
    k_index = max(0, (budget - 16) * 8 // (ib + 8 * qb))
    while k_index and 16 + (-(-(k_index * ib) // 8)) + k_index * qb > budget:
        k_index -= 1
    if k_bitmap >= k_index:
        k, coding = min(k_bitmap, n), _TK_BITMAP
        size = 16 + (-(-n // 8)) + k * qb
    else:
        k, coding = min(k_index, n), _TK_INDEX
        size = 16 + (-(-(k * ib) // 8)) + k * qb
    return int(k), int(8 * size) if k else 0, coding


def topk_elementwise(old: Factors, new: Factors, keep: int, bits_per_value: int = 32, *,
                     joint: bool = False) -> TopKUpdate:
    """Largest-magnitude entries of ΔA and ΔB at SOFT's bit budget for ``keep`` (spec §8).

    ``joint=False`` (spec §8: ΔA and ΔB each): every factor tensor keeps the same
    fraction k/N of its own entries, its largest; ``joint=True``: the k largest over all
    tensors together.

    Raises ValueError, naming the module and ΔA/ΔB, if an increment overflows the factors'
    dtype or lies outside the wire type's finite range (float16: |x| > 65 504).
    """
    r = check_same_layout(old, new)
    keep = check_keep(keep, r)
    k, bits, coding = topk_budget(old, keep, bits_per_value)
    if bits_per_value not in (16, 32):
        raise ValueError(f"bits_per_value must be 16 or 32; got bits_per_value = {bits_per_value!r}")
    wire = torch.float16 if bits_per_value == 16 else torch.float32
    deltas = []
    for name, (A0, B0), (A1, B1) in zip(old, old.values(), new.values(), strict=True):
        da, db = (A1 - A0).detach(), (B1 - B0).detach()
        for label, d in (("ΔA", da), ("ΔB", db)):
            problem = _tensor_problem(name, label, d, wire, "= new − old overflows (not finite)")
            if problem:
                raise ValueError(f"cannot send the top-k update: {problem}")
        # values travel at the wire precision, as SOFT's do
        deltas += [da.to(wire).to(A0.dtype), db.to(wire).to(B0.dtype)]
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
    return TopKUpdate(out[0::2], out[1::2], k, bits, coding, wire, names=list(old))


def _two_sided(A0, B0, A1, B1):
    P = torch.cat([B1, B0], dim=1).double()  # m × 2r
    Q = torch.cat([A1, -A0], dim=0).double()  # 2r × n
    return P, Q


def svd_truncation_qr(old: Factors, new: Factors, keep: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per module (P, Q) with P Q the best rank-``keep`` approximation of D, via QR + 2r×2r SVD.

    Raises ValueError naming the module if D overflows float64 (factors beyond ~1e150).
    """
    r = check_same_layout(old, new)
    keep = check_keep(keep, r)
    out = []
    for name, (A0, B0), (A1, B1) in zip(old, old.values(), new.values(), strict=True):
        P, Q = _two_sided(A0.detach(), B0.detach(), A1.detach(), B1.detach())
        overflow = ValueError(f"svd_truncation_qr: the product update of module {name!r} overflows float64")
        qp, rp = torch.linalg.qr(P, mode="reduced")
        qq, rq = torch.linalg.qr(Q.transpose(0, 1), mode="reduced")
        core = rp @ rq.transpose(0, 1)
        if not bool(torch.isfinite(core).all()):
            raise overflow
        try:
            u, s, vh = torch.linalg.svd(core)
        except torch.linalg.LinAlgError as e:  # pragma: no cover - finite cores converge
            raise ValueError(f"svd_truncation_qr: the SVD of module {name!r} failed: {e}") from e
        pair = ((qp @ u[:, :keep]) * s[:keep], vh[:keep] @ qq.transpose(0, 1))
        if not all(bool(torch.isfinite(t).all()) for t in pair):
            raise overflow
        out.append(pair)
    return out


def svd_truncation_dense(old: Factors, new: Factors, keep: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same truncation by forming D = B'A' − BA and a dense SVD (reference, slow)."""
    r = check_same_layout(old, new)
    keep = check_keep(keep, r)
    out = []
    for (A0, B0), (A1, B1) in zip(old.values(), new.values(), strict=True):
        D = B1.double() @ A1.double() - B0.double() @ A0.double()
        u, s, vh = torch.linalg.svd(D, full_matrices=False)
        out.append((u[:, :keep] * s[:keep], vh[:keep]))
    return out


def ffa_bits(factors: Factors, bits_per_value: int = 32) -> int:
    """Uplink bits of an FFA-LoRA update: every module's dense ΔB (r·Σm values) plus the header."""
    shape = shape_of(factors, bits_per_value)
    return int(shape.rank * sum(m.out_features for m in shape.modules) * bits_per_value + shape.header_bits)


def ffa_update(old: Factors, new: Factors, bits_per_value: int = 32) -> tuple[list[torch.Tensor], int]:
    """FFA-LoRA: the dense ΔB of every module (A stays frozen) and its bits (header included).

    Raises ValueError naming the module if ΔB overflows the factors' dtype or, with
    ``bits_per_value=16``, lies outside float16's finite range (|x| > 65 504).
    """
    check_same_layout(old, new)
    wire = torch.float16 if bits_per_value == 16 else None
    db = []
    for name, (_, B0), (_, B1) in zip(old, old.values(), new.values(), strict=True):
        d = (B1 - B0).detach()
        problem = _tensor_problem(name, "ΔB", d, wire, "= new − old has non-finite values (overflow)")
        if problem:
            raise ValueError(f"ffa_update: {problem}")
        db.append(d)
    return db, ffa_bits(old, bits_per_value)


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
        total += product_norm_sq(P, Q)
    return max(total, 0.0)


def product_error_dense(old: Factors, new: Factors, approx_factors: Factors) -> float:
    """Reference for :func:`product_error` with dense products (tests only)."""
    total = 0.0
    for name in old:
        A1, B1 = new[name]
        Ah, Bh = approx_factors[name]
        total += float(torch.linalg.matrix_norm(B1.double() @ A1.double() - Bh.double() @ Ah.double()) ** 2)
    return total

