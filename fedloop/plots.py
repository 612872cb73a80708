"""Figures and tables from run folders (``tsfa plot RUN_DIR``, ``tsfa compare RUN_DIR...``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedloop.history import History

__all__ = ["plot_run", "compare_runs", "summary_row"]


def _metric(h: History) -> tuple[str, str]:
    """The task's headline metric (:data:`fedloop.benchmark.METRICS`, one owner) and its label;
    for a history of an unknown task, accuracy when it was measured, else test loss."""
    from fedloop.benchmark import METRICS

    spec = METRICS.get(h.config.get("task"))
    if spec is not None:
        key = spec.column
    else:
        key = "accuracy" if np.isfinite(h.column("accuracy")).any() else "test_loss"
    return key, "test accuracy" if key == "accuracy" else "test loss"


def summary_row(h: History, label: str) -> dict:
    key, _ = _metric(h)
    vals = h.column(key)
    vals = vals[np.isfinite(vals)]
    lat = h.column("latency_s")
    budget = h.meta.get("latency_budget_s", math.nan)
    return {"run": label, "strategy": h.config.get("strategy", "?"), "task": h.config.get("task", "?"),
            "rounds": len(h.rounds), "metric": key, "final": float(vals[-1]) if len(vals) else math.nan,
            "best": float(vals.max() if key == "accuracy" else vals.min()) if len(vals) else math.nan,
            "uplink_mbit": h.total_uplink_bits / 1e6,
            "simulated_s": float(h.rounds[-1]["wallclock_s"]) if h.rounds else math.nan,
            "latency_over_budget": float(np.mean(lat) / budget) if len(lat) and budget == budget else math.nan}


def _require_rounds(h: History, where) -> None:
    if not h.rounds:
        raise ValueError(f"{where}: the ledger has no rounds to plot")


def plot_run(h: History, path) -> Path:
    """Four panels: the metric against rounds and cumulative uplink, latency per round with τ̄
    (and the queue), uplink bits per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _require_rounds(h, path)
    key, ylabel = _metric(h)
    rnd = h.column("round")
    y = h.column(key)
    ok = np.isfinite(y)
    cum = np.cumsum(h.column("uplink_bits")) / 1e6
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    ax[0, 0].plot(rnd[ok], y[ok], marker="o")
    ax[0, 0].set(xlabel="round", ylabel=ylabel)
    ax[0, 1].plot(cum[ok], y[ok], marker="o")
    ax[0, 1].set(xlabel="cumulative uplink (Mbit)", ylabel=ylabel)
    ax[1, 0].plot(rnd, h.column("latency_s"), label="round latency τ(t)")
    budget = h.meta.get("latency_budget_s")
    if budget:
        ax[1, 0].axhline(budget, color="k", ls="--", lw=1, label="budget τ̄")
        avg = np.cumsum(h.column("latency_s")) / np.arange(1, len(rnd) + 1)
        ax[1, 0].plot(rnd, avg, label="running average")
    ax[1, 0].set(xlabel="round", ylabel="latency (s)")
    q = h.column("queue_s")
    if np.isfinite(q).any():
        tw = ax[1, 0].twinx()
        tw.plot(rnd, q, color="tab:red", alpha=0.5, label="queue Q(t)")
        tw.set_ylabel("queue Q (s)", color="tab:red")
    ax[1, 0].legend(loc="upper right", fontsize=8)
    ax[1, 1].bar(rnd, h.column("uplink_bits") / 1e6)
    ax[1, 1].set(xlabel="round", ylabel="uplink per round (Mbit)")
    for a in ax.ravel():
        a.grid(alpha=0.3)
    if key == "test_loss":
        ax[0, 0].set_yscale("log")
        ax[0, 1].set_yscale("log")
    cfg = h.config
    fig.suptitle(f"{cfg.get('strategy', '?')} on {cfg.get('task', '?')}: {cfg.get('clients', '?')} clients, "
                 f"r = {cfg.get('rank', '?')}, seed {cfg.get('seed', '?')}")
    fig.tight_layout()
    path = Path(path)
    if not path.suffix:  # matplotlib would add ".png" itself: say where the figure really is
        path = path.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_runs(folders, out) -> tuple[list[dict], Path]:
    """Load run folders, return one summary row per run and write ``compare.png`` to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = [History.load(f) for f in folders]
    for h, f in zip(hs, folders, strict=True):
        _require_rounds(h, f)
    labels = [Path(f).name for f in folders]
    rows = [summary_row(h, lab) for h, lab in zip(hs, labels, strict=True)]
    key, ylabel = _metric(hs[0])
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for h, lab in zip(hs, labels, strict=True):
        y = h.column(key)
        ok = np.isfinite(y)
        xs = (h.column("round"), np.cumsum(h.column("uplink_bits")) / 1e6, h.column("wallclock_s"))
        for a, x in zip(ax, xs, strict=True):
            a.plot(x[ok], y[ok], marker="o", ms=3, label=lab)
    for a, lab in zip(ax, ("round", "cumulative uplink (Mbit)", "simulated wall-clock (s)"), strict=True):
        a.set(xlabel=lab, ylabel=ylabel)
        a.grid(alpha=0.3)
        if key == "test_loss":
            a.set_yscale("log")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compare.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return rows, path
