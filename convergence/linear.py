"""Exact constants of the bound on the linear teacher–student task (spec §5(a), docs/theory.md §4).

The task's training objective is F(W) = Σ_k p_k (1/n_k) Σ_i ½‖(W − M) x_i − ξ_i‖² per module,
a convex quadratic in the adapter product W = γBA. So, exactly:

* F* and its minimiser W_opt by weighted least squares, L_W = λ_max(Ŝ) with Ŝ = Σ_k p_k X_kᵀX_k/n_k,
* the rank term from the spectrum of W_opt Ŝ W_optᵀ (ε(r) = F*_r − F*, Eckart–Young in the Ŝ
  metric), and the initial gap F(0) − F* (peft's B = 0 start),
* L in the factors on the ball {‖A_ℓ‖₂, ‖B_ℓ‖₂ ≤ R} in closed form:
  L ≤ max_ℓ,k [2γ²R² λ_max(Ŝ_k) + γ((γR² + ‖M_ℓ‖₂) λ_max(Ŝ_k) + ‖Ξ_k,ℓ‖₂)], Ξ = mean ξ xᵀ.

Four constants are properties of the path the run takes, measured by the loop at every
local iterate (``fedloop`` writes them to the history): the radius R, G² (the largest client
gradient norm²), σ² (the largest minibatch-gradient variance, closed form per sample) and
μ (PL at the round start points: min_t ‖∇F(θ_t)‖² / 2(F(θ_t) − F*_r)); κ is the largest
measured ratio of the aggregate's sparsification error to Σ p_k e_k(s_k).

torch is needed (the task holds tensors); ``import convergence`` does not import it.
"""

from __future__ import annotations

import math

import numpy as np

from convergence.bound import BoundConstants
from convergence.rank import covariance_weighted_spectrum, rank_term

__all__ = ["exact_constants", "linear_optimum", "measured_along_run"]


def _arrays(task):
    """Per module: target M, per client X_k, Ξ_k noise; all float64 numpy."""
    p = task.client_sizes / task.client_sizes.sum()
    mods = []
    off = 0
    for name, m in task.model.items():
        d_out = m.weight.shape[0]
        W0 = m.weight.detach().double().numpy()
        M = task.target_delta[name].double().numpy()
        Xs, Ys = [], []
        for x, y in zip(task.xs, task.ys, strict=True):
            X = x.double().numpy()
            Xs.append(X)
            Ys.append(y.double().numpy()[:, off:off + d_out] - X @ W0.T)  # targets for the adapter ΔW
        off += d_out
        mods.append((name, M, Xs, Ys))
    return p, mods


def linear_optimum(task) -> dict:
    """The training objective's exact optimum: per module W_opt, Ŝ, and the totals F*,
    F(0) (the start: B = 0) and the pooled spectrum for ε(r)."""
    p, mods = _arrays(task)
    out = {"modules": {}, "floor": 0.0, "start": 0.0}
    lams = []
    for name, _M, Xs, Ys in mods:
        S = sum(pk * X.T @ X / len(X) for pk, X in zip(p, Xs, strict=True))
        XY = sum(pk * X.T @ Y / len(X) for pk, X, Y in zip(p, Xs, Ys, strict=True))  # n×m
        YY = sum(pk * float((Y**2).sum()) / len(Y) for pk, Y in zip(p, Ys, strict=True))
        W = np.linalg.solve(S, XY).T  # m×n
        fstar = 0.5 * (YY - float(np.sum(W * XY.T)))
        out["modules"][name] = {"W_opt": W, "S": S}
        out["floor"] += fstar
        out["start"] += 0.5 * YY
        lams.append(covariance_weighted_spectrum(W, S))
    out["spectrum"] = np.stack(lams)  # one row per module: each keeps its own top r
    out["product_smoothness"] = max(float(np.linalg.eigvalsh(m["S"])[-1]) for m in out["modules"].values())
    return out


def measured_along_run(history, floor: float, spectrum, rank: int) -> dict:
    """R, G², σ², μ and κ from a run's history (the columns the loop records)."""
    col = history.column
    R = float(np.nanmax(np.concatenate([col("factor_norm_max"), col("local_norm_max")])))
    G2 = float(np.nanmax(np.concatenate([col("client_grad_sq_max"), col("gradient_norm_sq")])))
    s2 = float(np.nanmax(col("client_noise_max")))
    f, g2 = col("objective"), col("gradient_norm_sq")
    fr = floor + rank_term(spectrum, rank)
    gap = f - fr
    ok = gap > 1e-12 * max(abs(fr), 1.0)
    mu = float(np.min(g2[ok] / (2 * gap[ok]))) if np.any(ok) else 0.0
    e, se = col("dropped_energy"), col("sparsification_error")
    pos = e > 0
    if np.any(~pos & (se > 1e-12)):
        t = int(np.flatnonzero(~pos & (se > 1e-12))[0])
        raise ValueError(f"round {t + 1} lost {se[t]:.3g} to sparsification with Σ p e = 0: κ is unbounded")
    kappa = float(np.max(se[pos] / e[pos])) if np.any(pos) else 1.0
    if not all(math.isfinite(v) for v in (R, G2, s2)):
        raise ValueError("the history lacks the bound's measurements (factor norms, client gradients); "
                         "run the linear task with fedloop to record them")
    return {"radius": R, "gradient_bound": G2, "noise": s2, "pl": mu, "sparsification_factor": kappa}


def exact_constants(task, history=None, *, radius=None, gradient_bound=None, noise=None, pl=None,
                    sparsification_factor=None) -> BoundConstants:
    """The bound's constants on a :class:`fedloop.tasks.LinearTask`.

    Everything the task fixes is computed exactly (F*, F(0), ε(r)'s spectrum, L_W, and L on
    the ball of radius R in closed form). The path constants (R, G², σ², μ, κ) are taken from
    ``history`` (the run's measurements) unless given explicitly.

    Raises:
        ValueError: the run's algorithm is not the analysed one (plain SGD: optimizer "sgd",
            momentum 0, no penalty), or a needed constant is neither given nor measured.
    """
    cfg = task.config
    if cfg.resolved_optimizer != "sgd" or cfg.momentum != 0 or cfg.resolved_penalty != 0:
        raise ValueError("exact constants hold for the analysed algorithm: optimizer='sgd', momentum=0, "
                         f"penalty=0; got optimizer={cfg.resolved_optimizer!r}, momentum={cfg.momentum}, "
                         f"penalty={cfg.resolved_penalty}")
    opt = linear_optimum(task)
    given = {"radius": radius, "gradient_bound": gradient_bound, "noise": noise, "pl": pl,
             "sparsification_factor": sparsification_factor}
    if any(v is None for v in given.values()):
        if history is None:
            missing = sorted(k for k, v in given.items() if v is None)
            raise ValueError(f"exact_constants needs a run history to measure {missing}, or those values given")
        measured = measured_along_run(history, opt["floor"], opt["spectrum"], cfg.rank)
        given = {k: (measured[k] if v is None else v) for k, v in given.items()}
    R = float(given["radius"])
    gamma = float(task.scaling)
    p, mods = _arrays(task)
    L = 0.0
    for _name, M, Xs, Ys in mods:
        Mn = float(np.linalg.norm(M, 2))
        c = gamma * R**2 + Mn
        pairs = [(X.T @ X / len(X), (Y - X @ M.T).T @ X / len(X)) for X, Y in zip(Xs, Ys, strict=True)]
        S_all = sum(pk * S for pk, (S, _) in zip(p, pairs, strict=True))
        Xi_all = sum(pk * Xi for pk, (_, Xi) in zip(p, pairs, strict=True))
        for S, Xi in [*pairs, (S_all, Xi_all)]:
            lmax = float(np.linalg.eigvalsh(S)[-1])
            L = max(L, 2 * gamma**2 * R**2 * lmax + gamma * (c * lmax + float(np.linalg.norm(Xi, 2))))
    return BoundConstants(
        step_size=float(cfg.lr), local_steps=int(cfg.local_steps), smoothness=L,
        product_smoothness=opt["product_smoothness"], noise=float(given["noise"]),
        gradient_bound=float(given["gradient_bound"]), pl=float(given["pl"]),
        initial_gap=max(opt["start"] - opt["floor"], 0.0), spectrum=opt["spectrum"], scaling=gamma,
        sparsification_factor=float(given["sparsification_factor"]), rank_weight=0.5, floor=opt["floor"],
        source=f"exact (linear task; path constants measured: R = {R:.4g})")
