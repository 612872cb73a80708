"""The online allocator (Lyapunov virtual queue) and baseline policies, one interface.

A policy's ``step(...)`` takes one round's observations and returns an
:class:`~tsfa.online.Allocation`; ``observe(latency_s)`` feeds back the realised round
latency. :class:`OnlineAllocator` keeps Q(t+1) = max(Q(t) + τ(t) − τ̄, 0).

**Fallback (documented, recorded, never silent).** If a round is infeasible under the
hard cap ``max_latency_s`` even with every client at ``min_keep``, the allocator applies
its ``fallback``:

* ``"relax_cap"`` (default): solve the round again without the hard cap; the overshoot
  enters the queue, which pushes later rounds down. ``Allocation.fallback`` says so.
* ``"skip_round"``: schedule nobody (keep = 0, latency = downlink) and record it.
* ``"raise"``: raise :class:`~tsfa.status.InfeasibleError`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from tsfa._validate import as_scalar
from tsfa.bandwidth import min_latency_bandwidth
from tsfa.model import LoraShape
from tsfa.online import Allocation, RoundProblem, _assemble, allocate
from tsfa.status import InfeasibleError, Status

__all__ = ["OnlineAllocator", "FixedPolicy", "DensePolicy", "FALLBACKS"]

FALLBACKS = ("relax_cap", "skip_round", "raise")


class _Policy:
    """Common round construction for every policy."""

    def __init__(self, shape: LoraShape, *, total_bandwidth_hz: float, downlink_s: float = 0.0,
                 max_latency_s: float | None = None, min_keep: int = 1, allow_skip: bool = False):
        if not isinstance(shape, LoraShape):
            raise ValueError(f"shape must be a LoraShape; got {type(shape).__name__}")
        self.shape = shape
        self.total_bandwidth_hz = as_scalar("total_bandwidth_hz", total_bandwidth_hz, lower=0, strict=True)
        self.downlink_s = as_scalar("downlink_s", downlink_s, lower=0)
        self.max_latency_s = None if max_latency_s is None else as_scalar("max_latency_s", max_latency_s, lower=0,
                                                                           strict=True)
        self.min_keep = min_keep
        self.allow_skip = allow_skip
        self.round = 0

    def problem(self, snr_hz, compute_s, error_profile, data_weight=None, *, queue=0.0, weight_v=1.0) -> RoundProblem:
        k = len(np.atleast_1d(snr_hz))
        weight = np.full(k, 1.0 / k) if data_weight is None else data_weight
        return RoundProblem(self.shape, snr_hz, compute_s, weight, error_profile, queue, weight_v,
                            self.total_bandwidth_hz, self.downlink_s, self.max_latency_s, self.min_keep,
                            self.allow_skip)

    def observe(self, latency_s: float) -> None:
        self.round += 1


class OnlineAllocator(_Policy):
    """TSFA's online stage: drift-plus-penalty allocation with a virtual latency queue.

    Args:
        shape: the LoRA shape (payload bits per keep count).
        latency_budget_s: τ̄, the long-term average latency budget, seconds.
        weight_v: V > 0; larger V drops less energy and lets the queue grow.
        total_bandwidth_hz, downlink_s, max_latency_s, min_keep, allow_skip: as in
            :class:`~tsfa.online.RoundProblem`.
        backend: allocation backend ("fast", "cvxpy", "milp", "pyomo" or a callable).
        fallback: "relax_cap", "skip_round" or "raise" (module docstring).
        queue: initial Q(0), seconds.
    """

    def __init__(self, shape: LoraShape, *, latency_budget_s: float, weight_v: float, total_bandwidth_hz: float,
                 downlink_s: float = 0.0, max_latency_s: float | None = None, min_keep: int = 1,
                 allow_skip: bool = False, backend="fast", fallback: str = "relax_cap", queue: float = 0.0):
        super().__init__(shape, total_bandwidth_hz=total_bandwidth_hz, downlink_s=downlink_s,
                         max_latency_s=max_latency_s, min_keep=min_keep, allow_skip=allow_skip)
        self.latency_budget_s = as_scalar("latency_budget_s", latency_budget_s, lower=0, strict=True)
        self.weight_v = as_scalar("weight_v", weight_v, lower=0, strict=True)
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}")
        self.fallback = fallback
        self.backend = backend
        self.queue = as_scalar("queue", queue, lower=0)
        self.last_latency_s: float | None = None

    def step(self, snr_hz, compute_s, error_profile, data_weight=None) -> Allocation:
        """Allocate this round (does not update the queue: call :meth:`observe`)."""
        prob = self.problem(snr_hz, compute_s, error_profile, data_weight, queue=self.queue, weight_v=self.weight_v)
        alloc = allocate(prob, backend=self.backend, tau_hint=self.last_latency_s)
        if alloc.status is Status.INFEASIBLE:
            alloc = self._fall_back(prob, alloc)
        return alloc

    def _fall_back(self, prob: RoundProblem, failed: Allocation) -> Allocation:
        if self.fallback == "raise":
            raise InfeasibleError(failed.message)
        if self.fallback == "relax_cap":
            relaxed = dataclasses.replace(prob, max_latency_s=None)
            alloc = allocate(relaxed, backend=self.backend, tau_hint=self.last_latency_s)
            note = f"relax_cap: {failed.message}; solved without max_latency_s"
        else:
            keep = np.zeros(prob.num_clients, dtype=np.int64)
            bw = min_latency_bandwidth(np.zeros(prob.num_clients), prob.snr_hz, prob.compute_s,
                                       prob.total_bandwidth_hz, downlink_s=prob.downlink_s)
            alloc = _assemble(prob, keep, bw, math.nan, "skip_round", 0.0, 0)
            note = f"skip_round: {failed.message}; nobody scheduled"
        return dataclasses.replace(alloc, fallback=note, message=f"{alloc.message} [fallback {note}]")

    def observe(self, latency_s: float) -> None:
        """Feed back the realised latency τ(t): Q ← max(Q + τ − τ̄, 0)."""
        tau = as_scalar("latency_s", latency_s, lower=0)
        self.queue = max(self.queue + tau - self.latency_budget_s, 0.0)
        self.last_latency_s = tau
        self.round += 1

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state: queue, round, last latency and the settings."""
        return {"queue": self.queue, "round": self.round, "last_latency_s": self.last_latency_s,
                "latency_budget_s": self.latency_budget_s, "weight_v": self.weight_v}

    def load_state_dict(self, state: dict) -> None:
        for key in ("queue", "round", "latency_budget_s", "weight_v"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        self.queue = as_scalar("queue", state["queue"], lower=0)
        self.round = as_scalar("round", state["round"], lower=0, integer=True)
        self.latency_budget_s = as_scalar("latency_budget_s", state["latency_budget_s"], lower=0, strict=True)
        self.weight_v = as_scalar("weight_v", state["weight_v"], lower=0, strict=True)
        last = state.get("last_latency_s")
        self.last_latency_s = None if last is None else as_scalar("last_latency_s", last, lower=0)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.state_dict(), f)

    def load(self, path) -> None:
        with open(path) as f:
            self.load_state_dict(json.load(f))


class FixedPolicy(_Policy):
    """Baseline: a fixed keep count for everyone, and either the equal bandwidth split
    (``bandwidth="equal"``) or the latency-optimal split (``bandwidth="min_latency"``)."""

    def __init__(self, shape: LoraShape, *, keep: int, bandwidth: str = "equal", **kwargs):
        super().__init__(shape, **kwargs)
        self.keep = as_scalar("keep", keep, lower=1, integer=True)
        if self.keep > shape.rank:
            raise ValueError(f"keep must be <= rank {shape.rank}; got keep = {keep}")
        if bandwidth not in ("equal", "min_latency"):
            raise ValueError(f"bandwidth must be 'equal' or 'min_latency'; got {bandwidth!r}")
        self.bandwidth = bandwidth

    def step(self, snr_hz, compute_s, error_profile, data_weight=None) -> Allocation:
        prob = self.problem(snr_hz, compute_s, error_profile, data_weight)
        keep = np.full(prob.num_clients, self.keep, dtype=np.int64)
        bits = self.shape.payload_bits(keep)
        if self.bandwidth == "min_latency":
            bw = min_latency_bandwidth(bits, prob.snr_hz, prob.compute_s, prob.total_bandwidth_hz,
                                       downlink_s=prob.downlink_s)
        else:
            equal = lambda S, c, T, B: (np.full(len(S), B / len(S)), 0)  # noqa: E731
            equal.__name__ = "equal"
            bw = min_latency_bandwidth(bits, prob.snr_hz, prob.compute_s, prob.total_bandwidth_hz,
                                       downlink_s=prob.downlink_s, backend=equal)
        return _assemble(prob, keep, bw, math.nan, f"fixed-{self.bandwidth}", 0.0, 0)


class DensePolicy(FixedPolicy):
    """Baseline: every client sends all r components, latency-optimal bandwidth, no budget."""

    def __init__(self, shape: LoraShape, **kwargs):
        super().__init__(shape, keep=shape.rank, bandwidth="min_latency", **kwargs)
