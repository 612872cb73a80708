"""Calibrated loss curves with a band, for configurations not yet run (spec §5(b); docs/theory.md §6).

Theorem 1 contracts the gap with the *worst* mode of the product-space Hessian; a training
curve is the sum of all modes. On the quadratic model (A5), a step whose size in the product
space is η ν(r) κ (ν(r) the rank's reach, Lemma 2; κ the kept share of the update energy)
leaves u_t = Σ_j g_j φ(η ν κ λ_j t) for the mode profile φ of the optimiser, so two
configurations that differ only in (r, s) have gap curves that are *time rescalings* of each
other (Proposition 3):

    ℓ_t(r, s) − F* − ε(r) = (g_0(r) / g_0(r_j)) · u_j(f t),    f = (r / r_j)^p · (κ(r, s) / κ_j)^q,

with u_j the gap curve of a pilot j at (r_j, κ_j), F* the loss's known lower bound and ε(r)
the rank term. First-order theory gives q = 1 and p from Lemma 2 (:func:`reach_power`);
pilots that differ in rank (keep) fit p (q) on a grid instead, and report both.

The pilot's curve is used as measured, smoothed: a period-2 alternation between rounds is
estimated and removed, then the non-increasing least-squares fit is taken; beyond its last round a power law
fitted to its last third extends it. The band is a residual bootstrap: each replicate
re-smooths the pilot plus resampled residuals, refits p and q, predicts, and adds a
resampled residual (the round-to-round scatter of one run); the quantiles across
replicates form the band. :func:`predict_from` re-calibrates on a run's own history.
numpy only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from convergence.rank import check_spectrum, rank_term
from convergence.template import (
    Pilot,
    alternation,
    kept_share_curve,
    noise_floor,
    parse_pilot,
    pilot_kept_share,
    smooth_curve,
    tail_exponent,
)

__all__ = ["Pilot", "CurveModel", "Calibration", "Prediction", "fit_curve", "predict_from", "reach_power",
           "kept_share_curve", "pilot_kept_share", "smooth_curve", "alternation"]

#: The grid the exponents p (rank) and q (keep) are fitted on.
EXPONENT_GRID = np.round(np.arange(0.0, 2.0001, 0.05), 2)
#: Residual draws per bootstrap replicate in a band.
NOISE_DRAWS = 10


def reach_power(optimizer: str = "sgd", alpha_fixed: bool = False) -> float:
    """Lemma 2's p in ν(r) ∝ r^p: ν ∝ γ^m r with γ = α/r and m = 2 for SGD steps (linear in the
    gradient), m = 1 for sign-like (Adam-type) steps; α = r makes γ = 1, so p = 1."""
    m = 2.0 if str(optimizer).lower() == "sgd" else 1.0
    return 1.0 - m if alpha_fixed else 1.0


@dataclass(frozen=True)
class CurveModel:
    """Pilots, the loss floor F*, ε(r)'s spectrum and the exponents p (rank) and q (keep)."""

    pilots: tuple[Pilot, ...]
    floor: float
    rank_power: float
    keep_power: float
    spectrum: np.ndarray | None = None
    rank_weight: float = 0.5
    keep_floor: float = 0.0
    participation_cost: float = 0.0

    def base(self, rank, kept, participation=0.0) -> np.ndarray:
        """The level the gap closes on: F* + ε(r) + φ (1 − κ) + ψ χ², φ the keep floor (what a
        dropped share of the update leaves unlearned), ψ the participation cost and χ² the
        clients' participation divergence (Proposition 4: what skipping some clients more often
        than others biases the objective by)."""
        return self.floor + self.rank_floor(rank) + self.keep_floor * (1.0 - np.asarray(kept, dtype=float)) \
            + self.participation_cost * np.asarray(participation, dtype=float)

    def rank_floor(self, rank) -> np.ndarray:
        """ε(r) (0 without a spectrum; a rank beyond the spectrum's length has ε = 0)."""
        r = np.asarray(rank, dtype=int)
        if self.spectrum is None:
            return np.zeros(r.shape)
        return np.asarray(rank_term(self.spectrum, np.minimum(r, self.spectrum.shape[-1]),
                                    weight=self.rank_weight), dtype=float)

    def kept_share(self, rank, keep) -> np.ndarray:
        """κ(r, s), read from the nearest-rank pilot's kept-share curve at the fraction s/r."""
        r, s = np.broadcast_arrays(np.asarray(rank, dtype=float), np.asarray(keep, dtype=float))
        j = self._nearest(r)
        out = np.empty(r.shape)
        for i, p in enumerate(self.pilots):
            grid = np.linspace(0.0, 1.0, len(p.kept_curve))
            m = j == i
            out[m] = np.interp(np.clip(s[m] / r[m], 0.0, 1.0), grid, p.kept_curve)
        return out

    def _nearest(self, rank) -> np.ndarray:
        ranks = np.array([p.rank for p in self.pilots], dtype=float)
        return np.argmin(np.abs(np.log(np.asarray(rank, dtype=float))[..., None] - np.log(ranks)), axis=-1)

    def _speeds(self, rank, keep=None, kept_share=None) -> np.ndarray:
        """f(r, s) relative to every pilot: shape (candidates..., pilots)."""
        r = np.asarray(rank, dtype=float)
        kappa = self.kept_share(r, r if keep is None else keep) if kept_share is None \
            else np.asarray(kept_share, dtype=float)
        r, kappa = np.broadcast_arrays(r, kappa)
        ref_r = np.array([p.rank for p in self.pilots], dtype=float)
        ref_k = np.maximum(np.array([p.kept for p in self.pilots], dtype=float), 1e-12)
        return (r[..., None] / ref_r) ** self.rank_power * (np.maximum(kappa[..., None], 1e-12) / ref_k) \
            ** self.keep_power

    def template(self, rank, keep=None, kept_share=None) -> np.ndarray:
        """The pilot each candidate is read from: the fastest pilot the candidate does not outrun
        (f ≤ 1: the prediction stays inside that pilot's rounds as long as possible), else the
        fastest pilot."""
        f = self._speeds(rank, keep, kept_share)
        inside = np.where(f <= 1.0 + 1e-12, f, -np.inf)
        return np.where(np.isfinite(inside.max(axis=-1)), inside.argmax(axis=-1), f.argmin(axis=-1))

    def speed(self, rank, keep=None, kept_share=None, pilot=None) -> np.ndarray:
        """f(r, s) = (r/r_j)^p (κ(r, s)/κ_j)^q relative to pilot j (default: :meth:`template`)."""
        f = self._speeds(rank, keep, kept_share)
        j = self.template(rank, keep, kept_share) if pilot is None else np.full(f.shape[:-1], pilot)
        return np.take_along_axis(f, j[..., None].astype(np.intp), axis=-1)[..., 0]

    def value_at(self, rank, keep=None, t=0, *, kept_share=None, start=None, base=None, pilot=None,
                 participation=None) -> np.ndarray:
        """ℓ at (real) rounds ``t`` ≥ 0, broadcast with the candidates (rank, keep, kept_share,
        participation χ²; None: 0). ``start`` and ``base`` give the candidate's own known ℓ_0 and
        F* + ε(r) when they differ from the pilots' (e.g. another seed's data; the keep floor and
        the participation cost are added to ``base``); the gap is rescaled to them."""
        r = np.asarray(rank, dtype=float)
        f = self.speed(r, keep, kept_share, pilot)
        j = self.template(r, keep, kept_share) if pilot is None else np.full(np.shape(f), pilot)
        kappa = self.kept_share(r, r if keep is None else keep) if kept_share is None else kept_share
        chi2 = np.asarray(0.0 if participation is None else participation, dtype=float)
        r, f, j, t, kappa, chi2 = np.broadcast_arrays(r, f, j, np.asarray(t, dtype=float),
                                                      np.asarray(kappa, dtype=float), chi2)
        out = np.empty(r.shape)
        base = self.base(r.astype(int), kappa, chi2) if base is None \
            else np.broadcast_to(np.asarray(base, dtype=float), r.shape) + self.base(r.astype(int), kappa, chi2) \
            - self.floor - self.rank_floor(r.astype(int))
        for i, p in enumerate(self.pilots):
            m = j == i
            if not m.any():
                continue
            base_j = float(self.base(p.rank, p.kept, p.participation))
            l0 = p.start if start is None else np.broadcast_to(np.asarray(start, dtype=float), r.shape)[m]
            scale = np.maximum(l0 - base[m], 0.0) / max(p.start - base_j, 1e-300)
            out[m] = base[m] + np.maximum(scale * p.gap(f[m] * t[m], base_j)
                                          + np.where(t[m] >= 1, p.alternation * np.cos(np.pi * np.round(t[m])), 0.0),
                                          0.0)
        return out

    def curve(self, rank, keep=None, rounds: int = 1, *, kept_share=None, start=None, base=None,
              pilot=None, participation=None) -> np.ndarray:
        """ℓ_t for t = 0..rounds, shape (broadcast candidates, rounds + 1)."""
        shape = np.broadcast_shapes(*(np.shape(x) for x in (rank, keep, kept_share, start, base, participation)
                                      if x is not None))

        def ex(x):  # a candidate axis, then the rounds axis
            return None if x is None else np.broadcast_to(np.asarray(x, dtype=float), shape)[..., None]

        t = np.arange(rounds + 1, dtype=float)
        return self.value_at(ex(rank), ex(keep), t, kept_share=ex(kept_share), start=ex(start), base=ex(base),
                             pilot=pilot, participation=ex(participation))


@dataclass(frozen=True)
class Prediction:
    """A predicted curve and its band; arrays of shape (candidates..., rounds + 1)."""

    predicted: np.ndarray
    low: np.ndarray
    high: np.ndarray
    rank_term: np.ndarray
    speed: np.ndarray
    level: float

    @property
    def final(self) -> np.ndarray:
        return self.predicted[..., -1]

    def coverage(self, measured, *, skip_start: bool = True) -> float:
        """Share of the rounds (t ≥ 1 with ``skip_start``) whose measured value lies in the band."""
        m = np.asarray(measured, dtype=float)
        n = min(m.shape[-1], self.low.shape[-1])
        m, lo, hi = m[..., :n], self.low[..., :n], self.high[..., :n]
        ok = np.isfinite(m)
        if skip_start:
            ok[..., 0] = False
        return float(((m >= lo) & (m <= hi))[ok].mean()) if ok.any() else math.nan


@dataclass(frozen=True)
class Calibration:
    """The fitted :class:`CurveModel`, its bootstrap replicates, the residuals around the
    smoothed pilots, and what the pilots could not identify (``notes``)."""

    model: CurveModel
    replicates: tuple[CurveModel, ...]
    residuals: np.ndarray
    notes: tuple[str, ...]
    identified: dict = field(default_factory=dict)

    @property
    def rms(self) -> float:
        return float(np.sqrt(np.mean(self.residuals**2))) if self.residuals.size else 0.0

    def predict(self, rank, keep=None, rounds: int = 1, *, kept_share=None, level: float = 0.9, rng=0,
                start=None, base=None, runs: int = 1, participation=None) -> Prediction:
        """The curve of (rank, keep) — or of a given kept share and participation χ² — over
        rounds 0..``rounds`` with its ``level`` band (module docstring). ``start`` and ``base``
        are the candidate's own known ℓ_0 and F* + ε(r) where they differ from the pilots'
        (another seed, another data draw).
        ``runs``: the band is for the mean curve of that many runs (1: one run's curve); each
        replicate adds the mean of ``runs`` resampled residuals per round."""
        if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1); got level = {level!r}")
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise ValueError(f"runs must be an integer >= 1; got runs = {runs!r}")
        for name, v in (("start", start), ("base", base)):
            if v is not None and not np.all(np.isfinite(np.asarray(v, dtype=float))):
                raise ValueError(f"{name} must be finite; got {name} = {v!r}")
        _check_participation(participation)
        kw = dict(kept_share=kept_share, start=start, base=base, participation=participation)
        mid = self.model.curve(rank, keep, rounds, **kw)
        low = high = mid
        if self.replicates:
            gen = np.random.default_rng(rng)
            reps = np.stack([m.curve(rank, keep, rounds, **kw) for m in self.replicates])
            if self.residuals.size:  # NOISE_DRAWS residual draws per replicate: smoother quantiles
                reps = np.repeat(reps, NOISE_DRAWS, axis=0)
                reps = reps + gen.choice(self.residuals, size=(runs, *reps.shape)).mean(axis=0)
            q = (1.0 - level) / 2.0
            low = np.minimum(np.quantile(reps, q, axis=0), mid)
            high = np.maximum(np.quantile(reps, 1.0 - q, axis=0), mid)
            low[..., 0] = high[..., 0] = mid[..., 0]
        r = np.asarray(rank)
        return Prediction(predicted=mid, low=low, high=high, rank_term=self.model.rank_floor(r),
                          speed=self.model.speed(r, keep, kept_share), level=level)

    def predictor(self, *, level: float = 0.9, rng=0):
        """``predict(rank, keep_ratio, rounds, kept_share=None, participation=None) -> {"total",
        "low", "high", "rank", "speed"}`` over candidate arrays for :func:`tsfa.design_offline`:
        the predicted final loss, its band, ε(r) and the speed f(r, s); ``kept_share`` (the
        realised aggregate κ of a simulated online stage) replaces the keep ratio's κ(r, s), and
        ``participation`` (its clients' χ²) adds ψ χ². Only the final round is evaluated."""
        from tsfa.model import keep_from_ratio

        q = (1.0 - level) / 2.0
        if not 0 < level < 1:
            raise ValueError(f"level must lie in (0, 1); got level = {level!r}")

        def predict(rank, keep_ratio, rounds, kept_share=None, participation=None):
            T = np.asarray(rounds)
            if T.dtype.kind not in "iuf" or np.any(~np.isfinite(T)) or np.any(T < 0) or np.any(T != np.round(T)):
                raise ValueError(f"rounds must be integers >= 0; got rounds = {rounds!r}")
            r, kr, T = np.broadcast_arrays(np.asarray(rank), np.asarray(keep_ratio, dtype=float), T.astype(float))
            if np.any(~np.isfinite(kr)) or np.any(kr <= 0) or np.any(kr > 1):
                raise ValueError(f"keep_ratio must lie in (0, 1]; got keep_ratio = {keep_ratio!r}")
            keep = keep_from_ratio(r, kr)
            if kept_share is not None:
                ks = np.broadcast_to(np.asarray(kept_share, dtype=float), r.shape)
                if np.any(~np.isfinite(ks)) or np.any(ks < 0) or np.any(ks > 1):
                    raise ValueError(f"kept_share must lie in [0, 1]; got kept_share = {kept_share!r}")
            else:
                ks = None
            chi2 = None if participation is None else np.broadcast_to(_check_participation(participation), r.shape)
            mid = self.model.value_at(r, keep, T, kept_share=ks, participation=chi2)
            low = high = mid
            if self.replicates:
                gen = np.random.default_rng(rng)
                reps = np.stack([m.value_at(r, keep, T, kept_share=ks, participation=chi2) for m in self.replicates])
                if self.residuals.size:
                    reps = reps + gen.choice(self.residuals, size=reps.shape)
                low = np.minimum(np.quantile(reps, q, axis=0), mid)
                high = np.maximum(np.quantile(reps, 1.0 - q, axis=0), mid)
            return {"total": mid, "low": low, "high": high, "rank": self.model.rank_floor(r),
                    "speed": np.asarray(self.model.speed(r, keep, ks), dtype=float)}

        return predict

    @property
    def source(self) -> str:
        """Where the predictions come from (as ``BoundConstants.source``)."""
        return self.summary()

    def to_dict(self) -> dict:
        """The calibration's numbers, for a JSON report (the replicates are not included)."""
        m = self.model
        return {"model": "calibrated curves (convergence.fit_curve)", "floor": m.floor, "rank_power": m.rank_power,
                "keep_power": m.keep_power, "keep_floor": m.keep_floor, "participation_cost": m.participation_cost,
                "rms": self.rms,
                "replicates": len(self.replicates),
                "pilots": [{"rank": p.rank, "kept_share": p.kept, "rounds": len(p.smoothed) - 1, "start": p.start,
                            "tail": p.tail} for p in m.pilots],
                "identified": dict(self.identified), "notes": list(self.notes)}

    def summary(self) -> str:
        m = self.model
        ranks = ", ".join(f"r = {p.rank} (κ = {p.kept:.2f}, {len(p.smoothed) - 1} rounds)" for p in m.pilots)
        s = (f"curve calibrated on {len(m.pilots)} pilot(s): {ranks}; rank exponent p = {m.rank_power:.3g}, "
             f"keep exponent q = {m.keep_power:.3g}, keep floor φ = {m.keep_floor:.3g}, "
             f"participation cost ψ = {m.participation_cost:.3g}, F* = {m.floor:.4g}, "
             f"rms scatter {self.rms:.3g}")
        return s + ("; " + "; ".join(self.notes) if self.notes else "")


def _check_participation(participation):
    """None, or the participation χ² as a finite array ≥ 0 (else a ValueError naming it)."""
    if participation is None:
        return None
    x = np.asarray(participation, dtype=float)
    if not np.all(np.isfinite(x)) or np.any(x < 0):
        raise ValueError(f"participation must be a finite χ² >= 0; got participation = {participation!r:.80}")
    return x


def _with_tails(model: CurveModel) -> CurveModel:
    """The model with each pilot's power-law tail fitted above its own base."""
    pilots = tuple(Pilot(**{**p.__dict__, "tail": tail_exponent(np.maximum(
        p.smoothed - float(model.base(p.rank, p.kept)), 0.0))}) for p in model.pilots)
    return dataclasses.replace(model, pilots=pilots)


def _cross_error(model: CurveModel) -> float:
    """Σ over ordered pilot pairs (i ≠ j) of the squared error of pilot i predicted from pilot j."""
    m = _with_tails(model)
    err = 0.0
    for i, pi in enumerate(m.pilots):
        T = len(pi.smoothed) - 1
        for j in range(len(m.pilots)):
            if i != j:
                pred = m.curve(pi.rank, None, T, kept_share=pi.kept, start=pi.start, pilot=j)
                wiggle = m.pilots[j].alternation * (-1.0) ** np.arange(T + 1)  # compare the smooth parts
                err += float(np.sum((pred[1:] - wiggle[1:] - pi.smoothed[1:]) ** 2))
    return err


def _fit_constants(model: CurveModel, fit_p: bool, fit_q: bool, fit_phi: bool) -> CurveModel:
    """p (steps of 0.25, then 0.05 around the best) and q (steps of 0.5, then 0.25) in
    [0, 2], and the keep floor φ in [0, φ_max] by bounded scalar search, minimising
    :func:`_cross_error` (Proposition 3)."""
    from scipy.optimize import minimize_scalar

    phi_max = min((float(np.min(p.smoothed[1:]) - model.base(p.rank, 1.0)) / (1.0 - p.kept)
                   for p in model.pilots if p.kept < 1.0 - 1e-9), default=0.0)
    seen: dict = {}

    def evaluate(p, q):
        key = (round(float(p), 6), round(float(q), 6))
        if key not in seen:
            m = dataclasses.replace(model, rank_power=key[0], keep_power=key[1])
            if fit_phi and phi_max > 0:
                res = minimize_scalar(lambda phi: _cross_error(dataclasses.replace(m, keep_floor=phi)),
                                      bounds=(0.0, phi_max), method="bounded", options={"xatol": 1e-3 * phi_max})
                seen[key] = (float(res.fun), dataclasses.replace(m, keep_floor=float(res.x)))
            else:
                seen[key] = (_cross_error(m), m)
        return seen[key]

    lo, hi = EXPONENT_GRID[0], EXPONENT_GRID[-1]
    ps = np.arange(lo, hi + 1e-9, 0.25) if fit_p else np.array([model.rank_power])
    qs = np.arange(lo, hi + 1e-9, 0.5) if fit_q else np.array([model.keep_power])
    best = min((evaluate(p, q) + (p, q) for p in ps for q in qs), key=lambda x: x[0])  # coarse, then fine
    p_f = np.clip(np.arange(best[2] - 0.25, best[2] + 0.2501, 0.05), lo, hi) if fit_p else ps
    q_f = np.clip(np.arange(best[3] - 0.5, best[3] + 0.501, 0.25), lo, hi) if fit_q else qs
    best = min((evaluate(p, q) + (p, q) for p in p_f for q in q_f), key=lambda x: x[0])
    return _with_tails(best[1])


def _fit_participation(model: CurveModel, online: Pilot) -> CurveModel:
    """ψ ∈ [0, ψ_max] by bounded scalar search, minimising the squared error of the online
    pilot's smoothed curve predicted by ``model`` at its rank, aggregate kept share and χ²
    (Proposition 4); ψ_max puts ψ χ² at the pilot's lowest loss above the rest of its base."""
    from scipy.optimize import minimize_scalar

    T = len(online.smoothed) - 1
    room = float(np.min(online.smoothed[1:]) - model.base(online.rank, online.kept))
    if room <= 0:
        return dataclasses.replace(model, participation_cost=0.0)
    j = int(model.template(online.rank, None, online.kept))
    wiggle = model.pilots[j].alternation * (-1.0) ** np.arange(T + 1)

    def err(psi):
        m = dataclasses.replace(model, participation_cost=psi)
        pred = m.curve(online.rank, None, T, kept_share=online.kept, start=online.start,
                       participation=online.participation, pilot=j)
        return float(np.sum((pred[1:] - wiggle[1:] - online.smoothed[1:]) ** 2))

    hi = room / online.participation
    res = minimize_scalar(err, bounds=(0.0, hi), method="bounded", options={"xatol": 1e-3 * hi})
    return dataclasses.replace(model, participation_cost=float(res.x))


def _groups(parsed, hs) -> list[list[int]]:
    """Indices of the pilot runs that differ only in their seed (one configuration each)."""
    keys = {}
    for i, h in enumerate(hs):
        key = tuple(sorted((k, repr(v)) for k, v in h.config.items() if k not in ("seed", "out")))
        keys.setdefault(key, []).append(i)
    return list(keys.values())


def fit_curve(pilots, spectrum=None, *, floor: float = 0.0, rank_power=None, keep_power=None,
              keep_floor=None, boots: int = 200, rng=0, rank_weight: float = 0.5,
              rounds: int | None = None, online_pilot=None, data_weight=None) -> Calibration:
    """Calibrate the curve model on pilot run(s) and bootstrap its band (module docstring).

    Args:
        pilots: a :class:`fedloop.History` or a list of them (configurations that differ only
            in the seed are averaged into one pilot, and the bootstrap resamples their seeds);
            each needs its start loss and an evaluated loss at every round (≥ 3 rounds).
        spectrum: ε(r)'s spectrum (as for :func:`convergence.rank_term`); None: ε = 0.
        floor: F*, the loss's known lower bound (0 for squared error and cross-entropy).
        rank_power: fix p (None: fitted when the pilots differ in rank, else Lemma 2's value).
        keep_power: fix q (None: fitted when two pilots share a rank but not their kept share
            and a third pilot fixes p; else 0: the kept share acts on the floor, not the speed).
        keep_floor: fix φ (None: fitted when the pilots differ in kept share by more than 10 %,
            else 0).
        boots: bootstrap replicates (0: no band).
        rank_weight: ε(r) = rank_weight · tail of the spectrum.
        rounds: use each pilot's first ``rounds`` rounds only (None: all).
        online_pilot: a run of the online stage (``tsfa``, with skipping), or a list of runs of
            one configuration that differ only in the seed (averaged: their mean curve, kept
            share and χ²; the bootstrap resamples the seeds), whose participation χ²
            identifies the participation cost ψ (Proposition 4), fitted after the other
            constants on this pilot alone (None: ψ = 0; the template pilots always run every
            client, so they cannot identify it).
        data_weight: the clients' data weights p for the χ² (None: uniform).
    """
    hs = list(pilots) if isinstance(pilots, (list, tuple)) else [pilots]
    if not hs:
        raise ValueError("pilots must hold at least one history")
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor):
        raise ValueError(f"floor must be a finite number; got floor = {floor!r}")
    if isinstance(boots, bool) or not isinstance(boots, int) or not 0 <= boots <= 100_000:
        raise ValueError(f"boots must be an integer in 0..100000; got boots = {boots!r}")
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 3):
        raise ValueError(f"rounds must be None or an integer >= 3; got rounds = {rounds!r}")
    for name, v in (("rank_power", rank_power), ("keep_power", keep_power), ("keep_floor", keep_floor)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ValueError(f"{name} must be None or a finite number; got {name} = {v!r}")
    if keep_floor is not None and keep_floor < 0:
        raise ValueError(f"keep_floor must be >= 0; got keep_floor = {keep_floor!r}")
    spec = None if spectrum is None else check_spectrum(spectrum)
    parsed = [parse_pilot(h, i, rounds, data_weight) for i, h in enumerate(hs)]
    groups = _groups(parsed, hs)
    lengths = {len(parsed[i][1]) for g in groups for i in g}
    if len(lengths) > 1 and any(len(g) > 1 for g in groups):
        raise ValueError(f"pilots of one configuration must have the same number of rounds; got {sorted(lengths)}")
    ons = [] if online_pilot is None else \
        list(online_pilot) if isinstance(online_pilot, (list, tuple)) else [online_pilot]
    on_parsed = [parse_pilot(h, len(hs) + i, rounds, data_weight) for i, h in enumerate(ons)]
    if ons and (len(_groups(on_parsed, ons)) > 1 or len({len(x[1]) for x in on_parsed}) > 1):
        raise ValueError(f"online_pilot must be one run or runs of one configuration that differ only in the seed, "
                         f"with the same rounds; got {len(ons)} runs of "
                         f"{len(_groups(on_parsed, ons))} configurations")

    def pilot_of(entries) -> Pilot:
        """One pilot from runs of one configuration (parsed entries): their mean curve."""
        mean = np.mean([e[1] for e in entries], axis=0)
        return Pilot(rank=entries[0][0].rank, kept=float(np.mean([e[0].kept for e in entries])),
                     kept_curve=np.mean([e[0].kept_curve for e in entries], axis=0), start=float(mean[0]),
                     smoothed=smooth_curve(mean), tail=0.0, alternation=alternation(mean),
                     participation=float(np.mean([e[0].participation for e in entries])))

    group_pilots = [pilot_of([parsed[i] for i in g]) for g in groups]
    online = None if not ons else (pilot_of(on_parsed), np.mean([e[1] for e in on_parsed], axis=0),
                                   np.concatenate([e[2] for e in on_parsed]))
    residuals = []
    for g, gp in zip(groups, group_pilots, strict=True):  # one run's scatter around its configuration's template
        wiggle = gp.alternation * (-1.0) ** np.arange(len(gp.smoothed))
        for i in g:
            res = (parsed[i][1] - gp.smoothed - wiggle)[1:]
            df = len(np.unique(gp.smoothed[1:])) + 1
            residuals.append(res * math.sqrt(len(res) * len(g) / max(len(res) * len(g) - df, 1)))
    residuals = noise_floor(np.concatenate(residuals), [parsed[i][1] for g in groups for i in g])
    ranks = {p.rank for p in group_pilots}
    kept = [p.kept for p in group_pilots]
    differ_kept = max(kept) > 1.1 * min(kept)
    by_rank = {}
    for p in group_pilots:
        by_rank.setdefault(p.rank, []).append(p.kept)
    same_rank_kept = any(max(v) > 1.1 * min(v) for v in by_rank.values())
    fit_p = rank_power is None and len(ranks) > 1
    fit_q = keep_power is None and same_rank_kept and len(ranks) > 1
    fit_phi = keep_floor is None and differ_kept
    opt = "sgd" if str(hs[0].config.get("optimizer") or "adam").lower() == "sgd" else "adam"
    p0 = reach_power(opt, alpha_fixed=hs[0].config.get("alpha") is not None) if rank_power is None \
        else float(rank_power)
    q0 = 0.0 if keep_power is None else float(keep_power)
    notes = []
    if not fit_p:
        notes.append(f"rank exponent p = {p0:g} " + ("as given" if rank_power is not None else
                                                      f"from Lemma 2 ({opt} steps): the pilots have one rank"))
    if not fit_q:
        notes.append(f"keep exponent q = {q0:g} " + ("as given" if keep_power is not None else
                                                      "(no pilot pair separates it)"))
    if not fit_phi:
        notes.append(f"keep floor φ = {keep_floor or 0.0:g} " + ("as given" if keep_floor is not None else
                                                                "(the pilots share one kept share)"))
    if any(len(g) > 1 for g in groups):
        notes.append("pilots averaged over seeds: " + ", ".join(f"r = {group_pilots[k].rank}: {len(g)} seeds"
                                                               for k, g in enumerate(groups)))
    base = CurveModel(pilots=tuple(group_pilots), floor=float(floor), rank_power=p0, keep_power=q0,
                      spectrum=spec, rank_weight=float(rank_weight), keep_floor=float(keep_floor or 0.0))
    low = min(float(np.min(p.smoothed[1:]) - base.base(p.rank, 1.0)) for p in group_pilots)
    if low <= 0:
        notes.append(f"a pilot's loss reaches F* + ε(r) (margin {low:.3g}): check floor and the spectrum")

    def calibrated(pilots) -> CurveModel:
        return _fit_constants(dataclasses.replace(base, pilots=tuple(pilots)), fit_p, fit_q, fit_phi)

    model = calibrated(group_pilots)
    psi_gen = np.random.default_rng([rng if isinstance(rng, int) else 0, 1])  # apart from the replicates' draws
    if online is not None:
        if online[0].participation < 1e-3:
            notes.append(f"participation cost ψ = 0: the online pilot's participation χ² = "
                         f"{online[0].participation:.2g} does not identify it")
            online = None
        else:
            model = _fit_participation(model, online[0])
    for name, fitted, v in (("rank exponent p", fit_p, model.rank_power), ("keep exponent q", fit_q,
                                                                            model.keep_power)):
        if fitted and (v <= EXPONENT_GRID[0] or v >= EXPONENT_GRID[-1]):
            notes.append(f"{name} = {v:g} at the end of its grid [{EXPONENT_GRID[0]:g}, {EXPONENT_GRID[-1]:g}]")
    gen = np.random.default_rng(rng)
    reps = []
    for _ in range(boots):
        ps = []
        for g, gp in zip(groups, group_pilots, strict=True):
            if len(g) > 1:  # resample the seeds: the template's seed-to-seed uncertainty
                ps.append(pilot_of([parsed[i] for i in gen.choice(g, size=len(g))]))
            else:
                y = parsed[g[0]][1].copy()
                wiggle = gp.alternation * (-1.0) ** np.arange(len(y))
                y[1:] = gp.smoothed[1:] + wiggle[1:] + gen.choice(parsed[g[0]][2], size=len(y) - 1)
                ps.append(dataclasses.replace(gp, smoothed=smooth_curve(y), alternation=alternation(y)))
        m = calibrated(ps)
        if online is not None and len(on_parsed) > 1:  # the online pilot's seeds resampled too
            m = _fit_participation(m, pilot_of([on_parsed[i] for i in psi_gen.choice(len(on_parsed),
                                                                                     size=len(on_parsed))]))
        elif online is not None:  # its rounds
            y = online[1].copy()
            wiggle = online[0].alternation * (-1.0) ** np.arange(len(y))
            y[1:] = online[0].smoothed[1:] + wiggle[1:] + psi_gen.choice(online[2], size=len(y) - 1)
            m = _fit_participation(m, dataclasses.replace(online[0], smoothed=smooth_curve(y)))
        reps.append(m)
    identified = {"rank_power": fit_p, "keep_power": fit_q, "keep_floor": fit_phi,
                  "participation_cost": online is not None}
    if reps and (fit_p or fit_q or fit_phi):
        e = np.array([(m.rank_power, m.keep_power, m.keep_floor) for m in reps])
        lo, hi = np.quantile(e, [0.05, 0.95], axis=0)
        notes.append(f"bootstrap 90 % ranges: p {lo[0]:.2f}–{hi[0]:.2f}, q {lo[1]:.2f}–{hi[1]:.2f}, "
                     f"φ {lo[2]:.3g}–{hi[2]:.3g}")
    if reps and online is not None:
        lo, hi = np.quantile([m.participation_cost for m in reps], [0.05, 0.95])
        seeds = f", {len(on_parsed)} seeds" if len(on_parsed) > 1 else ""
        notes.append(f"participation cost ψ = {model.participation_cost:.3g} from the online pilot (r = "
                     f"{online[0].rank}{seeds}, χ² = {online[0].participation:.3g}, κ = {online[0].kept:.2f}); "
                     f"bootstrap 90 % range {lo:.3g}–{hi:.3g}")
    return Calibration(model=model, replicates=tuple(reps), residuals=residuals, notes=tuple(notes),
                       identified=identified)


def predict_from(history, *, rounds: int | None = None, boots: int = 100, rng=0, floor: float = 0.0) -> Calibration:
    """Re-calibrate on a run's own history (its first ``rounds`` rounds; None: all), at its own
    rank and kept share: the loop's mid-run prediction of its remaining rounds."""
    return fit_curve(history, None, floor=floor, boots=boots, rng=rng, rounds=rounds)
