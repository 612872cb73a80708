"""Benchmark the min–max latency bandwidth split: median solve time per backend.

Instances: K clients dropped in the default cell (spec §9), one Rayleigh draw, dense
MiniLM-L6 q/v r = 8 payloads, compute times from the default device speeds. The cvxpy
timing excludes the one-off compilation (the problem is built once per K and re-solved).
The "batch" row solves all seeds' instances in one call of ``min_latency_bandwidth_batch``
(time per instance).

    python benchmarks/bandwidth.py [--repeats N] [--sizes 10 100 1000 10000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from tsfa import Cell, min_latency_bandwidth, min_latency_bandwidth_batch, minilm_l6_qv

LIMITS = {"fast": 10**9, "cvxpy": 1000, "scipy": 100}  # largest K each backend is run at


def instance(k: int, seed: int):
    cell = Cell()
    rng = np.random.default_rng(seed)
    clients = cell.sample_clients(k, rng=rng)
    snr = cell.sample_snr_hz(clients, rng=rng)
    payload = np.full(k, minilm_l6_qv(8).dense_payload_bits, dtype=float)
    return payload, snr, clients.compute_time_s(5e11), cell.total_bandwidth_hz


def bench(backend: str, k: int, repeats: int, seeds: int):
    times, lat, ok = [], [], 0
    for seed in range(seeds):
        args = instance(k, seed)
        min_latency_bandwidth(*args, backend=backend)  # warm-up / compile
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = min_latency_bandwidth(*args, backend=backend)
            times.append(time.perf_counter() - t0)
        ok += r.success
        lat.append(r.latency_s)
    return statistics.median(times), ok, lat


def bench_batch(k: int, repeats: int, seeds: int):
    """Median time per instance of the batched kernel over ``seeds`` stacked instances."""
    rows = [instance(k, seed) for seed in range(seeds)]
    S, c, T = (np.stack([r[i] for r in rows]) for i in range(3))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = min_latency_bandwidth_batch(S, c, T, rows[0][3])
        times.append((time.perf_counter() - t0) / seeds)
    return statistics.median(times), list(out.latency_s)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    print(f"{'K':>6} {'backend':>7} {'median ms':>10} {'solved':>7} {'max |Δτ|/τ vs fast':>19}")
    for k in args.sizes:
        res = {}
        for backend in ("fast", "cvxpy", "scipy"):
            if k > LIMITS[backend]:
                continue
            reps = args.repeats if backend == "fast" else max(1, args.repeats // 10)
            res[backend] = bench(backend, k, reps, args.seeds)
        fast_lat = np.array(res["fast"][2])
        for backend, (t, ok, lat) in res.items():
            lat = np.array(lat)
            good = np.isfinite(lat)
            diff = np.max(np.abs(lat[good] / fast_lat[good] - 1)) if good.any() else float("nan")
            print(f"{k:>6} {backend:>7} {t * 1e3:>10.3f} {ok:>4}/{args.seeds:<2} {diff:>19.1e}")
        t, lat = bench_batch(k, args.repeats, args.seeds)
        diff = np.max(np.abs(np.array(lat) / fast_lat - 1))
        print(f"{k:>6} {'batch':>7} {t * 1e3:>10.3f} {args.seeds:>4}/{args.seeds:<2} {diff:>19.1e}")
        if "cvxpy" in res:
            print(f"{k:>6} {'ratio':>7} cvxpy/fast = {res['cvxpy'][0] / res['fast'][0]:.0f}x")


if __name__ == "__main__":
    main()
