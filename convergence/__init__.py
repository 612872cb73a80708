"""convergence: the convergence bound of spec §5 (docs/theory.md), one pure function per term.

* :func:`bound` (``convergence.bound``): every term of the loss-gap bound per round,
  vectorised over candidate ranks and keep ratios; :class:`BoundConstants`, :class:`Schedule`.
* :func:`rank_term` and :func:`covariance_weighted_spectrum` (``convergence.rank``): ε(r).
* :func:`estimate_spectrum` (torch, imported lazily): ε(r)'s spectrum from a pilot gradient.
* :func:`exact_constants` (``convergence.linear``): the constants on the linear task.
* :func:`calibrate` (``convergence.calibration``): constants from a short pilot run.
* :func:`fit_curve`, :func:`predict_from` (``convergence.predict``): calibrated loss curves
  with a bootstrap band, by time rescaling of pilot curves (Proposition 3); :func:`reach` and
  :func:`reach_power`: the rank-dependent speed of Lemma 2.
* :func:`plot_bound_vs_empirical` (``convergence.plot``): the figure.

Importable without torch and pyomo.

Section references (spec §N) are to docs/spec.md, the project's statement of its model.
"""

from convergence.bound import (
    TERMS,
    BoundConstants,
    BoundTerms,
    Schedule,
    bound,
    contraction_factor,
    covariance_term,
    drift_term,
    noise_term,
    reach,
    sparsification_term,
)
from convergence.predict import Calibration, CurveModel, Prediction, fit_curve, predict_from, reach_power
from convergence.rank import covariance_weighted_spectrum, rank_term, stack_spectra
from convergence.spectrum import estimate_spectrum


def __getattr__(name):  # torch-side or matplotlib-side helpers, imported on first use
    if name in ("exact_constants", "linear_optimum", "measured_along_run"):
        from convergence import linear

        return getattr(linear, name)
    if name in ("calibrate", "schedule_from_history", "predict_schedule", "predict_final_loss", "make_predictor",
                "loss_curve"):
        from convergence import calibration

        return getattr(calibration, name)
    if name == "plot_bound_vs_empirical":
        from convergence.plot import plot_bound_vs_empirical

        return plot_bound_vs_empirical
    raise AttributeError(f"module 'convergence' has no attribute {name!r}")


__all__ = ["TERMS", "BoundConstants", "BoundTerms", "Schedule", "bound", "contraction_factor", "noise_term",
           "drift_term", "sparsification_term", "covariance_term", "rank_term", "covariance_weighted_spectrum",
           "stack_spectra", "estimate_spectrum", "exact_constants", "linear_optimum", "measured_along_run",
           "calibrate", "schedule_from_history", "predict_schedule", "predict_final_loss", "make_predictor",
           "loss_curve", "reach", "reach_power", "fit_curve", "predict_from", "Calibration", "CurveModel",
           "Prediction", "plot_bound_vs_empirical"]
