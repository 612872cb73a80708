"""Communication efficiency under the comparison protocol: value precision, error feedback, broadcasts.

SOFT at a fixed keep of r/4 (``fixed``), with and without client error feedback
(``error_feedback="rotated"``, docs/model.md "Error feedback") and at 8 bits per value, beside
the dense references (``ideal``, ``fedit``), the frozen adapter (``head``), a smaller dense rank
at the same bits (``lowrank``), and the other compressors at SOFT's bits with error feedback
(element-wise ``topk``, ``random`` components), and TSFA with the server's broadcast compressed
to 8 or 4 bits a value (``downlink_value_bits``; ``-half``: r/2 components of it). Paired seeds,
mean ± 95 % CI (``fedloop.benchmark``).

Reported: each variant's final metric, its uplink bits, the bits to reach the better dense
reference's final metric less δ, and the paired differences at equal uplink bits between
SOFT with error feedback and the other compressors with it.

    .venv/bin/python examples/10_communication.py --task linear --seeds 5 --out docs/figures

``--task rt-distill`` runs the discriminating testbed's set of variants, ``--task rt-minilm``
(accuracy) the reference, the frozen adapter and TSFA with error feedback at 4 bits;
``--variants a,b`` runs and reports a subset (outputs named ``..._subset``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from fedloop import RunConfig  # noqa: E402
from fedloop.benchmark import METRICS, benchmark, first_reach, mean_ci, metric_within  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: The linear task: plain SGD (the algorithm the bound analyses), rank 8, keep 2 = r/4.
LINEAR = dict(task="linear", clients=10, rounds=30, rank=8, keep=2, local_steps=5, batch_size=32, lr=0.05,
              optimizer="sgd", momentum=0.0, penalty=0.0, predict_every=0, checkpoint_every=10)
EF = {"error_feedback": "rotated"}
VARIANTS = {
    "fixed+ef": {"strategy": "fixed", **EF},
    "fixed+ef+q8": {"strategy": "fixed", "value_bits": 8, **EF},
    "fixed+ef+q4": {"strategy": "fixed", "value_bits": 4, **EF},
    "fixed+ef-unrotated": {"strategy": "fixed", "error_feedback": "fixed"},  # residual left in the old basis
    "topk+ef": {"strategy": "topk", **EF},
    "random+ef": {"strategy": "random", **EF},
    "tsfa+ef+q8": {"strategy": "tsfa", "value_bits": 8, **EF},
    "tsfa+ef+q4": {"strategy": "tsfa", "value_bits": 4, **EF},
    "tsfa+ef+auto": {"strategy": "tsfa", "value_bits": "auto", **EF},  # the allocator chooses q with s
    "tsfa+ef+auto-budget0.25": {"strategy": "tsfa", "value_bits": "auto", "budget_factor": 0.25, **EF},  # τ̄ halved
    # the downlink compressed too: the server broadcasts the adapter's change at 8 or 4 bits a value
    "tsfa+ef+q4+dl8": {"strategy": "tsfa", "value_bits": 4, "downlink_value_bits": 8, **EF},
    "tsfa+ef+q4+dl4": {"strategy": "tsfa", "value_bits": 4, "downlink_value_bits": 4, **EF},
    "fixed+ef+q4+dl4": {"strategy": "fixed", "value_bits": 4, "downlink_value_bits": 4, **EF},
    # ... and the r/2 components of the adapter's change that changed most (the rest waits)
    "tsfa+ef+q4+dl4-half": {"strategy": "tsfa", "value_bits": 4, "downlink_value_bits": 4, "downlink_keep": 4, **EF},
}
ORDER = ("ideal", "fedit", "head", "lowrank", "topk", "fixed", "fixed+ef", "fixed+ef-unrotated", "fixed+ef+q8",
         "topk+ef", "random+ef", "tsfa+ef+q8", "tsfa+ef+auto", "flasc")
#: On rt-distill (1–5 min a run on 2 cores) the set the claims need: the references, the frozen
#: adapter, SOFT with error feedback, TSFA at 8 bits with it, and the other compressors with it.
ORDER_DISTILL = ("ideal", "fedit", "head", "lowrank", "fixed+ef", "fixed+ef+q8", "fixed+ef+q4", "tsfa+ef+q8",
                 "tsfa+ef+q4", "tsfa+ef+auto", "tsfa+ef+auto-budget0.25", "tsfa+ef+q4+dl8", "tsfa+ef+q4+dl4",
                 "tsfa+ef+q4+dl4-half", "fixed+ef+q4+dl4", "topk+ef", "random+ef", "flasc")
#: On rt-minilm (the user-facing task; accuracy, 1 point = 0.01): the reference, the frozen adapter
#: and TSFA with error feedback at 4 bits, the headline setting of rt-distill.
ORDER_MINILM = ("fedit", "head", "tsfa+ef+q4", "tsfa+ef+q4+dl8")
QUICK = ("fedit", "fixed", "fixed+ef", "fixed+ef+q8", "topk+ef")


def base_config(task: str) -> RunConfig:
    if task == "linear":
        return RunConfig(**LINEAR)
    cfg = RunConfig.from_toml(ROOT / f"examples/configs/{task.replace('-', '_')}.toml")
    return cfg.replace(keep=max(1, cfg.rank // 4), predict_every=0)


def paired_at_equal_bits(bench, a: str, b: str) -> tuple[float, float, float]:
    """Mean and 95 % CI of (a − b) on the same seeds, each after its last round within the pair's
    common uplink budget (the smaller of the two mean totals), and that budget in bits."""
    m = bench.metric
    budget = min(float(np.mean([bench.runs[(s, k)].total_uplink_bits for k in bench.seeds])) for s in (a, b))
    d = [metric_within(bench.runs[(a, k)], m, "uplink_bits", budget)
         - metric_within(bench.runs[(b, k)], m, "uplink_bits", budget) for k in bench.seeds]
    return (*mean_ci(d), budget)


def paired_saving(bench, ref: str, s: str, columns=("uplink_bits",)) -> dict:
    """fedit's bits to the target over ``s``'s, seed by seed (the sum of ``columns``: uplink, or
    uplink and downlink): mean and 95 % CI over the seeds where both reach the target, and how
    many those are."""
    def bits(strategy, k):
        hit = first_reach(bench.runs[(strategy, k)], bench.metric, bench.target)
        return None if hit["uplink_bits"] is None else sum(hit[c] for c in columns)

    ratios = []
    for k in bench.seeds:
        a, b = bits(ref, k), bits(s, k)
        if a is not None and b:
            ratios.append(a / b)
    mean, ci = mean_ci(ratios) if ratios else (float("nan"), float("nan"))
    return {"mean": mean, "ci95": ci, "seeds": len(ratios)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("linear", "rt-distill", "rt-minilm"), default="linear")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--runs", default="runs/communication")
    ap.add_argument("--out", default="runs/communication")
    ap.add_argument("--quick", action="store_true", help="a short run of five variants (the test suite)")
    ap.add_argument("--variants", default=None,
                    help="comma-separated subset of the task's variants to run and report (default: all)")
    ap.add_argument("--tag", default="subset", help="the outputs' name suffix for a --variants subset")
    args = ap.parse_args(argv)
    cfg = base_config(args.task)
    order = {"linear": ORDER, "rt-distill": ORDER_DISTILL, "rt-minilm": ORDER_MINILM}[args.task]
    if args.quick:
        cfg = cfg.replace(rounds=4, clients=4, linear={"dim": 16, "samples": 64, "test_samples": 256})
        order = QUICK
    if args.variants:
        chosen = tuple(v.strip() for v in args.variants.split(","))
        unknown = [v for v in chosen if v not in order]
        if unknown:
            ap.error(f"--variants: {', '.join(unknown)} not among {', '.join(order)}")
        order = chosen
    bench = benchmark(cfg, order, args.seeds, out=Path(args.runs) / args.task, variants=VARIANTS, progress=False)
    rows = {r["strategy"]: r for r in bench.summary}
    metric = METRICS[cfg.task]
    lower = not metric.higher_is_better
    print(f"{args.task}: {len(bench.seeds)} seeds; reference {bench.reference}, target {bench.target:.4g}; "
          f"equal uplink bits {bench.equal_bits / 1e6:.3g} Mbit")
    print(f"{'variant':18s} {'final':>18s} {'uplink Mbit':>12s} {'downlink Mbit':>14s} {'bits to target (Mbit)':>24s} "
          f"{'at equal bits':>18s} {'lat/τ̄':>6s}")
    for s in order:
        r = rows[s]
        reach = (f"{r['bits_to_target_mean'] / 1e6:.3g} ± {r['bits_to_target_ci'] / 1e6:.2g} ({r['reached']}/"
                 f"{r['seeds']})" if r["reached"] else f"not reached (0/{r['seeds']})")
        print(f"{s:18s} {r['final_mean']:10.4f} ± {r['final_ci']:.4f} {r['uplink_bits_mean'] / 1e6:12.3g} "
              f"{r['downlink_bits_mean'] / 1e6:14.3g} {reach:>24s} {r['at_equal_bits_mean']:10.4f} ± "
              f"{r['at_equal_bits_ci']:.4f} {r['latency_over_budget_mean']:6.2f}")
    summary = {"task": args.task, "seeds": list(bench.seeds), "reference": bench.reference, "target": bench.target,
               "equal_bits": bench.equal_bits, "rows": bench.summary, "paired_at_equal_bits": {}}
    soft_ef = "fixed+ef"
    for other in ("topk+ef", "random+ef", "fixed", "fixed+ef-unrotated"):
        if other in rows and soft_ef in rows:
            mean, ci, budget = paired_at_equal_bits(bench, soft_ef, other)
            better = (mean < -ci) if lower else (mean > ci)
            summary["paired_at_equal_bits"][other] = {"mean": mean, "ci95": ci, "budget_bits": budget,
                                                      "soft_ef_better_beyond_ci": better}
            print(f"{soft_ef} − {other} within {budget / 1e6:.3g} Mbit: {mean:+.4f} ± {ci:.4f} "
                  f"({'better' if better else 'not better'} beyond the CI)")
    ref = rows.get("fedit")
    if ref:
        if soft_ef in rows:
            rel = rows[soft_ef]["final_mean"] / ref["final_mean"] - 1
            summary["soft_ef_vs_fedit_final_relative"] = rel
            print(f"{soft_ef} final vs fedit: {100 * rel:+.1f} %")
        for s in (soft_ef, "fixed+ef+q8", "fixed+ef+q4", "tsfa+ef+q8", "tsfa+ef+q4", "tsfa+ef+auto",
                  "tsfa+ef+auto-budget0.25", "tsfa+ef+q4+dl8", "tsfa+ef+q4+dl4", "tsfa+ef+q4+dl4-half",
                  "fixed+ef+q4+dl4"):
            if rows.get(s, {}).get("reached") and ref["reached"]:
                ratio = ref["bits_to_target_mean"] / rows[s]["bits_to_target_mean"]
                summary[f"{s}_bits_to_target_saving_vs_fedit"] = ratio
                paired = paired_saving(bench, "fedit", s)
                summary[f"{s}_paired_saving_vs_fedit"] = paired
                both = paired_saving(bench, "fedit", s, ("uplink_bits", "downlink_bits"))
                summary[f"{s}_paired_saving_both_directions_vs_fedit"] = both
                print(f"{s}: {ratio:.2f}× fewer uplink bits to the target than fedit (ratio of the means); "
                      f"per seed {paired['mean']:.2f} ± {paired['ci95']:.2f} over the {paired['seeds']} seeds where "
                      f"both reach it; uplink + downlink {both['mean']:.2f} ± {both['ci95']:.2f} (downlink to the "
                      f"target {rows[s]['downlink_to_target_mean'] / 1e6:.3g} Mbit, fedit's "
                      f"{ref['downlink_to_target_mean'] / 1e6:.3g})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.tag.replace("-", "").replace("_", "").isalnum():
        ap.error(f"--tag: letters, digits, - and _ only; got {args.tag!r}")
    name = f"communication_{args.task.replace('-', '_')}" + (f"_{args.tag}" if args.variants else "")
    (out / f"{name}.json").write_text(
        json.dumps(summary, indent=1, default=lambda x: None if isinstance(x, float) and not np.isfinite(x) else x))
    fig = Path(bench.out) / "benchmark.png"
    (out / f"{name}.png").write_bytes(fig.read_bytes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
