"""Benchmark the per-round allocator: the fast path against the certified search and the other backends.

Instances: K default clients, one Rayleigh draw, r = 16 on MiniLM-L6 q/v shapes, error
profiles from ErrorModel(), Q = 1 s, V = 10, skipping allowed. Columns, all in one run:

* fast: ``allocate(p, certify=False, tau_hint=τ')`` (what OnlineAllocator runs between
  certified rounds), τ' the certified latency × 1.1 (a previous round's latency, roughly);
* fast cold: the same without a hint;
* certified: ``allocate(p)`` (backend "fast", certify=True: interval branch-and-bound);
* cvxpy, milp, pyomo: ``allocate(p, backend=...)`` (K ≤ 1000, 200, 200).

Times are medians of ``--repeats`` calls (one call for cvxpy, milp and pyomo); ratios are
time / fast time; "Δobj" is fast's objective relative to the certified one (negative: better).

    python benchmarks/allocator.py [--sizes 20 100 1000 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tsfa import Cell, minilm_l6_qv
from tsfa.online import RoundProblem, allocate
from tsfa.simulate import ErrorModel

LIMITS = {"cvxpy": 1000, "milp": 200, "pyomo": 200}


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


def _time(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 100, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    names = ("fast", "fast cold", "certified", "cvxpy", "milp", "pyomo")
    print("allocator: median ms per round; ratio = time / fast time (same run); Δobj = fast vs certified objective")
    print(f"{'K':>6} " + " ".join(f"{n:>10}" for n in names) + " " + " ".join(f"{n + '/fast':>15}" for n in names[1:])
          + f" {'fast evals':>10} {'cert evals':>10} {'Δobj':>9}")
    for k in args.sizes:
        p = instance(k)
        t_cert, cert = _time(lambda p=p: allocate(p), args.repeats)
        hint = cert.latency_s * 1.1
        t_fast, fast = _time(lambda p=p, h=hint: allocate(p, certify=False, tau_hint=h), args.repeats)
        t_cold, _ = _time(lambda p=p: allocate(p, certify=False), args.repeats)
        t = {"fast": t_fast, "fast cold": t_cold, "certified": t_cert}
        for b in ("cvxpy", "milp", "pyomo"):
            if k <= LIMITS[b]:
                t[b] = _time(lambda p=p, b=b: allocate(p, backend=b), 1)[0]
        cells = " ".join(f"{t[n] * 1e3:>10.2f}" if n in t else f"{'—':>10}" for n in names)
        ratios = " ".join(f"{t[n] / t_fast:>14.1f}x" if n in t else f"{'—':>15}" for n in names[1:])
        print(f"{k:>6} {cells} {ratios} {fast.tau_evaluations:>10} {cert.tau_evaluations:>10} "
              f"{fast.objective / cert.objective - 1:>9.1e}")


if __name__ == "__main__":
    main()
