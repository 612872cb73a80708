"""Benchmark the per-round allocator: median solve time per backend, ratios against cvxpy.

Instances: K default clients, one Rayleigh draw, r = 16 on MiniLM-L6 q/v shapes, error
profiles from ErrorModel(), Q = 1 s, V = 1, skipping allowed. The fast backend is also
timed with a warm-started τ (the previous round's latency as ``tau_hint``).

    python benchmarks/allocator.py [--sizes 10 100 1000 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tsfa import Cell, minilm_l6_qv
from tsfa.online import RoundProblem, allocate
from tsfa.simulate import ErrorModel

LIMITS = {"fast": 10**9, "cvxpy": 1000, "milp": 200, "pyomo": 200}


def instance(k, seed=0, r=16):
    rng = np.random.default_rng(seed)
    cell = Cell()
    cl = cell.sample_clients(k, rng=rng)
    snr = cell.sample_snr_hz(cl, rng=rng)
    em = ErrorModel()
    prof = em.sample(r, em.client_scales(k, rng), rng)
    return RoundProblem(shape=minilm_l6_qv(r), snr_hz=snr, compute_s=cl.compute_time_s(5e11),
                        data_weight=np.full(k, 1 / k), error_profile=prof, queue=1.0, weight_v=10.0,
                        total_bandwidth_hz=cell.total_bandwidth_hz, downlink_s=0.02, max_latency_s=None, min_keep=1,
                        allow_skip=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'K':>6} {'backend':>10} {'median s':>10} {'vs cvxpy':>9} {'evals':>6} {'objective':>12} {'rel gap':>9}")
    for k in args.sizes:
        p = instance(k)
        rows = {}
        for backend in ("fast", "fast+warm", "cvxpy", "milp", "pyomo"):
            base = backend.split("+")[0]
            if k > LIMITS[base]:
                continue
            hint = allocate(p).latency_s if backend == "fast+warm" else None
            reps = args.repeats if base == "fast" else 1
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                a = allocate(p, backend=base, tau_hint=hint)
                times.append(time.perf_counter() - t0)
            rows[backend] = (statistics.median(times), a)
        ref = rows.get("cvxpy", (None,))[0]
        for name, (t, a) in rows.items():
            ratio = f"{ref / t:8.1f}x" if ref else "      —"
            print(f"{k:>6} {name:>10} {t:>10.4f} {ratio:>9} {a.tau_evaluations:>6} {a.objective:>12.6f} "
                  f"{a.relative_gap:>9.2e}")


if __name__ == "__main__":
    main()
