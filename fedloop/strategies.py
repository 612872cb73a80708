"""The strategies compared by ``fedloop`` (spec §8), one record each.

A :class:`Strategy` says everything the loop needs to know about one way of federating
LoRA: which allocation policy the server runs, whether the clients run SOFT's mechanism
(orthogonality penalty, tensorwise optimiser, server re-orthogonalisation), which factors
the clients train, what a client sends (``encode``, run on the client), how the server reads
it (``decode``) and how it aggregates what it read (``aggregate``). Every strategy also runs with
its clients in other processes (:mod:`fedloop.flower`; :mod:`fedloop.flower_codec` puts each
strategy's upload into bytes).

=========  ========  ====  ================================================
strategy   policy    SOFT  what a client sends / how the server aggregates
=========  ========  ====  ================================================
tsfa       online    yes   SOFT's s_k components (s_k from TSFA), rank-wise mean
fixed      equal     yes   SOFT's s components, equal bandwidth
random     min-lat   yes   s seeded random components
svd        min-lat   yes   rank-s SVD of the update, folded into frozen weights
fedit      dense     no    all r components (dense FedIT): separate means of A, B
ideal      dense     no    fedit + Σ p B_k A_k − B̄Ā folded in (FedEx-LoRA, exact)
lowrank    dense     no    fedit at structural rank ``keep``
topk       min-lat   no    the largest entries of ΔA, ΔB within SOFT's bits
ffa        none      no    B only (A frozen: FFA-LoRA)
head       none      no    nothing of the adapter (frozen); the head only
=========  ========  ====  ================================================

"online" is :class:`tsfa.OnlineAllocator`; "equal"/"min-lat" a :class:`tsfa.allocator.FixedPolicy`
with equal or latency-optimal bandwidth; "dense" a :class:`tsfa.allocator.DensePolicy`;
"none": every client that trained sends its whole payload with the latency-optimal split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tsfa.allocator import DensePolicy, FixedPolicy, OnlineAllocator

# torch and soft are imported inside the functions: ``fedloop.config`` reads this table, and
# importing ``fedloop`` does not import torch.

__all__ = ["Strategy", "STRATEGY_TABLE", "STRATEGIES", "SOFT_STRATEGIES", "WIRE_STRATEGIES",
           "DELTA_BROADCAST_STRATEGIES", "wire_bytes", "read_wire", "get", "derive_seed",
           "derive_rng"]


def derive_seed(*parts) -> int:
    """A 32-bit seed from integer parts, e.g. (run seed, purpose, round, client)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def derive_rng(*parts) -> np.random.Generator:
    """A Generator from integer parts: every random draw of a run is a function of its purpose."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


@dataclass(frozen=True)
class Strategy:
    """One strategy of the loop.

    Attributes:
        name: the ``RunConfig.strategy`` value.
        policy: builds the server's allocation policy,
            ``policy(shape, *, latency_budget_s, config, max_latency_s, total_bandwidth_hz, downlink_s)``,
            or None (every client that trained sends its payload, latency-optimal split).
        soft: the clients run SOFT's mechanism (penalty, tensorwise optimiser) and the server
            re-orthogonalises the global factors (each ``RunConfig`` setting can override).
        train_a, train_b: which LoRA factors the clients train.
        norm: the norm of a decoded update for the server's norm rule
            (``RunConfig.reject_norm_factor``), or None where the rule does not apply.
        downlink: ``"dense"``: the server broadcasts the global adapter whole; ``"topk"``
            (FLASC-style): the clients hold their own view of it and the server broadcasts the
            largest entries of (global − view) at the uplink's bit budget, keeping the rest for
            later rounds (``fedloop.Server.broadcast``).
        encode: client side, ``encode(config, global_factors, local_factors, keep, round, client)``
            → (payload, uplink bits of the adapter part).
        decode: server side, ``decode(payload, keep, server)`` → what ``aggregate`` takes;
            raises ValueError for a payload that does not fit (``soft.WireFormatError``).
        aggregate: server side, ``aggregate(server, decoded, weights)`` updates
            ``server.global_factors`` (or folds into the frozen weights); ``weights`` are the
            data weights p_k of the decoded clients, in order.
    """

    name: str
    policy: Callable[..., Any] | None
    soft: bool
    encode: Callable[..., tuple[Any, int]]
    decode: Callable[..., Any]
    aggregate: Callable[..., None]
    train_a: bool = True
    train_b: bool = True
    norm: Callable[[Any], float] | None = None
    downlink: str = "dense"


# -- policies --------------------------------------------------------------------------------
def _online(shape, *, latency_budget_s, config, max_latency_s, **kw):
    # The scale-free V: profiles are passed relative to the round's mean dense energy.
    return OnlineAllocator.from_relative_v(shape, latency_budget_s=latency_budget_s, relative_v=config.relative_v,
                                           max_latency_s=max_latency_s, allow_skip=config.allow_skip,
                                           queue=config.initial_queue, drift=config.drift,
                                           value_bits=config.value_bits_menu, **kw)


def _fixed_equal(shape, *, config, latency_budget_s, max_latency_s, **kw):
    return FixedPolicy(shape, keep=config.keep, bandwidth="equal", **kw)


def _fixed_min_latency(shape, *, config, latency_budget_s, max_latency_s, **kw):
    return FixedPolicy(shape, keep=config.keep, bandwidth="min_latency", **kw)


def _dense(shape, *, config, latency_budget_s, max_latency_s, **kw):
    return DensePolicy(shape, **kw)


# -- SOFT wire payloads ----------------------------------------------------------------------
def _encode_wire(cfg, glob, local, keep, t, k, value_bits=None):
    """The ``keep`` components SOFT selects (``random``: seeded random ones; fedit, ideal,
    lowrank: keep = r; fedit selects per module), as wire bytes, at ``value_bits`` (the
    allocator's choice) or the configuration's precision."""
    q = cfg.base_value_bits if value_bits is None else int(value_bits)
    data = wire_bytes(glob, local, keep, q, rounding_seed=derive_seed(cfg.seed, 43, t, k),
                      scope="module" if cfg.strategy == "fedit" else cfg.scope,
                      random_seed=derive_seed(cfg.seed, 41, t, k) if cfg.strategy == "random" else None)
    return data, 8 * len(data)


def wire_bytes(old, new, keep: int, value_bits: int, *, rounding_seed: int, scope: str = "module",
               random_seed: int | None = None) -> bytes:
    """SOFT's wire payload of (new − old): the ``keep`` components SOFT selects (or seeded random
    ones, ``random_seed``), float32 or float16 values, or 8/4-bit integers with unbiased
    stochastic rounding seeded by ``rounding_seed``. Clients' uploads and the server's delta
    broadcast (``RunConfig.downlink_value_bits``) are both this."""
    import torch

    import soft

    wire = torch.float16 if value_bits == 16 else torch.float32
    if random_seed is not None:
        upd = soft.random_components(old, new, int(keep), torch.Generator().manual_seed(random_seed), dtype=wire)
    else:
        upd = soft.sparsify(old, new, int(keep), scope=scope, dtype=wire)
    if value_bits < 16:
        upd = soft.quantise(upd, value_bits, torch.Generator().manual_seed(rounding_seed))
    return upd.encode()


def read_wire(data, shape):
    """SOFT's wire payload read back (``soft.decode``, or ``soft.decode_quantised`` for 8/4-bit
    values, dequantised): a :class:`soft.RankSparseUpdate`; raises ``soft.WireFormatError``."""
    import soft

    quantised = isinstance(data, (bytes, bytearray)) and len(data) > 3 and data[3] >= 2  # the dtype code byte
    return soft.decode_quantised(data, shape).dequantised() if quantised else soft.decode(data, shape)


def _decode_wire(data, keep, server):
    import soft

    upd = read_wire(data, server.soft_shape)
    if upd.keep != int(keep):
        raise soft.WireFormatError(f"payload keeps {upd.keep} components, {int(keep)} were allocated")
    return upd


def _aggregate_wire(server, updates, weights):
    import soft

    server.global_factors = soft.aggregate(server.global_factors, updates, weights)


def _encode_ideal(cfg, glob, local, keep, t, k):
    data, bits = _encode_wire(cfg, glob, local, keep, t, k)
    return (data, local), bits  # the oracle also reads the full local factors (counted on Flower only)


def _decode_ideal(payload, keep, server):
    data, local = payload
    return _decode_wire(data, keep, server), local


def _aggregate_ideal(server, decoded, weights):
    """fedit's mean, then Σ p B_k A_k − B̄Ā folded into the frozen weights (FedEx-LoRA)."""
    import torch

    import soft

    new = soft.aggregate(server.global_factors, [upd for upd, _ in decoded], weights)
    wn = torch.as_tensor(weights / weights.sum())
    for name in server.names:
        Ab, Bb = new[name]
        mean_prod = sum(wk * (local[name][1].double() @ local[name][0].double())
                        for wk, (_, local) in zip(wn, decoded, strict=True))
        server.fold(name, (mean_prod - Bb.double() @ Ab.double()) * server.task.scaling)
    server.global_factors = new


# -- baselines that need the server in the same process ---------------------------------------
def _encode_topk(cfg, glob, local, keep, t, k):
    from soft.baselines import topk_elementwise

    data = topk_elementwise(glob, local, int(keep), bits_per_value=cfg.value_bits).encode()
    return data, 8 * len(data)


def _decode_topk(data, keep, server):
    from soft.baselines import decode_topk

    return decode_topk(data, server.soft_shape)


def _aggregate_topk(server, updates, weights):
    """Entry-wise weighted mean over the clients that sent each entry."""
    import torch

    glob = server.global_factors
    num = {n: [torch.zeros_like(A, dtype=torch.float64), torch.zeros_like(B, dtype=torch.float64)]
           for n, (A, B) in glob.items()}
    den = {n: [torch.zeros_like(A, dtype=torch.float64), torch.zeros_like(B, dtype=torch.float64)]
           for n, (A, B) in glob.items()}
    for wk, tk in zip(weights, updates, strict=True):
        for n, da, db in zip(server.names, tk.delta_a, tk.delta_b, strict=True):
            num[n][0] += wk * da.double()
            num[n][1] += wk * db.double()
            den[n][0] += wk * (da != 0)
            den[n][1] += wk * (db != 0)
    server.global_factors = {n: (A + (num[n][0] / den[n][0].clamp_min(1e-300)).to(A.dtype),
                                 B + (num[n][1] / den[n][1].clamp_min(1e-300)).to(B.dtype))
                             for n, (A, B) in glob.items()}


def _encode_svd(cfg, glob, local, keep, t, k):
    import soft
    from soft.baselines import svd_truncation_qr

    return svd_truncation_qr(glob, local, int(keep)), soft.shape_of(glob).payload_bits(int(keep))


def _aggregate_svd(server, truncations, weights):
    """Each client's rank-s product update, weighted, folded into the frozen weights."""
    wn = weights / weights.sum()
    for wk, trunc in zip(wn, truncations, strict=True):
        for name, (P, Q) in zip(server.names, trunc, strict=True):
            server.fold(name, wk * server.task.scaling * (P @ Q))


def _encode_ffa(cfg, glob, local, keep, t, k):
    from soft.baselines import ffa_update

    _, bits = ffa_update(glob, local)
    return {n: B for n, (_, B) in local.items()}, bits


def _aggregate_ffa(server, b_factors, weights):
    wn = weights / weights.sum()
    server.global_factors = {n: (A, sum(wk * b[n] for wk, b in zip(wn, b_factors, strict=True)))
                             for n, (A, B) in server.global_factors.items()}


def _encode_nothing(cfg, glob, local, keep, t, k):
    return None, 0


def _as_is(payload, keep, server):
    return payload


def _aggregate_nothing(server, decoded, weights):
    """The adapter stays as it is (the head is averaged by the server for every strategy)."""


def _table(*rows: Strategy) -> dict[str, Strategy]:
    return {row.name: row for row in rows}


def _wire_norm(update) -> float:
    import soft

    return soft.update_norm(update)


_WIRE = dict(encode=_encode_wire, decode=_decode_wire, aggregate=_aggregate_wire, norm=_wire_norm)
STRATEGY_TABLE: dict[str, Strategy] = _table(
    Strategy("tsfa", policy=_online, soft=True, **_WIRE),
    Strategy("ideal", policy=_dense, soft=False, encode=_encode_ideal, decode=_decode_ideal,
             aggregate=_aggregate_ideal),
    Strategy("fedit", policy=_dense, soft=False, **_WIRE),
    Strategy("ffa", policy=None, soft=False, encode=_encode_ffa, decode=_as_is, aggregate=_aggregate_ffa,
             train_a=False),
    Strategy("topk", policy=_fixed_min_latency, soft=False, encode=_encode_topk, decode=_decode_topk,
             aggregate=_aggregate_topk),
    Strategy("flasc", policy=_fixed_min_latency, soft=False, encode=_encode_topk, decode=_decode_topk,
             aggregate=_aggregate_topk, downlink="topk"),
    Strategy("random", policy=_fixed_min_latency, soft=True, **_WIRE),
    Strategy("svd", policy=_fixed_min_latency, soft=True, encode=_encode_svd, decode=_as_is,
             aggregate=_aggregate_svd),
    Strategy("fixed", policy=_fixed_equal, soft=True, **_WIRE),
    Strategy("head", policy=None, soft=False, encode=_encode_nothing, decode=_as_is,
             aggregate=_aggregate_nothing, train_a=False, train_b=False),
    Strategy("lowrank", policy=_dense, soft=False, **_WIRE),
)

#: Every strategy's name, in the table's order.
STRATEGIES = tuple(STRATEGY_TABLE)
#: Strategies whose clients run SOFT's mechanism (penalty, tensorwise optimiser, re-orthogonalisation).
SOFT_STRATEGIES = tuple(s.name for s in STRATEGY_TABLE.values() if s.soft)
#: Strategies whose clients send SOFT's wire payload (value precision, error feedback apply).
WIRE_STRATEGIES = tuple(s.name for s in STRATEGY_TABLE.values() if s.encode is _encode_wire)
#: Strategies whose round changes only the global factors, so the server can broadcast that change as
#: SOFT's payload at a chosen precision (``RunConfig.downlink_value_bits``; ``fedloop.Server.broadcast``):
#: not ideal or svd (they also change the frozen weights), head (no adapter) or flasc (its own downlink).
DELTA_BROADCAST_STRATEGIES = tuple(s.name for s in STRATEGY_TABLE.values()
                                   if s.downlink == "dense" and s.name not in ("ideal", "svd", "head"))


def get(name: str) -> Strategy:
    """The record of strategy ``name``; an unknown name is a ValueError listing the valid ones."""
    if name not in STRATEGY_TABLE:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got strategy = {name!r}")
    return STRATEGY_TABLE[name]
