"""Bound vs empirical loss on both tasks (spec §5).

For each task, a grid of structural ranks × keep ratios is trained with fedloop:

* ``linear`` (5 seeds): the bound with *exact* constants (convergence.exact_constants) is
  evaluated on every run's realised schedule and checked at every round; its tightness
  (bound / empirical at the last round) is reported. Then the bound is *calibrated* on one
  configuration (the pilot) and predicts every configuration's final loss before training;
  the Spearman correlation with the measured final loss (mean over seeds) is reported.
* ``rt-minilm`` (1 seed): calibrated on the pilot with ε(r) from a pilot-gradient spectrum
  (convergence.estimate_spectrum), predicted on the others; Spearman against the final
  test loss.

Writes <out>/bound_linear.png, bound_rt_minilm.png, bound_vs_empirical.csv and
bound_spearman.json. ``--quick`` runs a tiny grid (for the test suite).

    python examples/06_bound_vs_empirical.py [--out docs/figures] [--tasks linear rt-minilm] [--quick]
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
from scipy.stats import spearmanr  # noqa: E402

from convergence import (  # noqa: E402
    bound,
    calibrate,
    exact_constants,
    plot_bound_vs_empirical,
    predict_final_loss,
)
from convergence.calibration import loss_curve, schedule_from_history  # noqa: E402
from fedloop import RunConfig, run  # noqa: E402
from fedloop.design import task_spectrum  # noqa: E402
from fedloop.history import write_csv  # noqa: E402
from fedloop.tasks import LinearTask, make_task  # noqa: E402
from tsfa import keep_from_ratio  # noqa: E402

LINEAR = dict(task="linear", strategy="fixed", clients=10, rounds=30, local_steps=4, batch_size=16, lr=0.05,
              optimizer="sgd", momentum=0.0, penalty=0.0)
RT = dict(task="rt-minilm", strategy="fixed", clients=10, rounds=15, local_steps=2, batch_size=8, max_length=32,
          test_size=300, lr=2e-3)


def grid(ranks, ratios):
    out = []
    for r in ranks:
        for q in ratios:
            keep = keep_from_ratio(r, q)
            if (r, keep) not in out:
                out.append((r, keep))
    return out


def reuse(cfg: RunConfig):
    """The finished run in cfg.out if it was made with this very configuration (``--reuse``)."""
    from fedloop.history import History

    try:
        h = History.load(cfg.out)
    except FileNotFoundError:
        return None
    return h if h.config == cfg.to_dict() and len(h.rounds) == cfg.rounds else None


def sweep(task: str, base: dict, cells, seeds, out: Path, pilot_cell, log, reuse_runs=False):
    rows, runs = [], {}
    for r, keep in cells:
        for seed in seeds:
            folder = out / "runs" / f"{task}_r{r}_k{keep}_s{seed}"
            cfg = RunConfig(**base, rank=r, keep=keep, seed=seed, out=str(folder))
            t0 = time.perf_counter()
            h = reuse(cfg) if reuse_runs else None
            h = h if h is not None else run(cfg, progress=False)
            runs[(r, keep, seed)] = (cfg, h)
            log(f"{task} r={r} keep={keep} seed={seed}: final {loss_curve(h)[0][-1]:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    pilot_cfg, pilot = runs[(*pilot_cell, seeds[0])]
    spectrum = task_spectrum(make_task(pilot_cfg))  # exact on linear, a pilot gradient on rt-minilm
    cal = calibrate(pilot, spectrum)
    log(f"{task}: {cal.source}")
    for r, keep in cells:
        hs = [runs[(r, keep, s)][1] for s in seeds]
        finals = np.array([loss_curve(h)[0][-1] for h in hs])
        pred = predict_final_loss(cal, pilot, r, keep / r, base["rounds"])
        row = {"task": task, "rank": r, "keep": keep, "keep_ratio": keep / r, "seeds": len(seeds),
               "empirical_final_mean": float(finals.mean()), "empirical_final_std": float(finals.std()),
               "predicted_final": float(pred.total[-1] + cal.floor), "pilot": (r, keep) == tuple(pilot_cell)}
        for name, v in pred.final().items():
            row[f"predicted_{name}"] = float(v)
        if task == "linear":  # the exact bound on each realised run
            ok, tight = True, []
            for s in seeds:
                cfg, h = runs[(r, keep, s)]
                c = exact_constants(LinearTask(cfg), h)
                terms = bound(c, schedule_from_history(h))
                emp = loss_curve(h)[0] - c.floor
                ok &= bool(np.all(terms.total >= emp - 1e-6 * np.maximum(emp, 1.0)))
                tight.append(float(terms.total[-1] / emp[-1]))
            row.update(exact_bound_holds=ok, tightness_mean=float(np.mean(tight)), tightness_min=float(np.min(tight)),
                       tightness_max=float(np.max(tight)))
        rows.append(row)
    others = [x for x in rows if not x["pilot"]]
    rho = spearmanr([x["predicted_final"] for x in others], [x["empirical_final_mean"] for x in others]).correlation
    return rows, runs, cal, float(rho)


def figure(task, rows, runs, cal, seeds, pilot_cell, base, path: Path):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    hs = [runs[(*pilot_cell, s)][1] for s in seeds]
    pred = predict_final_loss(cal, hs[0], pilot_cell[0], pilot_cell[1] / pilot_cell[0], base["rounds"])
    plot_bound_vs_empirical(hs, pred, ax=axes[0], label="calibrated bound",
                            title=f"{task}: pilot r={pilot_cell[0]}, keep={pilot_cell[1]} — calibrated terms")
    if task == "linear":
        cfg, h = runs[(*pilot_cell, seeds[0])]
        c = exact_constants(LinearTask(cfg), h)
        exact = bound(c, schedule_from_history(h))
        axes[0].plot(np.arange(exact.total.shape[-1]), exact.loss(), "k--", lw=1.5,
                     label=f"exact-constant bound (seed {seeds[0]})")
        axes[0].set_yscale("log")
        axes[0].legend(fontsize=7, loc="lower left", ncol=2)
    ax = axes[1]
    emp = np.array([x["empirical_final_mean"] for x in rows])
    prd = np.array([x["predicted_final"] for x in rows])
    err = np.array([x["empirical_final_std"] for x in rows])
    ranks = np.array([x["rank"] for x in rows])
    sc = ax.scatter(prd, emp, c=ranks, cmap="viridis", s=50, zorder=3)
    ax.errorbar(prd, emp, yerr=err, fmt="none", ecolor="grey", alpha=0.6, zorder=2)
    for x in rows:
        ax.annotate(f"r{x['rank']}k{x['keep']}" + ("*" if x["pilot"] else ""), (x["predicted_final"],
                    x["empirical_final_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lo, hi = min(prd.min(), emp.min()), max(prd.max(), emp.max())
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls=":")
    others = [x for x in rows if not x["pilot"]]
    rho = spearmanr([x["predicted_final"] for x in others], [x["empirical_final_mean"] for x in others]).correlation
    ax.set_xlabel("predicted final loss (calibrated on the pilot *)")
    ax.set_ylabel("measured final loss" + (f" (mean ± sd, {len(seeds)} seeds)" if len(seeds) > 1 else ""))
    ax.set_title(f"{task}: prediction over the (rank, keep) grid — Spearman {rho:.3f}", fontsize=10)
    fig.colorbar(sc, ax=ax, label="rank r")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/figures")
    ap.add_argument("--tasks", nargs="+", default=["linear", "rt-minilm"], choices=["linear", "rt-minilm"])
    ap.add_argument("--quick", action="store_true", help="tiny grid, few rounds (for tests)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: 5 on linear, 1 on rt-minilm)")
    ap.add_argument("--reuse", action="store_true", help="load finished runs of the same configuration from <out>/runs")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    all_rows, summary = [], {}
    for task in args.tasks:
        if task == "linear":
            base = dict(LINEAR)
            cells, seeds, pilot = grid((1, 2, 3, 4, 6, 8), (0.25, 0.5, 1.0)), list(range(5)), (4, 2)
            if args.quick:
                base.update(rounds=6, clients=4)
                cells, seeds = [(2, 1), (4, 2), (4, 4), (6, 3)], [0, 1]
        else:
            base = dict(RT)
            cells, seeds, pilot = grid((2, 4, 8), (0.25, 0.5, 1.0)), [0], (4, 2)
            if args.quick:
                base.update(rounds=3, clients=3, test_size=40)
                cells = [(2, 1), (4, 2), (4, 4)]
        if args.seeds is not None:
            seeds = list(range(args.seeds))
        rows, runs, cal, rho = sweep(task, base, cells, seeds, out, pilot, log, reuse_runs=args.reuse)
        figure(task, rows, runs, cal, seeds, pilot, base, out / f"bound_{task.replace('-', '_')}.png")
        summary[task] = {"spearman_predicted_vs_empirical": rho, "configs": len(cells), "seeds": len(seeds),
                         "rounds": base["rounds"], "pilot": {"rank": pilot[0], "keep": pilot[1]},
                         "calibration": cal.source}
        if task == "linear":
            ex = np.array([x["predicted_final"] for x in rows])
            summary[task].update(
                exact_bound_holds_every_round=all(x["exact_bound_holds"] for x in rows),
                tightness_median=float(np.median([x["tightness_mean"] for x in rows])),
                tightness_range=[float(min(x["tightness_min"] for x in rows)),
                                 float(max(x["tightness_max"] for x in rows))])
            del ex
        log(f"{task}: Spearman(predicted, measured final loss) over {len(cells) - 1} held-out configs = {rho:.3f}")
        all_rows += rows
    write_csv(out / "bound_vs_empirical.csv", all_rows)
    (out / "bound_spearman.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
