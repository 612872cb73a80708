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
           "sparsification_term", "covariance_term", "reach", "TERMS"]


def _finite(v) -> bool:
    """math.isfinite that answers False (not OverflowError) for an integer beyond the float range."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


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
        reach_rank: the rank r_0 at which ``pl`` holds (None: one μ for every rank, the
            theorem's form). Given, a schedule of rank r uses μ(r) = μ · ν(r)/ν(r_0) with the
            reach ν(r) ∝ r^p of Lemma 2 (docs/theory.md §3): the rank-dependent speed.
        reach_power: p in ν(r) ∝ r^p (1 for γ = 1; ``convergence.reach_power`` gives Lemma 2's value).
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
    reach_rank: int | None = None
    reach_power: float = 1.0

    def __post_init__(self):
        for f in fields(self):
            name, v = f.name, getattr(self, f.name)
            if name in ("spectrum", "source", "split", "floor", "reach_rank"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not _finite(v):
                raise ValueError(f"{name} must be a finite number; got {name} = {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be >= 0; got {name} = {v!r}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0; got step_size = {self.step_size!r}")
        if int(self.local_steps) != self.local_steps or self.local_steps < 1:
            raise ValueError(f"local_steps must be an integer >= 1; got local_steps = {self.local_steps!r}")
        real = (int, float, np.integer, np.floating)
        if isinstance(self.floor, (bool, np.bool_)) or not isinstance(self.floor, real) \
                or not _finite(self.floor):
            raise ValueError(f"floor must be a finite number; got floor = {self.floor!r}")
        if self.split is not None and (isinstance(self.split, (bool, np.bool_))
                                       or not isinstance(self.split, (int, float, np.integer, np.floating))
                                       or not _finite(self.split) or self.split <= 0):
            raise ValueError(f"split must be None or a finite number > 0; got split = {self.split!r}")
        if self.reach_rank is not None and (isinstance(self.reach_rank, (bool, np.bool_))
                                            or not isinstance(self.reach_rank, (int, np.integer))
                                            or self.reach_rank < 1):
            raise ValueError(f"reach_rank must be None or an integer >= 1; got reach_rank = {self.reach_rank!r}")
        object.__setattr__(self, "spectrum", check_spectrum(self.spectrum))

    def at_rank(self, rank: int) -> BoundConstants:
        """The constants for rank r: μ(r) = μ (r / r_0)^p (unchanged without ``reach_rank``)."""
        if self.reach_rank is None or int(rank) == self.reach_rank:
            return self
        return replace(self, pl=self.pl * reach(rank, self.reach_rank, self.reach_power))

    def replace(self, **changes) -> BoundConstants:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["spectrum"] = self.spectrum.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BoundConstants:
        """Inverse of :meth:`to_dict`; a document that is not an object with exactly the fields is
        a ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"constants must be a mapping of BoundConstants fields; got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown BoundConstants fields {unknown}; known: {sorted(known)}")
        try:
            spectrum = np.asarray(d.get("spectrum", [0.0]), dtype=float)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"spectrum must be an array of real numbers; got {d.get('spectrum')!r:.60}") from None
        try:
            return cls(**{**d, "spectrum": spectrum})
        except TypeError as exc:  # a required field is missing
            raise ValueError(f"BoundConstants: {exc}") from None


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
    is the start). ``total`` bounds the loss gap F(θ_t) − F*; :meth:`loss` adds F* back.
    ``reach`` is the rank-dependent speed ν(r)/ν(r_0) per candidate (1 without
    ``BoundConstants.reach_rank``), ``rates`` the contraction factor ρ(r) per candidate and
    ``rate`` the first candidate's."""

    contraction: np.ndarray
    noise: np.ndarray
    drift: np.ndarray
    sparsification: np.ndarray
    covariance: np.ndarray
    rank: np.ndarray
    total: np.ndarray
    floor: float = 0.0
    rate: float = 1.0
    reach: np.ndarray | float = 1.0
    rates: np.ndarray | float = 1.0

    def loss(self) -> np.ndarray:
        """The bound on the loss F(θ_t) itself: total + F*."""
        return self.total + self.floor

    def final(self) -> dict:
        """Each term (and the total) at the last round, as arrays of the leading shape."""
        return {name: getattr(self, name)[..., -1] for name in (*TERMS, "total")}

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in (*TERMS, "total")}


# -- one pure function per term --------------------------------------------------------------
def reach(rank, reference_rank: int, power: float = 1.0):
    """ν(r)/ν(r_0) = (r / r_0)^p, the rank-dependent speed of Lemma 2 (docs/theory.md §3): at
    B = 0 with A's entries i.i.d. of variance v, E‖∇_θF‖² = γ² r v ‖∇_W G‖², so the effective
    step in the product space grows like γ(r)^m r (m = 2 for SGD, 1 for sign-like steps)."""
    r = np.asarray(rank, dtype=float)
    if np.any(r < 1) or not np.all(np.isfinite(r)):
        raise ValueError(f"rank must be >= 1; got rank = {rank!r}")
    out = (r / float(reference_rank)) ** float(power)
    return float(out) if out.ndim == 0 else out


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
    eta = float(c.step_size)  # products, not **: an overflow is inf (reported by bound), not OverflowError
    return (1.0 + beta) * (eta * eta) * c.smoothness * c.local_steps * c.noise / 2.0


def drift_term(c: BoundConstants) -> float:
    """The per-round client-drift increment (1+β)[η² L E G²/2 + η² L G √(G²+σ²) E(E−1)]."""
    _, beta = _a_beta(c)
    eta, L, E, G2 = float(c.step_size), float(c.smoothness), float(c.local_steps), float(c.gradient_bound)
    e2 = eta * eta
    return (1.0 + beta) * (e2 * L * E * G2 / 2.0 + e2 * L * math.sqrt(G2 * (G2 + c.noise)) * E * (E - 1))


def _aggregation_weight(c: BoundConstants) -> float:
    _, beta = _a_beta(c)
    if c.product_smoothness == 0 or c.scaling == 0:
        return 0.0
    if beta <= 0:
        return math.inf
    return (1.0 + 1.0 / beta) * c.product_smoothness * (float(c.scaling) * float(c.scaling))


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

#: The most per-round values :func:`bound` returns (the product of the leading shape and T + 1);
#: beyond it, ask for the final round only (:func:`convergence.make_predictor` does).
MAX_OUTPUT_VALUES = 2**28


def _rounds(T) -> int:
    if isinstance(T, (bool, np.bool_)) or not isinstance(T, (int, np.integer, float, np.floating)):
        raise ValueError(f"rounds must be an integer >= 0; got rounds = {T!r}")
    if not _finite(T) or int(T) != T or T < 0:
        raise ValueError(f"rounds must be an integer >= 0; got rounds = {T!r}")
    return int(T)


class _Series:
    """A per-round series x_τ (τ = 0..T−1) as a head (..., n) followed by a constant tail (...)
    for τ ≥ n: a scalar schedule is n = 0, a full array n = T. Lets the convolution
    Σ_{τ<t} ρ^{t−1−τ} x_τ be evaluated at any t in O(n), whatever T."""

    def __init__(self, head: np.ndarray, tail: np.ndarray):
        self.head, self.tail = head, tail
        self.n = head.shape[-1]

    @classmethod
    def of(cls, name: str, x, T: int) -> _Series:
        x = np.asarray(x)
        if x.dtype.kind not in "iuf":
            raise ValueError(f"{name} must be real numbers; got {name} of dtype {x.dtype}")
        x = x.astype(float)
        _check_nonneg(name, x)
        if x.ndim == 0:
            return cls(np.zeros((0,)), x)
        if x.shape[-1] != T:
            raise ValueError(f"{name} must be a scalar or have a last axis of length rounds ({T}); got shape {x.shape}")
        return cls(x, np.zeros(x.shape[:-1]))

    def scaled(self, w: float) -> _Series:
        return _Series(_mul(w, self.head), _mul(w, self.tail))

    def lead_shape(self) -> tuple:
        return np.broadcast_shapes(self.head.shape[:-1], self.tail.shape)

    def conv(self, rho: float, t: np.ndarray, geo_t: np.ndarray | None = None) -> np.ndarray:
        """acc_t = Σ_{τ<t} ρ^{t−1−τ} x_τ at rounds ``t`` (int array; its last axis is the rounds
        axis of the result, its leading axes broadcast with the series')."""
        n = self.n
        if n:
            from scipy.signal import lfilter  # the recursion acc ← ρ acc + x, in C

            with np.errstate(over="ignore", invalid="ignore"):
                y = lfilter([1.0], [1.0, -rho], self.head, axis=-1)
            Y = np.concatenate([np.zeros(y.shape[:-1] + (1,)), y], axis=-1)  # Y[..., t] = acc_t, t ≤ n
            idx = np.minimum(t, n).astype(np.intp)
            if idx.ndim == 1:
                base = Y[..., idx]
            else:
                shp = np.broadcast_shapes(Y.shape[:-1] + (1,), idx.shape[:-1] + (1,))
                base = np.take_along_axis(np.broadcast_to(Y, shp[:-1] + Y.shape[-1:]),
                                          np.broadcast_to(idx, shp[:-1] + idx.shape[-1:]), axis=-1)
        else:
            base = np.zeros(())
        k = np.maximum(t - n, 0) if n else t
        with np.errstate(over="ignore", invalid="ignore"):
            tail = _mul(self.tail[..., None], geo_t if (geo_t is not None and not n) else _geo(rho, k))
            return _mul(base, _power(rho, k)) + tail if n else tail


def _mul(a, b):
    """a·b with 0·inf = 0 (a zero increment contributes nothing, however long the horizon)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim == 0 and float(a) == 0.0:
        return np.zeros(b.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        out = a * b
        if np.isnan(out).any():
            out = np.where((a == 0) | (b == 0), 0.0, out)
    return out


def _power(rho: float, k) -> np.ndarray:
    """ρ^k (ρ^0 = 1, also for ρ = 0). For ρ < 1 only the k where ρ^k is not 0 in floating point
    are computed (k > 760/|ln ρ| gives 0), so long horizons cost a fill, not a pow each."""
    k = np.asarray(k, dtype=float)
    if 0.0 < rho < 1.0 and k.size > 4096:
        out = np.zeros(k.shape)
        live = k < 760.0 / -math.log(rho)
        out[live] = np.power(rho, k[live])
        out[k == 0] = 1.0
        return out
    with np.errstate(over="ignore", under="ignore"):
        return np.power(rho, k)


def _geo(rho: float, k) -> np.ndarray:
    """Σ_{j<k} ρ^j in closed form, accurate for ρ near 1: expm1(k ln ρ)/(ρ − 1). For ρ < 1,
    where ρ^k is below 2⁻⁶⁰ the sum equals its limit 1/(1 − ρ) to rounding."""
    k = np.asarray(k, dtype=float)
    if rho == 1.0:
        return k
    if rho == 0.0:
        return (k > 0).astype(float)
    lr = math.log(rho)
    if rho < 1.0 and k.size > 4096:
        out = np.full(k.shape, 1.0 / (1.0 - rho))
        live = k < 42.0 / -lr
        out[live] = np.expm1(k[live] * lr) / (rho - 1.0)
        return out
    with np.errstate(over="ignore", invalid="ignore"):
        return np.expm1(k * lr) / (rho - 1.0)


def bound(constants: BoundConstants, schedule: Schedule) -> BoundTerms:
    """Evaluate the bound for rounds 0..T (docs/theory.md, Theorem 1).

    Vectorised: ``schedule.rank`` and the leading axes of the per-round schedules broadcast
    together; every term has shape (broadcast shape, T+1). With ``constants.split`` None the
    Young split β is chosen from :data:`SPLIT_GRID` (and a/2) to make the final total least,
    separately for each candidate; ``BoundTerms.rate`` is then ρ of the first candidate.

    Closed form (geometric sums; the per-round series by one C-level recursion), so the cost
    is O(T) numpy with a small constant, and the choice of β costs O(1) per β for scalar
    schedules. Raises ValueError naming the constant responsible when a term overflows.
    """
    c = constants
    if not isinstance(c, BoundConstants):
        raise ValueError(f"constants must be BoundConstants; got {type(c).__name__}")
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a Schedule; got {type(schedule).__name__}")
    T = _rounds(schedule.rounds)
    eps = np.asarray(rank_term(c.spectrum, schedule.rank, weight=c.rank_weight), dtype=float)
    e = _Series.of("sparsification", schedule.sparsification, T)
    cv = _Series.of("covariance", schedule.covariance, T)
    shape = np.broadcast_shapes(eps.shape, e.lead_shape(), cv.lead_shape())
    if (T + 1) * math.prod(shape) > MAX_OUTPUT_VALUES:
        raise ValueError(f"rounds = {T} with {math.prod(shape)} candidates asks for "
                         f"{(T + 1) * math.prod(shape)} per-round values (at most {MAX_OUTPUT_VALUES}); "
                         "evaluate the final round only (convergence.make_predictor)")
    t_sel = np.array([T])
    rounds = np.arange(T + 1, dtype=float)
    return _by_rank(c, np.broadcast_to(np.asarray(schedule.rank), shape),
                    lambda ci: _evaluate(ci, eps, e, cv, t_sel, rounds, shape))


def _by_rank(c: BoundConstants, ranks: np.ndarray, evaluate) -> BoundTerms:
    """``evaluate(constants)`` once per distinct rank when μ depends on the rank (``reach_rank``),
    each candidate taking its own rank's terms; ``reach`` and ``rates`` per candidate."""
    uniq = np.unique(ranks) if c.reach_rank is not None else np.array([])
    if len(uniq) <= 1:
        ci = c.at_rank(int(uniq[0])) if len(uniq) else c
        out = evaluate(ci)
        out.reach = np.full(ranks.shape, reach(uniq[0], c.reach_rank, c.reach_power) if len(uniq) else 1.0)
        out.rates = np.full(ranks.shape, out.rate)
        return out
    out, rates = None, np.empty(ranks.shape)
    for r in uniq:
        terms = evaluate(c.at_rank(int(r)))
        pick = ranks == r
        rates[pick] = terms.rate
        if out is None:
            out = terms
        else:
            for name in (*TERMS, "total"):
                setattr(out, name, np.where(pick[..., None], getattr(terms, name), getattr(out, name)))
    out.reach = np.asarray(reach(ranks, c.reach_rank, c.reach_power), dtype=float)
    out.rates = rates
    out.rate = float(rates.ravel()[0])
    return out


def _betas(c: BoundConstants) -> list[float]:
    if c.split is not None:
        return [float(c.split)]
    a, _ = _a_beta(c)
    return sorted({*SPLIT_GRID.tolist(), *([a / 2] if a > 0 else [])})


def _evaluate(c: BoundConstants, eps, e: _Series, cv: _Series, t_sel, t_out, shape) -> BoundTerms:
    """Terms at rounds ``t_out`` (int array, last axis = rounds), β chosen per candidate by the
    total at rounds ``t_sel`` (same conventions, one round), as the loop of the old recursion
    did: the first β of the sorted grid with the least finite total, skipping ρ > 1."""
    betas = _betas(c)
    best_total, best_i = None, None
    candidates = []
    for i, beta in enumerate(betas):
        ci = c.replace(split=beta)
        if c.split is None and contraction_factor(ci) > 1.0 + 1e-12 and best_total is not None:
            continue  # ρ > 1: the bound grows without limit; never the least
        candidates.append(i)
        if len(betas) == 1:
            best_i = np.zeros(shape, dtype=np.intp)
            break
        tot = _terms(ci, eps, e, cv, t_sel, shape)["total"][..., -1]
        tot = np.where(np.isfinite(tot), tot, np.inf)
        if best_total is None:
            best_total, best_i = tot, np.full(shape, i, dtype=np.intp)
        else:
            better = tot < best_total
            best_total, best_i = np.where(better, tot, best_total), np.where(better, i, best_i)
    out = None
    for i in np.unique(best_i):
        ci = c.replace(split=betas[int(i)])
        terms = _terms(ci, eps, e, cv, t_out, shape)
        _check_finite(ci, terms, eps, e, cv, t_out)
        if out is None:
            out, rate = terms, contraction_factor(ci)
        else:
            pick = (best_i == i)[..., None]
            out = {k: np.where(pick, terms[k], out[k]) for k in out}
    if c.split is None:
        rate = contraction_factor(c.replace(split=betas[int(np.ravel(best_i)[0])]))
    return BoundTerms(**out, floor=float(c.floor), rate=rate)


def _terms(c: BoundConstants, eps, e: _Series, cv: _Series, t, shape) -> dict:
    rho = contraction_factor(c)
    _, beta = _a_beta(c)
    w = _aggregation_weight(c)
    n, d = noise_term(c), drift_term(c)
    u0 = np.maximum(c.initial_gap - eps, 0.0)
    t = np.asarray(t)
    full = (*shape, t.shape[-1])
    powers, geo = _power(rho, t), _geo(rho, t)
    with np.errstate(over="ignore", invalid="ignore"):
        out = {
            "contraction": _mul(u0[..., None], powers),
            "noise": _mul(n, geo),
            "drift": _mul(d, geo),
            "sparsification": e.scaled(_mul(w, c.sparsification_factor)).conv(rho, t, geo),
            "covariance": cv.scaled(w).conv(rho, t, geo),
            "rank": _mul(eps[..., None], 1.0 + _mul(beta, geo)),
        }
        out = {k: (v if v.shape == full else np.array(np.broadcast_to(v, full), dtype=float))
               for k, v in out.items()}
        total = out["contraction"] + out["noise"]
        for k in TERMS[2:]:
            total += out[k]
    return {**out, "total": total}


def _check_finite(c: BoundConstants, terms: dict, eps, e: _Series, cv: _Series, t) -> None:
    """Raise ValueError naming the constant behind a non-finite term (instead of inf/nan)."""
    if all(np.all(np.isfinite(terms[k])) for k in (*TERMS, "total")):
        return
    rho = contraction_factor(c)
    T = int(np.max(t))
    vals = {f.name: getattr(c, f.name) for f in fields(c)
            if f.name not in ("spectrum", "source", "floor", "reach_rank", "reach_power")}
    culprits = {
        "contraction": ("initial_gap", "pl", "split"),
        "noise": ("step_size", "smoothness", "local_steps", "noise"),
        "drift": ("step_size", "smoothness", "local_steps", "gradient_bound", "noise"),
        "sparsification": ("product_smoothness", "scaling", "sparsification_factor", "split"),
        "covariance": ("product_smoothness", "scaling", "split"),
        "rank": ("spectrum", "rank_weight", "split"),
    }
    increments = {"noise": noise_term(c), "drift": drift_term(c), "sparsification": _aggregation_weight(c)
                  * c.sparsification_factor, "covariance": _aggregation_weight(c)}
    for name in (*TERMS, "total"):
        if np.all(np.isfinite(terms[name])):
            continue
        if name == "total":
            raise ValueError(f"the bound's total overflows the float range over rounds = {T}; "
                             "the terms are finite but their sum is not: scale down initial_gap or the schedules")
        inc = increments.get(name)
        names = culprits[name]
        if inc is not None and not _finite(inc):  # the per-round increment itself overflows
            big = max((k for k in names if k in vals), key=lambda k: abs(math.log10(max(abs(vals[k]), 1e-300))))
            raise ValueError(f"the {name} term overflows: its per-round increment is {inc!r} "
                             f"({', '.join(f'{k} = {vals[k]!r}' for k in names if k in vals)}); "
                             f"{big} = {vals[big]!r} is too large")
        if rho > 1.0:
            raise ValueError(f"the {name} term overflows over rounds = {T}: the contraction factor "
                             f"rho = (1 + split)(1 - a) = {rho!r} > 1 compounds (split = {c.split!r}, pl = {c.pl!r}, "
                             f"step_size = {c.step_size!r}, local_steps = {c.local_steps!r}); choose a smaller split, "
                             "a larger pl, or fewer rounds")
        big = max((k for k in names if k in vals), key=lambda k: abs(math.log10(max(abs(vals[k]), 1e-300))),
                  default=names[0])
        raise ValueError(f"the {name} term overflows the float range "
                         f"({', '.join(f'{k} = {vals[k]!r}' for k in names if k in vals)}); "
                         f"{big} = {vals[big]!r} is too large")
