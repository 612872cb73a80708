"""SOFT vs naive sparsification at equal uplink bits, in real federated training.

On the ``linear`` task (default) or ``rt-minilm``, the same seeds are trained with
``fixed`` (SOFT: the s most important rank components, near-orthogonal factors), ``random``
(s random rank components), ``topk`` (element-wise top-k of ΔA and ΔB at SOFT's bit
budget, positions counted), ``svd`` (the exact rank-s truncation of each client's product
update: the oracle SOFT replaces) and ``fedit`` (dense). For each, the loop measures per
round the aggregate's product error ‖W_{t+1} − B̄Ā‖² (what sparsification lost against
the dense average, ``sparsification_error``) relative to the dense update energy, the
uplink bits and the final loss.

Writes <out>/soft_vs_naive.png and soft_vs_naive.csv.

    python examples/03_soft_vs_naive.py [--task linear] [--keep 1 2] [--seeds 0 1 2] [--out runs/examples]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from convergence.calibration import loss_curve  # noqa: E402
from fedloop import RunConfig, run  # noqa: E402
from fedloop.history import write_csv  # noqa: E402

STRATEGIES = ("fixed", "random", "topk", "svd", "fedit")
LABELS = {"fixed": "SOFT (top-s components)", "random": "random components", "topk": "element-wise top-k",
          "svd": "SVD truncation (oracle)", "fedit": "dense (fedit)"}
BASE = {"linear": dict(task="linear", clients=10, rounds=30, rank=4, local_steps=4, batch_size=16, lr=0.02),
        "rt-minilm": dict(task="rt-minilm", clients=10, rounds=12, rank=8, local_steps=2, batch_size=8,
                          max_length=32, test_size=300)}


def measure(task: str, keeps, seeds, out: Path, *, rounds=None, clients=None, log=print) -> list[dict]:
    rows = []
    for keep in keeps:
        for strategy in STRATEGIES:
            if strategy == "fedit" and keep != keeps[0]:
                continue
            for seed in seeds:
                base = dict(BASE[task])
                if rounds:
                    base["rounds"] = rounds
                if clients:
                    base["clients"] = clients
                cfg = RunConfig(**base, strategy=strategy, keep=keep, seed=seed,
                                out=str(out / "runs" / f"{task}_{strategy}_k{keep}_s{seed}"))
                h = run(cfg, progress=False)
                rel = h.column("sparsification_error") / np.maximum(h.column("update_energy"), 1e-300)
                rows.append({"task": task, "strategy": strategy, "keep": keep if strategy != "fedit" else cfg.rank,
                             "seed": seed, "uplink_mbit": h.total_uplink_bits / 1e6,
                             "relative_product_error": float(np.nanmean(rel)),
                             "final_loss": float(loss_curve(h)[0][-1]), "final_accuracy": h.final_accuracy})
                log(f"{task} {strategy:>6} keep {keep}: seed {seed} error {rows[-1]['relative_product_error']:.3f}, "
                    f"{rows[-1]['uplink_mbit']:.2f} Mbit, final loss {rows[-1]['final_loss']:.4f}")
    return rows


def summarise(rows):
    out = {}
    for r in rows:
        out.setdefault((r["strategy"], r["keep"]), []).append(r)
    return {k: {m: float(np.mean([x[m] for x in v])) for m in ("uplink_mbit", "relative_product_error", "final_loss")}
            | {"sd_loss": float(np.std([x["final_loss"] for x in v])), "n": len(v)} for k, v in out.items()}


def figure(rows, path: Path, task: str):
    s = summarise(rows)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4))
    for strategy in STRATEGIES:
        pts = sorted((k[1], v) for k, v in s.items() if k[0] == strategy)
        if not pts:
            continue
        x = [v["uplink_mbit"] for _, v in pts]
        mk = "*" if strategy == "fedit" else "o-"
        ax.plot(x, [v["relative_product_error"] for _, v in pts], mk, ms=10 if strategy == "fedit" else 6,
                label=LABELS[strategy])
        bx.errorbar(x, [v["final_loss"] for _, v in pts], yerr=[v["sd_loss"] for _, v in pts], fmt=mk,
                    ms=10 if strategy == "fedit" else 6, capsize=3, label=LABELS[strategy])
        for keep, v in pts:
            ax.annotate(f"s={keep}", (v["uplink_mbit"], v["relative_product_error"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("uplink per run (Mbit)")
    ax.set_ylabel("aggregate's product error / dense update energy\n(mean over rounds)")
    ax.set_title(f"{task}: what sparsification loses at equal bits", fontsize=10)
    bx.set_xlabel("uplink per run (Mbit)")
    bx.set_ylabel("final loss (mean ± sd over seeds)")
    bx.set_title(f"{task}: final loss", fontsize=10)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="linear", choices=list(BASE))
    ap.add_argument("--keep", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--clients", type=int, default=None)
    ap.add_argument("--out", default="runs/examples")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.task, args.keep, args.seeds, out, rounds=args.rounds, clients=args.clients)
    write_csv(out / "soft_vs_naive.csv", rows)
    figure(rows, out / "soft_vs_naive.png", args.task)
    for (strategy, keep), v in sorted(summarise(rows).items()):
        print(f"{strategy:>6} keep {keep}: {v['uplink_mbit']:.2f} Mbit, relative product error "
              f"{v['relative_product_error']:.3f}, final loss {v['final_loss']:.4f} ± {v['sd_loss']:.4f}")
    print(f"wrote {out / 'soft_vs_naive.png'} and {out / 'soft_vs_naive.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
