"""Offline rank design (TSFA stage 1) validated by training (spec §6).

For each task: a short pilot run calibrates the bound; ``fedloop.design.plan_for`` chooses
the structural rank (and a nominal keep ratio and V) from channel statistics alone under
the configuration's latency budget τ̄. Then the rank is swept *empirically*: a ``tsfa`` run
(online allocation of keep counts and bandwidth) at every candidate rank, all under the
same τ̄ (the base configuration's, in seconds). The offline choice should be among the two
empirically best ranks; its predicted final loss is printed beside the measured one.

Writes <out>/offline_<task>.png, offline_<task>.csv (the plan table), offline_sweep.csv
and offline_summary.json.

    python examples/01_offline_rank_design.py [--out docs/figures] [--tasks linear rt-minilm] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from convergence.calibration import loss_curve  # noqa: E402
from fedloop import RunConfig, run  # noqa: E402
from fedloop.design import plan_for  # noqa: E402
from fedloop.history import write_csv  # noqa: E402

LINEAR = dict(task="linear", strategy="tsfa", clients=10, rounds=30, rank=4, local_steps=4, batch_size=16, lr=0.05,
              budget_factor=0.5)
RT = dict(task="rt-minilm", strategy="tsfa", clients=10, rounds=15, rank=4, local_steps=2, batch_size=8,
          max_length=32, test_size=300, budget_factor=1.0)
SETTINGS = {
    "linear": dict(base=LINEAR, ranks=(1, 2, 3, 4, 6, 8), seeds=(0, 1, 2), pilot_rounds=15),
    "rt-minilm": dict(base=RT, ranks=(2, 4, 8, 16), seeds=(0,), pilot_rounds=6),
}


def study(task: str, out: Path, quick: bool, log):
    s = SETTINGS[task]
    base, ranks, seeds, pilot_rounds = dict(s["base"]), s["ranks"], s["seeds"], s["pilot_rounds"]
    if quick:
        base.update(rounds=4, clients=4)
        if task == "rt-minilm":
            base.update(test_size=40)
        ranks, seeds, pilot_rounds = ranks[:3], seeds[:1], 3
    cfg = RunConfig(**base, out=str(out / "runs" / f"offline_{task}"))
    t0 = time.perf_counter()
    plan, pilot, constants = plan_for(cfg, ranks=ranks, keep_ratios=(0.25, 0.5, 1.0), pilot_rounds=pilot_rounds,
                                      draws=60 if quick else 200)
    log(f"{task}: {plan.message}  [{time.perf_counter() - t0:.0f} s incl. pilot]")
    log(plan.format_table())
    tau = plan.latency_budget_s
    sweep = []
    for r in ranks:
        finals, lat = [], []
        for seed in seeds:
            run_cfg = cfg.replace(rank=r, keep=max(1, r // 2), seed=seed, latency_budget_s=tau,
                                  out=str(out / "runs" / f"offline_{task}_r{r}_s{seed}"))
            h = run(run_cfg, progress=False)
            finals.append(float(loss_curve(h)[0][-1]))
            lat.append(float(np.mean(h.column("latency_s"))))
        best_pred = min((c for c in plan.table if c.rank == r and c.feasible), key=lambda c: c.predicted_loss,
                        default=None)
        sweep.append({"task": task, "rank": r, "measured_final_mean": float(np.mean(finals)),
                      "measured_final_std": float(np.std(finals)), "seeds": len(seeds),
                      "mean_latency_over_budget": float(np.mean(lat) / tau),
                      "predicted_final_best_feasible": None if best_pred is None else best_pred.predicted_loss,
                      "chosen": r == plan.rank})
        log(f"{task} rank {r}: measured final {np.mean(finals):.4f} ± {np.std(finals):.4f}, "
            f"latency {np.mean(lat) / tau:.2f} τ̄")
    order = sorted(sweep, key=lambda x: x["measured_final_mean"])
    top2 = [x["rank"] for x in order[:2]]
    summary = {"chosen_rank": plan.rank, "chosen_keep": plan.keep, "relative_v": plan.relative_v,
               "weight_v": plan.weight_v,
               "predicted_final": plan.predicted_loss,
               "measured_final_at_chosen": next((x["measured_final_mean"] for x in sweep if x["chosen"]), None),
               "empirical_best_two": top2, "chosen_in_best_two": plan.rank in top2,
               "latency_budget_s": tau, "status": plan.status.value, "calibration": constants.source}
    write_csv(out / f"offline_{task.replace('-', '_')}.csv", plan.table_rows())
    figure(task, plan, sweep, summary, out / f"offline_{task.replace('-', '_')}.png")
    return sweep, summary


def figure(task, plan, sweep, summary, path):
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    ratios = sorted({round(c.keep_ratio, 3) for c in plan.table})
    for q in (0.25, 0.5, 1.0):
        rows = [c for c in plan.table if abs(c.keep_ratio - q) < 0.13 and (q < 1 or c.keep_ratio == 1)]
        rows = sorted({c.rank: c for c in rows}.values(), key=lambda c: c.rank)
        ax.plot([c.rank for c in rows], [c.predicted_loss for c in rows], "o-", label=f"predicted, keep ≈ {q:g}")
        infe = [c for c in rows if not c.feasible]
        ax.scatter([c.rank for c in infe], [c.predicted_loss for c in infe], marker="x", color="k", zorder=4)
    ax.scatter([], [], marker="x", color="k", label="misses τ̄ (infeasible)")
    if plan.rank is not None:
        ax.axvline(plan.rank, color="grey", ls=":", label=f"offline choice r={plan.rank}, keep {plan.keep}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("structural rank r")
    ax.set_ylabel("predicted final loss (calibrated bound)")
    ax.set_title(f"{task}: offline plan (τ̄ = {plan.latency_budget_s:.3g} s)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    del ratios
    r = [x["rank"] for x in sweep]
    m = [x["measured_final_mean"] for x in sweep]
    sd = [x["measured_final_std"] for x in sweep]
    bx.errorbar(r, m, yerr=sd, fmt="o-", color="#d62728", label="measured final loss, tsfa at τ̄")
    if plan.rank is not None:
        bx.scatter([plan.rank], [plan.predicted_loss], marker="*", s=180, color="k", zorder=5,
                   label=f"predicted at the choice: {plan.predicted_loss:.3f}")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("structural rank r")
    bx.set_ylabel("final loss")
    bx.set_title(f"empirical rank sweep — best two: {summary['empirical_best_two']}", fontsize=10)
    bx.legend(fontsize=7)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/figures")
    ap.add_argument("--tasks", nargs="+", default=["linear", "rt-minilm"], choices=list(SETTINGS))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    all_sweep, summary = [], {}
    for task in args.tasks:
        sweep, summary[task] = study(task, out, args.quick, log)
        all_sweep += sweep
    write_csv(out / "offline_sweep.csv", all_sweep)
    (out / "offline_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
