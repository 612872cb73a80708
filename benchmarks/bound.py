"""Time of the convergence bound against the horizon T: the full per-round bound and the
offline predictor (final round only), side by side in one run.

    python benchmarks/bound.py [--rounds 1000 200000 10000000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from convergence import BoundConstants, Schedule, bound, make_predictor


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, nargs="+", default=[1_000, 200_000, 10_000_000])
    args = ap.parse_args()
    c = BoundConstants(step_size=0.05, local_steps=4, smoothness=10.0, product_smoothness=2.0, noise=1.0,
                       gradient_bound=1.0, pl=0.1, initial_gap=2.0, spectrum=[1.0, 0.5, 0.25, 0.1])
    predict = make_predictor(c, {"update_energy": 0.05, "covariance_sq": 1e-4})
    bound(c, Schedule(rounds=10, rank=2, sparsification=0.01))  # warm-up: lazy imports are not the bound's cost
    predict(np.array([1]), np.array([0.5]), np.array([10]))
    print(f"{'T':>10} {'bound s':>9} {'predictor s':>12} {'ratio':>7}")
    for T in args.rounds:
        t0 = time.perf_counter()
        bound(c, Schedule(rounds=T, rank=2, sparsification=0.01, covariance=1e-4))
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        predict(np.array([1, 2, 4]), np.array([0.5, 0.5, 0.25]), np.full(3, T))
        pred = time.perf_counter() - t0
        print(f"{T:>10} {full:>9.4f} {pred:>12.5f} {full / pred:>7.0f}")


if __name__ == "__main__":
    main()
