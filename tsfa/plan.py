"""Results of the offline stage (spec §6): the design table's rows, the simulated online
points (``latency_model="online"``) and the plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tsfa.model import LoraShape, ModuleShape
from tsfa.simulate import VPoint
from tsfa.status import ResultMixin, Status

__all__ = ["Candidate", "OnlinePoint", "OfflinePlan", "base_shape"]


def base_shape(modules) -> LoraShape:
    """The adapted modules at rank 1: a :class:`LoraShape` (its rank ignored; its bits per value
    and header kept) or a non-empty sequence of :class:`ModuleShape` (or (name, m, n) tuples)."""
    if isinstance(modules, LoraShape):
        return modules.with_rank(1)
    if isinstance(modules, (str, bytes)) or not isinstance(modules, Sequence) or not modules:
        raise ValueError(f"modules must be a LoraShape or a non-empty sequence of ModuleShape; got {modules!r}")
    return LoraShape(tuple(m if isinstance(m, ModuleShape) else ModuleShape(*m) for m in modules), 1)


@dataclass(frozen=True, eq=False)
class Candidate:
    """One row of the design table (one (rank, keep ratio, rounds) candidate).

    Attributes:
        index: position in the table (the tie-break order: rank, then keep, then rounds).
        rank: r.  keep: s = ⌈ρ r⌉ in 1..r.  keep_ratio: s / r (what ``predict`` saw).
        nominal_keep_ratios: the grid values ρ that give this keep at this rank.
        rounds: training rounds.
        payload_bits: S(s) per client, bits.  downlink_s: T^dl, s.
        predicted_loss: the predictor's "total".  loss_terms: every term, by name (read-only).
        latency_mean_s, latency_low_s, latency_high_s: SAA mean and interval, s.
        latency_s: the statistic the constraints use (mean or upper end), s.
        participation: mean share of uploading clients.
        training_time_s: rounds · latency_s, s.
        violated: the constraints this candidate breaks (names from ``CONSTRAINTS``).
    """

    index: int
    rank: int
    keep: int
    keep_ratio: float
    nominal_keep_ratios: tuple[float, ...]
    rounds: int
    payload_bits: int
    downlink_s: float
    predicted_loss: float
    loss_terms: Mapping[str, float]
    latency_mean_s: float
    latency_low_s: float
    latency_high_s: float
    latency_s: float
    participation: float
    training_time_s: float
    violated: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.violated

    def as_dict(self) -> dict:
        """A flat dict (loss terms as ``loss_<name>``), e.g. for a CSV row."""
        row = {k: getattr(self, k) for k in ("index", "rank", "keep", "keep_ratio", "rounds", "payload_bits",
                                             "downlink_s", "predicted_loss")}
        row["nominal_keep_ratios"] = " ".join(f"{x:g}" for x in self.nominal_keep_ratios)
        row.update({f"loss_{k}": v for k, v in self.loss_terms.items() if k != "total"})
        row.update({k: getattr(self, k) for k in ("latency_mean_s", "latency_low_s", "latency_high_s", "latency_s",
                                                  "participation", "training_time_s")})
        row["feasible"] = self.feasible
        row["violated"] = "+".join(self.violated)
        return row


@dataclass(frozen=True, eq=False)
class OnlinePoint:
    """One simulated (rank, V, rounds) point of the online latency model (step 6 of
    :func:`~tsfa.offline.design_offline`, ``latency_model="online"``).

    Attributes:
        index: position in ``OfflinePlan.online_table`` (order: rank, then V, then rounds).
        rank: r.  relative_v: the scale-free V simulated.  rounds: training rounds.
        simulated_rounds: rounds the statistics are over, min(rounds, v_rounds) (a prefix of
            the rank's simulation: the draws do not depend on the horizon).
        replicates: independent simulated trajectories the statistics average over
            (``VSweepSettings.online_replicates``).
        time_average_latency_s: simulated time-average round latency (mean over the
            replicates), s.
        latency_low_s, latency_high_s: its interval at the SAA's ``confidence``: Student-t
            over the replicates' time-averages, or with one replicate a batch-means interval
            over its rounds (10 contiguous batches; NaN with fewer than 4 rounds), s.
        average_queue_s: mean virtual queue, s.
        participation: mean share of clients scheduled (keep > 0).
        mean_keep: mean components kept per client and round (skipped clients count 0).
        mean_keep_ratio: clip(mean_keep / r, 1/r, 1), the keep ratio ``predict`` saw.
        keep, keep_ratio: mean_keep rounded (halves up) and clipped to 1..r, and keep / r
            (the plan's).
        kept_share: κ = 1 − the average relative dropped energy Σ_k p_k e_k(s_k) / Σ_k p_k e_k(0)
            (a skipped client drops all its energy).
        sent_share: the share of the update energy in components some client sent in some
            round, 1 − ē(s_max)/ē(0) (``SimulationResult.sent_share``).
        participation_divergence: χ²(w ‖ p) of the clients' shares of scheduled rounds
            (:func:`tsfa.participation_divergence`).
        training_time_s: rounds · time_average_latency_s, s.
        predicted_loss, loss_terms: the predictor's "total" and every term (read-only).
        violated: the constraints broken ("latency": simulated latency > τ̄; "time":
            training time > time budget; "participation": simulated participation below
            ``online_min_participation``).
    """

    index: int
    rank: int
    relative_v: float
    rounds: int
    simulated_rounds: int
    replicates: int
    time_average_latency_s: float
    latency_low_s: float
    latency_high_s: float
    average_queue_s: float
    participation: float
    mean_keep: float
    mean_keep_ratio: float
    keep: int
    keep_ratio: float
    kept_share: float
    sent_share: float
    participation_divergence: float
    training_time_s: float
    predicted_loss: float
    loss_terms: Mapping[str, float]
    violated: tuple[str, ...]

    @property
    def feasible(self) -> bool:
        return not self.violated

    def as_dict(self) -> dict:
        """A flat dict (loss terms as ``loss_<name>``), e.g. for a CSV row."""
        row = {k: getattr(self, k) for k in ("index", "rank", "relative_v", "rounds", "simulated_rounds", "replicates",
                                             "time_average_latency_s", "latency_low_s", "latency_high_s",
                                             "average_queue_s", "participation", "mean_keep", "mean_keep_ratio",
                                             "keep", "keep_ratio", "kept_share", "sent_share",
                                             "participation_divergence", "training_time_s",
                                             "predicted_loss")}
        row.update({f"loss_{k}": v for k, v in self.loss_terms.items() if k != "total"})
        row["feasible"] = self.feasible
        row["violated"] = "+".join(self.violated)
        return row


@dataclass(frozen=True, eq=False)
class OfflinePlan(ResultMixin):
    """Result of :func:`design_offline`.

    Attributes:
        status: OPTIMAL, INFEASIBLE (no candidate meets the budgets; ``message`` gives the
            smallest feasible τ̄ and the fix) or ERROR (a solver failed, or the MILP and the
            enumeration disagree).
        message: what was decided and why, in words.
        rank, keep, keep_ratio, rounds: the chosen r, s, s/r and round count (None if none).
        relative_v: the chosen scale-free V (None if not chosen): pass it to
            :meth:`OnlineAllocator.from_relative_v <tsfa.allocator.OnlineAllocator.from_relative_v>`
            (or ``fedloop``'s ``weight_v``) with error profiles divided by the round's
            Σ p_k e_k(0). The property ``weight_v`` is the absolute V = relative_v · τ̄².
        predicted_loss, loss_terms: the chosen candidate's predicted final loss and its terms.
        expected_latency_s, latency_low_s, latency_high_s: its SAA mean latency and interval, s.
        participation: its mean share of uploading clients.
        latency_budget_s, time_budget_s, max_latency_s, min_participation: the inputs.
        min_latency_budget_s: the smallest τ̄ for which some candidate is feasible (the least
            latency statistic among candidates that meet the other constraints; inf if none).
        binding: the constraints that bind: relaxing one alone admits a candidate with lower
            predicted loss (if no single one does but a better candidate exists, the ones it
            breaks); with rounds derived from the time budget, "time" always binds.
        table: every candidate (:class:`Candidate`), in tie-break order.
        chosen: index of the chosen candidate in ``table`` (None if none).
        draws, confidence, latency_statistic: SAA settings.
        v_sweep: the V sweep (:class:`VPoint`), empty if V was not chosen (with
            ``latency_model="online"``, each V's ``meets_budget`` is its point's
            ``online_latency_test``).
        cross_check: True if the MILP and enumeration agreed (None for method="enumerate").
        objective: equals ``predicted_loss``.
        solve_time_s: wall time of the whole design, s.
        backend: "milp:appsi_highs" or "enumerate" (and the SAA backend after a "/").
        latency_model: "nominal" or "online" (``VSweepSettings.latency_model``).
        online_table: with "online", every simulated (rank, V, rounds) point
            (:class:`OnlinePoint`); empty with "nominal".
        online_chosen: with "online", the index of the chosen point in ``online_table``.
        screen_chosen: the index in ``table`` of the nominal choice (steps 1–4); with
            "nominal" it equals ``chosen``.
        simulation_seed: the seed of the online-stage simulations (the V sweep, and with
            "online" every rank's), None where none ran: :func:`~tsfa.simulate.sweep_v` with
            it reproduces them (with "online", on each seed of
            ``tsfa.online_model.replicate_seeds(simulation_seed, online_replicates)``).

    With ``latency_model="online"`` the plan's rank, keep, rounds, V, predicted loss and
    latency come from the chosen online point: ``expected_latency_s`` is its simulated
    time-average latency, ``latency_low_s``/``latency_high_s`` its interval,
    ``participation`` its simulated share of scheduled clients, ``keep`` its rounded mean
    keep; no row of ``table`` is the choice (``chosen`` is None) and ``table`` is the
    nominal screen, whose choice is ``screen_chosen``; ``min_latency_budget_s`` is the
    screen's (the simulation depends on τ̄, so no smaller τ̄ is derived from it).
    """

    status: Status
    message: str
    rank: int | None
    keep: int | None
    keep_ratio: float | None
    rounds: int | None
    relative_v: float | None
    predicted_loss: float
    loss_terms: Mapping[str, float]
    expected_latency_s: float
    latency_low_s: float
    latency_high_s: float
    participation: float
    latency_budget_s: float
    time_budget_s: float | None
    max_latency_s: float | None
    min_participation: float
    min_latency_budget_s: float
    binding: tuple[str, ...]
    table: tuple[Candidate, ...]
    chosen: int | None
    draws: int
    confidence: float
    latency_statistic: str
    v_sweep: tuple[VPoint, ...]
    cross_check: bool | None
    objective: float
    solve_time_s: float
    backend: str
    latency_model: str = "nominal"
    online_table: tuple[OnlinePoint, ...] = ()
    online_chosen: int | None = None
    screen_chosen: int | None = None
    simulation_seed: int | None = None

    @property
    def weight_v(self) -> float | None:
        """The absolute V of the online objective, relative_v · τ̄² (None if V was not chosen)."""
        return None if self.relative_v is None else self.relative_v * self.latency_budget_s**2

    @property
    def chosen_candidate(self) -> Candidate | None:
        return None if self.chosen is None else self.table[self.chosen]

    @property
    def chosen_point(self) -> OnlinePoint | None:
        """The chosen online point (``latency_model="online"``), else None."""
        return None if self.online_chosen is None else self.online_table[self.online_chosen]

    def table_rows(self) -> list[dict]:
        """The table as flat dicts (see :meth:`Candidate.as_dict`), with a ``chosen`` flag (and,
        with ``latency_model="online"``, a ``screen_chosen`` flag: the nominal screen's choice)."""
        if self.latency_model == "online":
            return [dict(c.as_dict(), chosen=c.index == self.chosen, screen_chosen=c.index == self.screen_chosen)
                    for c in self.table]
        return [dict(c.as_dict(), chosen=c.index == self.chosen) for c in self.table]

    def online_rows(self) -> list[dict]:
        """The online points as flat dicts (see :meth:`OnlinePoint.as_dict`), with a ``chosen``
        flag (empty with ``latency_model="nominal"``)."""
        return [dict(p.as_dict(), chosen=p.index == self.online_chosen) for p in self.online_table]

    def format_online_table(self, *, feasible_only: bool = False) -> str:
        """The online points as fixed-width text; the chosen row is marked with '*'."""
        terms = [k for k in (self.online_table[0].loss_terms if self.online_table else {}) if k != "total"]
        head = ["", "rank", "V", "rounds", "latency", f"{self.confidence:.0%} CI", "particip", "χ²", "mean keep",
                "kept", "sent", *terms, "total", "violated"]
        rows = []
        for p in self.online_table:
            if feasible_only and not p.feasible:
                continue
            rows.append(["*" if p.index == self.online_chosen else "", str(p.rank), f"{p.relative_v:.3g}",
                         str(p.rounds), f"{p.time_average_latency_s:.4g}",
                         f"[{p.latency_low_s:.4g}, {p.latency_high_s:.4g}]", f"{p.participation:.3f}",
                         f"{p.participation_divergence:.3g}", f"{p.mean_keep:.3g}", f"{p.kept_share:.4f}",
                         f"{p.sent_share:.4f}", *(f"{p.loss_terms[t]:.4g}" for t in terms),
                         f"{p.predicted_loss:.4g}", "+".join(p.violated) or "-"])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def format_table(self, *, feasible_only: bool = False) -> str:
        """The table as fixed-width text; the chosen row is marked with '*' (with
        ``latency_model="online"``, the nominal screen's choice with 's')."""
        terms = [k for k in (self.table[0].loss_terms if self.table else {}) if k != "total"]
        head = ["", "rank", "keep", "ratio", "rounds", *terms, "total", "lat mean", f"{self.confidence:.0%} CI",
                "particip", "violated"]
        rows = []
        for c in self.table:
            if feasible_only and not c.feasible:
                continue
            mark = "*" if c.index == self.chosen else "s" if c.index == self.screen_chosen else ""
            rows.append([mark, str(c.rank), str(c.keep), f"{c.keep_ratio:.3g}",
                         str(c.rounds), *(f"{c.loss_terms[t]:.4g}" for t in terms), f"{c.predicted_loss:.4g}",
                         f"{c.latency_mean_s:.4g}", f"[{c.latency_low_s:.4g}, {c.latency_high_s:.4g}]",
                         f"{c.participation:.3f}", "+".join(c.violated) or "-"])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def shape(self, modules) -> LoraShape:
        """The chosen rank applied to ``modules`` (a LoraShape or a sequence of ModuleShape)."""
        if self.rank is None:
            raise ValueError(f"the plan has no chosen rank (status {self.status.value})")
        return base_shape(modules).with_rank(self.rank)
