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

Every value on the wire is finite. The encoder refuses (ValueError, before any byte is
produced) an increment that is NaN or inf, or that the wire type cannot hold (float16:
|x| > 65 504 after rounding); the decoder refuses (WireFormatError) a payload whose values
are not finite even when its CRC is right, and a mask whose padding bits are set, so every
payload it accepts re-encodes to the same bytes. The server's :func:`aggregate` re-checks
the updates it is handed (structure and finiteness) and refuses a result that overflows.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from soft.factors import Factors, check_factors, check_same_layout, shape_of_checked
from soft.importance import _importance, select_top
from tsfa.model import LoraShape

__all__ = ["RankSparseUpdate", "WireFormatError", "sparsify", "decode", "aggregate", "update_norm", "WIRE_VERSION"]

WIRE_VERSION = 1
_MAGIC = b"SF"
_HEAD = struct.Struct("<2sBBHHHH")  # 12 bytes, then the CRC-32 (4 bytes)
HEADER_BYTES = 16
_DTYPES = {0: (torch.float32, "<f4", 32), 1: (torch.float16, "<f2", 16)}
_CODES = {torch.float32: 0, torch.float16: 1}


class WireFormatError(ValueError):
    """A payload that cannot be decoded: wrong magic/version/shape, bad length or checksum,
    mask, or a value that is not finite."""


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (for messages)."""
    return str(dtype).removeprefix("torch.")


def _component_problem(name: str, indices, label: str, values: torch.Tensor, axis: int,
                      wire_dtype: torch.dtype | None = None, nonfinite: str = "has non-finite values (NaN or inf)"
                      ) -> str | None:
    """What is wrong with one module's increments, or None.

    ``values`` holds one component per column (``axis=1``, Δb: m×s) or per row (``axis=0``,
    Δa: s×n); ``indices`` are the rank indices of those components. A value that is not
    finite is reported with ``nonfinite``; with ``wire_dtype``, a finite value that the wire
    type rounds to ±inf (float16 beyond 65 504) is reported as out of range. The message
    names the module, the rank component and the factor (``label``).
    """
    if values.numel() == 0:
        return None
    values = values.detach()
    reduce = 1 - axis

    def where(bad: torch.Tensor) -> tuple[int, int]:
        j = int(torch.nonzero(bad.any(dim=reduce)).reshape(-1)[0])
        comp = int(indices[j]) if j < len(indices) else j
        return j, comp

    if (wire_dtype is None or values.dtype == wire_dtype) and bool(torch.isfinite(values.sum())):
        return None  # one reduction: a finite sum has no NaN or inf among its terms
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        _, comp = where(bad)
        return f"module {name!r}, component {comp}: {label} {nonfinite}"
    if wire_dtype is not None and values.dtype != wire_dtype:
        over = ~torch.isfinite(values.to(wire_dtype))
        if bool(over.any()):
            j, comp = where(over)
            big = float(values.select(axis, j).double().abs().max())
            return (f"module {name!r}, component {comp}: {label} has values outside {dtype_name(wire_dtype)}'s "
                    f"finite range (|x| ≤ {torch.finfo(wire_dtype).max:g}); largest |x| = {big:.6g}")
    return None


def _values_problem(names, indices, delta_b, delta_a, wire_dtype=None) -> str | None:
    for name, idx, db, da in zip(names, indices, delta_b, delta_a, strict=True):
        problem = (_component_problem(name, idx, "Δb", db, 1, wire_dtype)
                   or _component_problem(name, idx, "Δa", da, 0, wire_dtype))
        if problem:
            return problem
    return None


def _structure_problem(u: RankSparseUpdate) -> str | None:
    """Whether a (possibly hand-built) update is consistent with its shape, or None."""
    L, r = u.shape.num_modules, u.shape.rank
    if not len(u.indices) == len(u.delta_b) == len(u.delta_a) == L:
        return (f"has {len(u.indices)} index sets, {len(u.delta_b)} Δb and {len(u.delta_a)} Δa "
                f"for {L} modules")
    for mod, idx, db, da in zip(u.shape.modules, u.indices, u.delta_b, u.delta_a, strict=True):
        m, n = mod.out_features, mod.in_features
        if not isinstance(idx, torch.Tensor) or idx.ndim != 1 or idx.is_floating_point() or idx.is_complex():
            return f"module {mod.name!r}: indices must be a 1-D integer tensor"
        c = len(idx)
        if c and (int(idx.min()) < 0 or int(idx.max()) >= r or bool((idx[1:] <= idx[:-1]).any())):
            return f"module {mod.name!r}: indices {idx.tolist()} must be ascending, distinct and in 0..{r - 1}"
        for label, t, want in (("Δb", db, (m, c)), ("Δa", da, (c, n))):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                return f"module {mod.name!r}: {label} must be a floating tensor of shape {want}; got {got}"
    return None


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
    #: Set by :func:`sparsify` and :func:`updates_from_indices`, which check structure and values
    #: while building; ``encode`` checks a hand-built (or ``dataclasses.replace``-d) update itself.
    _checked: bool = field(default=False, init=False, repr=False, compare=False)

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
        """The payload bytes (see the module docstring).

        Raises ValueError, naming the module, the component and the factor, if an increment
        is not finite or lies outside the wire type's finite range (float16: |x| > 65 504).
        """
        if self.keep == 0:
            return b""
        code = _CODES[_check_dtype(self.dtype)]
        problem = None if self._checked else (_structure_problem(self) or _values_problem(
            self.names, self.indices, self.delta_b, self.delta_a, self.dtype))
        if problem:
            raise ValueError(f"cannot encode the update: {problem}")
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
        return head + struct.pack("<I", crc) + body  # 8 × its length is payload_bits (tests)

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


def payload_bytes(data, shape) -> bytes:
    """``data`` as bytes, for decoding against ``shape`` (a :class:`tsfa.LoraShape`); a wrong
    type of either is a ValueError naming it (the library's one error type for bad input)."""
    if not isinstance(shape, LoraShape):
        raise ValueError(f"shape must be a tsfa.LoraShape; got {type(shape).__name__}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes; got {type(data).__name__}")
    return bytes(data)


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
    r = check_same_layout(old, new)
    return _build_update(old, new, indices, check_keep(keep, r), dtype)


def _build_update(old: Factors, new: Factors, indices, keep: int, dtype) -> RankSparseUpdate:
    """:func:`updates_from_indices` for factor sets already checked (:func:`check_same_layout`)."""
    shape = shape_of_checked(old, bits_per_value=_DTYPES[_CODES[_check_dtype(dtype)]][2])
    counts = [len(i) for i in indices]
    if any(c != keep for c in counts):
        sizes = {m.out_features + m.in_features for m in shape.modules}
        if sum(counts) != keep * len(counts) or len(sizes) != 1:
            raise ValueError(f"the modules must send keep = {keep} indices each (or keep·L = {keep * len(counts)} "
                             f"in total when all modules have the same size m + n); got {counts}")
    dbs, das, idxs = [], [], []
    for name, (A0, B0), (A1, B1), idx in zip(old, old.values(), new.values(), indices, strict=True):
        idx = torch.sort(torch.as_tensor(idx, dtype=torch.int64)).values
        idxs.append(idx)
        raw_b = B1[:, idx].detach() - B0[:, idx].detach()
        raw_a = A1[idx].detach() - A0[idx].detach()
        overflow = f"= new − old overflows {dtype_name(raw_b.dtype)} (not finite)"
        problem = (_component_problem(name, idx, "Δb", raw_b, 1, dtype, overflow)
                   or _component_problem(name, idx, "Δa", raw_a, 0, dtype, overflow))
        if problem:
            raise ValueError(f"cannot send the update: {problem}")
        dbs.append(raw_b.to(dtype))
        das.append(raw_a.to(dtype))
    update = RankSparseUpdate(shape, keep, tuple(idxs), tuple(dbs), tuple(das), dtype)
    object.__setattr__(update, "_checked", True)  # checked above, value by value
    return update


def sparsify(old: Factors, new: Factors, keep: int, *, dtype=torch.float32, scope: str = "module") -> RankSparseUpdate:
    """SOFT: keep the components with the largest ‖D_i‖ = ‖b'_i a'_iᵀ − b_i a_iᵀ‖.

    ``old`` are the factors the client received, ``new`` its locally trained ones (same
    modules, same order). Only vector norms and dot products are computed.

    ``scope="module"`` (spec §3): ``keep`` components in every module. ``scope="global"``:
    the keep · L largest components over all modules, so modules whose update is larger get
    more of the same payload; needs every module to have the same size m + n (then the
    payload is exactly ``LoraShape.payload_bits(keep)`` either way).

    Raises ValueError, naming the module, the component and the factor, if a kept increment
    overflows the factors' dtype or lies outside the wire type's finite range (float16:
    |x| > 65 504 after rounding), before any byte is produced.
    """
    r = check_same_layout(old, new)  # validated once here: shapes, dtypes, finite entries
    keep = check_keep(keep, r)
    imps = [_importance(*old[n], *new[n]) for n in old]
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
    return _build_update(old, new, indices, keep, dtype)


def read_header(data, shape: LoraShape) -> tuple[bytes, int, int, int]:
    """(bytes, dtype code, keep, CRC) of a SOFT payload's header, checked against ``shape``:
    not empty or truncated, magic, version, rank, module count, shape tag, keep in 1..r
    (a :class:`WireFormatError` naming what is wrong). The dtype code is the caller's to check."""
    data = payload_bytes(data, shape)
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
    if r != shape.rank or L != shape.num_modules:
        raise WireFormatError(
            f"payload is for rank {r} with {L} modules; the receiver's adapter has rank {shape.rank} "
            f"with {shape.num_modules} modules"
        )
    if tag != shape_tag(shape):
        raise WireFormatError("shape tag mismatch: the payload was encoded for different module names or sizes")
    if not 1 <= keep <= r:
        raise WireFormatError(f"keep = {keep} outside 1..{r}")
    return data, code, keep, crc


def read_masks(data: bytes, shape: LoraShape, q: int, keep: int, crc: int) -> tuple[LoraShape, np.ndarray, int]:
    """After :func:`read_header`: the length for ``keep`` at ``q`` bits, the checksum and the
    masks' padding bits, checked; returns (the wire's LoraShape, the L×r mask, the offset
    after the masks)."""
    L, r = shape.num_modules, shape.rank
    wire = LoraShape(shape.modules, shape.rank, q, 8 * HEADER_BYTES)
    expected = wire.payload_bits(keep) // 8
    if len(data) != expected:
        raise WireFormatError(f"payload length {len(data)} bytes, expected {expected} for keep = {keep} at {q} bits")
    if zlib.crc32(data[HEADER_BYTES:], zlib.crc32(data[: _HEAD.size])) != crc:
        raise WireFormatError("checksum mismatch: the payload is corrupted")
    mask_bytes = wire.mask_bits // 8
    all_bits = np.unpackbits(np.frombuffer(data, np.uint8, mask_bytes, HEADER_BYTES))
    if all_bits[L * r:].any():
        raise WireFormatError(f"mask padding bits (after the {L * r} mask bits) must be zero")
    return wire, all_bits[: L * r].reshape(L, r), HEADER_BYTES + mask_bytes


def decode(data: bytes, shape: LoraShape) -> RankSparseUpdate:
    """Parse a payload produced by :meth:`RankSparseUpdate.encode` for this adapter shape.

    Raises :class:`WireFormatError` naming what is wrong (magic, version, dtype, rank,
    module count, keep, shape tag, length, checksum, mask popcounts or padding bits, or a
    value that is not finite — named by module, component and factor — even under a valid
    checksum). An accepted payload re-encodes to the same bytes.
    """
    data, code, keep, crc = read_header(data, shape)
    if code not in _DTYPES:
        raise WireFormatError(f"unknown dtype code {code} (0 = float32, 1 = float16; 2, 3: soft.decode_quantised)")
    L = shape.num_modules
    dtype, np_dtype, q = _DTYPES[code]
    wire_shape, bits, off = read_masks(data, shape, q, keep, crc)
    counts = bits.sum(axis=1)
    sizes = {m.out_features + m.in_features for m in shape.modules}
    if np.any(counts != keep) and (len(sizes) != 1 or counts.sum() != keep * L):
        raise WireFormatError(f"masks set {counts.tolist()} components per module; expected keep = {keep} each"
                              + (f" or {keep * L} in total" if len(sizes) == 1 else ""))
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
    problem = _values_problem([m.name for m in shape.modules], idxs, dbs, das)
    if problem:
        raise WireFormatError(f"{problem}: the payload carries values no client can send")
    return RankSparseUpdate(wire_shape, keep, tuple(idxs), tuple(dbs), tuple(das), dtype)


def aggregate(global_factors: Factors, updates: Sequence[RankSparseUpdate], weights, *,
              fill: str = "renormalise") -> dict:
    """New global factors from rank-sparse updates (spec §3, server).

    For every module and index i, ``fill="renormalise"`` (SOFT's rule) adds the weighted
    average of Δb_i, Δa_i over the clients that sent i (weights renormalised over them);
    an index nobody sent stays unchanged. ``fill="zero"`` treats an unsent increment as 0
    and normalises the weights over all clients (plain FedAvg of sparse updates).
    Returns new float32/float64 tensors in the global factors' dtype.

    Validates before aggregating: the global factors (shapes, one rank, finite), the weights
    (one per update, finite, ≥ 0), and every update, whatever its weight (same modules and
    rank; indices ascending, distinct, in 0..r−1; Δb m×s and Δa s×n; every value finite).
    A result that overflows the global factors' dtype is refused too. Each failure is a
    ValueError naming the update (``updates[k]``) and the module.
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
            raise ValueError(f"updates[{k}] must be a RankSparseUpdate; got {type(u).__name__}")
        if list(u.names) != names or u.shape.rank != r:
            raise ValueError(f"updates[{k}] is for modules {list(u.names)} at rank {u.shape.rank}; "
                             f"the global factors have {names} at rank {r}")
        for mod, (A, B) in zip(u.shape.modules, global_factors.values(), strict=True):
            if (mod.out_features, mod.in_features) != (B.shape[0], A.shape[1]):
                raise ValueError(f"updates[{k}] has module {mod.name!r} of size {mod.out_features}×{mod.in_features}; "
                                 f"the global factors have {B.shape[0]}×{A.shape[1]}")
        problem = _structure_problem(u) or _values_problem(u.names, u.indices, u.delta_b, u.delta_a)
        if problem:
            raise ValueError(f"updates[{k}]: {problem}")
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
        for label, t in (("A", A2), ("B", B2)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"the aggregated {label} of module {name!r} overflows {dtype_name(t.dtype)}: "
                                 "the updates are too large for the global factors' dtype")
        out[name] = (A2, B2)
    return out


def update_norm(update) -> float:
    """‖Δ‖_F of the transmitted increments: √(Σ_ℓ Σ_{i sent} ‖Δb_i‖² + ‖Δa_i‖²).

    For a server screening updates (e.g. refusing a client whose norm exceeds a multiple
    of the round's median). It is the norm of what the client adds to the global factors
    (``update.apply_to(g) − g`` for any g), computed from the wire values alone, in float64
    and scaled so that it neither overflows nor underflows.

    Why the increments and not the product change D = (B + ΔB)(A + ΔA) − BA: the server
    averages Δb_i and Δa_i separately (:func:`aggregate`), so a client's contribution to
    the new global factors is its increments times a weight ≤ 1 (p_k over the clients that
    sent that index, or over all clients with ``fill="zero"``), and this norm bounds it.
    The product change of a single update does not: Δa_i = −a_i with an arbitrarily large
    Δb_i changes that client's own product by only −b_i a_iᵀ, yet once averaged with other
    clients' increments it moves the global product without bound. The increments are
    also comparable across the clients of a round, since all start from the same broadcast
    factors (one choice of LoRA's scale freedom B·c, A/c for everyone), and need no m×n
    matrix.

    Accepts a :class:`RankSparseUpdate` or a :class:`soft.baselines.TopKUpdate` (the norm of
    all its ΔA, ΔB entries). Raises ValueError, naming the module, if a value is not
    finite: a NaN norm would pass any "norm > c · median" test.
    """
    from soft.baselines import TopKUpdate

    if isinstance(update, RankSparseUpdate):
        problem = _values_problem(update.names, update.indices, update.delta_b, update.delta_a)
        tensors = list(update.delta_b) + list(update.delta_a)
    elif isinstance(update, TopKUpdate):
        problem = update.values_problem()
        tensors = list(update.delta_a) + list(update.delta_b)
    else:
        raise ValueError(f"update must be a RankSparseUpdate or a TopKUpdate; got {type(update).__name__}")
    if problem:
        raise ValueError(f"update_norm: {problem}")
    flat = [t.detach().double().reshape(-1) for t in tensors if t.numel()]
    if not flat:
        return 0.0
    x = torch.cat(flat)
    scale = float(x.abs().max())
    if scale == 0.0:
        return 0.0
    return scale * float(torch.linalg.vector_norm(x / scale))
