"""Calibrated curves with a band (convergence.predict) and the rank-dependent speed (Lemma 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convergence import BoundConstants, Schedule, bound
from convergence.bound import reach
from convergence.predict import fit_curve, predict_from
from convergence.template import alternation, kept_share_curve, smooth_curve


class _History:
    """The parts of a fedloop History the calibration reads (``shares``: each client's share of
    delivered rounds, written as a clients' ledger that sends the full rank)."""

    def __init__(self, loss, rank, *, kept=1.0, optimizer="adamw", alpha=None, shares=None):
        self.config = {"rank": rank, "optimizer": optimizer, "alpha": alpha, "strategy": "fixed"}
        self.meta = {"initial_test_loss": float(loss[0])}
        prof = [1.0 - kept * (s / rank) for s in range(rank + 1)]
        self.rounds = [{"round": t, "test_loss": float(v), "objective_after": math.nan, "objective": math.nan,
                        "dropped_energy": 1.0 - kept, "update_energy": 1.0, "profile": prof}
                       for t, v in enumerate(loss[1:], start=1)]
        if shares is not None:
            T = len(self.rounds)
            self.config["clients"] = len(shares)
            self.config["strategy"] = "tsfa"
            self.clients = [{"round": t, "client": k, "keep": rank,
                             "status": "ok" if t <= round(share * T) else "skipped"}
                            for t in range(1, T + 1) for k, share in enumerate(shares)]

    def column(self, name):
        return np.array([r.get(name, math.nan) for r in self.rounds], dtype=float)


def modal(t, speed, gaps=(0.3, 0.15, 0.05), rates=(0.8, 0.2, 0.05), floor=0.2):
    """Σ_j g_j exp(−speed λ_j t): the quadratic model's gap under a product-space step ∝ speed."""
    t = np.asarray(t, dtype=float)
    return floor + sum(g * np.exp(-speed * lam * t) for g, lam in zip(gaps, rates, strict=True))


def test_smoothing_removes_an_alternation_between_rounds():
    t = np.arange(21)
    base = modal(t, 1.0)
    wiggle = base + 0.01 * (-1.0) ** t * (t > 0)
    s = smooth_curve(wiggle)
    assert s[0] == wiggle[0]
    assert np.max(np.abs(s[1:] - base[1:])) < 0.002  # the alternation is estimated and removed
    assert alternation(wiggle) == pytest.approx(0.01, abs=0.001) and abs(alternation(base)) < 0.001
    assert np.allclose(smooth_curve(base), base, atol=1e-3)  # a smooth decreasing curve is left as it is
    assert np.all(np.diff(s[1:]) <= 1e-15)  # non-increasing


def test_time_rescaling_recovers_the_rank_exponent_and_predicts_a_third_rank():
    p_true, T = 0.5, 20
    f = lambda r: (r / 4) ** p_true  # noqa: E731
    pilots = [_History(modal(np.arange(T + 1), f(r)), r) for r in (2, 8)]
    cal = fit_curve(pilots, floor=0.2, boots=0)
    assert cal.model.rank_power == pytest.approx(p_true, abs=0.051)
    assert cal.identified["rank_power"]
    pred = cal.predict(4, 4, T)
    exact = modal(np.arange(T + 1), f(4))
    assert np.max(np.abs(pred.predicted - exact)) < 0.02 * (exact[0] - 0.2)


def test_one_pilot_takes_lemma_2_exponent_and_says_so():
    h = _History(modal(np.arange(11), 1.0), 4, optimizer="sgd", alpha=8.0)
    cal = fit_curve(h, boots=0, floor=0.2)
    assert cal.model.rank_power == -1.0  # SGD with fixed α: ν ∝ γ² r ∝ 1/r
    assert any("Lemma 2" in n for n in cal.notes)
    cal = fit_curve(_History(modal(np.arange(11), 1.0), 4), boots=0, floor=0.2)
    assert cal.model.rank_power == 1.0  # α = r (γ = 1): ν ∝ r


def test_band_covers_noisy_runs_of_a_held_out_rank():
    rng = np.random.default_rng(3)
    T, sd = 20, 0.01
    f = lambda r: (r / 4) ** 0.6  # noqa: E731
    noisy = lambda r: modal(np.arange(T + 1), f(r)) + np.r_[0.0, rng.normal(0, sd, T)]  # noqa: E731
    cal = fit_curve([_History(noisy(2), 2), _History(noisy(8), 8)], floor=0.2, boots=100, rng=1)
    pred = cal.predict(4, 4, T)
    cover = [pred.coverage(noisy(4)) for _ in range(30)]
    assert np.mean(cover) >= 0.85  # a 90 % band for one run's curve
    mean_curve = np.mean([noisy(4) for _ in range(5)], axis=0)
    assert pred.coverage(mean_curve) >= 0.9
    assert np.all(pred.low <= pred.predicted) and np.all(pred.predicted <= pred.high)
    assert np.median(pred.high - pred.low) < 0.1  # not a band that covers everything


def test_predictor_for_the_offline_stage_orders_ranks_and_keeps():
    T = 20
    f = lambda r: (r / 4) ** 0.6  # noqa: E731
    cal = fit_curve([_History(modal(np.arange(T + 1), f(r)), r) for r in (2, 8)], floor=0.2, boots=20,
                    keep_floor=0.05)
    predict = cal.predictor()
    out = predict(np.array([2, 4, 8, 16]), np.array([1.0, 1.0, 1.0, 1.0]), np.array([T, T, T, T]))
    assert set(out) >= {"total", "low", "high", "rank", "speed"}
    assert np.all(np.isfinite(out["total"])) and np.all(np.diff(out["total"]) < 0)  # faster at larger rank
    half = predict(np.array([4, 4]), np.array([1.0, 1.0]), np.array([T, T]), kept_share=np.array([0.5, 1.0]))
    assert half["total"][0] > half["total"][1]  # a smaller kept share leaves more unlearned
    long = predict(np.array([4]), np.array([1.0]), np.array([10**6]))  # only the final round is evaluated
    assert np.isfinite(long["total"]).all() and long["total"][0] >= 0.2 - 1e-12
    with pytest.raises(ValueError, match="keep_ratio"):
        predict(np.array([4]), np.array([0.0]), np.array([T]))
    with pytest.raises(ValueError, match="kept_share"):
        predict(np.array([4]), np.array([1.0]), np.array([T]), kept_share=np.array([1.5]))


def test_three_pilots_recover_the_keep_floor():
    """Pilots (2, full), (8, full), (8, half kept): p from the ranks, φ from the kept shares."""
    T, phi, p_true = 20, 0.08, 0.5

    def cell(r, kept):
        return modal(np.arange(T + 1), (r / 4) ** p_true, floor=0.2 + phi * (1 - kept))

    pilots = [_History(cell(2, 1.0), 2), _History(cell(8, 1.0), 8), _History(cell(8, 0.5), 8, kept=0.5)]
    cal = fit_curve(pilots, floor=0.2, boots=0)
    assert cal.identified["keep_floor"] and cal.identified["rank_power"]
    assert cal.model.keep_floor == pytest.approx(phi, rel=0.1)
    assert cal.model.rank_power == pytest.approx(p_true, abs=0.051)
    pred = cal.predict(4, None, T, kept_share=0.5)
    assert np.max(np.abs(pred.predicted[1:] - cell(4, 0.5)[1:])) < 0.02 * 0.5


def test_seeds_of_one_configuration_are_averaged_and_widen_the_band():
    rng = np.random.default_rng(0)
    T = 15
    runs = [_History(modal(np.arange(T + 1), 1.0 + 0.3 * rng.normal()), 4) for _ in range(4)]
    for i, h in enumerate(runs):
        h.config["seed"] = i
    one = fit_curve(runs[0], floor=0.2, boots=60)
    many = fit_curve(runs, floor=0.2, boots=60)
    assert any("averaged over seeds" in n for n in many.notes)
    width = lambda c: float(np.mean(c.predict(4, 4, T).high - c.predict(4, 4, T).low))  # noqa: E731
    assert width(many) > width(one)  # the seed-to-seed spread enters the band


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"floor": math.nan}, "floor"), ({"boots": -1}, "boots"), ({"rounds": 2}, "rounds"),
    ({"rank_power": "1"}, "rank_power"), ({"keep_floor": -0.1}, "keep_floor")])
def test_bad_arguments_name_themselves(kwargs, match):
    h = _History(modal(np.arange(11), 1.0), 4)
    with pytest.raises(ValueError, match=match):
        fit_curve(h, **kwargs)


def test_a_pilot_without_its_start_or_with_gaps_is_refused():
    h = _History(modal(np.arange(11), 1.0), 4)
    h.meta["initial_test_loss"] = math.nan
    with pytest.raises(ValueError, match="start loss"):
        fit_curve(h)
    h = _History(modal(np.arange(11), 1.0), 4)
    h.rounds[3]["test_loss"] = math.nan
    with pytest.raises(ValueError, match="every round"):
        fit_curve(h)
    with pytest.raises(ValueError, match="profile"):
        kept_share_curve([1.0, 1.2, 0.0])


def test_predict_from_uses_the_first_rounds_only():
    loss = modal(np.arange(21), 1.0)
    h = _History(loss, 4)
    a = predict_from(h, rounds=8, boots=0)
    b = fit_curve(_History(loss[:9], 4), boots=0)
    assert np.array_equal(a.predict(4, 4, 20).predicted, b.predict(4, 4, 20).predicted)


# -- Lemma 2: the reach ν(r) ----------------------------------------------------------------------
def test_lemma_2_expected_reach_by_monte_carlo():
    """E_A ‖∇G Aᵀ‖² = r v ‖∇G‖² for A with i.i.d. entries of variance v (peft's Kaiming-uniform A)."""
    rng = np.random.default_rng(0)
    m, n = 24, 40
    grad = rng.normal(size=(m, n)) @ np.diag(np.linspace(3.0, 0.1, n))  # an anisotropic ∇_W G
    v = 1.0 / (3 * n)
    for r in (1, 4, 16):
        A = rng.uniform(-1 / math.sqrt(n), 1 / math.sqrt(n), size=(4000, r, n))
        ratio = np.einsum("mn,drn->dmr", grad, A)
        ratio = (ratio**2).sum(axis=(1, 2)) / (grad**2).sum()
        se = ratio.std() / math.sqrt(len(ratio))
        assert abs(ratio.mean() - r * v) < 4 * se, (r, ratio.mean(), r * v)


def test_lemma_2_on_the_linear_task_start():
    """At the start (B = 0) the loop's ‖∇_θ f(θ_0)‖² is γ² Σ_ℓ ‖∇_W G_ℓ(0) A_ℓᵀ‖² exactly, and over
    A's draws its mean is γ² r v Σ_ℓ ‖∇_W G_ℓ(0)‖²."""
    pytest.importorskip("torch")
    from convergence import linear_optimum
    from fedloop import RunConfig
    from fedloop.server import Server

    cfg = RunConfig(task="linear", strategy="fedit", rounds=1, clients=4, rank=4, keep=2, out="unused")
    server = Server(cfg)
    task = server.task
    opt = linear_optimum(task)
    gamma = task.scaling
    grads = {name: -mod["W_opt"] @ mod["S"] for name, mod in opt["modules"].items()}
    exact = sum(gamma**2 * float(np.sum((g @ task.model[name].lora_A.detach().double().numpy().T) ** 2))
                for name, g in grads.items())
    from fedloop import measure

    start = measure.start_point(task, server.global_factors, server.weights)
    measured = start["gradient_norm_sq"]
    assert measured == pytest.approx(exact, rel=1e-6)
    n = next(iter(grads.values())).shape[1]
    expected = gamma**2 * cfg.rank / (3 * n) * sum(float(np.sum(g**2)) for g in grads.values())
    rng = np.random.default_rng(1)
    draws = [gamma**2 * sum(float(np.sum((g @ rng.uniform(-1, 1, (cfg.rank, n)).T / math.sqrt(n)) ** 2))
                            for g in grads.values()) for _ in range(3000)]
    assert abs(np.mean(draws) - expected) < 4 * np.std(draws) / math.sqrt(len(draws))


def test_bound_speeds_up_larger_ranks_and_is_unchanged_at_the_reference_rank():
    c = BoundConstants(step_size=0.05, local_steps=4, smoothness=2.0, product_smoothness=1.0, noise=0.1,
                       gradient_bound=1.0, pl=0.5, initial_gap=1.0, spectrum=np.linspace(0.01, 0, 16))
    sched = Schedule(rounds=30, rank=np.array([2, 4, 8]), sparsification=0.01, covariance=0.0)
    plain = bound(c, sched)
    fast = bound(c.replace(reach_rank=4, reach_power=1.0), sched)
    assert np.allclose(fast.total[1], plain.total[1])  # r = r_0: Theorem 1 as it was
    assert np.allclose(fast.reach, [0.5, 1.0, 2.0]) and np.allclose(plain.reach, 1.0)
    assert fast.rates[0] > fast.rates[1] > fast.rates[2]  # larger reach, smaller contraction factor
    assert fast.contraction[2, -1] < plain.contraction[2, -1] and fast.contraction[0, -1] > plain.contraction[0, -1]
    assert reach(16, 4, 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="reach_rank"):
        c.replace(reach_rank=0)


def test_a_short_monotone_pilot_still_gets_a_band():
    """Five noisy but decreasing rounds fit the non-increasing template exactly; the band takes
    the noise the second differences show instead of collapsing to a line."""
    loss = modal(np.arange(6), 1.0)
    loss[1:] += np.array([0.012, -0.004, 0.006, -0.009, 0.003])
    loss[1:] = np.minimum.accumulate(loss[1:])
    cal = predict_from(_History(loss, 4), boots=40)
    pred = cal.predict(4, 4, 10)
    assert np.min(pred.high[1:] - pred.low[1:]) > 1e-3


def test_an_online_pilot_identifies_the_participation_cost():
    """Proposition 4 as the model uses it: a tsfa pilot that skips two clients most rounds
    sits ψ χ² above the full-participation curve; fit_curve recovers ψ, and the predictor adds
    ψ χ² for a candidate's χ²."""
    from tsfa import participation_divergence

    T, psi, p_true = 20, 0.3, 0.5
    shares = [1.0] * 8 + [0.25, 0.25]
    chi2 = float(participation_divergence(shares))
    assert chi2 > 0.05

    def cell(r, extra=0.0):
        return modal(np.arange(T + 1), (r / 4) ** p_true, floor=0.2 + extra)

    pilots = [_History(cell(2), 2), _History(cell(8), 8)]
    online = _History(cell(4, psi * chi2), 4, shares=shares)
    cal = fit_curve(pilots, floor=0.2, boots=20, online_pilot=online)
    assert cal.identified["participation_cost"]
    assert cal.model.participation_cost == pytest.approx(psi, rel=0.1)
    assert any("participation cost ψ" in n for n in cal.notes)
    predict = cal.predictor()
    out = predict(np.array([4, 4]), np.array([1.0, 1.0]), np.array([T, T]), participation=np.array([0.0, chi2]))
    assert out["total"][1] - out["total"][0] == pytest.approx(cal.model.participation_cost * chi2, rel=0.05)
    with pytest.raises(ValueError, match="participation"):
        predict(np.array([4]), np.array([1.0]), np.array([T]), participation=np.array([-1.0]))
    # without an online pilot (or with one that runs every client) ψ stays 0 and a note says why
    even = fit_curve(pilots, floor=0.2, boots=0, online_pilot=_History(cell(4), 4, shares=[0.5] * 10))
    assert even.model.participation_cost == 0.0 and not even.identified["participation_cost"]
    assert any("does not identify" in n for n in even.notes)


def test_an_online_pilot_of_several_seeds_is_averaged_and_its_seeds_resampled():
    T, psi = 20, 0.3
    shares = [1.0] * 8 + [0.25, 0.25]
    from tsfa import participation_divergence

    chi2 = float(participation_divergence(shares))
    pilots = [_History(modal(np.arange(T + 1), 0.5 ** 0.5), 2), _History(modal(np.arange(T + 1), 2 ** 0.5), 8)]
    online = modal(np.arange(T + 1), 1.0, floor=0.2 + psi * chi2)
    noise = np.random.default_rng(0).normal(0, 0.004, (3, T + 1)) * (np.arange(T + 1) > 0)
    noise -= noise.mean(axis=0)  # the seeds' mean is the noiseless curve
    runs = []
    for i in range(3):
        h = _History(online + noise[i], 4, shares=shares)
        h.config["seed"] = i
        runs.append(h)
    cal = fit_curve(pilots, floor=0.2, boots=20, online_pilot=runs)
    assert cal.model.participation_cost == pytest.approx(psi, rel=0.05)
    mean = fit_curve(pilots, floor=0.2, boots=0, online_pilot=_History(online, 4, shares=shares))
    assert cal.model.participation_cost == pytest.approx(mean.model.participation_cost, rel=1e-6)
    assert any("3 seeds" in n for n in cal.notes)
    spread = [m.participation_cost for m in cal.replicates]
    assert max(spread) > min(spread)  # the seeds are resampled: the replicates differ
    other = _History(online, 8, shares=shares)
    with pytest.raises(ValueError, match="online_pilot must be one run or runs of one configuration"):
        fit_curve(pilots, floor=0.2, boots=0, online_pilot=[runs[0], other])


def test_proposition_4_bounds_the_bias_of_uneven_participation_on_quadratics():
    """F_k(θ) = ½ (θ − c_k)ᵀ H (θ − c_k), μ = λ_min(H): F(θ_w) − F* ≤ χ²(w‖p) ζ²_p / (2μ)."""
    from tsfa import participation_divergence

    rng = np.random.default_rng(4)
    ratios = []
    for _ in range(200):
        K, d = int(rng.integers(2, 8)), int(rng.integers(1, 5))
        Q = rng.standard_normal((d, d))
        H = Q @ Q.T + 0.1 * np.eye(d)
        c = rng.standard_normal((K, d)) * rng.uniform(0.1, 3)
        p = rng.dirichlet(np.ones(K))
        pi = rng.uniform(0, 1, K)
        w = p * pi / np.sum(p * pi)
        theta_p, theta_w = p @ c, w @ c  # the minimisers of F and F_w (one Hessian)
        gap = 0.5 * (theta_w - theta_p) @ H @ (theta_w - theta_p)
        zeta2 = float(np.sum(p * np.sum(((theta_w - c) @ H) ** 2, axis=1)))  # ∇F_k(θ_w) − ∇F_w(θ_w) = H(θ_w − c_k)
        chi2 = float(participation_divergence(pi, p))
        assert chi2 == pytest.approx(float(np.sum(w**2 / p) - 1), rel=1e-9, abs=1e-12)
        bound = chi2 * zeta2 / (2 * np.linalg.eigvalsh(H)[0])
        assert gap <= bound * (1 + 1e-9) + 1e-12
        ratios.append(gap / bound if bound > 0 else 1.0)
    assert max(ratios) > 0.3  # not vacuous: some instances come close
