"""The Shannon rate of a client's uplink and its inverses (spec §2), exact across the float range.

R(b) = b·log2(1 + c/b) for bandwidth b [Hz] and c = B·SNR per unit bandwidth [Hz]; its cap
c/ln 2 as b → ∞; the least bandwidth b^min(S, c, slack) that moves S bits within a time
slack, and its slope (the one least-bandwidth kernel of the library, used by the bandwidth
solver, the online search and the offline SAA); the root of ln(1+x) = a·x behind it.
Products that would leave the float range are formed in logs.
"""

from __future__ import annotations

import math

import numpy as np

from tsfa._validate import real_array

__all__ = ["LN2", "rate_bps", "rate_cap_bps", "bandwidth_for_rate", "min_bandwidth", "bandwidth_for_deadline",
           "log1p_ratio_root", "log1p_ratio_root_newton", "min_bandwidth_trusted"]

LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------
# Rate and its inverse (spec §2)
# --------------------------------------------------------------------------------------


_FMAX = float(np.finfo(float).max)
_TINY = float(np.finfo(float).tiny)  # the least normal float; below it, precision is lost
_DENORM_MIN = math.ulp(0.0)  # the least positive float


def _real(name: str, value) -> np.ndarray:
    """A float array of real numbers (no bools, complex or NaN); errors name the argument."""
    arr = real_array(name, value)
    if np.isnan(arr).any():
        raise ValueError(f"{name} must not be NaN; got {name} = {value!r}")
    return arr


def rate_bps(bandwidth_hz, snr_hz):
    """Achievable rate R(b) = b·log2(1 + c/b) in bit/s (broadcasts).

    ``snr_hz`` is c = P·g/N_0 in Hz. R is increasing and concave in b with R(0) = 0 and
    R(∞) = c/ln 2 (:func:`rate_cap_bps`). Evaluated without spurious overflow or underflow
    over the whole float range: where c/b leaves the float range, log1p(c/b) is taken as
    ln c − ln b (c ≫ b) or R as c/ln 2 · (1 − c/(2b)) (c ≪ b). A rate above the largest
    float is ``inf``.
    """
    b = _real("bandwidth_hz", bandwidth_hz)
    c = _real("snr_hz", snr_hz)
    b, c = np.broadcast_arrays(b, c)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        x = c / b
        r = b * (np.log1p(x) / LN2)
        big = (b > 0) & (c > 0) & ~(x <= 1e300)  # c/b overflows (or nearly): log1p(x) = ln c − ln b
        if big.any():
            r = np.where(big, b * ((np.log(c) - np.log(b)) / LN2), r)
        small = (b > 0) & (c > 0) & (x < 1e-8)  # c ≪ b: R = c/ln2 · log1p(x)/x, log1p(x)/x = 1 − x/2
        if small.any():
            r = np.where(small, (c / LN2) * (1.0 - 0.5 * x), r)
    r = np.where((b <= 0) | (c <= 0), 0.0, r)
    r = np.where(np.isinf(b) & (c > 0), c / LN2, r)
    return r if r.ndim else float(r)


def rate_cap_bps(snr_hz):
    """Upper bound of the rate over all bandwidths, c/ln 2 (bit/s)."""
    c = _real("snr_hz", snr_hz) / LN2
    return c if c.ndim else float(c)


def log1p_ratio_root_newton(a: np.ndarray, max_iter: int = 60) -> tuple[np.ndarray, int]:
    """Newton from an asymptotic start (any a ∈ (0, 1)); see :func:`log1p_ratio_root`."""
    la = -np.log(a)
    # W_{-1} asymptotics for small a: x ≈ (L + ln L)/a − 1 with L = a − ln a.
    big = la + a
    x0 = (big + np.log(big)) / a - 1.0
    x = np.maximum(x0, 2.0 * (1.0 / a - 1.0))
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        inv = 1.0 / (1.0 + x)
        h = np.log1p(x) - a * x
        step = h / (inv - a)
        x = x - step
        # Monotone from the right: stop at rounding level (a tolerance of 1e-14 can stall).
        if np.all(np.abs(step) <= 4e-14 * x):
            break
    return x, it


def _log_root_small(neg_log_a: np.ndarray) -> np.ndarray:
    """y = ln(1 + x) at the root of ln(1+x) = a x for tiny a (a < 1e-17), from L = −ln a.

    With x = y/a the equation reads y = L + ln y + ln(1 + a/y); for a < 1e-17 the last
    term is below half an ulp of y, so y solves y − ln y = L (Newton from L + ln L, which
    is within 1 % for L ≥ 39; monotone and quadratic). Works for any L, even where a
    itself underflows (L > 745)."""
    L = np.asarray(neg_log_a, dtype=float)
    with np.errstate(invalid="ignore"):  # L = inf (a = 0) gives y = inf
        y = L + np.log(L)
        for _ in range(8):
            y = np.where(np.isfinite(y), y - (y - np.log(y) - L) / (1.0 - 1.0 / y), y)
    return y


# A table of log x against logit(a) on a uniform grid starts Newton within ~1e-5 of the root,
# so two steps reach rounding level (quadratic convergence); outside the grid, log1p_ratio_root_newton.
_TABLE_T0, _TABLE_T1, _TABLE_N = -40.0, 30.0, 14001
_TABLE_H = (_TABLE_T1 - _TABLE_T0) / (_TABLE_N - 1)
_TABLE_Z: np.ndarray | None = None
#: Below this a, the root comes from :func:`_log_root_small` (x = y/a; inf where that overflows).
_TINY_A = 1e-17


def _table() -> np.ndarray:
    global _TABLE_Z
    if _TABLE_Z is None:
        t = np.linspace(_TABLE_T0, _TABLE_T1, _TABLE_N)
        x, _ = log1p_ratio_root_newton(1.0 / (1.0 + np.exp(-t)))
        _TABLE_Z = np.log(x)
    return _TABLE_Z


def log1p_ratio_root(a: np.ndarray, max_iter: int = 60) -> tuple[np.ndarray, int]:
    """Solve ln(1+x) = a·x for x > 0, elementwise, a ∈ (0, 1).

    x = c/b is the SNR per Hz at which bandwidth b carries rate a·c/ln2. h(x) = ln(1+x) − a x
    is concave, positive on (0, x*) and peaks at 1/a − 1 < x*; Newton started right of the
    peak converges (after at most one step) monotonically from the right. The start comes
    from a tabulated log x(logit a), interpolated linearly, then two Newton steps; for
    a < 1e-17, x = y/a with y from :func:`_log_root_small` (``inf`` where x exceeds the
    largest float, a = 0 included). Raises ValueError for a outside [0, 1) or NaN.
    Returns x and the number of Newton steps taken.
    """
    a = np.array(a, dtype=float)
    if np.any(np.isnan(a)) or np.any(a < 0) or np.any(a >= 1):
        raise ValueError(f"a must lie in (0, 1); got a = {a!r}")
    return _root(a, max_iter)


def _root(a: np.ndarray, max_iter: int = 60) -> tuple[np.ndarray, int]:
    """:func:`log1p_ratio_root` without its checks (a float array in [0, 1), not modified)."""
    tiny = a < _TINY_A
    if tiny.any():
        x = np.empty(a.shape)
        with np.errstate(divide="ignore", over="ignore"):
            y = _log_root_small(-np.log(a[tiny]))
            x[tiny] = np.where(a[tiny] > 0, y / a[tiny], np.inf)
        it = 8
        if (~tiny).any():
            x[~tiny], it = _root(a[~tiny], max_iter)
        return x, it
    z = _table()
    with np.errstate(divide="ignore"):
        t = np.log(a) - np.log1p(-a)
    inside = (t > _TABLE_T0) & (t < _TABLE_T1)
    if not inside.all():
        x, it = log1p_ratio_root_newton(a, max_iter)
        if inside.any():
            x[inside], _ = _root(a[inside])
        return x, it
    u = (t - _TABLE_T0) / _TABLE_H
    i = np.minimum(u.astype(np.intp), _TABLE_N - 2)
    f = u - i
    zi = z.take(i)
    x = np.exp(zi + f * (z.take(i + 1) - zi))
    for _ in range(2):
        x = x - (np.log1p(x) - a * x) / (1.0 / (1.0 + x) - a)
    return x, 2


def min_bandwidth_trusted(payload_bits, snr_hz, slack_s) -> tuple[np.ndarray, np.ndarray]:
    """:func:`min_bandwidth` with ``slope=True`` for inputs already validated (S ≥ 0, c > 0, no
    NaN; arrays that broadcast): the inner kernel of the τ searches and the least-latency Newton.

    Where every quotient a = S ln2 / (c · slack) of an entry with S > 0 and slack > 0 stays in
    the normal range, the same formulas as ``min_bandwidth`` run without its checks and
    log-domain branches (equal results, bit for bit); otherwise ``min_bandwidth`` runs.
    """
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        num = payload_bits * LN2
        den = snr_hz * slack_s
        a = num / den
        pos = (payload_bits > 0) & (slack_s > 0)
        ok = pos & (a < 1.0)
        if np.any(pos & ~((a >= _TINY_A) & (den >= _TINY) & (den < np.inf) & (num >= _TINY) & (num < np.inf))):
            return min_bandwidth(payload_bits, snr_hz, slack_s, slope=True)
    b = np.where(payload_bits > 0, np.inf, 0.0) + np.zeros(a.shape)  # inf where slack ≤ 0 or a ≥ 1
    db = np.zeros(a.shape)
    if ok.all():
        x, _ = _root(a)
        b = snr_hz / x
        db = b * a / ((1.0 / (1.0 + x) - a) * slack_s)
    elif ok.any():
        ao = a[ok]
        x, _ = _root(ao)
        bo = np.broadcast_to(snr_hz, a.shape)[ok] / x
        b[ok] = bo
        db[ok] = bo * ao / ((1.0 / (1.0 + x) - ao) * np.broadcast_to(slack_s, a.shape)[ok])
    return b, db


def bandwidth_for_rate(rate, snr_hz):
    """Least bandwidth (Hz) that carries ``rate`` bit/s at SNR product c (inverse of R).

    Returns ``inf`` where the rate is at or above the cap c/ln 2 (no bandwidth suffices)
    and 0 where the rate is 0. Broadcasts. Equals :func:`min_bandwidth` of ``rate`` bits in
    one second (accurate over the whole float range).
    """
    r = _real("rate", rate)
    if np.any(r < 0):
        raise ValueError(f"rate must be >= 0; got rate = {rate!r}")
    return min_bandwidth(r, snr_hz, 1.0)


def min_bandwidth(payload_bits, snr_hz, slack_s, *, slope: bool = False):
    """b^min and its slope: the least bandwidth (Hz) that uploads S bits within a slack.

    The kernel behind every least-latency computation of the library (spec §2): client k,
    with ``slack_s`` = τ − T_k seconds left for its upload, needs b^min = c/x with
    ln(1+x) = a·x, a = S ln2 / (c (τ − T)) (:func:`log1p_ratio_root`); implicit differentiation
    gives ∂b^min/∂τ = b a / ((1/(1+x) − a)(τ − T)) ≤ 0.

    Numerics: where S, c or the slack make a product or quotient leave the float range
    (extreme units), a is formed in logs and b = S ln2 / (slack · ln(1+x)) with ln(1+x) from
    the asymptotic root of :func:`log1p_ratio_root`, so b^min stays accurate (no spurious
    0 or ``inf``) for every finite positive input.

    Args:
        payload_bits: S, bits (0 = nothing to send), ≥ 0.
        snr_hz: c = P g / N_0, Hz, > 0.
        slack_s: τ − T, seconds (``inf``: unlimited time, b^min = 0).
        slope: also return ∂b^min/∂τ, Hz/s.

    All arguments broadcast against each other; NaN, negative payloads and non-positive
    SNR products raise ValueError naming the argument. Returns b^min (Hz; 0 where S = 0,
    ``inf`` where no bandwidth suffices: slack ≤ 0 or S/slack at or above the cap c/ln 2),
    and with ``slope`` the pair (b^min, ∂b^min/∂τ) (0 where b^min is 0 or inf).
    """
    S, c, w = np.broadcast_arrays(_real("payload_bits", payload_bits), _real("snr_hz", snr_hz),
                                  _real("slack_s", slack_s))
    if np.any(S < 0):
        raise ValueError(f"payload_bits must be >= 0; got payload_bits = {payload_bits!r}")
    if np.any(c <= 0):
        raise ValueError(f"snr_hz must be > 0; got snr_hz = {snr_hz!r}")
    b = np.zeros(S.shape)
    db = np.zeros(S.shape)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
        num, den = S * LN2, c * w
        a = num / den
        # Entries whose intermediates left the normal range (under- or overflow): a in logs.
        odd = (S > 0) & (w > 0) & np.isfinite(S) & np.isfinite(c) & np.isfinite(w) & (
            (num < _TINY) | ~(den >= _TINY) | ~np.isfinite(den) | ~(a >= _TINY) | ~np.isfinite(a))
        la = np.where(odd, np.log(S) + math.log(LN2) - np.log(c) - np.log(w), np.log(a))
        a = np.where(odd, np.exp(la), a)
    pos = (S > 0) & (w > 0) & np.isfinite(S)
    ok = pos & (la < 0) & (a < 1.0) & np.isfinite(w)
    b[(S > 0) & ~ok & ~(np.isinf(w) & (w > 0))] = np.inf
    if ok.any():
        tiny = ok & (a < _TINY_A)
        normal = ok & ~tiny
        if normal.any():
            x, _ = log1p_ratio_root(a[normal])
            bo = c[normal] / x
            b[normal] = bo
            if slope:
                db[normal] = bo * a[normal] / ((1.0 / (1.0 + x) - a[normal]) * w[normal])
        if tiny.any():
            y = _log_root_small(-la[tiny])  # y = ln(1+x) = a x, and b = c/x = S ln2 / (w y)
            St, wt = S[tiny], w[tiny]
            with np.errstate(over="ignore", under="ignore", divide="ignore"):
                bt = St * LN2 / (wt * y)
                redo = ~np.isfinite(bt) | (bt < _TINY)
                bt = np.where(redo, np.exp(np.log(St) + math.log(LN2) - np.log(wt) - np.log(y)), bt)
                # b^min below the least float rounds up to it (conservative: it carries S in time)
                bt = np.maximum(bt, _DENORM_MIN)
                b[tiny] = bt
                if slope:  # 1/(1+x) − a = a (1 − a − y)/(a + y), so ∂b/∂τ = −b (a + y)/((a + y − 1) w)
                    at = a[tiny]
                    db[tiny] = -bt * ((at + y) / (at + y - 1.0)) / wt
    if not slope:
        return b if b.ndim else float(b)
    return (b, db) if b.ndim else (float(b), float(db))


def bandwidth_for_deadline(payload_bits, snr_hz, compute_s, deadline_s):
    """b^min: least bandwidth (Hz) per client to finish by ``deadline_s`` (:func:`min_bandwidth`).

    Client k must upload ``payload_bits[k]`` within ``deadline_s − compute_s[k]`` seconds.
    Zero payload needs zero bandwidth; an impossible deadline gives ``inf``. b^min is
    convex and increasing in the payload and convex decreasing in the deadline.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        slack = _real("deadline_s", deadline_s) - _real("compute_s", compute_s)
    if np.isnan(slack).any():
        raise ValueError(f"deadline_s − compute_s is undefined (inf − inf); got deadline_s = {deadline_s!r}, "
                         f"compute_s = {compute_s!r}")
    return min_bandwidth(payload_bits, snr_hz, slack)
