"""Alignment of LoRA rank components with the update's singular directions, on real training.

MiniLM-L6 + Rotten Tomatoes (peft LoRA on query/value, the head trained and sent dense),
K clients split by movie, a few FedIT rounds (dense separate averaging of A and B, so
every selection rule below is measured on the *same* trajectory). After each client's
local training, with D_ℓ = B'A' − BA per module and s = keep components per module:

* ``top-s``: product energy captured by SOFT's s most important components,
  1 − ‖Σ_{dropped} D_i‖² / ‖D‖² (exact, through Grams);
* ``share``: the prototype's metric, Σ_top ‖D_i‖² / Σ_i ‖D_i‖²;
* ``EY``: captured by the best rank-s approximation of each D_ℓ (Eckart–Young, via QR +
  SVD of the 2r×2r core; the test harness's oracle, never run by clients);
* ``random``: captured by s random components (mean of 4 draws);
* ``top-k``: captured by element-wise magnitude top-k of ΔA, ΔB (each tensor separately, spec §8) at
  SOFT's bit budget, positions counted; ``top-k joint``: the same over all tensors jointly;
* ``global``: SOFT with ``scope="global"`` (the keep·L largest components over all modules).

Variants: ``plain`` (no penalty, no server step), ``penalty`` (λ · R_orth only),
``reorth`` (the server re-orthogonalises the global factors after every aggregation:
A orthonormal rows, B orthogonal columns, B·A unchanged; plus a small penalty), each with
the LoRA factors trained by AdamW (fresh state every round), SGD with momentum, or
``soft.optim.TensorwiseAdam`` (one second moment per tensor); the head always by AdamW.

    python benchmarks/soft_alignment.py --out runs/soft_alignment [--rounds 6] [--variants ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import soft
from fedloop import data as fd
from soft.baselines import topk_elementwise
from soft.optim import TensorwiseAdam

VARIANTS = {
    "plain-adamw": dict(penalty=0.0, reorth=False, optimizer="adamw", lr=2e-3),
    "penalty-adamw": dict(penalty=0.1, reorth=False, optimizer="adamw", lr=2e-3),
    "reorth-adamw": dict(penalty=0.01, reorth=True, optimizer="adamw", lr=2e-3),
    "reorth-sgd": dict(penalty=0.01, reorth=True, optimizer="sgd", lr=0.1),
    "plain-sgd": dict(penalty=0.0, reorth=False, optimizer="sgd", lr=0.1),
    "plain-tadam": dict(penalty=0.0, reorth=False, optimizer="tadam", lr=2e-3),
    "reorth-tadam": dict(penalty=0.01, reorth=True, optimizer="tadam", lr=2e-3),
    "reorth-balanced-adamw": dict(penalty=0.0, reorth="balanced", optimizer="adamw", lr=2e-3),
}


def _measure(old, new, keep, gen):
    tot = top = ey = rnd = share_num = share_den = 0.0
    svd = soft.svd_truncation_qr(old, new, keep)
    tk_err = soft.product_error(old, new, topk_elementwise(old, new, keep).apply_to(old))
    tkj_err = soft.product_error(old, new, topk_elementwise(old, new, keep, joint=True).apply_to(old))
    glob_err = soft.product_error(old, new, soft.sparsify(old, new, keep, scope="global").apply_to(old))
    for ell, name in enumerate(old):
        (A0, B0), (A1, B1) = old[name], new[name]
        e = soft.update_energy(A0, B0, A1, B1)
        imp = soft.component_importance(A0, B0, A1, B1)
        idx = soft.select_top(imp, keep)
        tot += e
        top += e - soft.dropped_error(A0, B0, A1, B1, idx)
        P, Q = svd[ell]
        ey += float((P.norm(dim=0) ** 2 * Q.norm(dim=1) ** 2).sum())  # P, Q have orthogonal columns/rows
        r = A0.shape[0]
        rnd += e - np.mean([soft.dropped_error(A0, B0, A1, B1, torch.randperm(r, generator=gen)[:keep])
                            for _ in range(4)])
        sq = (imp**2).numpy()
        share_num += np.sort(sq)[::-1][:keep].sum()
        share_den += sq.sum()
    return {"top-s": top / tot, "EY": ey / tot, "random": rnd / tot, "top-k": 1 - tk_err / tot,
            "global": 1 - glob_err / tot, "top-k joint": 1 - tkj_err / tot,
            "share": share_num / share_den, "energy": tot}


def run(variant: str, *, rounds=6, clients=10, rank=8, keep=2, local_steps=4, batch=16, max_length=48,
        test_size=600, seed=0, lr=None, log=print) -> dict:
    cfg = dict(VARIANTS[variant])
    if lr is not None:
        cfg["lr"] = lr
    rt = fd.load_rotten_tomatoes()
    train, test = fd.train_test_split(len(rt.texts), 0.1, seed)
    parts = fd.split_by_movie(rt.movies, clients, seed, indices=train)
    model, tok = fd.build_minilm_lora(rank, seed=seed)
    enc = fd.tokenize(tok, list(rt.texts), max_length)
    labels = torch.tensor(rt.labels)
    test = test[:test_size]
    lora = soft.read_lora(model)
    head = fd.head_parameters(model)
    glob = soft.clone_factors(lora)
    scaling = cfg["reorth"] if isinstance(cfg["reorth"], str) else "a-orthonormal"
    if cfg["reorth"]:
        glob = soft.reorthogonalize_factors(glob, scaling)
    ghead = {k: v.detach().clone() for k, v in head.items()}
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    history = []
    for t in range(rounds):
        new_f, new_h, stats = [], [], []
        t0 = time.perf_counter()
        for k in range(clients):
            soft.write_lora(model, glob)
            with torch.no_grad():
                for name, p in head.items():
                    p.copy_(ghead[name])
            factors = [p for pair in lora.values() for p in pair]
            if cfg["optimizer"] == "adamw":
                opt = torch.optim.AdamW(factors, lr=cfg["lr"], weight_decay=0.0)
            elif cfg["optimizer"] == "tadam":
                opt = TensorwiseAdam(factors, lr=cfg["lr"])
            else:
                opt = torch.optim.SGD(factors, lr=cfg["lr"], momentum=0.9)
            head_opt = torch.optim.AdamW(list(head.values()), lr=2e-3, weight_decay=0.0)
            model.train()
            for _ in range(local_steps):
                b = rng.choice(parts[k], size=min(batch, len(parts[k])), replace=False)
                out = model(input_ids=enc["input_ids"][b], attention_mask=enc["attention_mask"][b])
                loss = torch.nn.functional.cross_entropy(out.logits, labels[b])
                if cfg["penalty"]:
                    loss = loss + cfg["penalty"] * soft.factors_penalty(lora)
                opt.zero_grad()
                head_opt.zero_grad()
                loss.backward()
                opt.step()
                head_opt.step()
            new = soft.clone_factors(lora)
            stats.append(_measure(glob, new, keep, gen))
            new_f.append(new)
            new_h.append({k2: v.detach().clone() for k2, v in head.items()})
        w = np.array([len(p) for p in parts], float)
        w /= w.sum()
        glob = {n: (sum(wk * f[n][0] for wk, f in zip(w, new_f, strict=True)),
                    sum(wk * f[n][1] for wk, f in zip(w, new_f, strict=True))) for n in glob}
        ghead = {n: sum(wk * h[n] for wk, h in zip(w, new_h, strict=True)) for n in ghead}
        if cfg["reorth"]:
            glob = soft.reorthogonalize_factors(glob, scaling)
        acc = _accuracy(model, glob, head, ghead, enc, labels, test)
        row = {key: float(np.mean([s[key] for s in stats])) for key in stats[0]}
        row.update(round=t + 1, accuracy=acc, seconds=time.perf_counter() - t0,
                   defect_a=float(np.mean([soft.orthogonality_defect(*glob[n])[0] for n in glob])),
                   defect_b=float(np.mean([soft.orthogonality_defect(*glob[n])[1] for n in glob])))
        history.append(row)
        log(f"{variant:>14} round {t + 1}: top-s {row['top-s']:.3f}  EY {row['EY']:.3f}  random {row['random']:.3f}"
            f"  top-k {row['top-k']:.3f}  global {row['global']:.3f}  share {row['share']:.3f}  acc {acc:.3f}"
            f"  ({row['seconds']:.0f} s)")
    return {"variant": variant, "config": cfg, "rounds": history}


@torch.no_grad()
def _accuracy(model, glob, head, ghead, enc, labels, idx) -> float:
    soft.write_lora(model, glob)
    for name, p in head.items():
        p.copy_(ghead[name])
    model.eval()
    correct = 0
    for i in range(0, len(idx), 128):
        b = idx[i:i + 128]
        out = model(input_ids=enc["input_ids"][b], attention_mask=enc["attention_mask"][b])
        correct += int((out.logits.argmax(-1) == labels[b]).sum())
    return correct / len(idx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/soft_alignment")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="override every variant's learning rate")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(v, rounds=args.rounds, clients=args.clients, rank=args.rank, keep=args.keep, seed=args.seed,
                   lr=args.lr)
               for v in args.variants]
    (out / "alignment.json").write_text(json.dumps(results, indent=1))
    print(f"\nmeans over rounds 2..{args.rounds} (s = {args.keep} of r = {args.rank}):")
    print(f"{'variant':>14} {'top-s':>6} {'EY':>6} {'top-s/EY':>8} {'random':>7} {'top-k':>6} {'tk-jnt':>6} "
          f"{'global':>6} {'share':>6} {'acc':>6}")
    for res in results:
        rows = res["rounds"][1:] or res["rounds"]
        m = {k: np.mean([r[k] for r in rows]) for k in ("top-s", "EY", "random", "top-k", "top-k joint", "global",
                                                         "share")}
        print(f"{res['variant']:>14} {m['top-s']:6.3f} {m['EY']:6.3f} {m['top-s'] / m['EY']:8.3f} "
              f"{m['random']:7.3f} {m['top-k']:6.3f} {m['top-k joint']:6.3f} {m['global']:6.3f} {m['share']:6.3f} "
              f"{res['rounds'][-1]['accuracy']:6.3f}")
    print(f"wrote {out / 'alignment.json'}")


if __name__ == "__main__":
    main()
