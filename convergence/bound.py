"""The convergence bound of spec §5 as a calculator (derivation: docs/theory.md).

For the loss gap g_t = F(θ_t) − F* (F* the best loss over *all* adapters, of any rank) the
theorem of docs/theory.md gives, with u_t = g_t − ε(r),

    u_{t+1} ≤ ρ u_t + (1+β)(n + d) + β ε(r) + w (κ e_t + c_t),

    a = min(1, 2 η μ E),  ρ = (1+β)(1−a),  β = a/2 (default),  w = (1 + 1/β) L_W γ²,
    n = η² L E σ² / 2                                  (stochastic-gradient noise),
    d = η² L E G² / 2 + η² L G √(G² + σ²) E (E − 1)     (client drift from local steps),

where e_t = Σ_k p_k e_k(s_k) is round t's sparsification error (SOFT error profiles, in
units of B·A), c_t = ‖C_t‖²_F the covariance of separate averaging, and ε(r) the rank term.
Unrolled, g_t is bounded by the sum of six named terms, each returned separately:

* contraction  ρ^t (g_0 − ε(r))
* noise        (1+β) n Σ_{j<t} ρ^j
* drift        (1+β) d Σ_{j<t} ρ^j
* sparsification  Σ_{τ<t} ρ^{t−1−τ} w κ e_τ
* covariance   Σ_{τ<t} ρ^{t−1−τ} w c_τ
* rank         ε(r) (1 + β Σ_{j<t} ρ^j)

Everything is numpy and vectorised: ``rank`` may be an array of candidate ranks and the
per-round schedules may carry leading axes (candidate keep ratios, seeds…), so the offline
stage evaluates whole grids in one call. No torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

import numpy as np

from convergence.rank import check_spectrum, rank_term

__all__ = ["BoundConstants", "Schedule", "BoundTerms", "bound", "contraction_factor", "noise_term", "drift_term",
           "sparsification_term", "covariance_term", "TERMS"]

#: The names of the bound's terms, in stacking order.
TERMS = ("contraction", "noise", "drift", "sparsification", "covariance", "rank")


@dataclass(frozen=True)
class BoundConstants:
    """The constants of the bound (docs/theory.md, Assumptions A1–A6).

    Attributes:
        step_size: η, the clients' SGD step size (> 0).
        local_steps: E, local steps per round (integer ≥ 1).
        smoothness: L, smoothness of the loss in the LoRA factors on the ball the factors
            stay in (A1).
        product_smoothness: L_W, smoothness of the loss as a function of the adapter
            product W = γBA (A5).
        noise: σ², variance bound of a client's minibatch gradient (A2).
        gradient_bound: G², bound on the squared norm of every client's gradient (A3; the
            heterogeneity ζ² enters through it: G ≤ ‖∇F‖ + ζ).
        pl: μ, the PL constant at the round start points (A4): ‖∇F(θ_t)‖² ≥ 2μ(F(θ_t) − F*_r).
        initial_gap: g_0 = F(θ_0) − F*.
        spectrum: the covariance-weighted target spectrum λ_1 ≥ λ_2 ≥ … ≥ 0 behind ε(r).
        scaling: γ = α/r (the adapter is γBA); e_t and c_t are in units of B·A.
        sparsification_factor: κ in ‖B'A' − B̄Ā‖² ≤ κ Σ_k p_k e_k(s_k) (A6; 1 when the kept
            components are orthogonal and every client keeps the same indices).
        rank_weight: ε(r) = rank_weight · Σ_{i>r} λ_i (½ for a ½‖·‖² loss).
        floor: F*, added back by :meth:`BoundTerms.loss` to give a loss, not a gap.
        split: β of the Young split in the aggregation step; None = a/2.
        source: a free-text note of where the constants came from.
    """

    step_size: float
    local_steps: int
    smoothness: float
    product_smoothness: float
    noise: float
    gradient_bound: float
    pl: float
    initial_gap: float
    spectrum: np.ndarray = field(default_factory=lambda: np.zeros(1))
    scaling: float = 1.0
    sparsification_factor: float = 1.0
    rank_weight: float = 0.5
    floor: float = 0.0
    split: float | None = None
    source: str = ""

    def __post_init__(self):
        for f in fields(self):
            name, v = f.name, getattr(self, f.name)
            if name in ("spectrum", "source", "split", "floor"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number; got {name} = {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be >= 0; got {name} = {v!r}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0; got step_size = {self.step_size!r}")
        if int(self.local_steps) != self.local_steps or self.local_steps < 1:
            raise ValueError(f"local_steps must be an integer >= 1; got local_steps = {self.local_steps!r}")
        if not isinstance(self.floor, (int, float, np.integer, np.floating)) or not math.isfinite(self.floor):
            raise ValueError(f"floor must be a finite number; got floor = {self.floor!r}")
        if self.split is not None and (not math.isfinite(self.split) or self.split <= 0):
            raise ValueError(f"split must be None or a finite number > 0; got split = {self.split!r}")
        object.__setattr__(self, "spectrum", check_spectrum(self.spectrum))

    def replace(self, **changes) -> BoundConstants:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spectrum"] = self.spectrum.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BoundConstants:
        return cls(**{**d, "spectrum": np.asarray(d.get("spectrum", [0.0]), dtype=float)})


@dataclass(frozen=True)
class Schedule:
    """What the bound is evaluated on.

    Attributes:
        rounds: T, the number of rounds (the terms are returned for t = 0..T).
        rank: the structural rank r, an int or an array of candidate ranks.
        sparsification: e_t = Σ_k p_k e_k(s_k) per round: a scalar (every round alike) or an
            array whose last axis has length T (leading axes broadcast with ``rank``).
        covariance: c_t = ‖C_t‖²_F per round, same conventions.
    """

    rounds: int
    rank: object = 1
    sparsification: object = 0.0
    covariance: object = 0.0


@dataclass
class BoundTerms:
    """The bound's terms per round: each array has shape (..., T+1), index t = round t (t = 0
    is the start). ``total`` bounds the loss gap F(θ_t) − F*; :meth:`loss` adds F* back."""

    contraction: np.ndarray
    noise: np.ndarray
    drift: np.ndarray
    sparsification: np.ndarray
    covariance: np.ndarray
    rank: np.ndarray
    total: np.ndarray
    floor: float = 0.0
    rate: float = 1.0

    def loss(self) -> np.ndarray:
        """The bound on the loss F(θ_t) itself: total + F*."""
        return self.total + self.floor

    def final(self) -> dict:
        """Each term (and the total) at the last round, as arrays of the leading shape."""
        return {name: getattr(self, name)[..., -1] for name in (*TERMS, "total")}

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in (*TERMS, "total")}


# -- one pure function per term --------------------------------------------------------------
def _a_beta(c: BoundConstants) -> tuple[float, float]:
    a = min(1.0, 2.0 * c.step_size * c.pl * c.local_steps)
    beta = c.split if c.split is not None else a / 2.0
    return a, beta


def contraction_factor(c: BoundConstants) -> float:
    """ρ = (1+β)(1−a) with a = min(1, 2ημE): the per-round contraction of the gap above ε(r)."""
    a, beta = _a_beta(c)
    return (1.0 + beta) * (1.0 - a)


def noise_term(c: BoundConstants) -> float:
    """The per-round stochastic-gradient noise increment (1+β) η² L E σ² / 2."""
    _, beta = _a_beta(c)
    return (1.0 + beta) * c.step_size**2 * c.smoothness * c.local_steps * c.noise / 2.0


def drift_term(c: BoundConstants) -> float:
    """The per-round client-drift increment (1+β)[η² L E G²/2 + η² L G √(G²+σ²) E(E−1)]."""
    _, beta = _a_beta(c)
    eta, L, E, G2 = c.step_size, c.smoothness, c.local_steps, c.gradient_bound
    return (1.0 + beta) * (eta**2 * L * E * G2 / 2.0 + eta**2 * L * math.sqrt(G2 * (G2 + c.noise)) * E * (E - 1))


def _aggregation_weight(c: BoundConstants) -> float:
    _, beta = _a_beta(c)
    if c.product_smoothness == 0 or c.scaling == 0:
        return 0.0
    if beta <= 0:
        return math.inf
    return (1.0 + 1.0 / beta) * c.product_smoothness * c.scaling**2


def sparsification_term(c: BoundConstants, sparsification):
    """The per-round increment w κ e_t of the sparsification error e_t = Σ_k p_k e_k(s_k)."""
    e = np.asarray(sparsification, dtype=float)
    _check_nonneg("sparsification", e)
    return _aggregation_weight(c) * c.sparsification_factor * e


def covariance_term(c: BoundConstants, covariance):
    """The per-round increment w ‖C_t‖²_F of separate averaging's covariance."""
    cov = np.asarray(covariance, dtype=float)
    _check_nonneg("covariance", cov)
    return _aggregation_weight(c) * cov


def _check_nonneg(name, x):
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite; got {name} containing {x[~np.isfinite(x)].ravel()[0]!r}")
    if np.any(x < 0):
        raise ValueError(f"{name} must be >= 0; got {name} containing {x[x < 0].ravel()[0]!r}")


def _per_round(name, x, T):
    x = np.asarray(x, dtype=float)
    if x.ndim == 0:
        return np.full(T, float(x))
    if x.shape[-1] != T:
        raise ValueError(f"{name} must be a scalar or have a last axis of length rounds ({T}); got shape {x.shape}")
    return x


#: β values tried when ``split`` is None (the theorem holds for every β > 0; the least final
#: total over this grid is reported, per candidate).
SPLIT_GRID = np.logspace(-4, 1, 26)


def bound(constants: BoundConstants, schedule: Schedule) -> BoundTerms:
    """Evaluate the bound for rounds 0..T (docs/theory.md, Theorem 1).

    Vectorised: ``schedule.rank`` and the leading axes of the per-round schedules broadcast
    together; every term has shape (broadcast shape, T+1). With ``constants.split`` None the
    Young split β is chosen from :data:`SPLIT_GRID` (and a/2) to make the final total least,
    separately for each candidate; ``BoundTerms.rate`` is then ρ of the first candidate.
    """
    c = constants
    if not isinstance(c, BoundConstants):
        raise TypeError(f"constants must be BoundConstants; got {type(c).__name__}")
    if c.split is None:
        a, _ = _a_beta(c)
        best = None
        for beta in sorted({*SPLIT_GRID.tolist(), *([a / 2] if a > 0 else [])}):
            if (1.0 + beta) * (1.0 - a) > 1.0 + 1e-12 and best is not None:
                continue  # ρ > 1: the bound grows without limit; never the least
            with np.errstate(over="ignore", invalid="ignore"):
                b = _bound(c.replace(split=float(beta)), schedule)
            if best is None:
                best = b
                continue
            better = b.total[..., -1] < best.total[..., -1]
            for name in (*TERMS, "total"):
                setattr(best, name, np.where(better[..., None], getattr(b, name), getattr(best, name)))
        return best
    return _bound(c, schedule)


def _bound(c: BoundConstants, schedule: Schedule) -> BoundTerms:
    T = schedule.rounds
    if isinstance(T, bool) or int(T) != T or T < 0:
        raise ValueError(f"rounds must be an integer >= 0; got rounds = {T!r}")
    T = int(T)
    eps = np.asarray(rank_term(c.spectrum, schedule.rank, weight=c.rank_weight), dtype=float)
    e = sparsification_term(c, _per_round("sparsification", schedule.sparsification, T))
    cv = covariance_term(c, _per_round("covariance", schedule.covariance, T))
    shape = np.broadcast_shapes(eps.shape, e.shape[:-1], cv.shape[:-1])
    rho = contraction_factor(c)
    _, beta = _a_beta(c)
    n, d = noise_term(c), drift_term(c)
    u0 = np.maximum(c.initial_gap - eps, 0.0)
    powers = rho ** np.arange(T + 1)
    geo = np.concatenate([[0.0], np.cumsum(powers[:-1])])  # Σ_{j<t} ρ^j
    out = {
        "contraction": np.broadcast_to(u0[..., None] * powers, (*shape, T + 1)),
        "noise": np.broadcast_to(n * geo, (*shape, T + 1)),
        "drift": np.broadcast_to(d * geo, (*shape, T + 1)),
        "rank": np.broadcast_to(eps[..., None] * (1.0 + beta * geo), (*shape, T + 1)),
    }
    for name, x in (("sparsification", e), ("covariance", cv)):
        acc = np.zeros(np.broadcast_shapes(x.shape[:-1], shape) + (T + 1,))
        for t in range(T):
            acc[..., t + 1] = rho * acc[..., t] + x[..., t]
        out[name] = acc
    out = {k: np.array(v, dtype=float) for k, v in out.items()}
    total = sum(out[k] for k in TERMS)
    return BoundTerms(**out, total=total, floor=float(c.floor), rate=rho)
