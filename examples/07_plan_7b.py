"""Offline design (TSFA stage 1) for a Llama-2-7B q/v deployment, from module shapes alone.

No weights and no training: the 64 adapted modules (q_proj and v_proj of 32 layers,
4096×4096 each) come from the model's config (``tsfa.llama_7b_qv``). The cell is the
spec §9 default (K = 20 clients in a 500 m cell, 20 MHz, Rayleigh fading), with devices that
can fine-tune a 7B model (50–400 TFLOP/s, a stated assumption), 8 samples × 256 tokens of
local training per round, a 1 Gbit/s downlink broadcast, τ̄ = 15 s, a per-round cap of
45 s (clients that cannot make it skip the round) and a 4-hour training budget.

**Predicted loss: the convergence bound with assumed constants.** No 7B model can be
trained here, so the bound's constants are stated, not calibrated (on a real deployment,
calibrate them with ``convergence.calibrate`` on a short pilot and estimate the spectrum
with ``convergence.estimate_spectrum``):

* ε(r) from an assumed power-law spectrum per module, λ_i = (0.5/64) · i^(−1.3), i = 1..4096,
  for each of the 64 modules (so Σ over modules of ½ Σ_{i>r} λ_i is the rank term);
* η = 1e-4, E = 8 local steps, μ = 4 (the initial gap of 2 halves every ~90 rounds),
  L = L_W = 1, σ² = 0.1, G² = 1, κ = 1, γ = 1, F* = 0;
* a per-round dense update energy of 2e-5 (units of B·A) and covariance 1e-8; the
  sparsification error at keep s is that energy times the spectrum's share beyond s
  (``convergence.predict_schedule``).

The script prints the plan and the table of every candidate and writes ``plan_7b.csv``
and ``plan_7b.png`` to ``--out``.

    python examples/07_plan_7b.py [--quick] [--draws 200] [--out runs/examples]
"""

from __future__ import annotations

import argparse
import pathlib
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import convergence  # noqa: E402
import tsfa  # noqa: E402
from fedloop.history import write_csv  # noqa: E402

RANKS = (1, 2, 4, 8, 16, 32, 64)
KEEP_RATIOS = (0.125, 0.25, 0.5, 1.0)
LATENCY_BUDGET_S = 15.0
MAX_LATENCY_S = 45.0
TIME_BUDGET_S = 4 * 3600.0
DOWNLINK_RATE_BPS = 1e9
SPECTRUM = np.tile((0.5 / 64) * np.arange(1, 4097, dtype=float) ** -1.3, (64, 1))  # assumed, see the docstring
CONSTANTS = convergence.BoundConstants(step_size=1e-4, local_steps=8, smoothness=1.0, product_smoothness=1.0,
                                       noise=0.1, gradient_bound=1.0, pl=4.0, initial_gap=2.0, spectrum=SPECTRUM,
                                       source="assumed for a 7B plan (examples/07_plan_7b.py)")
predict = convergence.make_predictor(CONSTANTS, {"update_energy": 2e-5, "covariance_sq": 1e-8})


def plan(*, draws: int = 200, v_rounds: int = 100, v_grid=tsfa.DEFAULT_V_GRID, seed: int = 0) -> tsfa.OfflinePlan:
    cell = tsfa.Cell(compute_flops_per_s_range=(50e12, 400e12))
    clients = cell.sample_clients(20, rng=seed)
    flops = 8 * tsfa.training_flops_per_sample(6.74e9, 256)  # 8 samples of 256 tokens per round
    problem = tsfa.OfflineProblem(
        system=tsfa.SystemSpec(tsfa.llama_7b_qv(), cell, clients, clients.compute_time_s(flops),
                               downlink_rate_bps=DOWNLINK_RATE_BPS),
        grid=tsfa.CandidateGrid(ranks=RANKS, keep_ratios=KEEP_RATIOS),
        budgets=tsfa.Budgets(LATENCY_BUDGET_S, time_budget_s=TIME_BUDGET_S, max_latency_s=MAX_LATENCY_S),
        saa=tsfa.SaaSettings(draws=draws),
        vsweep=tsfa.VSweepSettings(v_rounds=v_rounds, v_grid=v_grid),
    )
    return tsfa.design_offline(problem, predict, rng=seed + 1)


def figure(result: tsfa.OfflinePlan, path: pathlib.Path) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
    ranks = sorted({c.rank for c in result.table})
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(ranks)))
    for r, col in zip(ranks, colours, strict=True):
        rows = [c for c in result.table if c.rank == r]
        x = [c.latency_mean_s for c in rows]
        err = [[c.latency_mean_s - c.latency_low_s for c in rows], [c.latency_high_s - c.latency_mean_s for c in rows]]
        ax.errorbar(x, [c.predicted_loss for c in rows], xerr=err, fmt="o-", color=col, ms=4, label=f"r = {r}")
    c = result.chosen_candidate
    if c is not None:
        ax.plot(c.latency_mean_s, c.predicted_loss, "r*", ms=16, label=f"chosen (r = {c.rank}, s = {c.keep})")
    ax.axvline(result.latency_budget_s, color="k", ls="--", lw=1, label="τ̄")
    ax.set_xlabel("expected round latency, s (SAA mean, 95% CI)")
    ax.set_ylabel("predicted final loss (bound, assumed constants)")
    ax.set_title(f"Llama-2-7B q/v, 20 MHz, K = 20: {len(result.table)} candidates, {result.draws} draws")
    ax.legend(fontsize=8)
    if result.v_sweep:
        v = [p.relative_v for p in result.v_sweep]
        bx.semilogx(v, [p.time_average_latency_s for p in result.v_sweep], "o-", label="simulated latency, s")
        bx.axhline(result.latency_budget_s, color="k", ls="--", lw=1, label="τ̄")
        bx2 = bx.twinx()
        bx2.semilogx(v, [p.average_dropped_energy for p in result.v_sweep], "s-", color="tab:orange",
                     label="dropped energy (of dense)")
        bx2.set_ylabel("dropped energy / dense energy")
        if result.relative_v is not None:
            bx.axvline(result.relative_v, color="r", lw=1, label=f"chosen V = {result.relative_v:.3g}")
        bx.set_xlabel("V (scale-free)")
        bx.set_ylabel("time-average latency, s")
        bx.set_title("V rule: least dropped energy with simulated latency ≤ τ̄")
        bx.legend(loc="center left", fontsize=8)
        bx2.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> tsfa.OfflinePlan:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="30 draws, a 3-point V sweep over 20 rounds (for tests)")
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--out", default="runs/examples")
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(draws=30, v_rounds=20, v_grid=(0.1, 1.0, 10.0)) if args.quick else dict(draws=args.draws)
    t0 = time.perf_counter()
    result = plan(**kw)
    elapsed = time.perf_counter() - t0
    print(f"{result.status.value}: {result.message}")
    print(f"design time {elapsed:.2f} s ({result.backend})\n")
    print(result.format_table())
    rows = result.table_rows()
    write_csv(out / "plan_7b.csv", rows)
    figure(result, out / "plan_7b.png")
    print(f"\nwrote {out / 'plan_7b.csv'} and {out / 'plan_7b.png'}")
    return result


if __name__ == "__main__":
    main()
