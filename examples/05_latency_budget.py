"""Latency budget tracking: TSFA's long-term average latency against τ̄, in real training.

On the ``linear`` task (default) or ``rt-minilm``, ``tsfa`` is trained under several
budgets τ̄ = factor × the median dense latency, beside ``fedit`` (dense uploads, no
budget) and ``fixed`` (a fixed keep ratio, equal bandwidth). The virtual queue
Q(t+1) = max(Q + τ(t) − τ̄, 0) of the online stage keeps the running average of the round
latency at or under τ̄ while the per-round latency follows the fading.

Writes <out>/latency_budget.png (running average latency / τ̄ per round, the queue, and
uplink bits against the budget) and latency_budget.csv.

    python examples/05_latency_budget.py [--task linear] [--factors 0.3 0.5 0.8] [--rounds 60] [--out runs/examples]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedloop import RunConfig, run  # noqa: E402
from fedloop.history import write_csv  # noqa: E402

BASE = {"linear": dict(task="linear", clients=10, rounds=60, rank=4, keep=2, local_steps=4, batch_size=16, lr=0.02),
        "rt-minilm": dict(task="rt-minilm", clients=10, rounds=20, rank=8, keep=2, local_steps=2, batch_size=8,
                          max_length=32, test_size=300)}


def measure(task, factors, out: Path, *, rounds=None, clients=None, seed=0, log=print):
    runs = {}
    base = dict(BASE[task], seed=seed)
    if rounds:
        base["rounds"] = rounds
    if clients:
        base["clients"] = clients
    for f in factors:
        cfg = RunConfig(**base, strategy="tsfa", budget_factor=f, out=str(out / "runs" / f"{task}_tsfa_b{f:g}"))
        runs[("tsfa", f)] = run(cfg, progress=False)
    for strategy in ("fedit", "fixed"):
        cfg = RunConfig(**base, strategy=strategy, budget_factor=factors[0],
                        out=str(out / "runs" / f"{task}_{strategy}"))
        runs[(strategy, None)] = run(cfg, progress=False)
    rows = []
    for (strategy, f), h in runs.items():
        lat, tau = h.column("latency_s"), h.meta["latency_budget_s"]
        dense = h.meta["dense_median_latency_s"]
        row = {"task": task, "strategy": strategy, "budget_factor": f, "latency_budget_s": tau,
               "mean_latency_s": float(lat.mean()), "mean_latency_over_dense_median": float(lat.mean() / dense),
               "mean_latency_over_budget": float(lat.mean() / tau) if f is not None else float("nan"),
               "max_latency_over_budget": float(lat.max() / tau) if f is not None else float("nan"),
               "uplink_mbit": h.total_uplink_bits / 1e6, "final_test_loss": float(h.column("test_loss")[-1]),
               "final_accuracy": h.final_accuracy}
        rows.append(row)
        log(f"{strategy:>5} {'' if f is None else f'τ̄ = {f:g} × dense':<14} mean latency "
            f"{row['mean_latency_over_dense_median']:.3f} × dense median"
            + (f" = {row['mean_latency_over_budget']:.3f} τ̄" if f is not None else "")
            + f", {row['uplink_mbit']:.2f} Mbit, final test loss {row['final_test_loss']:.4f}")
    return runs, rows


def figure(runs, path: Path, task: str):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    dense = next(iter(runs.values())).meta["dense_median_latency_s"]
    for (strategy, f), h in runs.items():
        lat = h.column("latency_s")
        t = np.arange(1, len(lat) + 1)
        label = f"tsfa, τ̄ = {f:g} × dense" if f is not None else strategy
        line = axes[0].plot(t, np.cumsum(lat) / t / dense, label=label)[0]
        if f is not None:
            axes[0].axhline(f, color=line.get_color(), ls=":", lw=1)
            axes[1].plot(t, h.column("queue_s") / h.meta["latency_budget_s"], color=line.get_color(), label=label)
        axes[2].plot(np.cumsum(h.column("uplink_bits")) / 1e6, h.column("test_loss"), color=line.get_color(),
                     label=label)
    axes[0].set_ylabel("running average latency / dense median latency\n(dotted: each τ̄)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("virtual queue Q(t) / τ̄")
    axes[2].set_ylabel("test loss")
    axes[2].set_xlabel("cumulative uplink (Mbit)")
    for a in axes[:2]:
        a.set_xlabel("round")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{task}: latency budget tracking (dense median latency {dense:.3g} s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="linear", choices=list(BASE))
    ap.add_argument("--factors", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--out", default="runs/examples")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, rows = measure(args.task, args.factors, out, rounds=args.rounds, clients=args.clients)
    write_csv(out / "latency_budget.csv", rows)
    figure(runs, out / "latency_budget.png", args.task)
    print(f"wrote {out / 'latency_budget.png'} and {out / 'latency_budget.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
