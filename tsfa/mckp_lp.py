"""The LP relaxation of the multiple-choice knapsack (MCKP) of :mod:`tsfa.knapsack`, exactly,
and reduced-cost fixing.

For K groups of J items (weights ``W[k, j]`` Hz, ``inf`` = not allowed; costs ``C[k, j]``) and a
budget B, the relaxation lets each group take a convex combination of its items. Its optimum
takes each group's lower convex hull and fills the budget with hull increments in order of
efficiency −ΔC/ΔW, the one that does not fit whole in part (:func:`mckp_relaxation`; the
multiplier λ is that increment's efficiency). :func:`mckp_greedy` is its integer choice, and
:func:`reduce_mckp` drops the items whose reduced cost rules them out of every optimal
choice. The fast allocator (:mod:`tsfa.fast`), the τ search and the exact backends
(:mod:`tsfa.knapsack`) use them."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["Relaxation", "mckp_relaxation", "mckp_greedy", "reduce_mckp"]


def _hull_if_chains_are_convex(W: np.ndarray, C: np.ndarray, mask: np.ndarray):
    """:func:`_hull`'s answer when every client's allowed items are consecutive and already
    form a convex chain (every increment lowers the cost, efficiencies strictly decreasing),
    the common case of the online stage; None otherwise. Same values as the general loop."""
    K, J = W.shape
    if J < 2:
        return None
    count = mask.sum(axis=1)
    first = np.argmax(mask, axis=1)
    idx = np.arange(J)
    if not np.array_equal(mask, (idx >= first[:, None]) & (idx < (first + count)[:, None])):
        return None
    has = np.zeros((K, J), dtype=bool)
    has[:, 1:] = mask[:, 1:] & mask[:, :-1]
    dW = np.ones((K, J))
    dC = np.zeros((K, J))
    with np.errstate(invalid="ignore"):
        np.subtract(W[:, 1:], W[:, :-1], out=dW[:, 1:], where=has[:, 1:])
        np.subtract(C[:, 1:], C[:, :-1], out=dC[:, 1:], where=has[:, 1:])
    with np.errstate(divide="ignore", invalid="ignore"):
        eff = np.where(has, -dC / dW, np.nan)
    if np.any(has & ~(eff > 0)):
        return None
    if np.any(has[:, 1:] & has[:, :-1] & ~(eff[:, 1:] < eff[:, :-1])):
        return None
    prev = np.where(has, idx - 1, -1)
    return mask, prev, eff, dW, dC

def _hull(W: np.ndarray, C: np.ndarray):
    """Lower convex hull of each client's allowed items in the (weight, cost) plane.

    Returns ``mask`` (hull vertices), ``prev`` (the previous vertex of each vertex, −1 for
    the lightest) and the efficiencies −ΔC/ΔW of each non-base vertex (strictly
    decreasing along each chain). Vertices that do not lower the cost are dropped.
    """
    K, J = W.shape
    mask = np.isfinite(W)
    quick = _hull_if_chains_are_convex(W, C, mask)
    if quick is not None:
        return quick
    idx = np.arange(J)
    rows = np.arange(K)[:, None]
    for _ in range(2 * J + 1):
        last = np.maximum.accumulate(np.where(mask, idx, -1), axis=1)
        prev = np.concatenate([np.full((K, 1), -1), last[:, :-1]], axis=1)
        has = mask & (prev >= 0)
        pj = np.where(has, prev, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            dW = np.where(has, W - W[rows, pj], 1.0)
            dC = np.where(has, C - C[rows, pj], 0.0)
            eff = np.where(has, -dC / dW, np.nan)
        useless = has & ~(eff > 0)
        if useless.any():
            mask &= ~useless
            continue
        # Convexity: a vertex whose successor is at least as efficient lies above the hull.
        succ_eff = np.full((K, J), -np.inf)
        kk, jj = np.nonzero(has)
        succ_eff[kk, prev[kk, jj]] = eff[kk, jj]
        above = mask & (prev >= 0) & (succ_eff >= eff)
        if not above.any():
            return mask, np.where(mask, prev, -1), np.where(has, eff, np.nan), dW, dC
        mask &= ~above
    raise RuntimeError("convex hull did not converge")  # pragma: no cover


class Relaxation(NamedTuple):
    """The MCKP LP relaxation at one budget (:func:`mckp_relaxation`).

    Attributes:
        value: the LP value (``inf`` when even the lightest items do not fit).
        choice: int64 (K,), the greedy integer choice after the fill (feasible), or None.
        whole: int64 (K,), the LP's integer part: per client the last hull vertex it takes
            whole (``choice`` before the fill), or None.
        multiplier: λ ≥ 0, the efficiency of the split increment (0 when everything fits).
        split: (k, j_from, j_to), the increment the LP takes in part, or None.
        fraction: the share θ ∈ [0, 1) of the split increment in the LP solution.
    """

    value: float
    choice: np.ndarray | None
    whole: np.ndarray | None
    multiplier: float
    split: tuple[int, int, int] | None
    fraction: float


def mckp_relaxation(W: np.ndarray, C: np.ndarray, budget: float, *, fill: int = 256,
                    multiplier_hint: float | None = None) -> Relaxation:
    """The MCKP LP relaxation (exact, one multiplier) and a greedy integer choice.

    The relaxation takes each client's lower convex hull and fills the budget with hull
    increments in order of efficiency −ΔC/ΔW; the increment that does not fit whole is
    taken in part (the split, whose efficiency is the multiplier λ). The integer choice
    drops the split and then adds later increments that still fit, in efficiency order,
    keeping each client's chain intact (at most ``fill`` of them).

    ``multiplier_hint`` (a λ from a nearby instance, e.g. the previous τ of a search) lets
    the kernel sort only the increments with efficiency within a factor of the hint
    instead of all of them; the LP (value, multiplier, split, whole) is the same, and the fill
    then scans only those sorted increments. Without a hint, above 8192 increments, the kernel
    estimates λ from a strided sample of them first. Unchecked input: W (K, J) ≥ 0 with ``inf`` for
    items not allowed, C finite where W is finite, budget > 0 (:func:`solve_mckp_highspy`
    validates; this kernel is the inner loop of the online search).
    """
    K = W.shape[0]
    none = Relaxation(math.inf, None, None, math.nan, None, math.nan)
    # The hull walks each group's items in order of weight: sort groups that are not (in the
    # online stage they are, b^min grows with s, except for skipped and disallowed options).
    perm = None
    if W.shape[1] > 1 and np.any(W[:, 1:] < W[:, :-1]):
        perm = np.argsort(W, axis=1, kind="stable")
        W = np.take_along_axis(W, perm, axis=1)
        C = np.take_along_axis(C, perm, axis=1)
    mask, prev, eff, dW, dC = _hull(W, C)
    if not mask.any(axis=1).all():
        return none
    base = np.argmax(mask, axis=1)
    rows = np.arange(K)
    left = budget - W[rows, base].sum()
    base_cost = C[rows, base].sum()
    if left < -1e-12 * budget:
        return none
    flat = np.flatnonzero(mask & (prev >= 0))  # row-major: chain order within each client
    kk, jj = np.divmod(flat, W.shape[1])
    e, w, c = eff.take(flat), dW.take(flat), dC.take(flat)
    # The increments taken whole (``taken``), the split (index into kk, or -1) and the ones after it.
    window = None
    if multiplier_hint is None and len(w) > 8192:  # estimate λ from every m-th increment, sorted
        m = len(w) // 2048
        es = e[::m]
        o = np.argsort(-es)
        n_s = int(np.searchsorted(np.cumsum(w[::m][o]) * m, left, side="right"))
        multiplier_hint = float(es[o[min(n_s, len(o) - 1)]])
    if multiplier_hint is not None and multiplier_hint > 0 and len(w):
        for f in (1.15, 4.0):
            above = e > multiplier_hint * f
            w_above = w[above].sum()
            if w_above > left:
                continue
            mid = np.flatnonzero((e >= multiplier_hint / f) & ~above)
            if w_above + w[mid].sum() > left:
                window = above, mid, w_above
                break
    if window is not None:
        above, mid, w_above = window
        order = mid[np.argsort(-e[mid], kind="stable")]  # ties in (client, item) order, as a full sort
        cum = w_above + np.cumsum(w[order])
        n = int(np.searchsorted(cum, left, side="right"))
        taken = np.concatenate([np.flatnonzero(above), order[:n]])
        used = cum[n - 1] if n else w_above
    else:
        order = np.argsort(-e, kind="stable")  # by efficiency, ties in (client, item) order
        cum = np.cumsum(w[order])
        n = int(np.searchsorted(cum, left, side="right"))
        taken = order[:n]
        used = cum[n - 1] if n else 0.0
    choice = base.copy()
    if len(taken):
        np.maximum.at(choice, kk[taken], jj[taken])
    whole = choice.copy()
    lp = base_cost + c[taken].sum()
    mult, split, frac = 0.0, None, 0.0
    if n < len(order):
        i = order[n]
        rem = left - used
        frac = float(rem / w[i])
        lp += c[i] * frac
        mult = float(e[i])
        split = (int(kk[i]), int(prev[kk[i], jj[i]]), int(jj[i]))
        # Integer fill: later increments that still fit, in order, keeping each chain intact.
        tail = order[n + 1:n + 1 + fill]
        wt = w[tail]
        tail_min = np.minimum.accumulate(wt[::-1])[::-1]
        for t in range(len(tail)):
            if tail_min[t] > rem:
                break
            q = tail[t]
            if wt[t] <= rem and prev[kk[q], jj[q]] == choice[kk[q]]:
                choice[kk[q]] = jj[q]
                rem -= wt[t]
    if perm is not None:
        choice, whole = perm[rows, choice], perm[rows, whole]
        if split is not None:
            split = (split[0], int(perm[split[0], split[1]]), int(perm[split[0], split[2]]))
    return Relaxation(float(lp), choice, whole, mult, split, frac)


def mckp_greedy(W: np.ndarray, C: np.ndarray, budget: float, fill: int = 256, return_split: bool = False):
    """MCKP LP relaxation (exact, one multiplier) and a greedy integer solution.

    Returns (lp_value, choice, multiplier) or (inf, None, nan) if even the lightest items
    do not fit. ``multiplier`` is the efficiency of the split item (the LP's λ; 0 if every
    item fits). With ``return_split`` a fourth value is the split item (k, j), or None.
    (:func:`mckp_relaxation` returns the whole solution.)
    """
    rel = mckp_relaxation(W, C, budget, fill=fill)
    split = None if rel.split is None else (rel.split[0], rel.split[2])
    if return_split:
        return rel.value, rel.choice, rel.multiplier, split
    return rel.value, rel.choice, rel.multiplier


def reduce_mckp(W, C, budget, *, cutoff: float | None = None, rtol: float = 1e-9):
    """Reduced-cost fixing: drop items that cannot be in any optimal choice.

    With the LP multiplier λ and LP value LB, item (k, j) has reduced cost
    rc[k, j] = (C + λW)[k, j] − min_j' (C + λW)[k, j'] ≥ 0, and every feasible choice x has
    cost(x) ≥ LB + Σ_k rc[k, x_k]. With UB the cost of the greedy integer choice, an item with
    rc > UB − LB can only be in choices costlier than UB, so it is dropped (W set to inf);
    the greedy choice and every optimal choice survive. With ``cutoff`` < UB the threshold is
    cutoff − LB: every choice cheaper than the cutoff survives, and the greedy choice is kept
    so that one feasible choice remains. Returns (W_reduced, greedy_choice), or (W, None)
    where the LP is infeasible.
    """
    W = np.asarray(W, dtype=float)
    C = np.asarray(C, dtype=float)
    lp, choice, lam = mckp_greedy(W, C, budget)
    if choice is None or not math.isfinite(lp):
        return W, None
    rows = np.arange(W.shape[0])
    ub = float(C[rows, choice].sum())
    if cutoff is not None:
        ub = min(ub, float(cutoff))
    with np.errstate(invalid="ignore"):
        red = np.where(np.isfinite(W), C + lam * W, np.inf)
    rc = red - red.min(axis=1, keepdims=True)
    slack = max(ub - lp, 0.0) + rtol * (abs(ub) + abs(lp) + abs(lam) * budget) + 1e-300
    keep = np.isfinite(W) & (rc <= slack)
    keep[rows, choice] = True
    return np.where(keep, W, np.inf), choice


