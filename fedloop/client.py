"""The client side of a round: local training, and the client-pool protocol the server talks to.

A :class:`~fedloop.Server` runs a round against a *client pool*, anything with

* ``train(round) -> TrainReport``: every client trains from the global adapter and reports its
  error profile e_k(s), s = 0..r (zeros for a client that failed), its mean training loss
  and its status ("ok" or "error: ...");
* ``upload(round, sent, keep, bandwidth_hz) -> {client: Upload | reason}``: the scheduled
  clients encode what their strategy sends with the keep count the server allocated; a
  client that cannot deliver answers with the reason as a string.

:class:`LocalPool` is the K clients in this process (it also hands the server the clients'
full factors for the bound's measurements); :class:`fedloop.flower.TsfaStrategy` is a pool
of Flower nodes. Both train with :func:`train_client` and encode with the strategy's
``encode``, so they compute the same thing.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import numpy as np
import torch

import soft
from fedloop.config import RunConfig
from fedloop.measure import ClientProbe
from fedloop.strategies import derive_rng, derive_seed
from fedloop.strategies import get as get_strategy
from soft.feedback import residual, with_residual
from soft.optim import TensorwiseAdam

__all__ = ["RunFailed", "TrainReport", "Upload", "ClientPool", "LocalPool", "train_client", "to_host"]


class RunFailed(RuntimeError):
    """The run cannot continue (e.g. a non-finite loss); the last checkpoint is intact."""


class TrainReport(NamedTuple):
    """What the clients report after local training: profiles (K, r+1), losses (K,), status (K),
    and, where the allocator chooses the precision, rounding profiles (K, r+1, len(menu))."""

    profiles: np.ndarray
    losses: np.ndarray
    status: list
    rounding: np.ndarray | None = None


class Upload(NamedTuple):
    """One client's uplink: the strategy's payload, its adapter bits, and the client's head."""

    payload: Any
    bits: int
    head: dict


class ClientPool(Protocol):
    def train(self, round: int) -> TrainReport: ...

    def upload(self, round: int, sent: list, keep: dict, bandwidth_hz: dict, value_bits: dict | None = None) -> dict:
        ...


class LocalPool:
    """The K clients of ``server``'s run, trained one after the other in this process.

    ``client_hook(round, client)``, if given, is called before each client trains; an
    exception raised there marks the client failed for that round (used to test faults).
    After ``train``, ``local_factors`` holds every client's trained factors (None if it
    failed) and ``probes`` its measurements (:class:`fedloop.measure.ClientProbe`)."""

    def __init__(self, server, client_hook=None):
        self.server, self.hook = server, client_hook
        K = server.config.clients
        self.local_factors: list = [None] * K
        self.heads: list = [None] * K
        self.probes: dict[int, ClientProbe] = {}

    def train_one(self, t: int, k: int):
        """Client k's local training in round t, measured; returns (factors, head, loss)."""
        s = self.server
        self.probes[k] = probe = ClientProbe(s.task, k, s.config.batch_size)
        return train_client(s.config, s.task, s.client_factors, s.global_head, t, k, on_step=probe)

    def train(self, t: int) -> TrainReport:
        s = self.server
        K, r = s.config.clients, s.shape.rank
        self.local_factors, self.heads, self.probes = [None] * K, [None] * K, {}
        losses, status = np.full(K, np.nan), ["ok"] * K
        for k in range(K):
            try:
                if self.hook is not None:
                    self.hook(t + 1, k)
                self.local_factors[k], self.heads[k], losses[k] = self.train_one(t, k)
                if s.config.error_feedback != "none":  # send from local + what was not sent before
                    self.local_factors[k] = with_residual(self.local_factors[k], s.residuals[k])
                    s.residuals[k] = residual(self.local_factors[k], s.client_factors)  # until it sends
            except RunFailed:
                raise
            except Exception as exc:  # a failing client is dropped from this round, the run goes on
                status[k] = f"error: {type(exc).__name__}: {exc}"[:200]
        menu = s.config.value_bits_menu
        profiles = np.zeros((K, r + 1))
        rounding = np.zeros((K, r + 1, len(menu))) if menu else None
        for k in range(K):
            if self.local_factors[k] is not None:
                profiles[k] = soft.error_profile(s.client_factors, self.local_factors[k], scope=s.config.scope)
                if menu:
                    rounding[k] = soft.rounding_profile(s.client_factors, self.local_factors[k], menu)
        return TrainReport(profiles=profiles, losses=losses, status=status, rounding=rounding)

    def upload(self, t: int, sent: list, keep: dict, bandwidth_hz: dict, value_bits: dict | None = None) -> dict:
        s = self.server
        out = {}
        for k in sent:
            chosen = {} if value_bits is None else {"value_bits": value_bits[k]}
            payload, bits = s.strategy.encode(s.config, s.client_factors, self.local_factors[k], keep[k], t, k,
                                              **chosen)
            out[k] = Upload(payload=payload, bits=bits, head=self.heads[k])
            if s.config.error_feedback != "none":  # keep what this payload does not carry
                s.residuals[k] = residual(self.local_factors[k], applied(s, payload, keep[k]))
        return out


def applied(server, payload, keep: int) -> dict:
    """The global factors plus what ``payload`` carries, as the server will read it."""
    item = server.strategy.decode(payload, keep, server)
    if hasattr(item, "apply_to"):  # SOFT's wire payload
        return item.apply_to(server.client_factors)
    return {n: (A + da.to(A.dtype), B + db.to(B.dtype))  # topk: dense increments with zeros
            for (n, (A, B)), da, db in zip(server.client_factors.items(), item.delta_a, item.delta_b, strict=True)}


def to_host(tensors: dict) -> dict:
    """Detached float32 CPU copies of ``{name: tensor}`` or ``{name: (A, B)}``, from live
    parameters on any device and dtype: what the server keeps and the wire format reads."""
    def copy(t):
        return t.detach().to("cpu", torch.float32, copy=True)

    return {n: tuple(copy(t) for t in v) if isinstance(v, tuple) else copy(v) for n, v in tensors.items()}


def train_client(cfg: RunConfig, task, global_factors: dict, global_head: dict, t: int, k: int, on_step=None):
    """Client k's local training in round t (0-based) from the global factors and head: E steps
    of task loss + λ·R_orth with a fresh optimiser, seeded from (seed, t, k).

    ``on_step(kind, live, penalty)``, if given, is called after the first backward pass
    (kind "gradient": the ``.grad`` of the factors hold that step's gradient) and after every
    optimiser step (kind "iterate"); :class:`fedloop.measure.ClientProbe` uses it.

    Returns (local factors, local head, mean training loss). A Flower node
    (:mod:`fedloop.flower`) runs exactly this code.
    """
    strategy = get_strategy(cfg.strategy)
    task.assign(global_factors, global_head)
    torch.manual_seed(derive_seed(cfg.seed, 21, t, k))
    rng = derive_rng(cfg.seed, 22, t, k)
    live = task.factors()
    for A, B in live.values():
        A.requires_grad_(strategy.train_a)
        B.requires_grad_(strategy.train_b)
    params = [p for pair in live.values() for p in pair if p.requires_grad]
    opt_name = cfg.resolved_optimizer
    if not params:
        opt = None
    elif opt_name == "tadam":
        opt = TensorwiseAdam(params, lr=cfg.lr)
    elif opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    head = list(task.head().values())
    head_opt = torch.optim.AdamW(head, lr=cfg.head_lr, weight_decay=0.0) if head else None
    lam = cfg.resolved_penalty
    task.train()
    losses = []
    for step in range(cfg.local_steps):
        loss = task.loss(task.sample(k, cfg.batch_size, rng))
        if not torch.isfinite(loss):
            raise RunFailed(f"client {k} produced a non-finite loss ({loss.item()}) at round {t + 1}, "
                            f"local step {step + 1}; lower lr (now {cfg.lr}) — the last checkpoint is kept")
        losses.append(loss.item())
        total = loss + lam * soft.factors_penalty(live) if lam else loss
        for o in (opt, head_opt):
            if o:
                o.zero_grad()
        if total.requires_grad:
            total.backward()
        if on_step is not None and step == 0 and opt:
            on_step("gradient", live, lam)
        for o in (opt, head_opt):
            if o:
                o.step()
        if on_step is not None:
            on_step("iterate", live, lam)
    for A, B in live.values():
        A.requires_grad_(True)
        B.requires_grad_(True)
    return to_host(live), to_host(task.head()), float(np.mean(losses))
