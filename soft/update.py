"""Rank-sparse LoRA updates, their wire format, and their aggregation (spec §1, §3, §4).

Wire format (little-endian), exactly ``LoraShape.payload_bits(keep)`` bits:

    header (16 bytes = H): b"SF", version u8, dtype code u8 (0 fp32, 1 fp16), rank u16,
                           module count u16, keep u16, shape tag u16, CRC-32 u32
    masks  (L·r bits, packed, padded to whole bytes): bit ℓ·r + i = module ℓ sent index i
    values (s·M values of q bits): per module in order, Δb_i (m values) for each kept i
                           ascending, then Δa_i (n values) for each kept i ascending

The shape tag is the low 16 bits of a CRC-32 of the module names and shapes, so a payload
cannot be decoded against the wrong model; the CRC-32 covers the first 12 header bytes and
everything after the header, so a flipped or truncated byte is an error, never garbage.
A client that keeps 0 components is not scheduled and sends nothing (0 bits).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from soft.factors import Factors, check_factors, check_same_layout, shape_of
from soft.importance import component_importance, select_top
from tsfa.model import LoraShape

__all__ = ["RankSparseUpdate", "WireFormatError", "sparsify", "decode", "aggregate", "WIRE_VERSION"]

WIRE_VERSION = 1
_MAGIC = b"SF"
_HEAD = struct.Struct("<2sBBHHHH")  # 12 bytes, then the CRC-32 (4 bytes)
HEADER_BYTES = 16
_DTYPES = {0: (torch.float32, "<f4", 32), 1: (torch.float16, "<f2", 16)}
_CODES = {torch.float32: 0, torch.float16: 1}


class WireFormatError(ValueError):
    """A payload that cannot be decoded: wrong magic/version/shape, bad length or checksum."""


def shape_tag(shape: LoraShape) -> int:
    text = ";".join(f"{m.name}:{m.out_features}x{m.in_features}" for m in shape.modules)
    return zlib.crc32(text.encode()) & 0xFFFF


@dataclass(frozen=True, eq=False)
class RankSparseUpdate:
    """The increments of the kept rank components of every module.

    Attributes:
        shape: the adapter's :class:`tsfa.LoraShape` (module names and sizes, rank r, q).
        keep: s, components per module (0 = nothing sent).
        indices: per module, the kept indices (int64, ascending, length s).
        delta_b: per module, Δb_i for the kept i as an m×s tensor (columns in index order).
        delta_a: per module, Δa_i for the kept i as an s×n tensor.
        dtype: torch.float32 or torch.float16, the wire precision (q = 32 or 16).
    """

    shape: LoraShape
    keep: int
    indices: tuple[torch.Tensor, ...]
    delta_b: tuple[torch.Tensor, ...]
    delta_a: tuple[torch.Tensor, ...]
    dtype: torch.dtype = torch.float32

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.shape.modules)

    @property
    def payload_bits(self) -> int:
        """Uplink bits, ``LoraShape.payload_bits(keep)``; equals 8 × len(encode())."""
        return self.shape.payload_bits(self.keep)

    def mask(self) -> torch.Tensor:
        """L×r boolean mask of sent components."""
        m = torch.zeros(self.shape.num_modules, self.shape.rank, dtype=torch.bool)
        for ell, idx in enumerate(self.indices):
            m[ell, idx] = True
        return m

    def encode(self) -> bytes:
        """The payload bytes (see the module docstring)."""
        if self.keep == 0:
            return b""
        code = _CODES[self.dtype]
        _, np_dtype, _ = _DTYPES[code]
        L, r = self.shape.num_modules, self.shape.rank
        head = _HEAD.pack(_MAGIC, WIRE_VERSION, code, r, L, self.keep, shape_tag(self.shape))
        mask = np.packbits(self.mask().numpy().reshape(-1).astype(np.uint8)).tobytes()
        parts = [mask]
        for db, da in zip(self.delta_b, self.delta_a, strict=True):
            parts.append(db.detach().to(self.dtype).transpose(0, 1).contiguous().numpy().astype(np_dtype).tobytes())
            parts.append(da.detach().to(self.dtype).contiguous().numpy().astype(np_dtype).tobytes())
        body = b"".join(parts)
        crc = zlib.crc32(body, zlib.crc32(head))
        out = head + struct.pack("<I", crc) + body
        assert 8 * len(out) == self.payload_bits, (8 * len(out), self.payload_bits)
        return out

    def apply_to(self, factors: Factors, scale: float = 1.0) -> dict:
        """New factor set: ``factors`` plus ``scale`` × the sent increments."""
        out = {}
        for ell, (name, (A, B)) in enumerate(factors.items()):
            A2, B2 = A.detach().clone(), B.detach().clone()
            idx = self.indices[ell]
            if len(idx):
                B2[:, idx] += scale * self.delta_b[ell].to(B2.dtype)
                A2[idx] += scale * self.delta_a[ell].to(A2.dtype)
            out[name] = (A2, B2)
        return out


def check_keep(keep, r: int) -> int:
    """``keep`` as an int in 0..r, or a ValueError naming it (the keep count of a payload)."""
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or not 0 <= int(keep) <= r:
        raise ValueError(f"keep must be an integer in 0..{r}; got keep = {keep!r}")
    return int(keep)


def _check_dtype(dtype) -> torch.dtype:
    if dtype not in _CODES:
        raise ValueError(f"dtype must be torch.float32 or torch.float16; got dtype = {dtype!r}")
    return dtype


def updates_from_indices(old: Factors, new: Factors, indices: Sequence[torch.Tensor], keep: int,
                         dtype=torch.float32) -> RankSparseUpdate:
    """The update that sends the given component indices of every module (any selector).

    Every module sends ``keep`` indices, or (global scope) the counts may differ between
    modules of equal size m + n as long as they total keep · L, so the payload is unchanged.
    """
    shape = shape_of(old, bits_per_value=_DTYPES[_CODES[_check_dtype(dtype)]][2])
    counts = [len(i) for i in indices]
    if any(c != keep for c in counts):
        sizes = {m.out_features + m.in_features for m in shape.modules}
        if sum(counts) != keep * len(counts) or len(sizes) != 1:
            raise ValueError(f"the modules must send keep = {keep} indices each (or keep·L = {keep * len(counts)} "
                             f"in total when all modules have the same size m + n); got {counts}")
    dbs, das, idxs = [], [], []
    for (A0, B0), (A1, B1), idx in zip(old.values(), new.values(), indices, strict=True):
        idx = torch.sort(torch.as_tensor(idx, dtype=torch.int64)).values
        idxs.append(idx)
        dbs.append((B1[:, idx].detach() - B0[:, idx].detach()).to(dtype))
        das.append((A1[idx].detach() - A0[idx].detach()).to(dtype))
    return RankSparseUpdate(shape, keep, tuple(idxs), tuple(dbs), tuple(das), dtype)


def sparsify(old: Factors, new: Factors, keep: int, *, dtype=torch.float32, scope: str = "module") -> RankSparseUpdate:
    """SOFT: keep the components with the largest ‖D_i‖ = ‖b'_i a'_iᵀ − b_i a_iᵀ‖.

    ``old`` are the factors the client received, ``new`` its locally trained ones (same
    modules, same order). Only vector norms and dot products are computed.

    ``scope="module"`` (spec §3): ``keep`` components in every module. ``scope="global"``:
    the keep · L largest components over all modules, so modules whose update is larger get
    more of the same payload; needs every module to have the same size m + n (then the
    payload is exactly ``LoraShape.payload_bits(keep)`` either way).
    """
    r = check_same_layout(old, new)
    keep = check_keep(keep, r)
    imps = [component_importance(*old[n], *new[n]) for n in old]
    if scope == "module":
        indices = [select_top(imp, keep) for imp in imps]
    elif scope == "global":
        sizes = {int(A.shape[1] + B.shape[0]) for A, B in old.values()}
        if len(sizes) != 1:
            raise ValueError(f"scope='global' needs modules of equal size m + n; got sizes {sorted(sizes)}")
        flat = torch.cat(imps)
        top = torch.sort(torch.sort(flat, descending=True, stable=True).indices[: keep * len(imps)]).values
        indices = [top[(top >= ell * r) & (top < (ell + 1) * r)] - ell * r for ell in range(len(imps))]
    else:
        raise ValueError(f"scope must be 'module' or 'global'; got scope = {scope!r}")
    return updates_from_indices(old, new, indices, keep, dtype)


def decode(data: bytes, shape: LoraShape) -> RankSparseUpdate:
    """Parse a payload produced by :meth:`RankSparseUpdate.encode` for this adapter shape.

    Raises :class:`WireFormatError` naming what is wrong (magic, version, dtype, rank,
    module count, keep, shape tag, length, checksum, mask).
    """
    if not isinstance(shape, LoraShape):
        raise TypeError(f"shape must be a tsfa.LoraShape; got {type(shape).__name__}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes; got {type(data).__name__}")
    data = bytes(data)
    if len(data) == 0:
        raise WireFormatError("empty payload: a client keeping 0 components sends nothing, there is nothing to decode")
    if len(data) < HEADER_BYTES:
        raise WireFormatError(f"payload truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, code, r, L, keep, tag = _HEAD.unpack_from(data, 0)
    (crc,) = struct.unpack_from("<I", data, _HEAD.size)
    if magic != _MAGIC:
        raise WireFormatError(f"bad magic {magic!r}: not a SOFT payload (expected {_MAGIC!r})")
    if version != WIRE_VERSION:
        raise WireFormatError(f"unsupported wire version {version} (this decoder reads {WIRE_VERSION})")
    if code not in _DTYPES:
        raise WireFormatError(f"unknown dtype code {code} (0 = float32, 1 = float16)")
    if r != shape.rank or L != shape.num_modules:
        raise WireFormatError(
            f"payload is for rank {r} with {L} modules; the receiver's adapter has rank {shape.rank} "
            f"with {shape.num_modules} modules"
        )
    if tag != shape_tag(shape):
        raise WireFormatError("shape tag mismatch: the payload was encoded for different module names or sizes")
    if not 1 <= keep <= r:
        raise WireFormatError(f"keep = {keep} outside 1..{r}")
    dtype, np_dtype, q = _DTYPES[code]
    wire_shape = LoraShape(shape.modules, shape.rank, q, 8 * HEADER_BYTES)
    expected = wire_shape.payload_bits(keep) // 8
    if len(data) != expected:
        raise WireFormatError(f"payload length {len(data)} bytes, expected {expected} for keep = {keep}")
    if zlib.crc32(data[HEADER_BYTES:], zlib.crc32(data[: _HEAD.size])) != crc:
        raise WireFormatError("checksum mismatch: the payload is corrupted")
    mask_bytes = wire_shape.mask_bits // 8
    bits = np.unpackbits(np.frombuffer(data, np.uint8, mask_bytes, HEADER_BYTES))[: L * r].reshape(L, r)
    counts = bits.sum(axis=1)
    sizes = {m.out_features + m.in_features for m in shape.modules}
    if np.any(counts != keep) and (len(sizes) != 1 or counts.sum() != keep * L):
        raise WireFormatError(f"masks set {counts.tolist()} components per module; expected keep = {keep} each"
                              + (f" or {keep * L} in total" if len(sizes) == 1 else ""))
    off = HEADER_BYTES + mask_bytes
    idxs, dbs, das = [], [], []
    size = q // 8
    for ell, mod in enumerate(shape.modules):
        m, n, c = mod.out_features, mod.in_features, int(counts[ell])
        nb, na = c * m, c * n
        db = np.frombuffer(data, np_dtype, nb, off).reshape(c, m)
        off += nb * size
        da = np.frombuffer(data, np_dtype, na, off).reshape(c, n)
        off += na * size
        idxs.append(torch.from_numpy(np.flatnonzero(bits[ell]).astype(np.int64)))
        dbs.append(torch.from_numpy(db.copy()).transpose(0, 1).contiguous())
        das.append(torch.from_numpy(da.copy()))
    return RankSparseUpdate(wire_shape, keep, tuple(idxs), tuple(dbs), tuple(das), dtype)


def aggregate(global_factors: Factors, updates: Sequence[RankSparseUpdate], weights, *,
              fill: str = "renormalise") -> dict:
    """New global factors from rank-sparse updates (spec §3, server).

    For every module and index i, ``fill="renormalise"`` (SOFT's rule) adds the weighted
    average of Δb_i, Δa_i over the clients that sent i (weights renormalised over them);
    an index nobody sent stays unchanged. ``fill="zero"`` treats an unsent increment as 0
    and normalises the weights over all clients (plain FedAvg of sparse updates).
    Returns new float32/float64 tensors in the global factors' dtype.
    """
    r = check_factors(global_factors, "global_factors")
    if fill not in ("renormalise", "zero"):
        raise ValueError(f"fill must be 'renormalise' or 'zero'; got fill = {fill!r}")
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or len(w) != len(updates):
        raise ValueError(f"weights must have one entry per update ({len(updates)}); got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and non-negative; got {w.tolist()}")
    names = list(global_factors)
    for k, u in enumerate(updates):
        if not isinstance(u, RankSparseUpdate):
            raise TypeError(f"updates[{k}] must be a RankSparseUpdate; got {type(u).__name__}")
        if list(u.names) != names or u.shape.rank != r:
            raise ValueError(f"updates[{k}] is for modules {list(u.names)} at rank {u.shape.rank}; "
                             f"the global factors have {names} at rank {r}")
    out = {}
    total = float(w.sum())
    for ell, name in enumerate(names):
        A, B = global_factors[name]
        acc_a = torch.zeros(A.shape, dtype=torch.float64)
        acc_b = torch.zeros(B.shape, dtype=torch.float64)
        wsum = torch.zeros(r, dtype=torch.float64)
        for wk, u in zip(w, updates, strict=True):
            idx = u.indices[ell]
            if len(idx) == 0 or wk == 0:
                continue
            acc_b[:, idx] += wk * u.delta_b[ell].double()
            acc_a[idx] += wk * u.delta_a[ell].double()
            wsum[idx] += wk
        if fill == "zero":
            den = torch.full((r,), total if total > 0 else 1.0, dtype=torch.float64)
        else:
            den = torch.where(wsum > 0, wsum, torch.ones_like(wsum))
        A2 = (A.detach().double() + acc_a / den[:, None]).to(A.dtype)
        B2 = (B.detach().double() + acc_b / den[None, :]).to(B.dtype)
        out[name] = (A2, B2)
    return out
