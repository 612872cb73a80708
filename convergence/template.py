"""A pilot run's loss curve as the template of a prediction (docs/theory.md §6).

:func:`parse_pilot` validates a pilot history and turns it into a :class:`Pilot`: its rank,
its kept share of the update energy, the kept-share curve of its mean error profile, and its
curve with a period-2 alternation removed (:func:`alternation`) and made non-increasing
(:func:`smooth_curve`), extended beyond its last round by a power law
(:func:`tail_exponent`). :func:`noise_floor` keeps the residuals around the template no
smaller than the noise the curve shows. ``convergence.predict`` builds its model on these.
numpy (and scipy.special) only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Pilot", "parse_pilot", "smooth_curve", "alternation", "kept_share_curve", "pilot_kept_share",
           "pilot_participation",
           "tail_exponent", "noise_floor", "TAIL_BOUNDS"]

#: Power-law tail exponents are clipped to this range.
TAIL_BOUNDS = (0.0, 3.0)


def kept_share_curve(profile) -> np.ndarray:
    """The kept share 1 − e(s)/e(0), s = 0..r, of a mean error profile e(s)/e(0) (checked: 1-D,
    finite, starts at 1 within 1e-6, non-increasing within 1e-9, ≥ 0)."""
    p = np.asarray(profile, dtype=float)
    if p.ndim != 1 or p.size < 2 or not np.all(np.isfinite(p)):
        raise ValueError(f"profile must be a finite 1-D array e(s)/e(0), s = 0..r; got {profile!r:.80}")
    if abs(p[0] - 1.0) > 1e-6 or np.any(p < -1e-9) or np.any(np.diff(p) > 1e-9):
        raise ValueError(f"profile must start at 1 and decrease to >= 0; got {np.round(p, 4).tolist()!r:.80}")
    return 1.0 - np.clip(p, 0.0, 1.0)


def _decreasing(y: np.ndarray) -> np.ndarray:
    """The least-squares non-increasing fit (pool-adjacent-violators)."""
    vals, sizes = [], []
    for v in y:
        vals.append(float(v))
        sizes.append(1)
        while len(vals) > 1 and vals[-2] < vals[-1]:
            n = sizes[-2] + sizes[-1]
            vals[-2] = (vals[-2] * sizes[-2] + vals[-1] * sizes[-1]) / n
            sizes[-2] = n
            vals.pop()
            sizes.pop()
    return np.repeat(vals, sizes)


def alternation(loss) -> float:
    """The amplitude a of a period-2 alternation a(−1)^t in a curve, from its second differences
    Δ²ℓ_t = ℓ_{t+1} − 2ℓ_t + ℓ_{t−1} ∋ −4a(−1)^t over rounds 2..T−1 (a smooth curve's
    curvature largely cancels in the alternating sum)."""
    y = np.asarray(loss, dtype=float)
    t = np.arange(2, len(y) - 1)
    if len(t) < 2:
        return 0.0
    d2 = y[t + 1] - 2 * y[t] + y[t - 1]
    return float(-np.mean((-1.0) ** t * d2) / 4.0)


def smooth_curve(loss) -> np.ndarray:
    """The pilot's curve as the template: ℓ_0 kept; rounds ≥ 1 with the alternation
    (:func:`alternation`) removed, then the non-increasing least-squares fit."""
    y = np.asarray(loss, dtype=float)
    if y.ndim != 1 or y.size < 4 or not np.all(np.isfinite(y)):
        raise ValueError(f"loss must be a finite 1-D curve over rounds 0..T with T >= 3; got {y!r:.80}")
    t = np.arange(len(y))
    s = y - alternation(y) * (-1.0) ** t
    s[0] = y[0]
    s[1:] = _decreasing(s[1:])
    return s


@dataclass(frozen=True)
class Pilot:
    """One pilot as the model uses it: rank, its kept share κ (:func:`pilot_kept_share`),
    its clients' participation χ² (:func:`pilot_participation`),
    kept-share curve of its mean error profile, start loss, smoothed curve, the power-law
    tail (gap at round T times (τ/T)^(−tail)) that extends it, and the amplitude a of its
    alternation between rounds, which predictions add back as a(−1)^t (a property of the
    rounds, not of the speed: it is not rescaled)."""

    rank: int
    kept: float
    kept_curve: np.ndarray
    start: float
    smoothed: np.ndarray
    tail: float
    alternation: float = 0.0
    participation: float = 0.0

    def gap(self, tau, base: float) -> np.ndarray:
        """The smoothed gap above ``base`` at (real) rounds τ ≥ 0: interpolated geometrically between
        rounds, a power law beyond T."""
        tau = np.asarray(tau, dtype=float)
        g = np.maximum(self.smoothed - base, 0.0)
        T = len(g) - 1
        with np.errstate(divide="ignore"):  # geometric between rounds: exact for one decaying mode
            inside = np.exp(np.interp(np.minimum(tau, T), np.arange(T + 1), np.log(g))) if np.all(g > 0) \
                else np.interp(np.minimum(tau, T), np.arange(T + 1), g)
        with np.errstate(divide="ignore"):
            beyond = g[-1] * (np.maximum(tau, T) / T) ** (-self.tail)
        return np.where(tau <= T, inside, beyond)


def tail_exponent(gap: np.ndarray) -> float:
    """The power-law exponent at the end of a smoothed gap curve: the log-log slope over its last
    third (at least 3 rounds), clipped to :data:`TAIL_BOUNDS`."""
    T = len(gap) - 1
    t = np.arange(max(1, T - max(2, T // 3)), T + 1)
    g = gap[t]
    if np.any(g <= 0) or len(t) < 2:
        return TAIL_BOUNDS[1] if np.any(g <= 0) else 0.0
    slope = np.polyfit(np.log(t), np.log(g), 1)[0]
    return float(np.clip(-slope, *TAIL_BOUNDS))


def pilot_kept_share(history) -> float:
    """A run's kept share κ: the share of the update energy in components some delivered
    client sent in some round, 1 − ē(s_max)/ē(0), with ē the rounds' mean error profile and
    s_max the largest keep in the clients' ledger (under the norm ranking's common order, the
    components the aggregate ever applied; with a fixed keep s, 1 − ē(s)/ē(0)). Without a
    ledger, the mean over rounds of 1 − e_t/U_t (``dropped_energy`` / ``update_energy``;
    skipped clients drop all); 1 when neither is recorded."""
    return _kept_of(history.rounds, getattr(history, "clients", None))


def pilot_participation(history, data_weight=None, rounds: int | None = None) -> float:
    """χ²(w ‖ p) of a run's clients' shares of delivered rounds (``status == "ok"`` in the
    clients' ledger; :func:`tsfa.participation_divergence`); 0 without a ledger."""
    from tsfa.model import participation_divergence

    rows = [c for c in (getattr(history, "clients", None) or []) if isinstance(c, dict)]
    T = len(history.rounds) if rounds is None else min(rounds, len(history.rounds))
    k = history.config.get("clients")
    if not rows or T < 1 or isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return 0.0
    ok = np.zeros(k)
    for c in rows:
        t, i = c.get("round"), c.get("client")
        if c.get("status") == "ok" and isinstance(t, int) and isinstance(i, int) and 1 <= t <= T and 0 <= i < k:
            ok[i] += 1
    return float(participation_divergence(np.minimum(ok / T, 1.0), data_weight))


def _kept_of(rows, clients=None) -> float:
    """A pilot's kept share κ: the sent share (:func:`tsfa.sent_share`) of its rounds' mean
    profile at the largest keep its clients' ledger shows delivered; else the mean of
    1 − dropped / update energy over its rounds (1 without either)."""
    from tsfa.model import sent_share

    rounds = {row.get("round", t) for t, row in enumerate(rows, start=1)}
    sent = [c["keep"] for c in clients or [] if isinstance(c, dict) and c.get("status") == "ok"
            and isinstance(c.get("keep"), int) and not isinstance(c.get("keep"), bool) and c.get("round") in rounds]
    profiles = [row["profile"] for row in rows if isinstance(row.get("profile"), list)]
    if sent and profiles and len({len(p) for p in profiles}) == 1 and 0 <= max(sent) < len(profiles[0]):
        return sent_share(np.mean(np.asarray(profiles, dtype=float), axis=0), max(sent))
    shares = []
    for row in rows:
        e, u = row.get("dropped_energy"), row.get("update_energy")
        if isinstance(e, (int, float)) and isinstance(u, (int, float)) and math.isfinite(e) and math.isfinite(u) \
                and u > 0:
            shares.append(min(max(1.0 - e / u, 0.0), 1.0))
    return float(np.mean(shares)) if shares else 1.0


def parse_pilot(history, index: int, rounds: int | None = None,
                data_weight=None) -> tuple[Pilot, np.ndarray, np.ndarray]:
    """(Pilot, raw curve, residuals raw − smoothed) of a history, validated (``data_weight``:
    the clients' p for the participation χ²; None: uniform)."""
    from convergence.calibration import _check_history, loss_curve

    _check_history(history)
    r = history.config.get("rank", 1)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"pilots[{index}].config.rank must be an integer >= 1; got {r!r}")
    loss, _ = loss_curve(history)
    loss = np.asarray(loss, dtype=float)[: None if rounds is None else rounds + 1]
    if not np.isfinite(loss[0]):
        raise ValueError(f"pilots[{index}] has no start loss (meta.initial_test_loss or the round-0 objective)")
    if len(loss) < 4 or not np.all(np.isfinite(loss)):
        raise ValueError(f"pilots[{index}] needs an evaluated loss at every round, >= 3 rounds; got "
                         f"{int(np.isfinite(loss[1:]).sum())} evaluated of {len(loss) - 1}")
    profiles = []
    for row in history.rounds[: len(loss) - 1]:
        prof = row.get("profile")
        if isinstance(prof, list) and len(prof) == r + 1:
            profiles.append(prof)
    curve = kept_share_curve(np.mean(np.asarray(profiles, dtype=float), axis=0)) if profiles \
        else np.linspace(0.0, 1.0, r + 1)
    smoothed = smooth_curve(loss)
    wiggle = alternation(loss) * (-1.0) ** np.arange(len(loss))
    resid = (loss - smoothed - wiggle)[1:]
    # the fit used one level per block of the non-increasing fit and the alternation: rescale the
    # residuals to the noise's size (they are shrunk by the fit's degrees of freedom)
    df = len(np.unique(smoothed[1:])) + 1
    resid = resid * math.sqrt(len(resid) / max(len(resid) - df, 1))
    return (Pilot(rank=r, kept=_kept_of(history.rounds[: len(loss) - 1], getattr(history, "clients", None)),
                  kept_curve=curve, start=float(loss[0]), smoothed=smoothed, tail=0.0, alternation=alternation(loss),
                  participation=pilot_participation(history, data_weight, len(loss) - 1)), loss, resid)


def noise_floor(residuals: np.ndarray, curves) -> np.ndarray:
    """The residuals, scaled up to at least the round-to-round noise that the curves' second
    differences show (σ = MAD(Δ²ℓ)/0.6745/√6, robust to the curvature of a few early rounds):
    a short, monotone pilot fits its non-increasing template exactly and would give no band."""
    d2 = np.concatenate([np.diff(np.asarray(c, dtype=float)[1:], 2) for c in curves if len(c) > 3])
    if d2.size < 2:
        return residuals
    sigma = float(np.median(np.abs(d2 - np.median(d2)))) / 0.6745 / math.sqrt(6.0)
    rms = float(np.sqrt(np.mean(residuals**2))) if residuals.size else 0.0
    if rms >= sigma:
        return residuals
    if rms > 0:
        return residuals * (sigma / rms)
    return sigma * np.sqrt(2.0) * np.asarray(erfinv_grid(len(residuals)))


def erfinv_grid(n: int) -> np.ndarray:
    """n evenly spaced standard-normal quantiles divided by √2 (a fixed, seed-free noise set)."""
    from scipy.special import erfinv

    return erfinv(2.0 * (np.arange(1, n + 1) - 0.5) / n - 1.0)
