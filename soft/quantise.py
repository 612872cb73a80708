"""Value precision below 16 bits: int8 and int4 rank-sparse payloads with unbiased
stochastic rounding (docs/model.md, "Value precision").

:func:`quantise` turns a :class:`soft.RankSparseUpdate` into a :class:`QuantisedUpdate`:
each kept component's Δb_i and Δa_i get their own float32 scale Δ = max|x| / L, with
L = 2^(q−1) − 1 (127 for q = 8, 7 for q = 4), and every value x becomes the integer
c = ⌊x/Δ + u⌋, u ~ U[0, 1): E[cΔ] = x, and the rounding's variance is Δ² f (1 − f) ≤ Δ²/4
per value (f the fractional part of x/Δ). The generator is the caller's, so a client seeded
from (seed, round, client) rounds the same way after a resume.

Wire format (little-endian), exactly ``LoraShape.payload_bits(keep)`` bits at q = 8 or 4:

    header (16 bytes): as soft.update's, dtype code 2 (int8) or 3 (int4)
    masks  (L·r bits, packed, padded to whole bytes)
    scales (per module, per kept i ascending: Δ of b_i, Δ of a_i, float32)
    values (per module: b_i's m codes for each kept i, then a_i's n codes; int8 two's
            complement, or int4 two's complement packed two per byte, low nibble first;
            the whole section padded to a whole byte with zero bits)

Codes lie in [−L, L]: the decoder refuses −128 (int8), −8 (int4), a non-finite or negative
scale, and set padding bits, so every payload it accepts re-encodes to the same bytes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from soft.update import (
    _HEAD,
    _MAGIC,
    WIRE_VERSION,
    RankSparseUpdate,
    WireFormatError,
    _structure_problem,
    _values_problem,
    read_header,
    read_masks,
    shape_tag,
)
from tsfa.model import LoraShape

__all__ = ["QuantisedUpdate", "quantise", "decode_quantised", "QUANTISED_BITS", "levels", "rounding_profile",
           "VALUE_BITS"]

#: Every value precision a payload can carry: float32, float16, and the integer codes.
VALUE_BITS = (32, 16) + (8, 4)
#: float16 rounds to nearest with a relative error of at most 2^−11 (normal range).
FP16_UNIT = 2.0**-11

#: The value precisions below 16 bits the codec writes, and their dtype codes.
QUANTISED_BITS = (8, 4)
_CODE = {8: 2, 4: 3}


def levels(bits: int) -> int:
    """L = 2^(q−1) − 1, the largest code magnitude at q bits (symmetric range [−L, L])."""
    if bits not in QUANTISED_BITS:
        raise ValueError(f"bits must be one of {QUANTISED_BITS}; got bits = {bits!r}")
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True, eq=False)
class QuantisedUpdate:
    """A rank-sparse update at q = 8 or 4 bits per value.

    Attributes:
        shape: the adapter's :class:`tsfa.LoraShape` with ``bits_per_value`` = q.
        keep, indices: as :class:`soft.RankSparseUpdate`.
        codes_b: per module, the m×s integer codes of Δb (int8 tensors, in [−L, L]).
        codes_a: per module, the s×n integer codes of Δa.
        scale_b, scale_a: per module, the s float32 scales of the kept b_i and a_i.
    """

    shape: LoraShape
    keep: int
    indices: tuple[torch.Tensor, ...]
    codes_b: tuple[torch.Tensor, ...]
    codes_a: tuple[torch.Tensor, ...]
    scale_b: tuple[torch.Tensor, ...]
    scale_a: tuple[torch.Tensor, ...]

    @property
    def bits(self) -> int:
        return self.shape.bits_per_value

    @property
    def payload_bits(self) -> int:
        """Uplink bits, ``LoraShape.payload_bits(keep)``; equals 8 × len(encode())."""
        return self.shape.payload_bits(self.keep)

    def dequantised(self) -> RankSparseUpdate:
        """The values cΔ as a float32 :class:`soft.RankSparseUpdate` (what the server aggregates)."""
        dbs = tuple(c.float() * s[None, :] for c, s in zip(self.codes_b, self.scale_b, strict=True))
        das = tuple(c.float() * s[:, None] for c, s in zip(self.codes_a, self.scale_a, strict=True))
        return RankSparseUpdate(self.shape, self.keep, self.indices, dbs, das, torch.float32)

    def rounding_variance(self) -> float:
        """An upper bound on E‖Q(x) − x‖² over all sent values, Σ count · Δ²/4 per component
        and factor: from the scales and sizes only."""
        total = 0.0
        for cb, ca, sb, sa in zip(self.codes_b, self.codes_a, self.scale_b, self.scale_a, strict=True):
            total += float(cb.shape[0] * (sb.double() ** 2).sum() + ca.shape[1] * (sa.double() ** 2).sum()) / 4.0
        return total

    def encode(self) -> bytes:
        """The payload bytes (module docstring)."""
        if self.keep == 0:
            return b""
        L, r, lv = self.shape.num_modules, self.shape.rank, levels(self.bits)
        mask = torch.zeros(L, r, dtype=torch.bool)
        for ell, idx in enumerate(self.indices):
            mask[ell, idx] = True
        scales, codes = [], []
        for cb, ca, sb, sa in zip(self.codes_b, self.codes_a, self.scale_b, self.scale_a, strict=True):
            if not (torch.isfinite(sb).all() and torch.isfinite(sa).all() and (sb >= 0).all() and (sa >= 0).all()):
                raise ValueError("cannot encode the update: a scale is negative or not finite")
            scales.append(torch.stack([sb.float(), sa.float()], dim=1).reshape(-1).numpy().astype("<f4").tobytes())
            codes.append(cb.transpose(0, 1).reshape(-1))
            codes.append(ca.reshape(-1))
        flat = torch.cat(codes).to(torch.int64).numpy() if codes else np.zeros(0, np.int64)
        if flat.size and np.abs(flat).max() > lv:
            raise ValueError(f"cannot encode the update: a code lies outside [−{lv}, {lv}]")
        if self.bits == 8:
            values = flat.astype(np.int8).tobytes()
        else:
            nib = (flat & 0xF).astype(np.uint8)
            if nib.size % 2:
                nib = np.append(nib, np.uint8(0))
            values = (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8).tobytes()
        head = _HEAD.pack(_MAGIC, WIRE_VERSION, _CODE[self.bits], r, L, self.keep, shape_tag(self.shape))
        body = np.packbits(mask.numpy().reshape(-1).astype(np.uint8)).tobytes() + b"".join(scales) + values
        out = head + struct.pack("<I", zlib.crc32(body, zlib.crc32(head))) + body
        assert 8 * len(out) == self.payload_bits, (8 * len(out), self.payload_bits)
        return out


def rounding_profile(old, new, value_bits, scope: str = "module") -> np.ndarray:
    """v(s, q): the expected product-space error of sending the s components SOFT keeps at q bits,
    for s = 0..r (rows) and q in ``value_bits`` (columns), from norms and maxima only.

    Component i is sent as Δb_i, Δa_i; the server applies b'_i = b_i + Δb_i + ε, a'_i = a_i + Δa_i + η.
    With ε, η independent and zero-mean (stochastic rounding),

        E‖(b'_i + ε)(a'_i + η)ᵀ − b'_i a'_iᵀ‖² = E‖ε‖² ‖a'_i‖² + ‖b'_i‖² E‖η‖² + E‖ε‖² E‖η‖²,

    and components round independently, so v(s, q) sums this over the kept components (the s
    largest importances per module for ``scope="module"``, the s·L largest overall for
    ``"global"``, as :func:`soft.sparsify` selects). At q = 8, 4 the bound
    E‖ε‖² ≤ m Δ²/4 with Δ = max|Δb_i| / L_q (:meth:`QuantisedUpdate.rounding_variance`'s) is used;
    at q = 16, round-to-nearest float16 (biased but tiny): ‖ε‖ ≤ 2^−11 ‖Δb_i‖; q = 32: 0 (the
    reference precision). v(0, q) = 0. Returns a float64 array of shape (r+1, len(value_bits)).
    """
    from soft.factors import check_same_layout
    from soft.importance import _importance

    r = check_same_layout(old, new)
    qs = tuple(value_bits)
    if not qs or any(isinstance(q, bool) or q not in VALUE_BITS for q in qs):
        raise ValueError(f"value_bits must be a non-empty sequence of {VALUE_BITS}; got value_bits = {value_bits!r}")
    if scope not in ("module", "global"):
        raise ValueError(f"scope must be 'module' or 'global'; got scope = {scope!r}")
    per, imps = [], []
    for name in old:
        A0, B0 = old[name]
        A1, B1 = new[name]
        db, da = (B1 - B0).detach().double(), (A1 - A0).detach().double()
        a2, b2 = (A1.detach().double() ** 2).sum(dim=1), (B1.detach().double() ** 2).sum(dim=0)  # ‖a'_i‖², ‖b'_i‖²
        m, n = db.shape[0], da.shape[1]
        cols = []
        for q in qs:
            if q == 32:
                eps, eta = torch.zeros(r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64)
            elif q == 16:
                eps, eta = FP16_UNIT**2 * (db**2).sum(dim=0), FP16_UNIT**2 * (da**2).sum(dim=1)
            else:
                lv = levels(q)
                eps = m * (db.abs().amax(dim=0) / lv) ** 2 / 4.0
                eta = n * (da.abs().amax(dim=1) / lv) ** 2 / 4.0
            cols.append(eps * a2 + b2 * eta + eps * eta)
        per.append(torch.stack(cols, dim=1).numpy())  # r × len(qs)
        imps.append(_importance(A0, B0, A1, B1))
    out = np.zeros((r + 1, len(qs)))
    if scope == "module":
        for v, imp in zip(per, imps, strict=True):
            order = torch.sort(imp, descending=True, stable=True).indices.numpy()
            out[1:] += np.cumsum(v[order], axis=0)
        return out
    v, imp = np.concatenate(per), torch.cat(imps)
    order = torch.sort(imp, descending=True, stable=True).indices.numpy()
    csum = np.concatenate([np.zeros((1, len(qs))), np.cumsum(v[order], axis=0)])
    return csum[np.arange(r + 1) * len(per)]


def quantise(update: RankSparseUpdate, bits: int, generator: torch.Generator | None = None) -> QuantisedUpdate:
    """``update`` at ``bits`` ∈ {8, 4} per value, by unbiased stochastic rounding with one
    scale per kept component and factor (module docstring). ``generator``: the rounding's
    random source (None: torch's default generator)."""
    lv = levels(bits)
    if not isinstance(update, RankSparseUpdate):
        raise ValueError(f"update must be a soft.RankSparseUpdate; got {type(update).__name__}")
    problem = _structure_problem(update) or _values_problem(update.names, update.indices, update.delta_b,
                                                            update.delta_a)
    if problem:
        raise ValueError(f"cannot quantise the update: {problem}")
    if any(len(i) != update.keep for i in update.indices):
        raise ValueError(f"cannot quantise the update: every module must send keep = {update.keep} components "
                         f"(scope='module'); got {[len(i) for i in update.indices]}")
    shape = LoraShape(update.shape.modules, update.shape.rank, bits, update.shape.header_bits)

    def one(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().double()
        scale = (x.abs().amax(dim=dim) / lv).float() if x.numel() else torch.zeros(x.shape[1 - dim])
        s = scale.double().unsqueeze(dim)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
        codes = torch.floor(x / safe + u).clamp(-lv, lv)
        return torch.where(s > 0, codes, torch.zeros_like(codes)).to(torch.int8), scale

    cb, ca, sb, sa = [], [], [], []
    for db, da in zip(update.delta_b, update.delta_a, strict=True):
        c, s = one(db, 0)  # Δb is m×s: one scale per column
        cb.append(c)
        sb.append(s)
        c, s = one(da, 1)  # Δa is s×n: one scale per row
        ca.append(c)
        sa.append(s)
    return QuantisedUpdate(shape, update.keep, update.indices, tuple(cb), tuple(ca), tuple(sb), tuple(sa))


def decode_quantised(data: bytes, shape: LoraShape) -> QuantisedUpdate:
    """Parse a payload of :meth:`QuantisedUpdate.encode` for this adapter shape (any
    ``bits_per_value``: the payload's dtype code sets q). Raises :class:`WireFormatError`
    naming what is wrong; an accepted payload re-encodes to the same bytes."""
    data, code, keep, crc = read_header(data, shape)
    bits = {v: k for k, v in _CODE.items()}.get(code)
    if bits is None:
        raise WireFormatError(f"dtype code {code} is not a quantised payload (2 = int8, 3 = int4)")
    L = shape.num_modules
    wire, mask, off = read_masks(data, shape, bits, keep, crc)
    counts = mask.sum(axis=1)
    if np.any(counts != keep):
        raise WireFormatError(f"masks set {counts.tolist()} components per module; expected keep = {keep} each")
    scales = np.frombuffer(data, "<f4", 2 * keep * L, off).astype(np.float32).reshape(L, keep, 2)
    off += 8 * keep * L
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise WireFormatError("a scale is negative or not finite")
    n_codes = keep * wire.values_per_component
    raw = np.frombuffer(data, np.uint8, len(data) - off, off)
    if bits == 8:
        flat = raw.view(np.int8).astype(np.int64)
    else:
        nib = np.empty(2 * raw.size, np.int64)
        nib[0::2], nib[1::2] = raw & 0xF, raw >> 4
        if n_codes % 2 and nib[-1]:
            raise WireFormatError("the int4 padding nibble must be zero")
        flat = np.where(nib >= 8, nib - 16, nib)[:n_codes]
    lv = levels(bits)
    if np.any(flat < -lv):
        raise WireFormatError(f"a code is −{lv + 1}: codes lie in [−{lv}, {lv}]")
    idxs, cb, ca, sb, sa, pos = [], [], [], [], [], 0
    for ell, mod in enumerate(shape.modules):
        m, n = mod.out_features, mod.in_features
        b = flat[pos: pos + keep * m].reshape(keep, m)
        pos += keep * m
        a = flat[pos: pos + keep * n].reshape(keep, n)
        pos += keep * n
        idxs.append(torch.from_numpy(np.flatnonzero(mask[ell]).astype(np.int64)))
        cb.append(torch.from_numpy(b.T.astype(np.int8).copy()))
        ca.append(torch.from_numpy(a.astype(np.int8).copy()))
        sb.append(torch.from_numpy(scales[ell, :, 0].copy()))
        sa.append(torch.from_numpy(scales[ell, :, 1].copy()))
    return QuantisedUpdate(wire, keep, tuple(idxs), tuple(cb), tuple(ca), tuple(sb), tuple(sa))
