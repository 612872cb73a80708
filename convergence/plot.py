"""The bound-vs-empirical figure: measured loss (mean and spread over seeds) against the
predicted curve, with the bound's terms stacked underneath (matplotlib, headless-safe)."""

from __future__ import annotations

import numpy as np

from convergence.bound import TERMS, BoundTerms

__all__ = ["plot_bound_vs_empirical"]

_COLORS = {"contraction": "#4c72b0", "noise": "#dd8452", "drift": "#c44e52", "sparsification": "#8172b3",
           "covariance": "#937860", "rank": "#55a868"}


def plot_bound_vs_empirical(history, terms: BoundTerms | None = None, ax=None, *, label: str = "bound", index=None,
                            title: str | None = None, log: bool = False, band=None,
                            band_label: str = "predicted (calibrated curve)"):
    """Plot the empirical loss curve(s) against a bound and/or a predicted curve with its band.

    Args:
        history: one :class:`fedloop.History` or a list of them (seeds of one configuration:
            the mean is drawn with a min–max band).
        terms: the :class:`BoundTerms` to draw (its ``floor`` is added back so the curve is a
            loss); if it has leading axes, ``index`` picks one candidate. None: no bound.
        band: a :class:`convergence.Prediction` (one candidate) drawn as its curve and shaded
            band, e.g. ``Calibration.predict(rank, keep, rounds)``.
        ax: a matplotlib axis (default: a new figure).
        label: the legend label of the bound's total.
        log: log-scaled loss axis (for loose bounds).

    Returns:
        The axis.
    """
    import matplotlib

    if ax is None:
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 4.2))
    from convergence.calibration import loss_curve

    hs = history if isinstance(history, (list, tuple)) else [history]
    curves = [loss_curve(h) for h in hs]
    what = curves[0][1]
    Y = np.array([c[0] for c in curves], dtype=float)
    t = np.arange(Y.shape[1])
    pick = (lambda a: a) if index is None else (lambda a: a[index])
    floor = 0.0
    if terms is not None:
        parts = {name: np.asarray(pick(getattr(terms, name)), dtype=float) for name in TERMS}
        T = min(len(t), parts["rank"].shape[-1])
        floor = terms.floor
        base = np.full(T, floor)
        for name in reversed(TERMS):  # rank at the bottom, contraction on top
            top = base + parts[name][:T]
            ax.fill_between(t[:T], base, top, color=_COLORS[name], alpha=0.35, lw=0, label=f"{name}")
            base = top
        ax.plot(t[:T], base, color="k", lw=2, label=f"{label} (total)")
    if band is not None:
        mid, lo, hi = (np.asarray(pick(getattr(band, n)), dtype=float).reshape(-1)
                       for n in ("predicted", "low", "high"))
        tb = np.arange(len(mid))
        ax.fill_between(tb, lo, hi, color="#1f77b4", alpha=0.25, lw=0, label=f"{band.level:.0%} band")
        ax.plot(tb, mid, color="#1f77b4", lw=2, ls="--", label=band_label)
    mean = np.nanmean(Y, axis=0)
    ax.plot(t, mean, color="#d62728", lw=2, marker="o", ms=3, label=f"empirical {what}"
            + (f" (mean of {len(hs)})" if len(hs) > 1 else ""))
    if len(hs) > 1:
        ax.fill_between(t, np.nanmin(Y, axis=0), np.nanmax(Y, axis=0), color="#d62728", alpha=0.2, lw=0,
                        label="empirical min–max")
    if floor != 0:
        ax.axhline(floor, color="grey", lw=1, ls=":", label=f"F* = {floor:.3g}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("round t")
    ax.set_ylabel(what)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    return ax
