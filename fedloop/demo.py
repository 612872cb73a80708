"""The main job (``tsfa demo`` / ``make demo``), on embedded defaults.

1. Offline design (TSFA stage 1): a short pilot calibrates the predicted loss curves; the
   structural rank and V are chosen under τ̄ on the simulated online stage (the nominal SAA as
   a screen).
2. A TSFA run on ``rt-minilm`` (``--quick``: ``linear``) at the chosen rank and V.
3. The same seed under ``fedit`` (dense, separate averaging), ``ideal`` (dense, exact
   aggregation, no latency limit) and ``head`` (the adapter frozen: what the head alone learns).
4. A printed table (final metric, uplink bits, bit savings against fedit, mean latency over
   τ̄, the metric at tsfa's uplink bits and at equal simulated time) and figures in the run
   folder: the metric against uplink bits and simulated wall-clock (compare.png), TSFA's
   latency and queue per round (tsfa/run.png), and the curve predicted from the pilot, with
   its 90 % band, against the measured one (bound.png).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from fedloop.benchmark import METRICS, metric_within
from fedloop.config import RunConfig
from fedloop.history import write_csv

__all__ = ["main_job", "DEMO", "QUICK"]

#: The embedded defaults: the whole job takes a few minutes on a 2-core CPU.
#: τ̄ is half the median dense latency: below the slowest devices' compute time, so the plan and the
#: online stage must leave clients out of some rounds (the offline SAA caps a round at 1.5 τ̄ and
#: asks for ≥ 70 % participation: ``PLAN``).
DEMO = dict(task="rt-minilm", clients=10, rounds=20, local_steps=2, batch_size=8, max_length=32, test_size=300,
            budget_factor=0.5, seed=0)
PLAN = dict(max_latency_factor=1.5, min_participation=0.7)
#: ``--quick``: a smaller V grid and two replicate trajectories for the simulated online stage
#: (each V simulates the exact drift-plus-penalty allocator on every replicate).
QUICK_PLAN = dict(v_grid=(0.1, 1.0, 10.0), v_refine=0, online_replicates=2)
#: The runs after the plan: TSFA, the two dense references and the frozen-adapter baseline.
STRATEGIES = ("tsfa", "fedit", "ideal", "head")
#: ``--quick``: the linear task, seconds.
QUICK = dict(task="linear", clients=8, rounds=20, local_steps=4, batch_size=16, lr=0.05, budget_factor=0.4, seed=0)


def main_job(out="runs/demo", *, quick: bool = False, seed: int | None = None, progress: bool = True,
             log=print) -> dict:
    """Run the main job into ``out``; returns the summary (also written as summary.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convergence import plot_bound_vs_empirical
    from convergence.calibration import loss_curve
    from convergence.template import pilot_kept_share
    from fedloop.design import plan_for
    from fedloop.loop import run
    from fedloop.plots import compare_runs, plot_run

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = dict(QUICK if quick else DEMO)
    if seed is not None:
        base["seed"] = seed
    ranks = (2, 4, 8) if not quick else (1, 2, 4, 8)
    cfg = RunConfig(**base, strategy="tsfa", rank=4, keep=2, out=str(out / "tsfa"))
    pilot_rounds = 6 if not quick else 8
    log(f"[1/{len(STRATEGIES) + 1}] offline design on {cfg.task}: pilot of {pilot_rounds} rounds, ranks {ranks}")
    plan, pilot, calibration = plan_for(cfg.replace(out=str(out)), ranks=ranks, keep_ratios=(0.25, 0.5, 1.0),
                                      pilot_rounds=pilot_rounds, draws=100, progress=progress, **PLAN,
                                      **(QUICK_PLAN if quick else {}))
    log(plan.message)
    log(plan.format_table())
    if plan.online_table:
        log(plan.format_online_table())
        write_csv(out / "plan_online.csv", plan.online_rows())
    write_csv(out / "plan.csv", plan.table_rows())
    if not plan.success:
        raise ValueError(f"offline design failed: {plan.message}")
    tau = plan.latency_budget_s
    runs = {}
    for i, strategy in enumerate(STRATEGIES):
        c = cfg.replace(strategy=strategy, rank=plan.rank, keep=plan.keep, latency_budget_s=tau,
                        relative_v=float(plan.relative_v or cfg.relative_v), out=str(out / strategy))
        log(f"[{i + 2}/{len(STRATEGIES) + 1}] {strategy} on {c.task}: rank {c.rank}, {c.clients} clients, "
            f"{c.rounds} rounds")
        t0 = time.perf_counter()
        runs[strategy] = run(c, progress=progress)
        log(f"      done in {time.perf_counter() - t0:.0f} s")
    rows, compare_png = compare_runs([out / s for s in runs], out)
    plot_run(runs["tsfa"], out / "tsfa" / "run.png")
    # prediction vs empirical for the TSFA run: the curve calibrated on the pilot, at the chosen rank
    # and the run's realised kept share, with its 90 % band
    h = runs["tsfa"]
    kept = pilot_kept_share(h)
    pred = calibration.predict(plan.rank, None, len(h.rounds), kept_share=kept, start=loss_curve(h)[0][0])
    inside = pred.coverage(loss_curve(h)[0])
    ax = plot_bound_vs_empirical(h, None, band=pred,
                                 title=f"TSFA on {cfg.task}, r = {plan.rank}: predicted from a {pilot_rounds}-round "
                                       f"pilot (r = {cfg.rank});\nmeasured inside the band at {inside:.0%} of rounds")
    ax.title.set_fontsize(10)
    ax.figure.tight_layout()
    ax.figure.savefig(out / "bound.png", dpi=120)
    plt.close(ax.figure)
    dense = runs["fedit"].total_uplink_bits
    # Equal rounds (final), equal uplink bits (tsfa's total) and equal simulated time (the shortest
    # run that sends an adapter: head's rounds carry no upload).
    metric_spec = METRICS[cfg.task]
    equal_bits = runs["tsfa"].total_uplink_bits
    equal_time = min(h.rounds[-1]["wallclock_s"] for s, h in runs.items() if s != "head")
    table = []
    for s, hist in runs.items():
        r = next(x for x in rows if x["strategy"] == s)
        table.append({"strategy": s, "metric": r["metric"], "final": r["final"], "uplink_mbit": r["uplink_mbit"],
                      "bit_savings_vs_fedit": 1 - hist.total_uplink_bits / dense if dense else math.nan,
                      "mean_latency_over_tau": float(np.mean(hist.column("latency_s")) / tau),
                      "simulated_s": r["simulated_s"],
                      "at_equal_bits": metric_within(hist, metric_spec, "uplink_bits", equal_bits),
                      "at_equal_time": metric_within(hist, metric_spec, "wallclock_s", equal_time)})
    metric = table[0]["metric"].replace("_", " ")
    lines = [f"{'strategy':<8} {'final ' + metric:>16} {'uplink Mbit':>12} {'bit savings':>12} {'latency/τ̄':>10} "
             f"{'@tsfa bits':>11} {'@' + format(equal_time, '.3g') + ' s':>9}"]
    for r in table:
        lines.append(f"{r['strategy']:<8} {r['final']:>16.4f} {r['uplink_mbit']:>12.2f} "
                     f"{r['bit_savings_vs_fedit']:>11.1%} {r['mean_latency_over_tau']:>10.2f} "
                     f"{r['at_equal_bits']:>11.4f} {r['at_equal_time']:>9.4f}")
    lines.append(f"final: after {cfg.rounds} rounds; @tsfa bits: after the last round within tsfa's "
                 f"{equal_bits / 1e6:.3g} Mbit of uplink; @{equal_time:.3g} s: within the shortest adapter run's "
                 f"simulated time; head: the adapter frozen, only the classification head trains and travels")
    log("\n".join(lines))
    write_csv(out / "summary.csv", table)
    summary = {"task": cfg.task, "plan": {"rank": plan.rank, "keep": plan.keep, "relative_v": plan.relative_v,
                                          "predicted_loss": plan.predicted_loss, "latency_budget_s": tau},
               "prediction_inside_band": inside, "calibration": calibration.to_dict(),
               "table": table, "figures": [str(compare_png), str(out / "tsfa" / "run.png"), str(out / "bound.png")],
               "wall_s": time.perf_counter() - t_start}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    log(f"wrote {out}: summary.csv, plan.csv, compare.png, tsfa/run.png, bound.png "
        f"({summary['wall_s']:.0f} s)")
    return summary
