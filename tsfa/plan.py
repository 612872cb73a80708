"""Results of the offline stage (spec §6): the design table's rows and the plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tsfa.model import LoraShape, ModuleShape
from tsfa.simulate import VPoint
from tsfa.status import ResultMixin, Status

__all__ = ["Candidate", "OfflinePlan", "base_shape"]


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
        v_sweep: the V sweep (:class:`VPoint`), empty if V was not chosen.
        cross_check: True if the MILP and enumeration agreed (None for method="enumerate").
        objective: equals ``predicted_loss``.
        solve_time_s: wall time of the whole design, s.
        backend: "milp:appsi_highs" or "enumerate" (and the SAA backend after a "/").
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

    @property
    def weight_v(self) -> float | None:
        """The absolute V of the online objective, relative_v · τ̄² (None if V was not chosen)."""
        return None if self.relative_v is None else self.relative_v * self.latency_budget_s**2

    @property
    def chosen_candidate(self) -> Candidate | None:
        return None if self.chosen is None else self.table[self.chosen]

    def table_rows(self) -> list[dict]:
        """The table as flat dicts (see :meth:`Candidate.as_dict`), with a ``chosen`` flag."""
        return [dict(c.as_dict(), chosen=c.index == self.chosen) for c in self.table]

    def format_table(self, *, feasible_only: bool = False) -> str:
        """The table as fixed-width text; the chosen row is marked with '*'."""
        terms = [k for k in (self.table[0].loss_terms if self.table else {}) if k != "total"]
        head = ["", "rank", "keep", "ratio", "rounds", *terms, "total", "lat mean", f"{self.confidence:.0%} CI",
                "particip", "violated"]
        rows = []
        for c in self.table:
            if feasible_only and not c.feasible:
                continue
            rows.append(["*" if c.index == self.chosen else "", str(c.rank), str(c.keep), f"{c.keep_ratio:.3g}",
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
