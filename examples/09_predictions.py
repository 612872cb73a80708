"""Predictions checked on held-out configurations (docs/theory.md §6; spec §5(b), §6).

For one task, a grid of (rank, keep) cells of the ``fixed`` strategy runs with several
seeds. Three pilot cells — the smallest rank, and the largest rank at full and at a quarter
keep — calibrate ``convergence.fit_curve``: on the real models from the first seed only, on
``linear`` from the first three seeds (there each seed draws another task). Every other
cell is then predicted — curve, 90 % band and final loss — and compared with its measured
mean over seeds:

* coverage: the share of rounds 1..T at which the band contains the measured mean curve, for
  two bands: the 90 % band of one run's curve (what a pilot of one seed speaks for) and the
  stricter 90 % band of the mean of as many runs as there are seeds;
* Spearman(predicted final, measured mean final) over the held-out cells;
* on ``linear``, the exact bound (``convergence.exact_constants``) against every run, every round.

With ``--offline``, ``tsfa`` also runs at every rank under one τ̄ (in seconds; the base
configuration's), and the offline plan (``fedloop.design.plan_for`` with the calibrated
curves and the simulated online stage) is compared with the two empirically best ranks; its
online pilot is ``tsfa`` at the largest rank on the pilot seeds (``--pilot-seeds``), averaged.

``--offline-only`` runs the offline check alone (the pilot cells and ``tsfa`` per rank) and
writes ``<out>/offline_check_<task>.json``.

Runs are stored under ``<runs>/<task>/`` and reused when their configuration matches, so a
second call only analyses. Writes ``<out>/predictions_<task>.png``, ``predictions_<task>.csv``
and ``predictions_<task>.json``.

    python examples/09_predictions.py --task rt-distill --seeds 5 --offline --runs runs/predictions --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from scipy.stats import t as student_t

from convergence import bound, exact_constants, fit_curve, linear_optimum, rank_term  # noqa: E402
from convergence.calibration import loss_curve, schedule_from_history  # noqa: E402
from convergence.predict import Prediction  # noqa: E402
from fedloop import RunConfig, run  # noqa: E402
from fedloop.design import task_spectrum  # noqa: E402
from fedloop.history import History, write_csv  # noqa: E402
from fedloop.tasks import LinearTask, make_task  # noqa: E402
from tsfa import keep_from_ratio  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: The linear grid's settings: plain SGD (the algorithm Theorem 1 analyses) on a task unlike
#: the one of examples/06 (another size, target rank and spectrum, step and seeds).
LINEAR = dict(task="linear", strategy="fixed", clients=8, rounds=25, local_steps=3, batch_size=24, lr=0.03,
              optimizer="sgd", momentum=0.0, penalty=0.0, rank=8, keep=2, out="runs/linear",
              linear={"dim": 40, "true_rank": 6, "decay": 0.5})
TASKS = {
    "rt-distill": dict(config="examples/configs/rt_distill.toml", ranks=(2, 4, 8, 16),
                       pilots=((2, 2), (16, 16), (16, 4)), pilot_seeds=1),
    "rt-minilm": dict(config="examples/configs/rt_minilm.toml", ranks=(2, 4, 8, 16),
                      pilots=((2, 2), (16, 16), (16, 4)), pilot_seeds=1),
    "linear": dict(config=None, ranks=(1, 2, 3, 4, 6, 8), pilots=((1, 1), (8, 8), (8, 2)), pilot_seeds=3),
}
RATIOS = (0.25, 0.5, 1.0)
#: The plan's V grid: three V around the tsfa runs' V = 1 (each simulated V runs the exact
#: drift-plus-penalty allocator for every simulated rank, about 1–2 s per round on 2 cores).
OFFLINE_PLAN = dict(v_grid=(0.3, 1.0, 3.0), v_refine=0)
#: The plan's settings in ``--quick`` (the test suite): fewer draws and rounds, two replicate trajectories.
QUICK_PLAN = dict(draws=40, v_rounds=30, v_refine=0, online_replicates=2)
#: Bootstrap replicates in ``--quick`` (the test suite).
QUICK_BOOTS = 10


def base_config(task: str) -> RunConfig:
    spec = TASKS[task]
    return RunConfig(**LINEAR) if spec["config"] is None else RunConfig.from_toml(ROOT / spec["config"])


def cells(ranks) -> list[tuple[int, int]]:
    out = []
    for r in ranks:
        for q in RATIOS:
            k = int(keep_from_ratio(r, q))
            if (r, k) not in out:
                out.append((r, k))
    return out


def matches(h: History, cfg: RunConfig) -> bool:
    """A stored run made with this configuration (settings it predates take their defaults)."""
    defaults = RunConfig().to_dict()
    return len(h.rounds) == cfg.rounds and all(h.config.get(k, defaults[k]) == v for k, v in cfg.to_dict().items())


def get_run(cfg: RunConfig, log) -> History:
    try:
        h = History.load(cfg.out)
        if matches(h, cfg):
            return h
    except (FileNotFoundError, ValueError):
        pass
    t0 = time.perf_counter()
    h = run(cfg, progress=False)
    log(f"ran {Path(cfg.out).name}: final {loss_curve(h)[0][-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    return h


def ci95(x) -> float:
    x = np.asarray(x, dtype=float)
    return float(student_t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else math.nan


def seed_mean_prediction(cal, r, k, T, known, runs: int = 1) -> Prediction:
    """The cell's predicted mean curve: each seed's prediction from its own known start (and
    F* + ε(r) on linear), averaged over the seeds, band ends too; the band is for one run's
    curve (``runs`` = 1) or for the mean of ``runs`` runs."""
    preds = [cal.predict(r, k, T, start=start, base=base, runs=runs) for start, base in known]
    avg = lambda name: np.mean([getattr(p, name) for p in preds], axis=0)  # noqa: E731
    return Prediction(predicted=avg("predicted"), low=avg("low"), high=avg("high"), rank_term=avg("rank_term"),
                      speed=preds[0].speed, level=preds[0].level)


def run_namer(task: str, runs_dir: Path):
    """The task's base configuration and the configuration of each stored run, by name."""
    base, folder = base_config(task), runs_dir / task
    cfg_of = lambda strategy, r, k, s, tag="", **kw: base.replace(  # noqa: E731
        strategy=strategy, rank=r, keep=k, seed=s, out=str(folder / f"{strategy}{tag}_r{r}_k{k}_s{s}"), **kw)
    return base, cfg_of


def pilot_cells(task: str, seeds, cfg_of, log, pilot_seeds=None):
    """The pilot runs (reused when stored), the task's spectrum (exact on linear, a pilot
    gradient otherwise), the loss floor and the number of pilot seeds."""
    spec = TASKS[task]
    n_pilot = pilot_seeds or spec["pilot_seeds"]
    pilots = [get_run(cfg_of("fixed", r, k, s), log) for r, k in spec["pilots"] for s in seeds[:n_pilot]]
    pilot_task = make_task(cfg_of("fixed", *spec["pilots"][-1], seeds[0]))
    floor = float(linear_optimum(pilot_task)["floor"]) if task == "linear" else 0.0
    return pilots, task_spectrum(pilot_task), floor, n_pilot


def offline_only(task: str, seeds: list[int], runs_dir: Path, log, *, pilot_seeds=None, initial_queue="auto",
                 quick=False, pilot_rounds=None) -> dict:
    """The offline check: the pilot cells (the first ``pilot_rounds`` rounds of each, None = all)
    and ``tsfa`` per rank, without the held-out grid; :func:`study` adds it on request."""
    base, cfg_of = run_namer(task, runs_dir)
    pilots, spectrum, floor, n_pilot = pilot_cells(task, seeds, cfg_of, log, pilot_seeds)
    return offline_check(task, base, cfg_of, pilots, seeds, log,
                         dict(spectrum=spectrum, floor=floor, boots=QUICK_BOOTS if quick else 100, rng=0,
                              rounds=pilot_rounds),
                         pilot_seeds=n_pilot, initial_queue=initial_queue,
                         **(QUICK_PLAN if quick else OFFLINE_PLAN))


def study(task: str, seeds: list[int], runs_dir: Path, log, *, pilot_rounds=None, offline=False, pilot_seeds=None,
          quick=False, initial_queue="auto"):
    spec = TASKS[task]
    grid = cells(spec["ranks"])
    base, cfg_of = run_namer(task, runs_dir)
    runs = {(r, k, s): get_run(cfg_of("fixed", r, k, s), log) for s in seeds for r, k in grid}
    pilots, spectrum, floor, n_pilot = pilot_cells(task, seeds, cfg_of, log, pilot_seeds)
    cal = fit_curve(pilots, spectrum, floor=floor, boots=QUICK_BOOTS if quick else 100, rng=0, rounds=pilot_rounds)
    log(f"{task}: {cal.summary()}")
    T = base.rounds
    known = {}  # what each seed's run knows before training: its start loss (and on linear F* + ε(r))
    for r, k in grid:
        for s in seeds:
            base_rs = None
            if task == "linear":
                opt = linear_optimum(LinearTask(cfg_of("fixed", r, k, s)))
                base_rs = float(opt["floor"]) + float(rank_term(opt["spectrum"], r))
            known[(r, k, s)] = (float(loss_curve(runs[(r, k, s)])[0][0]), base_rs)
    rows, curves = [], {}
    for r, k in grid:
        measured = np.array([loss_curve(runs[(r, k, s)])[0] for s in seeds])
        mean = measured.mean(axis=0)
        pred = seed_mean_prediction(cal, r, k, T, [known[(r, k, s)] for s in seeds])
        pred_mean = seed_mean_prediction(cal, r, k, T, [known[(r, k, s)] for s in seeds], runs=len(seeds))
        is_pilot = (r, k) in spec["pilots"]
        curves[(r, k)] = (pred, pred_mean, measured)
        row = {"task": task, "rank": r, "keep": k, "pilot": is_pilot, "seeds": len(seeds),
               "measured_final": float(mean[-1]), "measured_final_ci95": ci95(measured[:, -1]),
               "predicted_final": float(pred.final), "band_low_final": float(pred.low[-1]),
               "band_high_final": float(pred.high[-1]), "coverage": pred.coverage(mean),
               "coverage_mean_band": pred_mean.coverage(mean),
               "speed": float(pred.speed), "template_rank": cal.model.pilots[int(cal.model.template(r, k))].rank,
               "rank_term": float(pred.rank_term)}
        if task == "linear":  # the exact bound on every run of the cell, every round
            holds, tight = True, []
            for s in seeds:
                h = runs[(r, k, s)]
                c = exact_constants(LinearTask(cfg_of("fixed", r, k, s)), h)
                terms = bound(c, schedule_from_history(h))
                gap = loss_curve(h)[0] - c.floor
                holds &= bool(np.all(terms.total >= gap - 1e-6 * np.maximum(gap, 1.0)))
                tight.append(float(terms.total[-1] / gap[-1]))
            row.update(exact_bound_holds=holds, exact_tightness_median=float(np.median(tight)))
        rows.append(row)
    held = [x for x in rows if not x["pilot"]]
    inside = sum(x["coverage"] * T for x in held) / (len(held) * T)
    summary = {
        "task": task, "seeds": seeds, "rounds": T, "pilots": [list(p) for p in spec["pilots"]],
        "pilot_seeds": seeds[:n_pilot], "pilot_rounds": pilot_rounds or T, "held_out_cells": len(held),
        "coverage_pooled": inside, "coverage_min": min(x["coverage"] for x in held),
        "cells_covered_90": sum(x["coverage"] >= 0.9 for x in held),
        "coverage_pooled_mean_band": sum(x["coverage_mean_band"] for x in held) / len(held),
        "cells_covered_90_mean_band": sum(x["coverage_mean_band"] >= 0.9 for x in held),
        "spearman_final": float(spearmanr([x["predicted_final"] for x in held],
                                          [x["measured_final"] for x in held]).correlation),
        "calibration": cal.summary(),
    }
    if task == "linear":
        summary["exact_bound_holds_every_run_every_round"] = all(x["exact_bound_holds"] for x in rows)
    if offline:
        summary["offline"] = offline_only(task, seeds, runs_dir, log, pilot_seeds=pilot_seeds,
                                          initial_queue=initial_queue, quick=quick, pilot_rounds=pilot_rounds)
    return rows, curves, cal, summary


def offline_check(task, base, cfg_of, pilots, seeds, log, fit_kw, pilot_seeds=1, initial_queue="auto",
                  **plan_kw) -> dict:
    """The offline plan against ``tsfa`` at every rank under the same τ̄ (seconds), every run and
    the plan's simulated online stage starting from the queue ``initial_queue`` (0: the
    latency-blind first rounds; "auto": the least Q whose first allocation meets τ̄). The plan's
    calibration adds an online pilot to the template pilots: ``tsfa`` at the largest rank on
    the first ``pilot_seeds`` seeds, averaged (its skipping identifies the participation cost ψ)."""
    from fedloop.design import plan_for
    from fedloop.server import Server

    probe = Server(base.replace(out=str(Path(cfg_of("tsfa", base.rank, base.keep, seeds[0]).out).parent / "probe")))
    tau = probe.tau_bar
    ranks = TASKS[task]["ranks"]
    tag = "" if initial_queue == 0 else f"-q0{initial_queue}"  # runs of Q(0) = 0 keep their folder names
    tsfa_runs = {(r, s): get_run(cfg_of("tsfa", r, max(1, r // 2), s, tag=tag, latency_budget_s=tau,
                                        initial_queue=initial_queue), log)
                 for r in ranks for s in seeds}
    finals = {r: [loss_curve(tsfa_runs[(r, s)])[0][-1] for s in seeds] for r in ranks}
    order = sorted(ranks, key=lambda r: np.mean(finals[r]))
    online = [tsfa_runs[(max(ranks), s)] for s in seeds[:pilot_seeds]]
    cal = fit_curve(pilots, online_pilot=online, data_weight=probe.weights, **fit_kw)
    log(f"{task}: offline calibration: {cal.summary()}")
    plan, _, _ = plan_for(base.replace(strategy="tsfa", latency_budget_s=tau, initial_queue=initial_queue),
                          pilot=pilots[-1], ranks=ranks,
                          calibration=cal, latency_model="online", **plan_kw)
    log(f"{task}: offline plan: {plan.message}")
    log(plan.format_online_table())
    lat = {r: [np.mean([x["latency_s"] for x in tsfa_runs[(r, s)].rounds]) / tau for s in seeds] for r in ranks}
    return {"latency_budget_s": tau, "initial_queue": initial_queue,
            "measured_latency_over_budget_by_rank": {str(r): float(np.mean(lat[r])) for r in ranks},
            "plan_simulated_latency_over_budget": plan.expected_latency_s / tau,
            "online_pilot": [max(ranks), seeds[:pilot_seeds]], "calibration": cal.summary(),
            "plan_rank": plan.rank, "plan_status": plan.status.value,
            "plan_relative_v": plan.relative_v, "plan_predicted_loss": plan.predicted_loss,
            "plan_message": plan.message, "measured_final_by_rank": {str(r): float(np.mean(finals[r])) for r in ranks},
            "measured_ci95_by_rank": {str(r): ci95(finals[r]) for r in ranks}, "best_two_ranks": order[:2],
            "plan_among_best_two": plan.rank in order[:2]}


def figure(task, rows, curves, summary, path: Path):
    held = [x for x in rows if not x["pilot"]]
    pil = [x for x in rows if x["pilot"]]
    n = len(rows) + 1
    cols = 4
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(3.6 * cols, 2.9 * math.ceil(n / cols)),
                             squeeze=False)
    label = "training objective" if task == "linear" else "test loss"
    for ax, x in zip(axes.flat, pil + held, strict=False):
        pred, pred_mean, measured = curves[(x["rank"], x["keep"])]
        t = np.arange(pred.predicted.shape[-1])
        ax.fill_between(t, pred.low, pred.high, color="tab:blue", alpha=0.15, label="90 % band, one run")
        ax.fill_between(t, pred_mean.low, pred_mean.high, color="tab:blue", alpha=0.3,
                        label=f"90 % band, mean of {len(measured)}")
        ax.plot(t, pred.predicted, color="tab:blue", lw=1.5, label="predicted")
        for m in measured:
            ax.plot(t, m, color="grey", lw=0.6, alpha=0.5)
        ax.plot(t, measured.mean(axis=0), color="k", lw=1.5, ls="--", label=f"measured mean ({len(measured)} seeds)")
        kind = "pilot cell" if x["pilot"] else (f"held out: in band {x['coverage']:.0%} "
                                                f"(mean band {x['coverage_mean_band']:.0%})")
        ax.set_title(f"r = {x['rank']}, s = {x['keep']} — {kind}", fontsize=8)
        lo = min(float(np.min(pred.low[1:])), float(np.min(measured[:, 1:])))
        hi = max(float(np.max(pred.high[2:])), float(np.max(measured[:, 2:])))
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        ax.set_xlabel("round", fontsize=7)
        ax.set_ylabel(label, fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=6, loc="upper right")
    ax = axes.flat[len(rows)]
    prd = np.array([x["predicted_final"] for x in held])
    emp = np.array([x["measured_final"] for x in held])
    err = np.array([x["measured_final_ci95"] for x in held])
    ax.errorbar(prd, emp, yerr=err, fmt="o", color="tab:blue", ms=4)
    for x in held:
        ax.annotate(f"r{x['rank']}s{x['keep']}", (x["predicted_final"], x["measured_final"]), fontsize=6,
                    xytext=(2, 2), textcoords="offset points")
    lo, hi = min(prd.min(), emp.min()), max(prd.max(), emp.max())
    ax.plot([lo, hi], [lo, hi], color="grey", ls=":", lw=1)
    ax.set_xlabel("predicted final", fontsize=7)
    ax.set_ylabel("measured final (mean, 95 % CI)", fontsize=7)
    ax.set_title(f"Spearman {summary['spearman_final']:.2f} over {len(held)} held-out cells", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    for extra in list(axes.flat)[len(rows) + 1:]:
        extra.axis("off")
    seeds = ", ".join(map(str, summary["pilot_seeds"]))
    fig.suptitle(f"{task}: curves predicted from {len(summary['pilots'])} pilot cells (seeds "
                 f"{seeds}; {summary['pilot_rounds']} rounds) against the mean of "
                 f"{len(summary['seeds'])} seeds: inside the one-run band at {summary['coverage_pooled']:.0%} "
                 f"of held-out rounds, inside the {len(summary['seeds'])}-run-mean band at "
                 f"{summary['coverage_pooled_mean_band']:.0%}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(TASKS), default="linear")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=None, help="default: 0 (10 on linear)")
    ap.add_argument("--pilot-rounds", type=int, default=None, help="use the pilots' first rounds only")
    ap.add_argument("--pilot-seeds", type=int, default=None, help="seeds per pilot cell (default: 1; 3 on linear)")
    ap.add_argument("--offline", action="store_true", help="also check the offline plan against tsfa per rank")
    ap.add_argument("--offline-only", action="store_true",
                    help="only the offline check (pilots and tsfa per rank; no held-out grid)")
    ap.add_argument("--initial-queue", default="auto", type=lambda v: v if v == "auto" else float(v),
                    help="Q(0) of the offline check's tsfa runs and of its plan: 'auto' (default) or seconds")
    ap.add_argument("--runs", default="runs/predictions")
    ap.add_argument("--out", default="docs/figures")
    ap.add_argument("--quick", action="store_true", help="a tiny linear study (for the test suite)")
    args = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    first = args.first_seed if args.first_seed is not None else (10 if args.task == "linear" else 0)
    seeds = list(range(first, first + args.seeds))
    if args.quick:
        LINEAR.update(rounds=8, clients=4)
        TASKS["linear"].update(ranks=(1, 2, 4), pilots=((1, 1), (4, 4), (4, 1)), pilot_seeds=2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = args.task.replace("-", "_") + ("" if args.pilot_rounds is None else f"_pilot{args.pilot_rounds}")
    if args.offline_only:
        check = offline_only(args.task, seeds, Path(args.runs), log, pilot_seeds=args.pilot_seeds,
                             initial_queue=args.initial_queue, quick=args.quick, pilot_rounds=args.pilot_rounds)
        (out / f"offline_check_{suffix}.json").write_text(json.dumps(check, indent=1))
        print(json.dumps({k: v for k, v in check.items() if k != "calibration"}, indent=1))
        return 0
    rows, curves, _, summary = study(args.task, seeds, Path(args.runs), log, pilot_rounds=args.pilot_rounds,
                                     offline=args.offline, pilot_seeds=args.pilot_seeds, quick=args.quick,
                                     initial_queue=args.initial_queue)
    figure(args.task, rows, curves, summary, out / f"predictions_{suffix}.png")
    write_csv(out / f"predictions_{suffix}.csv", rows)
    (out / f"predictions_{suffix}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "calibration"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
