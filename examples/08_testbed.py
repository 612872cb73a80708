"""Does the adapter carry the learning, and does the rank matter? The testbed criteria, measured.

For each candidate task it runs, paired by seed (``fedloop.benchmark``): ``ideal`` at the
default rank against the frozen-adapter baseline ``head``, and dense ``fedit`` at r = 16
against r = 2. A task discriminates when

* ideal beats head by ≥ 5 accuracy points, or by a test-loss gap ≥ 5 seed standard deviations;
* fedit at r = 16 and at r = 2 differ by more than 2 seed standard deviations in the final metric;
* one 10-client run takes about 3 minutes or less on a 2-core CPU.

Candidates: ``rt-distill`` (examples/configs/rt_distill.toml), ``rt-minilm`` with the head
frozen at its random initialisation (only the adapter learns, LoRA lr 5e-3), and the
user-facing ``rt-minilm`` (head and adapter train). Writes ``testbed.csv`` and
``testbed.json`` to ``--out``; runs already in ``--runs`` are reused.

    python examples/08_testbed.py --seeds 3 --runs runs/testbed --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from fedloop import RunConfig
from fedloop.benchmark import METRICS, benchmark
from fedloop.history import write_csv

DEMO = dict(clients=10, rounds=20, local_steps=2, batch_size=8, max_length=32, test_size=300, budget_factor=0.5,
            rank=8, keep=2)
CANDIDATES = {
    "rt-distill": lambda: RunConfig.from_toml(Path(__file__).parent / "configs" / "rt_distill.toml"),
    "rt-minilm, head frozen": lambda: RunConfig(task="rt-minilm", train_head=False, lr=5e-3, **DEMO),
    "rt-minilm": lambda: RunConfig(task="rt-minilm", **DEMO),
}


def measure(name: str, base: RunConfig, seeds, runs: Path, progress: bool) -> dict:
    """The three criteria for one candidate (runs in ``runs/<name>/...``)."""
    folder = runs / name.replace(" ", "_").replace(",", "")
    t0 = time.perf_counter()
    main = benchmark(base, ("ideal", "head"), seeds, out=folder / f"r{base.rank}", progress=progress)
    per_run_s = (time.perf_counter() - t0) / (2 * len(seeds))
    ranks = {r: benchmark(base.replace(rank=r, keep=min(base.keep, r)), ("fedit",), seeds,
                          out=folder / f"r{r}", progress=progress) for r in (16, 2)}
    metric = METRICS[base.task]
    finals = {key: np.array([b.runs[(s, k)].rounds[-1][metric.column] for k in seeds])
              for key, b, s in (("ideal", main, "ideal"), ("head", main, "head"), ("r16", ranks[16], "fedit"),
                                ("r2", ranks[2], "fedit"))}
    acc = {key: np.array([b.runs[(s, k)].rounds[-1]["accuracy"] for k in seeds])
           for key, b, s in (("ideal", main, "ideal"), ("head", main, "head"))}
    sd = lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else float("nan")  # noqa: E731
    gap_points = 100 * float(acc["ideal"].mean() - acc["head"].mean())
    loss_gap = float(abs(finals["ideal"].mean() - finals["head"].mean()))
    loss_sd = max(sd(finals["ideal"]), sd(finals["head"]))
    rank_gap = float(finals["r16"].mean() - finals["r2"].mean())
    rank_sd = max(sd(finals["r16"]), sd(finals["r2"]))
    row = {"candidate": name, "metric": metric.column, "seeds": len(seeds),
           "ideal_final": float(finals["ideal"].mean()), "ideal_sd": sd(finals["ideal"]),
           "head_final": float(finals["head"].mean()), "head_sd": sd(finals["head"]),
           "ideal_accuracy": float(acc["ideal"].mean()), "head_accuracy": float(acc["head"].mean()),
           "adapter_gain_points": gap_points, "adapter_gap_in_sd": loss_gap / loss_sd if loss_sd > 0 else float("inf"),
           "r16_final": float(finals["r16"].mean()), "r16_sd": sd(finals["r16"]),
           "r2_final": float(finals["r2"].mean()), "r2_sd": sd(finals["r2"]),
           "rank_gap": rank_gap, "rank_gap_in_sd": abs(rank_gap) / rank_sd if rank_sd > 0 else float("inf"),
           "seconds_per_run": per_run_s}
    row["adapter_carries"] = bool(gap_points >= 5 or row["adapter_gap_in_sd"] >= 5)
    row["rank_matters"] = bool(row["rank_gap_in_sd"] > 2)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--rounds", type=int, help="override the rounds (short test runs)")
    p.add_argument("--runs", default="runs/testbed", help="folder for the runs (reused when present)")
    p.add_argument("--out", default="runs/testbed", help="folder for testbed.csv / testbed.json")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    seeds = tuple(range(args.seeds))
    rows = []
    for name in args.candidates:
        base = CANDIDATES[name]()
        if args.rounds:
            base = base.replace(rounds=args.rounds)
        row = measure(name, base, seeds, Path(args.runs), args.progress)
        rows.append(row)
        print(f"{name}: ideal {row['ideal_final']:.4f} ± {row['ideal_sd']:.4f} vs head {row['head_final']:.4f} "
              f"({row['metric']}; accuracy {row['ideal_accuracy']:.3f} vs {row['head_accuracy']:.3f}, "
              f"{row['adapter_gain_points']:+.1f} points, gap {row['adapter_gap_in_sd']:.1f} sd) | "
              f"r16 {row['r16_final']:.4f} ± {row['r16_sd']:.4f} vs r2 {row['r2_final']:.4f} ± {row['r2_sd']:.4f} "
              f"({row['rank_gap_in_sd']:.1f} sd) | {row['seconds_per_run']:.0f} s/run | adapter carries: "
              f"{row['adapter_carries']}, rank matters: {row['rank_matters']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "testbed.csv", rows)
    (out / "testbed.json").write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
