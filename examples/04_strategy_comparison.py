"""Compare strategies on one task over several seeds: accuracy against rounds, uplink bits
and simulated wall-clock, and a table of final accuracy (mean ± std), uplink bits and time.

Writes ``comparison.csv`` (one row per strategy and seed), ``comparison.json`` (every
round of every run) and ``comparison.png`` to ``--out``.

    python examples/04_strategy_comparison.py --task rt-minilm --strategies ideal fedit topk random tsfa \
        --seeds 0 1 2 --rounds 30 --clients 20 --out runs/compare
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedloop import RunConfig, run
from fedloop.history import write_csv


def compare(strategies, seeds, base: RunConfig, out: Path, progress=False, log=print):
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for s in strategies:
        for seed in seeds:
            cfg = base.replace(strategy=s, seed=seed, out=str(out / f"{s}_seed{seed}"))
            h = run(cfg, progress=progress)
            results[(s, seed)] = h
            log(f"{s:>7} seed {seed}: final {'accuracy' if base.task != 'linear' else 'test loss'} "
                f"{_final(h, base.task):.4f}, uplink {h.total_uplink_bits / 1e6:.1f} Mbit, "
                f"simulated {h.rounds[-1]['wallclock_s']:.1f} s")
    rows = [{"strategy": s, "seed": seed, "final": _final(h, base.task), "uplink_mbit": h.total_uplink_bits / 1e6,
             "simulated_s": h.rounds[-1]["wallclock_s"], "mean_latency_s": float(np.mean(h.column("latency_s"))),
             "latency_budget_s": h.meta["latency_budget_s"]} for (s, seed), h in results.items()]
    write_csv(out / "comparison.csv", rows)
    (out / "comparison.json").write_text(json.dumps(
        {f"{s}/{seed}": h.to_dict()["rounds"] for (s, seed), h in results.items()}, indent=1))
    summary = summarise(rows, strategies)
    _plot(results, strategies, seeds, base.task, out / "comparison.png")
    return summary


def _final(h, task):
    if task == "linear":
        return float(h.rounds[-1]["test_loss"])
    acc = h.column("accuracy")
    acc = acc[np.isfinite(acc)]
    return float(acc[-1])


def summarise(rows, strategies):
    table = {}
    for s in strategies:
        sub = [r for r in rows if r["strategy"] == s]
        f = np.array([r["final"] for r in sub])
        table[s] = {"final_mean": float(f.mean()), "final_std": float(f.std(ddof=1)) if len(f) > 1 else 0.0,
                    "uplink_mbit": float(np.mean([r["uplink_mbit"] for r in sub])),
                    "simulated_s": float(np.mean([r["simulated_s"] for r in sub])),
                    "latency_over_budget": float(np.mean([r["mean_latency_s"] / r["latency_budget_s"] for r in sub])),
                    "runs": len(sub)}
    return table


def _plot(results, strategies, seeds, task, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "test_loss" if task == "linear" else "accuracy"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for s in strategies:
        hs = [results[(s, seed)] for seed in seeds]
        mask = np.isfinite(hs[0].column(key))
        y = np.array([h.column(key)[mask] for h in hs])
        xs = {"round": hs[0].column("round")[mask],
              "uplink": np.mean([np.cumsum(h.column("uplink_bits"))[mask] / 1e6 for h in hs], axis=0),
              "time": np.mean([h.column("wallclock_s")[mask] for h in hs], axis=0)}
        for ax, name in zip(axes, ("round", "uplink", "time"), strict=True):
            m = y.mean(0)
            ax.plot(xs[name], m, label=s)
            if len(seeds) > 1:
                sd = y.std(0, ddof=1)
                ax.fill_between(xs[name], m - sd, m + sd, alpha=0.15)
    labels = ("round", "cumulative uplink (Mbit)", "simulated wall-clock (s)")
    for ax, lab in zip(axes, labels, strict=True):
        ax.set_xlabel(lab)
        ax.set_ylabel("test accuracy" if key == "accuracy" else "test loss")
        ax.grid(alpha=0.3)
    if key == "test_loss":
        for ax in axes:
            ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(f"{task}: mean ± std over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="rt-minilm", choices=["rt-minilm", "linear"])
    ap.add_argument("--strategies", nargs="+", default=["ideal", "fedit", "topk", "random", "tsfa"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--test-size", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--keep", type=int, default=2, help="components per module for topk/random/svd/fixed bits")
    ap.add_argument("--budget-factor", type=float, default=0.5, help="τ̄ = factor × median dense latency")
    ap.add_argument("--relative-v", type=float, default=1.0)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    base = RunConfig(task=args.task, rounds=args.rounds, clients=args.clients, local_steps=args.local_steps,
                     batch_size=args.batch_size, max_length=args.max_length, test_size=args.test_size,
                     eval_every=args.eval_every, lr=args.lr, keep=args.keep, checkpoint_every=args.rounds,
                     budget_factor=args.budget_factor, relative_v=args.relative_v)
    if args.task == "linear":
        base = base.replace(rank=4, keep=min(args.keep, 4), lr=args.lr if args.lr != 2e-3 else 0.02)
    table = compare(args.strategies, args.seeds, base, Path(args.out), progress=args.progress)
    metric = "accuracy" if args.task != "linear" else "test loss"
    print(f"\n{'strategy':>8} {'final ' + metric:>16} {'uplink Mbit':>12} {'sim time s':>10} {'latency/τ̄':>10}")
    for s, row in table.items():
        print(f"{s:>8} {row['final_mean']:>9.4f} ± {row['final_std']:.4f} {row['uplink_mbit']:>12.1f} "
              f"{row['simulated_s']:>10.1f} {row['latency_over_budget']:>10.2f}")
    print(f"wrote {args.out}/comparison.csv, comparison.json, comparison.png")


if __name__ == "__main__":
    main()
