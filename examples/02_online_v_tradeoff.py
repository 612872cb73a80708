"""Online allocation and the Lyapunov V trade-off (allocation only, no training).

K = 20 default clients, MiniLM-L6 q/v at r = 8, error profiles from ErrorModel(),
τ̄ = 0.8 × the median dense latency, hard cap τ_max = 2 τ̄, skipping allowed. For each V
the OnlineAllocator runs ``--rounds`` rounds; the script writes
``v_tradeoff.png`` and ``v_tradeoff.csv`` to ``--out``.

    python examples/02_online_v_tradeoff.py [--rounds 2000] [--out runs/examples]
"""

from __future__ import annotations

import argparse
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import tsfa  # noqa: E402
from tsfa.allocator import OnlineAllocator  # noqa: E402
from tsfa.simulate import dense_latency_s, simulate_allocation  # noqa: E402

V_VALUES = (0.3, 3.0, 30.0, 300.0)


def run(rounds: int, seed: int = 0, v_values=V_VALUES):
    cell = tsfa.Cell()
    clients = cell.sample_clients(20, rng=seed)
    shape = tsfa.minilm_l6_qv(8)
    compute = clients.compute_time_s(5e11)
    downlink = 0.02
    budget = 0.8 * dense_latency_s(cell, clients, shape, compute, downlink_s=downlink, rng=seed + 1)
    results = {}
    for v in v_values:
        policy = OnlineAllocator(shape, latency_budget_s=budget, weight_v=v, total_bandwidth_hz=cell.total_bandwidth_hz,
                                 downlink_s=downlink, max_latency_s=2 * budget, allow_skip=True)
        results[v] = simulate_allocation(policy, cell, clients, rounds=rounds, compute_s=compute, rng=seed + 2)
    return budget, results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--out", default="runs/examples")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget, results = run(args.rounds)
    with open(out / "v_tradeoff.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["V", "time_avg_latency_s", "latency_budget_s", "avg_dropped_energy", "avg_queue_s", "mean_keep"])
        for v, r in results.items():
            w.writerow([v, r.time_average_latency_s, budget, r.average_dropped_energy, r.average_queue,
                        r.mean_keep.mean()])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    vs = list(results)
    axes[0].semilogx(vs, [results[v].average_dropped_energy for v in vs], "o-", label="avg dropped energy")
    axes[0].set_xlabel("V")
    axes[0].set_ylabel("average dropped energy Σ p_k e_k(s_k)")
    ax2 = axes[0].twinx()
    ax2.semilogx(vs, [results[v].average_queue for v in vs], "s--", color="C3", label="avg queue")
    ax2.set_ylabel("average queue Q (s)", color="C3")
    axes[0].set_title("Lyapunov trade-off")
    for v in vs:
        lat = results[v].latency_s
        axes[1].plot(np.cumsum(lat) / np.arange(1, len(lat) + 1), label=f"V = {v:g}")
        axes[2].plot(results[v].queue, label=f"V = {v:g}", lw=0.8)
    axes[1].axhline(budget, color="k", ls=":", label="budget τ̄")
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("running average latency (s)")
    axes[1].set_title("time-average latency → ≤ τ̄")
    axes[1].legend(fontsize=8)
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("virtual queue Q(t) (s)")
    axes[2].set_title("queue trajectory")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "v_tradeoff.png", dpi=120)
    for v, r in results.items():
        print(f"V = {v:>6g}: avg latency {r.time_average_latency_s:.3f} s (τ̄ = {budget:.3f} s, "
              f"ratio {r.time_average_latency_s / budget:.3f}), dropped {r.average_dropped_energy:.4f}, "
              f"queue {r.average_queue:.3f} s, mean keep {r.mean_keep.mean():.2f}")
    print(f"wrote {out / 'v_tradeoff.png'} and {out / 'v_tradeoff.csv'}")


if __name__ == "__main__":
    main()
