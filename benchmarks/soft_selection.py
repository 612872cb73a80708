"""Benchmark SOFT's selection + encoding against element-wise top-k and SVD truncation.

One module of size n×n (768: MiniLM, 4096: a 7B model's projection) at LoRA rank r,
float32 factors, keep s = r/4 components (so every method gets SOFT's bit budget at s).
Timed: median of ``--repeats`` samples after one warm-up call, each sample the mean of as
many calls as fill 50 ms (time.perf_counter, torch's default thread count):

* SOFT: ``soft.sparsify(old, new, s).encode()`` (importances, selection, payload bytes);
* top-k: ``soft.baselines.topk_elementwise(old, new, s)``, which builds masked dense
  increments but no bytes, and top-k+ser: the same plus a realistic serialisation
  (nonzero entries found again, int32 indices + float32 values to bytes);
* QR: ``soft.svd_truncation_qr`` (thin QR of [B', B] and [A'; −A], SVD of a 2r×2r core);
* dense: ``soft.svd_truncation_dense`` (forms D = B'A' − BA, float64 SVD of n×n). Above
  n = 1024 it is timed over min(repeats, 2) single calls without a warm-up (about 12 s a
  call at 4096 on 2 cores; D has rank ≤ 2r, which LAPACK's divide and conquer exploits:
  a full-rank 4096×4096 SVD takes ~10× longer); ``--skip-dense`` leaves it out.

Quality at equal bits: ‖D − D̂‖²_F / ‖D‖²_F for SOFT (``sparsify(...).apply_to(old)``),
random components (mean of 5 draws, ``soft.baselines.random_components``), top-k
(``tk.apply_to(old)``; its budget prices an index at ⌈log2 r(m+n)⌉ bits), top-k32 (the
same selection with k cut so that int32 indices + float32 values fit SOFT's payload bytes,
i.e. what the serialisation above could afford) and the rank-s SVD truncation (the optimum
for any rank-s D̂; SOFT's D̂ has rank ≤ 2s, top-k's is full rank), each through
``soft.product_error``.

Factors ("trained" pairs, seed fixed per size and rank):

* old: A₀ = randn(r, n)/√n, B₀ = randn(n, r)/√n · diag(σ), σ_i = 1/(i+1), then
  ``soft.reorthogonalize`` (A orthonormal rows, B orthogonal columns with norms ≈ σ_i).
* new = old − η (∇_B, ∇_A), one LoRA gradient step for a weight gradient
  G = U diag(1, 1/2, 1/4) Vᵀ + ε N (rank-3 dominant part plus iid Gaussian noise N), with
  the chain rule ∇_B = G Aᵀ, ∇_A = Bᵀ G. The dominant directions lie mostly (weight ρ = 0.8)
  in the adapter's span: V = Aᵀ C_A + √(1−ρ²) V_⊥ and U = B̄ C_B + √(1−ρ²) U_⊥ (B̄ the unit
  columns of B), where row i of C_A, C_B has scale w_π(i) ∝ (i+1)^-1.5 over a random
  permutation π, so a few components (not simply those with the largest σ) take most of
  the step. N Aᵀ is iid Gaussian and Bᵀ N has independent rows of norm ≈ σ_i √n; both are
  drawn directly (independently: their correlation through N is O(1/n)), so no n×n matrix
  is formed. ε makes ‖ε N Aᵀ‖_F = ½ ‖U diag(g) C_Aᵀ‖_F, and η makes
  ‖D‖_F ≈ 0.05 ‖B₀A₀‖_F. ΔA comes out smaller than ΔB because ‖b_i‖ = σ_i ≤ 1 = ‖a_i‖.
  ``--noise`` sets that ½ and ``--rho`` the 0.8: the quality columns depend on both (more
  noise spreads the step over all components and entries), the timings do not.

    python benchmarks/soft_selection.py [--sizes 768 4096] [--ranks 8 16 64] [--repeats 5] [--skip-dense]
                              [--dense-max N] [--noise 0.5] [--rho 0.8] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import struct
import time

import torch

import soft

DENSE_LARGE = 1024  # above this size the dense SVD gets min(repeats, 2) calls and no warm-up
HEADER_BYTES = 16  # SOFT's wire header; the top-k32 serialisation gets the same
RANDOM_DRAWS = 5


def _unit_columns(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=0, keepdim=True)


def _off_span(X: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Columns of X with their component in span(Q) (orthonormal columns) removed, unit norm."""
    return _unit_columns(X - Q @ (Q.transpose(0, 1) @ X))


def trained_pair(n: int, r: int, seed: int, rho: float = 0.8, noise: float = 0.5, step: float = 0.05):
    """(old, new) factor sets of one n×n module, float32 (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=d)

    sigma = 1.0 / torch.arange(1, r + 1, dtype=d)
    A, B = soft.reorthogonalize(randn(r, n) / n**0.5, randn(n, r) / n**0.5 * sigma)
    b_norm = B.norm(dim=0)
    qb = B / b_norm  # orthonormal columns (B has orthogonal columns)
    gains = torch.tensor([1.0, 0.5, 0.25], dtype=d)
    w = (1.0 / torch.arange(1, r + 1, dtype=d) ** 1.5)[torch.randperm(r, generator=g)]
    c_a = rho * _unit_columns(w[:, None] * randn(r, 3))
    c_b = rho * _unit_columns(w[:, None] * randn(r, 3))
    V = A.transpose(0, 1) @ c_a + (1 - rho**2) ** 0.5 * _off_span(randn(n, 3), A.transpose(0, 1))
    U = qb @ c_b + (1 - rho**2) ** 0.5 * _off_span(randn(n, 3), qb)
    signal_b = (U * gains) @ c_a.transpose(0, 1)  # U diag(g) Vᵀ Aᵀ = U diag(g) C_Aᵀ
    noise_b = randn(n, r)  # N Aᵀ: iid because A has orthonormal rows
    eps = noise * float(signal_b.norm() / noise_b.norm())
    grad_b = signal_b + eps * noise_b
    grad_a = (B.transpose(0, 1) @ U * gains) @ V.transpose(0, 1) + eps * b_norm[:, None] * randn(r, n)
    # first-order product change ΔB·A + B·ΔA at η = 1, then η for ‖D‖ = step·‖BA‖
    P, Q = torch.cat([grad_b, B], dim=1), torch.cat([A, grad_a], dim=0)
    lin = float(((P.transpose(0, 1) @ P) * (Q @ Q.transpose(0, 1))).sum()) ** 0.5
    eta = step * float(B.norm()) / lin  # ‖BA‖_F = ‖B‖_F: A has orthonormal rows
    old = {"proj": (A.float(), B.float())}
    new = {"proj": ((A - eta * grad_a).float(), (B - eta * grad_b).float())}
    return old, new


def serialise_topk(tk) -> bytes:
    """Top-k increments as bytes: a small header, int32 flat indices, float32 values."""
    flat = torch.cat([t.reshape(-1) for pair in zip(tk.delta_a, tk.delta_b, strict=True) for t in pair])
    idx = torch.nonzero(flat).squeeze(1)
    vals = flat[idx].to(torch.float32)
    head = struct.pack("<2sHIII", b"TK", 1, len(idx), flat.numel(), 0)  # 16 bytes, like SOFT's
    return head + idx.to(torch.int32).numpy().tobytes() + vals.numpy().tobytes()


def topk_int32_factors(old, new, nbytes: int):
    """Old factors plus the largest |Δ| entries that fit ``nbytes`` as int32 index + float32 value."""
    k = max(0, (nbytes - HEADER_BYTES) // 8)
    deltas = [(new[name][i] - old[name][i]).detach() for name in old for i in (0, 1)]
    flat = torch.cat([d.reshape(-1) for d in deltas])
    kept = torch.zeros_like(flat)
    top = torch.topk(flat.abs(), min(k, flat.numel())).indices
    kept[top] = flat[top]
    out, off = {}, 0
    for name, (A, B) in old.items():
        dA = kept[off:off + A.numel()].reshape(A.shape)
        off += A.numel()
        dB = kept[off:off + B.numel()].reshape(B.shape)
        off += B.numel()
        out[name] = (A + dA, B + dB)
    return out, k


def timed(fn, repeats: int, warmup: bool = True, min_sample_s: float = 0.05):
    """(median seconds per call over ``repeats`` samples, last result).

    With ``warmup``, one untimed call first; then each sample averages as many calls as
    take ``min_sample_s`` (sub-millisecond calls are otherwise at the clock's and the
    scheduler's mercy). Without it, each sample is a single call.
    """
    loops = 1
    if warmup:
        t0 = time.perf_counter()
        fn()
        loops = max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            out = fn()
        times.append((time.perf_counter() - t0) / loops)
    return statistics.median(times), out


def relative_errors(old, new, keep, payload_bytes, dense_out):
    energy = soft.update_energy(*old["proj"], *new["proj"])
    A0, B0 = old["proj"]
    base = soft.update_energy(torch.zeros_like(A0), torch.zeros_like(B0), A0, B0)  # ‖BA‖²
    err_soft = soft.product_error(old, new, soft.sparsify(old, new, keep).apply_to(old))
    gen = torch.Generator().manual_seed(1)
    err_rand = statistics.fmean(
        soft.product_error(old, new, soft.random_components(old, new, keep, generator=gen).apply_to(old))
        for _ in range(RANDOM_DRAWS)
    )
    err_topk = soft.product_error(old, new, soft.topk_elementwise(old, new, keep).apply_to(old))
    topk32, k32 = topk_int32_factors(old, new, payload_bytes)
    err_topk32 = soft.product_error(old, new, topk32)
    err_svd = soft.product_error(old, new, factored=soft.svd_truncation_qr(old, new, keep))
    check = None
    if dense_out is not None:  # the dense truncation must give the same error as the QR one
        check = abs(soft.product_error(old, new, factored=dense_out) - err_svd) / energy
    return {"step": (energy / base) ** 0.5, "soft": err_soft / energy, "random": err_rand / energy,
            "topk": err_topk / energy, "topk32": err_topk32 / energy, "k32": k32, "svd": err_svd / energy,
            "check": check}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[768, 4096])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-dense", action="store_true", help="do not run the dense SVD")
    ap.add_argument("--dense-max", type=int, default=None, help="run the dense SVD only up to this size")
    ap.add_argument("--noise", type=float, default=0.5, help="ε: ‖ε N Aᵀ‖ / ‖dominant part of ∇_B‖ (default 0.5)")
    ap.add_argument("--rho", type=float, default=0.8, help="ρ: share of the dominant directions in the adapter's span")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N); default: leave torch's default (on a shared, busy machine "
                         "1 avoids oversubscription stalls that inflate every time by orders of magnitude)")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 factors, keep = r/4, "
          f"median of {args.repeats} samples (dense above {DENSE_LARGE}: of {min(args.repeats, 2)} single calls), "
          f"noise ε = {args.noise}, ρ = {args.rho}")
    timing, quality = [], []
    for n in args.sizes:
        for r in args.ranks:
            keep = max(1, r // 4)
            old, new = trained_pair(n, r, seed=1000 * n + r, rho=args.rho, noise=args.noise)
            t_soft, payload = timed(lambda old=old, new=new, keep=keep: soft.sparsify(old, new, keep).encode(),
                                    args.repeats)
            t_topk, _ = timed(lambda old=old, new=new, keep=keep: soft.topk_elementwise(old, new, keep),
                              args.repeats)
            t_ser, tk_bytes = timed(
                lambda old=old, new=new, keep=keep: serialise_topk(soft.topk_elementwise(old, new, keep)),
                args.repeats)
            t_qr, _ = timed(lambda old=old, new=new, keep=keep: soft.svd_truncation_qr(old, new, keep), args.repeats)
            dense_time = dense_out = None
            if not args.skip_dense and (args.dense_max is None or n <= args.dense_max):
                large = n > DENSE_LARGE
                dense_time, dense_out = timed(
                    lambda old=old, new=new, keep=keep: soft.svd_truncation_dense(old, new, keep),
                    min(args.repeats, 2) if large else args.repeats, warmup=not large)
            timing.append((n, r, keep, t_soft, t_topk, t_ser, t_qr, dense_time))
            tk = soft.topk_elementwise(old, new, keep)
            quality.append((n, r, keep, len(payload), tk.k, tk.bits // 8, len(tk_bytes),
                            relative_errors(old, new, keep, len(payload), dense_out)))

    print("\nwall time, ms (median); ratios = method time / SOFT time, same run")
    print(f"{'size':>5} {'r':>3} {'s':>3} {'SOFT':>9} {'top-k':>9} {'top-k+ser':>10} {'QR':>9} {'dense':>10} "
          f"{'top-k/SOFT':>11} {'+ser/SOFT':>10} {'QR/SOFT':>8} {'dense/SOFT':>11}")
    for n, r, keep, ts, tt, tse, tq, td in timing:
        dense = f"{1e3 * td:>10.1f}" if td is not None else f"{'—':>10}"
        dratio = f"{td / ts:>10.0f}x" if td is not None else f"{'—':>11}"
        print(f"{n:>5} {r:>3} {keep:>3} {1e3 * ts:>9.3f} {1e3 * tt:>9.3f} {1e3 * tse:>10.3f} {1e3 * tq:>9.3f} "
              f"{dense} {tt / ts:>10.2f}x {tse / ts:>9.2f}x {tq / ts:>7.2f}x {dratio}")

    print("\nrelative product error ‖D − D̂‖²/‖D‖² at equal bits (keep = r/4); ‖D‖/‖BA‖ = size of the step")
    print(f"{'size':>5} {'r':>3} {'s':>3} {'SOFT B':>7} {'top-k B':>7} {'k':>6} {'k32':>6} {'‖D‖/‖BA‖':>8} "
          f"{'SOFT':>8} {'random':>8} {'top-k':>8} {'top-k32':>8} {'SVD-s':>8} {'SOFT/top-k':>10} "
          f"{'SOFT/top-k32':>12} {'SOFT/SVD':>8} {'|dense−QR|':>10}")
    for n, r, keep, soft_b, k, _, tk_b, e in quality:
        check = f"{e['check']:>10.1e}" if e["check"] is not None else f"{'—':>10}"
        vs_svd = f"{e['soft'] / e['svd']:>8.2f}" if e["svd"] > 1e-9 else f"{'—':>8}"
        print(f"{n:>5} {r:>3} {keep:>3} {soft_b:>7} {tk_b:>7} {k:>6} {e['k32']:>6} {e['step']:>8.3f} "
              f"{e['soft']:>8.4f} {e['random']:>8.4f} {e['topk']:>8.4f} {e['topk32']:>8.4f} {e['svd']:>8.4f} "
              f"{e['soft'] / e['topk']:>10.2f} {e['soft'] / e['topk32']:>12.2f} {vs_svd} {check}")
    print("SOFT B: SOFT's payload bytes; k: entries top-k's own budget affords (SOFT's bits, ⌈log2 N⌉-bit indices);\n"
          "top-k B: those k entries serialised with int32 indices; k32: entries int32 indices afford in SOFT B")


if __name__ == "__main__":
    main()
