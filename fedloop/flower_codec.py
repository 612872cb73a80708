"""What each strategy's client sends over Flower, as bytes, and how the server reads it back.

Every strategy of :data:`fedloop.strategies.STRATEGIES` runs on Flower. A client's upload is one
or two byte strings in the reply's ``ConfigRecord`` (``payload`` and, for ``ideal``,
``factors``); the ledger's uplink bits are 8 × their total length (plus the head, as in
``fedloop``). Nothing is pickled:

=========================  ===========================================================
strategy                   bytes on the uplink
=========================  ===========================================================
tsfa fixed random fedit    SOFT's wire format (``soft.RankSparseUpdate.encode``)
lowrank                    the same, at structural rank ``keep``
topk flasc                 the top-k codec (``soft.baselines.TopKUpdate.encode``)
svd                        safetensors: ``<module>/P`` (m × s), ``<module>/Q`` (s × n)
ffa                        safetensors: ``<module>/B`` (m × r), the trained B
ideal                      SOFT's wire bytes + safetensors ``<module>/A``, ``<module>/B``
                           (the client's full local factors, which FedEx-LoRA's exact
                           residual Σ p B_k A_k − B̄Ā needs; in process the oracle reads
                           them for free, on Flower they travel and are counted)
head                       nothing (empty payload)
=========================  ===========================================================

:func:`decode` validates on receipt: the parts' names and sizes (at most :data:`MAX_BYTES`
each), and for safetensors the exact tensor names, shapes, dtype (float32) and finite values.
SOFT's and top-k's bytes are passed on as they are and checked by the strategy's own decoder
(magic, lengths, keep count, finite values) in :meth:`fedloop.Server.check_upload`. A payload
that does not fit is a ``ValueError`` naming the problem, and the client is rejected for that
round (ledger status ``error: rejected upload: ...`` or ``rejected: ...``).
"""

from __future__ import annotations

import torch

from fedloop.strategies import WIRE_STRATEGIES
from fedloop.strategies import get as get_strategy

__all__ = ["encode", "decode", "pack_tensors", "unpack_tensors", "PARTS", "MAX_BYTES"]

#: The byte strings a strategy's upload consists of, by name.
PARTS = {"ideal": ("payload", "factors")}
#: Upper bound on one part's length (refused before parsing).
MAX_BYTES = 2**33


def parts_of(strategy: str) -> tuple[str, ...]:
    return PARTS.get(strategy, ("payload",))


def pack_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes of ``{name: tensor}`` (contiguous CPU copies)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}) if tensors else b""


def unpack_tensors(data, expected: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]], what: str) -> dict:
    """Parse safetensors ``data`` holding exactly the tensors of ``expected`` (name → (shape,
    allowed dtypes)), all finite; anything else is a ValueError naming ``what`` and the problem."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"{what}: expected bytes, got {type(data).__name__}")
    if len(data) > MAX_BYTES:
        raise ValueError(f"{what}: {len(data)} bytes exceed the limit of {MAX_BYTES}")
    if not data and not expected:  # nothing expected, nothing sent (pack_tensors of no tensors)
        return {}
    try:
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"{what}: not a valid safetensors payload ({exc})") from None
    if set(tensors) != set(expected):
        raise ValueError(f"{what}: tensors {sorted(tensors)} != expected {sorted(expected)}")
    for name, (shape, dtypes) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
            raise ValueError(f"{what}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected "
                             f"{'/'.join(str(d) for d in dtypes)} {tuple(shape)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: tensor {name} has non-finite values")
    return {name: tensors[name] for name in expected}  # in the expected order (safetensors sorts names)


def encode(cfg, glob: dict, local: dict, keep: int, t: int, k: int) -> dict[str, bytes]:
    """Client side: the strategy's upload of client k in round t as named byte strings."""
    name = cfg.strategy
    payload, _ = get_strategy(name).encode(cfg, glob, local, keep, t, k)
    if name in WIRE_STRATEGIES or name in ("topk", "flasc"):
        return {"payload": bytes(payload)}
    if name == "ideal":
        data, full = payload
        return {"payload": bytes(data),
                "factors": pack_tensors({f"{n}/{w}": x for n, pair in full.items() for w, x in zip("AB", pair,
                                                                                                  strict=True)})}
    if name == "svd":  # float32 values, as the in-process ledger counts them (the truncation runs in float64)
        return {"payload": pack_tensors({f"{n}/{w}": x.float() for n, pair in zip(glob, payload, strict=True)
                                         for w, x in zip("PQ", pair, strict=True)})}
    if name == "ffa":
        return {"payload": pack_tensors({f"{n}/B": B for n, B in payload.items()})}
    if name == "head":
        return {"payload": b""}
    raise ValueError(f"strategy {name!r} has no Flower encoding")


def decode(server, parts: dict, keep: int):
    """Server side: the strategy's payload (what its ``decode`` takes) from a client's byte
    strings, validated; raises ValueError naming the problem."""
    name = server.config.strategy
    if set(parts) != set(parts_of(name)):
        raise ValueError(f"upload parts {sorted(parts)} != {sorted(parts_of(name))} for strategy {name!r}")
    for part, data in parts.items():
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"upload part {part!r} is {type(data).__name__}, not bytes")
        if len(data) > MAX_BYTES:
            raise ValueError(f"upload part {part!r}: {len(data)} bytes exceed the limit of {MAX_BYTES}")
    data = bytes(parts["payload"])
    glob = server.global_factors
    f32 = (torch.float32,)
    if name in WIRE_STRATEGIES or name in ("topk", "flasc"):
        return data
    if name == "ideal":
        exp = {f"{n}/{w}": (tuple(x.shape), f32) for n, pair in glob.items() for w, x in zip("AB", pair, strict=True)}
        t = unpack_tensors(parts["factors"], exp, "ideal's local factors")
        return data, {n: (t[f"{n}/A"], t[f"{n}/B"]) for n in glob}
    if name == "svd":
        keep = int(keep)
        exp = {}
        for n, (A, B) in glob.items():
            exp[f"{n}/P"] = ((B.shape[0], keep), f32)
            exp[f"{n}/Q"] = ((keep, A.shape[1]), f32)
        t = unpack_tensors(data, exp, "svd's truncation")
        return [(t[f"{n}/P"], t[f"{n}/Q"]) for n in glob]
    if name == "ffa":
        t = unpack_tensors(data, {f"{n}/B": (tuple(B.shape), f32) for n, (_, B) in glob.items()}, "ffa's B")
        return {n: t[f"{n}/B"] for n in glob}
    if name == "head":
        if data:
            raise ValueError(f"strategy 'head' sends no adapter; got a {len(data)}-byte payload")
        return None
    raise ValueError(f"strategy {name!r} has no Flower decoding")
