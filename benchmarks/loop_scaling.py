"""Seconds per round and peak memory of the federated loop against the number of clients.

Each K runs in its own subprocess (so peak RSS is that run's alone): rt-minilm, strategy
tsfa, r = 8, E local steps of batch 8 at 32 tokens, `--rounds` rounds (timed after the
setup: data, tokenisation, model, τ̄), one evaluation on 200 test snippets.
Peak memory should grow with K only by K adapters (r·M = 73 728 values, 0.3 MB each),
not by K models (22.7 M parameters, 91 MB each).

    python benchmarks/loop_scaling.py [--clients 5 20 50] [--rounds 2] [--local-steps 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
from fedloop import RunConfig
from fedloop import LocalPool, Server
k, rounds, steps, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = RunConfig(task="rt-minilm", strategy="tsfa", rounds=rounds, clients=k, local_steps=steps, batch_size=8,
                max_length=32, test_size=200, eval_every=rounds, checkpoint_every=rounds, out=out)
t0 = time.perf_counter()
r = Server(cfg)
pool = LocalPool(r)
setup = time.perf_counter() - t0
times = []
for _ in range(rounds):
    t1 = time.perf_counter()
    r.step(pool)
    times.append(time.perf_counter() - t1)
print(json.dumps({"clients": k, "setup_s": setup, "seconds_per_round": sum(times) / rounds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "adapter_mb": r.history.meta["lora_parameters"] * 4 / 2**20,
                  "model_mb": r.history.meta["model_parameters"] * 4 / 2**20}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[5, 20, 50])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=2)
    args = ap.parse_args()
    rows = []
    print(f"{'K':>4} {'setup s':>8} {'s/round':>8} {'s/client-round':>14} {'peak RSS MB':>11} {'K adapters MB':>13} "
          f"{'model MB':>8}")
    for k in args.clients:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, "-c", CHILD, str(k), str(args.rounds), str(args.local_steps), tmp],
                                 capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{k:>4} {row['setup_s']:>8.1f} {row['seconds_per_round']:>8.2f} {row['seconds_per_round'] / k:>14.3f} "
              f"{row['peak_rss_mb']:>11.0f} {k * row['adapter_mb']:>13.1f} {row['model_mb']:>8.1f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["clients"] - a["clients"])
        print(f"peak memory grows by {slope:.2f} MB per client (one model would be {a['model_mb']:.0f} MB)")
    _ = resource  # the parent's own RSS is not measured


if __name__ == "__main__":
    main()
