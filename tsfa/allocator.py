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
import time

import numpy as np

from tsfa._validate import as_int_tuple, as_scalar
from tsfa.bandwidth import min_latency_bandwidth
from tsfa.model import LoraShape
from tsfa.online import ALLOCATION_BACKENDS, Allocation, RoundProblem, allocate, assemble_allocation
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
        self.downlink_s = downlink_s
        self.max_latency_s = None if max_latency_s is None else as_scalar("max_latency_s", max_latency_s, lower=0,
                                                                           strict=True)
        self.min_keep = as_scalar("min_keep", min_keep, lower=0, integer=True)
        if self.min_keep > shape.rank:
            raise ValueError(f"min_keep must be <= rank {shape.rank}; got min_keep = {min_keep!r}")
        if not isinstance(allow_skip, (bool, np.bool_)):
            raise ValueError(f"allow_skip must be True or False; got allow_skip = {allow_skip!r}")
        self.allow_skip = bool(allow_skip)
        self.round = 0

    value_bits: tuple = ()  # the precisions a client may choose among (OnlineAllocator); () = the shape's

    @property
    def downlink_s(self) -> float:
        """T^dl of the next rounds, seconds; settable (validated), e.g. when a compressed
        broadcast changes the downlink's bits between rounds."""
        return self._downlink_s

    @downlink_s.setter
    def downlink_s(self, value: float) -> None:
        self._downlink_s = as_scalar("downlink_s", value, lower=0)

    def problem(self, snr_hz, compute_s, error_profile, data_weight=None, *, queue=0.0, weight_v=1.0,
                rounding_profile=None) -> RoundProblem:
        k = len(np.atleast_1d(snr_hz))
        if k == 0:
            raise ValueError("snr_hz must hold one entry per client (at least one); got an empty array")
        weight = np.full(k, 1.0 / k) if data_weight is None else data_weight
        return RoundProblem(shape=self.shape, snr_hz=snr_hz, compute_s=compute_s, data_weight=weight,
                            error_profile=error_profile, queue=queue, weight_v=weight_v,
                            total_bandwidth_hz=self.total_bandwidth_hz, downlink_s=self.downlink_s,
                            max_latency_s=self.max_latency_s, min_keep=self.min_keep, allow_skip=self.allow_skip,
                            value_bits=self.value_bits, rounding_profile=rounding_profile)

    def observe(self, latency_s: float) -> None:
        as_scalar("latency_s", latency_s, lower=0)
        self.round += 1


class OnlineAllocator(_Policy):
    """TSFA's online stage: drift-plus-penalty allocation with a virtual latency queue.

    Args:
        shape: the LoRA shape (payload bits per keep count).
        latency_budget_s: τ̄, the long-term average latency budget, seconds.
        weight_v: the absolute V > 0 of the objective V·Σ p_k e_k + Q·τ; larger V drops less
            energy and lets the queue grow. For the scale-free V of the offline plan and
            ``fedloop`` use :meth:`from_relative_v`.
        total_bandwidth_hz, downlink_s, max_latency_s, min_keep, allow_skip: as in
            :class:`~tsfa.online.RoundProblem`.
        backend: allocation backend ("fast", "cvxpy", "milp", "pyomo" or a callable).
        fallback: "relax_cap", "skip_round" or "raise" (module docstring).
        drift: ``"linear"``: each round minimises V·Σ p_k e_k(s_k) + Q·τ, the usual
            drift-plus-penalty bound (the quadratic term bounded by a constant). Its choices
            are extreme: at Q = 0 latency is free, so every client uploads everything up to
            the cap, the queue jumps, the next rounds skip, and a small V alternates between
            the two. ``"exact"``: each round minimises V·Σ p_k e_k(s_k) + ½·max(Q + τ − τ̄, 0)²,
            the penalty plus the next round's Lyapunov function L = ½Q² exactly (the same
            drift-plus-penalty guarantees: it is at most the linear bound of any other
            choice). It prices latency at q = max(Q + τ − τ̄, 0), so a round uses slack
            but not at any cost; it is solved by a bisection on that price over the linear
            problem (:meth:`step`).
        queue: initial Q(0), seconds, or ``"auto"``: at the first step, the smallest Q whose
            allocation meets τ̄ in that round (:meth:`calibrate_queue`). Starting from Q = 0,
            latency is free in the first round: every client uploads everything up to the cap,
            the queue jumps, the next rounds skip, and small V alternates between the two for
            many rounds. Starting at the price that meets τ̄ avoids that start; Q then moves as
            usual, so the time-average latency still converges to within τ̄.
        value_bits: the precisions (bits per value) each client may send at, chosen every round
            with its keep count (items (s, q) of :class:`~tsfa.online.RoundProblem`); ``step`` then
            needs the round's ``rounding_profile``. Empty (default): ``shape.bits_per_value``.
        certify_every: with ``backend="fast"``, rounds 0, N, 2N, ... (N = ``certify_every``, counted
            by :meth:`observe`) run the certified τ search of :func:`~tsfa.online.allocate`
            (``lower_bound`` and ``gap`` set; about 10–20 knapsack relaxations over the whole τ
            range) and the other rounds its uncertified fast path (``certify=False``: a secant
            search on the relaxation's τ-derivative from the previous round's latency, typically
            3–5 relaxations; ``lower_bound`` and ``gap`` NaN), which returned the same choice on
            the default cell in the tests (below 64 clients it runs the certified search, cheap there).
            1 certifies every round; 0 never. Both drifts use it:
            ``"exact"`` solves each of its linear problems this way. Other backends always certify.
    """

    def __init__(self, shape: LoraShape, *, latency_budget_s: float, weight_v: float, total_bandwidth_hz: float,
                 downlink_s: float = 0.0, max_latency_s: float | None = None, min_keep: int = 1,
                 allow_skip: bool = False, backend="fast", fallback: str = "relax_cap",
                 queue: float | str = 0.0, drift: str = "linear", certify_every: int = 10, value_bits=()):
        super().__init__(shape, total_bandwidth_hz=total_bandwidth_hz, downlink_s=downlink_s,
                         max_latency_s=max_latency_s, min_keep=min_keep, allow_skip=allow_skip)
        self.value_bits = as_int_tuple("value_bits", value_bits)
        self.latency_budget_s = as_scalar("latency_budget_s", latency_budget_s, lower=0, strict=True)
        self.weight_v = as_scalar("weight_v", weight_v, lower=0, strict=True)
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}; got {fallback!r}")
        self.fallback = fallback
        if not callable(backend) and backend not in ALLOCATION_BACKENDS:
            raise ValueError(f"backend must be one of {ALLOCATION_BACKENDS} or a callable; got backend = {backend!r}")
        self.backend = backend
        if drift not in ("linear", "exact"):
            raise ValueError(f"drift must be 'linear' or 'exact'; got drift = {drift!r}")
        self.drift = drift
        self.certify_every = as_scalar("certify_every", certify_every, lower=0, integer=True)
        self.calibrating = isinstance(queue, str) and queue == "auto"
        self.queue = 0.0 if self.calibrating else as_scalar("queue", queue, lower=0)
        self.last_latency_s: float | None = None

    @classmethod
    def from_relative_v(cls, shape: LoraShape, *, latency_budget_s: float, relative_v: float,
                        **kwargs) -> OnlineAllocator:
        """An allocator from the scale-free V: weight_v = relative_v · latency_budget_s².

        ``relative_v`` is the V of :class:`~tsfa.offline.OfflinePlan` and of ``fedloop``'s
        configuration, meant for error profiles divided by the round's mean dense energy
        Σ_k p_k e_k(0); ``kwargs`` are the other arguments of the constructor.
        """
        tau = as_scalar("latency_budget_s", latency_budget_s, lower=0, strict=True)
        v = as_scalar("relative_v", relative_v, lower=0, strict=True)
        try:
            weight = v * tau**2
        except OverflowError:
            weight = math.inf
        if not math.isfinite(weight):
            raise ValueError(f"relative_v · latency_budget_s² overflows; got relative_v = {v!r}, "
                             f"latency_budget_s = {tau!r}")
        return cls(shape, latency_budget_s=tau, weight_v=weight, **kwargs)

    def step(self, snr_hz, compute_s, error_profile, data_weight=None, rounding_profile=None) -> Allocation:
        """Allocate this round (does not update the queue: call :meth:`observe`). With
        ``value_bits``, ``rounding_profile`` (K × (r+1) × len(value_bits)) is required."""
        rp = rounding_profile
        if self.calibrating:
            self.queue = self.calibrate_queue(snr_hz, compute_s, error_profile, data_weight, rounding_profile=rp)
            self.calibrating = False
        if self.drift == "exact":
            return self._exact_step(snr_hz, compute_s, error_profile, data_weight, rp)
        prob = self.problem(snr_hz, compute_s, error_profile, data_weight, queue=self.queue, weight_v=self.weight_v,
                            rounding_profile=rp)
        alloc = allocate(prob, backend=self.backend, tau_hint=self.last_latency_s, certify=self.certifies())
        if alloc.status is Status.INFEASIBLE:
            alloc = self._fall_back(prob, alloc)
        return alloc

    def certifies(self) -> bool:
        """Whether this round runs the certified search (``certify_every``; always for backends
        other than ``"fast"``)."""
        if self.backend != "fast":
            return True
        return self.certify_every > 0 and self.round % self.certify_every == 0

    def _exact_step(self, snr_hz, compute_s, error_profile, data_weight, rounding_profile=None,
                    iterations: int = 30, cap_solves: int = 6) -> Allocation:
        """min V·P + ½·max(Q + τ − τ̄, 0)² over the linear problems' answers.

        At price q the linear problem min V·P + q·τ answers an allocation a(q) whose latency τ(q)
        falls as q grows; its value F(q) = min_a V·P_a + q·τ_a is concave and piecewise linear,
        one piece per allocation. Among these answers the exact objective's best a* answers at
        q* = max(Q + τ_a* − τ̄, 0) (the exact objective is convex in τ and its slope there is the
        price), the root of φ(q) = q − max(Q + τ(q) − τ̄, 0) (increasing) on [0, Q + τ(0) − τ̄].
        The search keeps a bracket [lo, hi] around that root with the
        allocations A = a(lo), B = a(hi) and asks the linear problem at the price where the two
        pieces meet, q_x = V (P_B − P_A)/(τ_A − τ_B): if the answer is no better there than A
        and B, no other allocation is optimal for any price in the bracket (F is concave), so
        the candidates are complete; otherwise the new piece splits the bracket by the sign of
        φ. It takes about two solves per piece near the root (a bisection on q took 30).

        Allocations off F's hull (the least energy at a latency between two pieces' latencies) are
        no price's answer, yet the exact objective, convex in τ, can prefer them; where the final
        bracket spans a jump, ``cap_solves`` solves at Q = 0 under caps between τ_B and τ_A (a
        golden-section search on the exact objective of the least-energy allocation under the
        cap) add those allocations. The best allocation seen under
        the exact objective is returned; the linear choice at q = Q is always among them, so the
        exact step is never worse than the linear one. (Not a global optimum over all discrete
        allocations: that needs every cap.)"""
        queue, budget, v = self.queue, self.latency_budget_s, self.weight_v
        certify = self.certifies()
        seen = []
        shared = {}  # least-latency splits by keep vector: they do not depend on the price

        def solve(q: float) -> Allocation:
            prob = self.problem(snr_hz, compute_s, error_profile, data_weight, queue=q, weight_v=v,
                                rounding_profile=rounding_profile)
            object.__setattr__(prob, "_polished", shared)
            alloc = allocate(prob, backend=self.backend, tau_hint=self.last_latency_s, certify=certify)
            if alloc.status is Status.INFEASIBLE:
                alloc = self._fall_back(prob, alloc)
            seen.append(alloc)
            return alloc

        def exact(a: Allocation) -> float:
            return v * a.dropped_energy + 0.5 * max(queue + a.latency_s - budget, 0.0) ** 2

        def line(a: Allocation, q: float) -> float:  # the linear objective of a at price q
            return v * a.dropped_energy + q * a.latency_s

        solve(queue)  # the linear choice: the exact step is never worse than it under the exact objective
        lo, a_lo = 0.0, solve(0.0)
        hi = queue + a_lo.latency_s - budget
        if hi > 0 and a_lo.success:
            a_hi = solve(hi)
            for _ in range(iterations):
                if not a_hi.success or a_lo.latency_s - a_hi.latency_s <= 1e-12 * a_lo.latency_s:
                    break  # one latency across the bracket: one piece (or no answer to split by)
                q = v * (a_hi.dropped_energy - a_lo.dropped_energy) / (a_lo.latency_s - a_hi.latency_s)
                if not lo < q < hi:
                    q = 0.5 * (lo + hi)
                mid = solve(q)
                if not mid.success or line(mid, q) >= min(line(a_lo, q), line(a_hi, q)) * (1 - 1e-9):
                    break  # no allocation beats A and B anywhere in the bracket
                if q >= max(queue + mid.latency_s - budget, 0.0):
                    hi, a_hi = q, mid
                else:
                    lo, a_lo = q, mid
            # Between the two pieces' latencies lie allocations on no piece (above F's hull) that the
            # exact objective, convex in τ, can prefer: the least energy under a cap there, H(cap),
            # searched by golden section over the cap (H is a staircase plus a convex term).
            if a_hi.success and a_lo.latency_s > a_hi.latency_s * (1 + 1e-9):
                prob = self.problem(snr_hz, compute_s, error_profile, data_weight, queue=0.0, weight_v=v,
                                    rounding_profile=rounding_profile)

                def h(cap: float) -> float:
                    cap = cap if self.max_latency_s is None else min(cap, self.max_latency_s)
                    capped = dataclasses.replace(prob, max_latency_s=cap)
                    object.__setattr__(capped, "_polished", shared)
                    alloc = allocate(capped, backend=self.backend, certify=certify)
                    if not alloc.success:
                        return math.inf
                    seen.append(alloc)
                    return exact(alloc)

                g = 0.5 * (math.sqrt(5.0) - 1.0)
                a, b = a_hi.latency_s, a_lo.latency_s
                c, d = b - g * (b - a), a + g * (b - a)
                hc, hd = h(c), h(d)
                for _ in range(cap_solves - 2):
                    if hc <= hd:
                        b, d, hd = d, c, hc
                        c = b - g * (b - a)
                        hc = h(c)
                    else:
                        a, c, hc = c, d, hd
                        d = a + g * (b - a)
                        hd = h(d)
        best = min((a for a in seen if a.success), key=exact, default=seen[0])
        return dataclasses.replace(best, objective=exact(best), lower_bound=math.nan, gap=math.nan,
                                   tau_evaluations=sum(a.tau_evaluations for a in seen))

    def calibrate_queue(self, snr_hz, compute_s, error_profile, data_weight=None, *, rounding_profile=None,
                        iterations: int = 40) -> float:
        """The smallest backlog Q (seconds) whose allocation of this round meets τ̄, by bisection;
        0 when Q = 0 already does. When no Q meets τ̄ (the round cannot), the smallest Q that
        reaches the least latency any Q gives."""

        def latency(q: float) -> float:
            prob = self.problem(snr_hz, compute_s, error_profile, data_weight, queue=q, weight_v=self.weight_v,
                                rounding_profile=rounding_profile)
            alloc = allocate(prob, backend=self.backend)
            return alloc.latency_s if alloc.success else math.inf

        goal = self.latency_budget_s
        if latency(0.0) <= goal:
            return 0.0
        hi = self.weight_v / goal  # the scale at which Q·τ matches V times a unit of dropped energy
        least = latency(hi)
        for _ in range(60):
            if least <= goal:
                break
            more = latency(hi * 4)
            if more >= least:  # the latency stopped falling: τ̄ cannot be met this round
                goal = least
                break
            hi, least = hi * 4, more
        lo = 0.0
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if latency(mid) <= goal:
                hi = mid
            else:
                lo = mid
        return float(hi)

    def _fall_back(self, prob: RoundProblem, failed: Allocation) -> Allocation:
        if self.fallback == "raise":
            raise InfeasibleError(failed.message)
        if self.fallback == "relax_cap":
            relaxed = dataclasses.replace(prob, max_latency_s=None)
            alloc = allocate(relaxed, backend=self.backend, tau_hint=self.last_latency_s, certify=self.certifies())
            note = f"relax_cap: {failed.message}; solved without max_latency_s"
        else:
            t0 = time.perf_counter()
            keep = np.zeros(prob.num_clients, dtype=np.int64)
            bw = min_latency_bandwidth(np.zeros(prob.num_clients), prob.snr_hz, prob.compute_s,
                                       prob.total_bandwidth_hz, downlink_s=prob.downlink_s)
            alloc = assemble_allocation(prob, keep, bw, lower=math.nan, name="skip_round", t0=t0, evals=0)
            note = f"skip_round: {failed.message}; nobody scheduled"
        return dataclasses.replace(alloc, fallback=note, message=f"{alloc.message} [fallback {note}]")

    def observe(self, latency_s: float) -> None:
        """Feed back the realised latency τ(t): Q ← max(Q + τ − τ̄, 0)."""
        tau = as_scalar("latency_s", latency_s, lower=0)
        queue = max(self.queue + tau - self.latency_budget_s, 0.0)
        if not math.isfinite(queue):  # the state stays as it was
            raise ValueError(f"latency_s = {latency_s!r} would make the queue non-finite "
                             f"(queue = {self.queue!r}); the queue must stay finite")
        self.queue = queue
        self.last_latency_s = tau
        self.round += 1

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state: queue, round, last latency and the settings."""
        return {"queue": self.queue, "round": self.round, "last_latency_s": self.last_latency_s,
                "latency_budget_s": self.latency_budget_s, "weight_v": self.weight_v,
                "calibrating": self.calibrating, "drift": self.drift}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output. Every field is validated before any is set, so a
        bad state raises ValueError (naming the field) and leaves the allocator unchanged."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict; got {type(state).__name__}")
        for key in ("queue", "round", "latency_budget_s", "weight_v"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        queue = as_scalar("queue", state["queue"], lower=0)
        rnd = as_scalar("round", state["round"], lower=0, integer=True)
        budget = as_scalar("latency_budget_s", state["latency_budget_s"], lower=0, strict=True)
        weight_v = as_scalar("weight_v", state["weight_v"], lower=0, strict=True)
        last = state.get("last_latency_s")
        last = None if last is None else as_scalar("last_latency_s", last, lower=0)
        calibrating = state.get("calibrating", False)
        if not isinstance(calibrating, bool):
            raise ValueError(f"calibrating must be true or false; got {calibrating!r}")
        drift = state.get("drift", self.drift)
        if not isinstance(drift, str) or drift not in ("linear", "exact"):
            raise ValueError(f"drift must be 'linear' or 'exact'; got {drift!r}")
        self.queue, self.round, self.latency_budget_s, self.weight_v = queue, rnd, budget, weight_v
        self.last_latency_s, self.calibrating, self.drift = last, calibrating, drift

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
        t0 = time.perf_counter()
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
        alloc = assemble_allocation(prob, keep, bw, lower=math.nan, name=f"fixed-{self.bandwidth}", t0=t0, evals=0)
        cap = prob.max_latency_s
        why = (bw.message if not bw.success
               else f"the latency {alloc.latency_s!r} s is not finite" if not math.isfinite(alloc.latency_s)
               else f"the latency {alloc.latency_s:.6g} s exceeds max_latency_s = {cap:.6g} s"
               if cap is not None and alloc.latency_s > cap * (1 + 1e-9) else None)
        if why is not None:  # the fixed choice does not fit: say so, keep the decisions for the record
            return dataclasses.replace(alloc, status=Status.INFEASIBLE, message=f"keep = {self.keep} for every client "
                                       f"does not fit: {why}; lower keep, add bandwidth or raise the cap")
        return alloc


class DensePolicy(FixedPolicy):
    """Baseline: every client sends all r components, latency-optimal bandwidth, no budget."""

    def __init__(self, shape: LoraShape, **kwargs):
        super().__init__(shape, keep=shape.rank, bandwidth="min_latency", **kwargs)
