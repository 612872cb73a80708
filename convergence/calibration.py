"""Calibrate the bound from a short pilot run and predict other configurations (spec §5(b)).

Method (docs/theory.md §5). The theorem's recursion, written for the loss ℓ_t itself, is

    ℓ_{t+1} = ρ ℓ_t + k + w (e_t + c_t),    k = (1−ρ)(F* + ε(r)) + β ε(r) + (1+β)(n + d),

linear in (ρ, k, w) given the pilot's measured losses ℓ_t, sparsification errors e_t and
covariances c_t. :func:`calibrate` fits it in two stages over the pilot's rounds: the trend
(ρ, k) by bounded least squares (0 ≤ ρ ≤ 1), then w ≥ 0 from the residuals against
x_t = e_t + c_t (e_t decays with the loss, so a joint fit would let w absorb the trend),
and maps the three numbers back onto :class:`BoundConstants`:

* ρ → a from (1 + a/2)(1 − a) = ρ (β = a/2), then μ = a / (2ηE) with the pilot's η and E;
* w → L_W = w / ((1 + 1/β) γ²) with κ = 1;
* k → noise and drift from the pilot's measured first-step gradients (σ² ≈ Σp‖g_k‖² −
  ‖Σp g_k‖², G² ≈ max_t Σp‖g_k‖²) with L = L_W, and F* takes the rest (held ≥ ``floor_min``
  by scaling L down);
* ε(r) from the given spectrum (e.g. :func:`convergence.estimate_spectrum`), weight ½.

To predict another (rank, keep ratio) before training, :func:`predict_schedule` builds its
per-round e_t from the pilot's dense update energy U_t = Σ p_k e_k(0) times the share of
the rank-r' energy beyond s' components, taken from the spectrum (SOFT's near-orthogonal
components follow the principal directions): Σ_{s'<i≤r'} λ_i / Σ_{i≤r'} λ_i; c_t is the
pilot's. Rounds beyond the pilot repeat the mean of its second half.
"""

from __future__ import annotations

import math

import numpy as np

from convergence.bound import BoundConstants, Schedule, bound, drift_term, noise_term
from convergence.rank import check_spectrum, rank_term
from tsfa.model import keep_from_ratio

__all__ = ["calibrate", "schedule_from_history", "predict_schedule", "predict_final_loss", "loss_curve",
           "make_predictor", "MEASUREMENTS"]

#: The per-round measurements a run's ledger holds for the bound (column → meaning), the
#: columns this module reads; ``fedloop``'s round schema includes them under the same names.
MEASUREMENTS: dict[str, str] = {
    "objective": "f(θ_t), the training objective at the round's start point (exact tasks; else NaN)",
    "objective_after": "f(θ_{t+1}), the point the bound at round t+1 speaks of (exact tasks)",
    "gradient_norm_sq": "‖∇f(θ_t)‖² (exact tasks)",
    "test_loss": "test loss after the round (NaN when not evaluated)",
    "dropped_energy": "e_t = Σ_k p_k e_k(s_k), the update energy the allocation dropped",
    "covariance_sq": "c_t = ‖C_t‖², the covariance of separate averaging over the trained clients",
    "update_energy": "U_t = Σ_k p̃_k e_k(0), the dense update energy of the trained clients",
    "profile": "the trained clients' mean error profile e(s)/e(0), s = 0..r",
    "grad_sq_mean": "Σ_k p̃_k ‖g_k‖², first-step gradients of the task loss",
    "grad_mean_sq": "‖Σ_k p̃_k g_k‖²",
}


#: Columns that are energies: ≥ 0 in every round that measured them.
_ENERGIES = ("dropped_energy", "covariance_sq", "update_energy", "grad_sq_mean", "grad_mean_sq")


def _check_history(history) -> None:
    """A pilot history: ``rounds`` a list of dicts, ``config`` and ``meta`` dicts, and every
    measured value of a declared column a real number (energies ≥ 0, finite); errors name the
    column and the round."""
    for attr in ("rounds", "config", "meta"):
        if not hasattr(history, attr):
            raise ValueError(f"history must be a fedloop History (with rounds, config, meta); "
                             f"got {type(history).__name__} without {attr!r}")
    if not isinstance(history.rounds, list) or not all(isinstance(r, dict) for r in history.rounds):
        raise ValueError("history.rounds must be a list of dicts (one per round)")
    if not isinstance(history.config, dict) or not isinstance(history.meta, dict):
        raise ValueError("history.config and history.meta must be dicts")
    for t, row in enumerate(history.rounds):
        for name in MEASUREMENTS:
            v = row.get(name)
            if v is None or name == "profile":
                continue
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise ValueError(f"history column {name!r} must hold numbers; got {v!r} in round {t}")
            if name in _ENERGIES and (v < 0 or math.isinf(v)):
                raise ValueError(f"history column {name!r} must be finite and >= 0 (an energy); "
                                 f"got {v!r} in round {t}")


def _column(history, name: str) -> np.ndarray:
    if name not in MEASUREMENTS:  # one schema: a column read here is a declared measurement
        raise KeyError(f"{name!r} is not a declared measurement; see convergence.calibration.MEASUREMENTS")
    return history.column(name)


def loss_curve(history) -> tuple[np.ndarray, str]:
    """The empirical loss at rounds 0..T the bound speaks of: the training objective where the
    run recorded it (linear), else the test loss (with the start point from the run's meta)."""
    obj = _column(history, "objective_after")
    if len(obj) and np.all(np.isfinite(obj)):
        start = history.meta.get("initial_objective", _column(history, "objective")[0])
        return np.concatenate([[start], obj]), "training objective"
    test = _column(history, "test_loss")
    start = history.meta.get("initial_test_loss", math.nan)
    return np.concatenate([[math.nan if start is None else start], test]), "test loss"


def schedule_from_history(history, rank: int | None = None) -> Schedule:
    """The realised schedule of a run: its rounds, rank, e_t (``dropped_energy``) and c_t
    (``covariance_sq``; rounds with no measurement count 0)."""
    e = np.nan_to_num(_column(history, "dropped_energy"), nan=0.0)
    c = np.nan_to_num(_column(history, "covariance_sq"), nan=0.0)
    r = int(history.config.get("rank", 1)) if rank is None else rank
    return Schedule(rounds=len(history.rounds), rank=r, sparsification=e, covariance=c)


def calibrate(history, spectrum=None, *, rank_weight: float = 0.5, skip: int = 0,
              floor_min: float | None = 0.0) -> BoundConstants:
    """Fit the bound's constants to a pilot run (method in the module docstring).

    Args:
        history: the pilot's :class:`fedloop.History` (any task; ≥ 3 evaluated rounds).
        spectrum: ε(r)'s spectrum (1-D, or 2-D with one row per module); None: no rank term
            (a zero spectrum as long as the pilot's rank — predictions then ignore ε(r)).
        rank_weight: ε(r) = rank_weight · tail of the spectrum.
        skip: leading rounds left out of the fit (transients).
        floor_min: a lower bound on the loss (0 for squared error and cross-entropy; None: none);
            if the fit puts F* below it, noise and drift are scaled down to keep F* there.
    """
    from scipy.optimize import lsq_linear

    _check_history(history)
    if isinstance(skip, (bool, np.bool_)) or not isinstance(skip, (int, np.integer)) or skip < 0:
        raise ValueError(f"skip must be an integer >= 0; got skip = {skip!r}")
    if floor_min is not None and (isinstance(floor_min, (bool, np.bool_))
                                  or not isinstance(floor_min, (int, float, np.integer, np.floating))
                                  or not math.isfinite(floor_min)):
        raise ValueError(f"floor_min must be a finite number or None; got floor_min = {floor_min!r}")
    if isinstance(rank_weight, (bool, np.bool_)) or not isinstance(rank_weight, (int, float, np.integer, np.floating)) \
            or not math.isfinite(rank_weight) or rank_weight < 0:
        raise ValueError(f"rank_weight must be a finite number >= 0; got rank_weight = {rank_weight!r}")
    cfg = history.config
    for key, integer, default in (("rank", True, 1), ("local_steps", True, 1), ("lr", False, 1.0)):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not 0 < v < 1e300:
            raise ValueError(f"the pilot's config.{key} must be a positive {'integer' if integer else 'number'}; "
                             f"got {key} = {v!r:.40}")
    alpha = cfg.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1e300):
        raise ValueError(f"the pilot's config.alpha must be None or a positive number; got alpha = {alpha!r:.40}")
    spectrum = check_spectrum(np.zeros(int(cfg.get("rank", 1))) if spectrum is None else spectrum)
    loss, _ = loss_curve(history)
    sch = schedule_from_history(history)
    x = np.asarray(sch.sparsification) + np.asarray(sch.covariance)
    T = len(history.rounds)
    idx = [t for t in range(skip, T) if np.isfinite(loss[t]) and np.isfinite(loss[t + 1])]
    if len(idx) < 3:
        raise ValueError(f"calibrate needs >= 3 consecutive evaluated rounds in the pilot; got {len(idx)}")
    X = np.array([[loss[t], 1.0] for t in idx])
    y = np.array([loss[t + 1] for t in idx])
    xe = np.array([x[t] for t in idx])
    # Stage 1: the contraction trend (ρ, k). Stage 2: w from what the trend leaves. e_t decays
    # with the loss itself, so a joint fit lets w absorb the trend (it overestimated w 60× on
    # the linear task); the two stages identify w from e_t's variation around the trend only.
    scale = np.maximum(np.abs(X).max(0), 1e-300)
    fit = lsq_linear(X / scale, y, bounds=(np.array([0.0, -np.inf]) * scale, np.array([1.0, np.inf]) * scale))
    rho, k = fit.x / scale
    resid_trend = y - X @ np.array([rho, k])
    xc = xe - xe.mean()  # the trend's intercept absorbs the mean of x_t
    w = max(0.0, float(xc @ resid_trend / (xc @ xc))) if float(xc @ xc) > 0 else 0.0
    k -= w * float(np.mean(xe))  # keep the fitted mean level: the trend's intercept held w·ē
    rho = min(max(rho, 0.0), 1.0 - 1e-9)
    a = -0.5 + math.sqrt(0.25 + 2.0 * (1.0 - rho))
    a = min(max(a, 1e-12), 1.0)
    beta = a / 2.0
    eta, E = float(cfg.get("lr", 1.0)), int(cfg.get("local_steps", 1))
    gamma = float(cfg.get("alpha") or cfg.get("rank", 1)) / float(cfg.get("rank", 1))
    L_W = w / ((1.0 + 1.0 / beta) * gamma**2)
    gsq, gmean = _column(history, "grad_sq_mean"), _column(history, "grad_mean_sq")
    ok = np.isfinite(gsq) & np.isfinite(gmean)
    sigma2 = float(np.mean(np.maximum(gsq[ok] - gmean[ok], 0.0))) if np.any(ok) else 0.0
    G2 = float(np.max(gsq[ok])) if np.any(ok) else 0.0
    base = dict(step_size=eta, local_steps=E, smoothness=L_W, product_smoothness=L_W, noise=sigma2,
                gradient_bound=G2, pl=a / (2 * eta * E), initial_gap=1.0, spectrum=spectrum, scaling=gamma,
                sparsification_factor=1.0, rank_weight=rank_weight, split=beta,
                reach_rank=int(cfg.get("rank", 1)), reach_power=_pilot_reach_power(cfg))
    probe = BoundConstants(**base)
    nd = noise_term(probe) + drift_term(probe)
    eps = rank_term(spectrum, int(cfg.get("rank", 1)), weight=rank_weight)
    floor = (k - beta * eps - nd) / (1.0 - rho) - eps
    if floor_min is not None and floor < floor_min:  # a loss bounded below: noise and drift take less of k
        floor = floor_min
        nd_left = k - beta * eps - (1.0 - rho) * (floor + eps)
        scale_nd = max(nd_left, 0.0) / nd if nd > 0 else 0.0
        base["smoothness"] = base["smoothness"] * scale_nd
        floor = (k - beta * eps - nd * scale_nd) / (1.0 - rho) - eps
    resid = float(np.sqrt(np.mean((X @ np.array([rho, k]) + w * xe - y) ** 2)))
    return BoundConstants(**{**base, "initial_gap": max(float(loss[0]) - floor, 0.0) if np.isfinite(loss[0])
                             else max(float(loss[idx[0]]) - floor, 0.0)}, floor=float(floor),
                          source=f"calibrated on a {T}-round pilot (rank {cfg.get('rank')}, keep {cfg.get('keep')}, "
                                 f"strategy {cfg.get('strategy')}): rho = {rho:.4f}, k = {k:.4g}, w = {w:.4g}, "
                                 f"rms residual {resid:.3g}")


def _pilot_reach_power(cfg) -> float:
    """Lemma 2's exponent for the pilot's optimiser and α (convergence.predict.reach_power)."""
    from convergence.predict import reach_power

    opt = str(cfg.get("optimizer") or "adam").lower()
    return reach_power(opt, alpha_fixed=cfg.get("alpha") is not None)


def _dropped_share(spectrum, rank, keep):
    """Σ_{keep<i≤rank} λ_i / Σ_{i≤rank} λ_i (summed over module rows), through ε's tail sums."""
    r = np.asarray(rank, dtype=int)
    k = np.clip(np.asarray(keep, dtype=int), 0, r)
    tail_r = rank_term(spectrum, r, weight=1.0)
    tot = rank_term(spectrum, 0, weight=1.0) - tail_r
    return np.where(tot > 0, (rank_term(spectrum, k, weight=1.0) - tail_r) / np.where(tot > 0, tot, 1.0), 0.0)


def predict_schedule(pilot, spectrum, rank, keep_ratio, rounds: int) -> Schedule:
    """The schedule of a configuration not yet run, from a pilot (module docstring): shapes
    broadcast over ``rank`` and ``keep_ratio``; keep s' = ⌈ρ r'⌉ clipped to 1..r'
    (:func:`tsfa.keep_from_ratio`, the rule of the offline grid). ``pilot`` is a
    History, or a mapping {"update_energy": U, "covariance_sq": c} (scalars or per-round
    arrays) when planning from shapes alone."""
    r = np.asarray(rank, dtype=int)
    kr = np.asarray(keep_ratio, dtype=float)
    if np.any(~np.isfinite(kr)) or np.any(kr <= 0) or np.any(kr > 1):
        raise ValueError(f"keep_ratio must lie in (0, 1]; got {kr}")
    r, kr = np.broadcast_arrays(r, kr)
    keep = keep_from_ratio(r, kr)
    share = _dropped_share(spectrum, r, keep)
    U, c = _pilot_series(pilot, "update_energy"), _pilot_series(pilot, "covariance_sq")
    U, c = _extend(U, rounds), _extend(c, rounds)
    return Schedule(rounds=rounds, rank=r, sparsification=share[..., None] * U, covariance=np.broadcast_to(
        c, (*r.shape, rounds)))


def _pilot_series(pilot, key):
    """A pilot's per-round series: a History's column, or a value/array from a mapping (planning
    without a pilot run, e.g. from module shapes alone)."""
    if hasattr(pilot, "column"):
        _check_history(pilot)
        return np.nan_to_num(_column(pilot, key), nan=0.0)
    if isinstance(pilot, dict) and key in pilot:
        from tsfa._validate import real_array

        x = np.atleast_1d(real_array(f"pilot[{key!r}]", pilot[key]))
        if x.ndim != 1:
            raise ValueError(f"pilot[{key!r}] must be a scalar or a 1-D per-round array; got shape {x.shape}")
        if np.any(~np.isfinite(x)) or np.any(x < 0):
            raise ValueError(f"pilot[{key!r}] must be finite and >= 0; got {pilot[key]!r}")
        return x
    raise ValueError(f"pilot must be a fedloop History or a mapping with {key!r}; got {type(pilot).__name__}")


def _extend(x, T):
    x = np.asarray(x, dtype=float)
    if len(x) >= T:
        return x[:T]
    tail = float(np.mean(x[len(x) // 2:])) if len(x) else 0.0
    return np.concatenate([x, np.full(T - len(x), tail)])


def predict_final_loss(constants: BoundConstants, pilot, rank, keep_ratio, rounds: int):
    """Predicted :class:`BoundTerms` for candidate (rank, keep ratio) pairs over ``rounds``."""
    return bound(constants, predict_schedule(pilot, constants.spectrum, rank, keep_ratio, rounds))


def make_predictor(constants, pilot=None):
    """A ``predict(rank, keep_ratio, rounds) -> {term: array, "total": predicted loss}`` callable
    for :func:`tsfa.design_offline`; "total" is the predicted final *loss* (gap + F*).

    ``constants`` is the calibrated bound (:class:`BoundConstants`, with its ``pilot``) or a
    calibrated curve (:class:`convergence.predict.Calibration`, whose predictor also returns the
    band, "low" and "high", and accepts the realised ``kept_share`` of a simulated online stage)."""
    from convergence.predict import Calibration

    if isinstance(constants, Calibration):
        return constants.predictor()
    if not isinstance(constants, BoundConstants):
        raise ValueError(f"constants must be BoundConstants or a Calibration; got {type(constants).__name__}")
    U_all, c_all = _pilot_series(pilot, "update_energy"), _pilot_series(pilot, "covariance_sq")

    def predict(rank, keep_ratio, rounds):
        """Closed form at each candidate's own round count: the cost does not grow with rounds."""
        from convergence.bound import _by_rank, _evaluate, _rounds, _Series

        T = np.asarray(rounds)
        if T.dtype.kind not in "iuf" or np.any(~np.isfinite(T)) or np.any(T < 0) or np.any(T != np.round(T)):
            raise ValueError(f"rounds must be integers >= 0; got rounds = {rounds!r}")
        r, kr, T = np.broadcast_arrays(np.asarray(rank), np.asarray(keep_ratio, dtype=float), T.astype(np.int64))
        if kr.dtype.kind != "f" or np.any(~np.isfinite(kr)) or np.any(kr <= 0) or np.any(kr > 1):
            raise ValueError(f"keep_ratio must lie in (0, 1]; got keep_ratio = {keep_ratio!r}")
        Tmax = _rounds(int(T.max()) if T.size else 0)
        eps = np.asarray(rank_term(constants.spectrum, r, weight=constants.rank_weight), dtype=float)
        share = _dropped_share(constants.spectrum, r, keep_from_ratio(r, kr))
        series = []
        for x in (U_all, c_all):  # the pilot's rounds, then the mean of its second half (_extend)
            head = x[:Tmax]
            tail = float(np.mean(x[len(x) // 2:])) if len(x) else 0.0
            series.append((head, tail if len(x) < Tmax else 0.0))
        (Uh, Ut), (ch, ct) = series
        e = _Series(share[..., None] * Uh, share * Ut)
        cv = _Series(np.asarray(ch, dtype=float), np.asarray(ct, dtype=float))
        shape = np.broadcast_shapes(eps.shape, share.shape, T.shape)
        terms = _by_rank(constants, np.broadcast_to(r, shape),
                         lambda ci: _evaluate(ci, eps, e, cv, np.array([Tmax]), T[..., None], shape))
        out = {name: v[..., 0] for name, v in terms.as_dict().items()}
        out["reach"] = np.broadcast_to(terms.reach, shape).astype(float)
        out["total"] = out["total"] + constants.floor
        return out

    return predict
