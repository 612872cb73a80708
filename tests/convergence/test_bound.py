import math

import numpy as np
import pytest

from convergence import (
    BoundConstants,
    Schedule,
    bound,
    contraction_factor,
    drift_term,
    noise_term,
    rank_term,
)


def constants(**kw):
    base = dict(step_size=0.05, local_steps=4, smoothness=10.0, product_smoothness=2.0, noise=1.0, gradient_bound=1.0,
                pl=0.1, initial_gap=2.0, spectrum=[1.0, 0.5, 0.25, 0.1], scaling=1.0, split=0.05)
    base.update(kw)
    return BoundConstants(**base)


def test_closed_form_without_errors():
    c = constants(noise=0.0, gradient_bound=0.0)
    b = bound(c, Schedule(rounds=20, rank=2))
    a = 2 * c.step_size * c.pl * c.local_steps
    rho = (1 + c.split) * (1 - a)
    eps = 0.5 * (0.25 + 0.1)
    t = np.arange(21)
    geo = (1 - rho**t) / (1 - rho)
    np.testing.assert_allclose(b.total, rho**t * (c.initial_gap - eps) + eps * (1 + c.split * geo), rtol=1e-12)
    assert b.rate == pytest.approx(rho) == contraction_factor(c)
    assert np.all(b.noise == 0) and np.all(b.drift == 0)


def test_terms_sum_and_recursion():
    c = constants()
    rng = np.random.default_rng(0)
    e, cov = rng.uniform(0, 0.01, 15), rng.uniform(0, 1e-3, 15)
    b = bound(c, Schedule(rounds=15, rank=3, sparsification=e, covariance=cov))
    rho, beta = contraction_factor(c), c.split
    w = (1 + 1 / beta) * c.product_smoothness * c.scaling**2
    eps = rank_term(c.spectrum, 3)
    u = c.initial_gap - eps
    for t in range(15):  # the theorem's one-step recursion, unrolled by hand
        u = rho * u + noise_term(c) + drift_term(c) + beta * eps + w * (e[t] + cov[t])
        assert b.total[t + 1] == pytest.approx(u + eps, rel=1e-12)
    np.testing.assert_allclose(b.total, sum(b.as_dict()[k] for k in
                                            ("contraction", "noise", "drift", "sparsification", "covariance", "rank")))


def test_vectorised_over_ranks_and_keep_grids():
    c = constants(split=None)
    ranks = np.array([1, 2, 3, 4])[:, None]
    e = np.linspace(0.0, 0.02, 3)[None, :, None] * np.ones(10)  # 3 keep ratios, 10 rounds
    b = bound(c, Schedule(rounds=10, rank=ranks, sparsification=e))
    assert b.total.shape == (4, 3, 11)
    for i, r in enumerate((1, 2, 3, 4)):
        for j in range(3):
            single = bound(c, Schedule(rounds=10, rank=r, sparsification=e[0, j]))
            np.testing.assert_allclose(b.total[i, j], single.total, rtol=1e-12)
    # more error never predicts less loss; a larger rank never has a larger rank term
    assert np.all(np.diff(b.total[..., -1], axis=1) >= 0)
    assert np.all(np.diff(b.rank[:, 0, -1]) <= 0)


def test_split_choice_never_worse_than_any_fixed_split():
    c = constants(split=None)
    sch = Schedule(rounds=30, rank=2, sparsification=0.01, covariance=1e-4)
    best = bound(c, sch).total[-1]
    for beta in (1e-3, 0.02, 0.3, 2.0):
        assert best <= bound(c.replace(split=beta), sch).total[-1] * (1 + 1e-12)


@pytest.mark.parametrize("field,value,match", [
    ("noise", -1.0, "noise must be >= 0"),
    ("smoothness", float("nan"), "smoothness must be a finite number"),
    ("pl", float("inf"), "pl must be a finite number"),
    ("step_size", 0.0, "step_size must be > 0"),
    ("local_steps", 2.5, "local_steps must be an integer"),
    ("spectrum", [0.1, 0.5], "sorted non-increasing"),
    ("spectrum", [1.0, -0.5], "non-negative"),
    ("split", -1.0, "split must be"),
])
def test_bad_constants(field, value, match):
    with pytest.raises(ValueError, match=match):
        constants(**{field: value})


def test_bad_schedules():
    c = constants()
    with pytest.raises(ValueError, match="rank must lie in 0..4"):
        bound(c, Schedule(rounds=5, rank=5))
    with pytest.raises(ValueError, match="last axis of length rounds"):
        bound(c, Schedule(rounds=5, rank=2, sparsification=np.zeros(4)))
    with pytest.raises(ValueError, match="sparsification must be >= 0"):
        bound(c, Schedule(rounds=3, rank=2, sparsification=[0.1, -1.0, 0.0]))
    with pytest.raises(ValueError, match="covariance must be finite"):
        bound(c, Schedule(rounds=2, rank=2, covariance=[0.0, math.nan]))
    with pytest.raises(ValueError, match="rounds must be an integer"):
        bound(c, Schedule(rounds=-1, rank=2))


def test_two_dimensional_spectrum_sums_module_tails():
    spec = np.array([[3.0, 1.0, 0.0], [2.0, 2.0, 1.0]])
    assert rank_term(spec, 1) == pytest.approx(0.5 * (1.0 + 3.0))
    np.testing.assert_allclose(rank_term(spec, np.array([0, 3])), [0.5 * 9.0, 0.0])


def test_constants_round_trip():
    c = constants(spectrum=np.array([[1.0, 0.5], [0.2, 0.0]]))
    assert BoundConstants.from_dict(c.to_dict()).to_dict() == c.to_dict()


def synthetic_pilot(rho, k, w, T=40, seed=1):
    from fedloop.history import History

    rng = np.random.default_rng(seed)
    e = rng.uniform(0, 0.01, T)
    loss = [2.0]
    for t in range(T):
        loss.append(rho * loss[-1] + k + w * e[t])
    rounds = [{"round": t + 1, "test_loss": loss[t + 1], "dropped_energy": e[t], "covariance_sq": 0.0,
               "update_energy": 0.05, "grad_sq_mean": 1.0, "grad_mean_sq": 0.5} for t in range(T)]
    h = History(config={"rank": 2, "keep": 1, "lr": 0.01, "local_steps": 2, "alpha": None, "strategy": "tsfa"},
                rounds=rounds, meta={"initial_test_loss": loss[0]})
    return h, e, np.array(loss)


def test_calibrate_recovers_a_synthetic_recursion():
    from convergence import calibrate

    # without sparsification the trend is recovered exactly, and w = 0
    h, e, loss = synthetic_pilot(0.9, 0.03, 0.0)
    c = calibrate(h, [1.0, 0.3, 0.1], floor_min=None)
    b = bound(c, Schedule(rounds=len(e), rank=2, sparsification=e))
    np.testing.assert_allclose(b.loss(), loss, rtol=1e-6, atol=1e-8)
    assert b.rate == pytest.approx(0.9, rel=1e-6) and b.sparsification[-1] == pytest.approx(0.0, abs=1e-9)
    # with sparsification that varies independently of the trend, w is found from the residuals
    h, e, loss = synthetic_pilot(0.9, 0.03, 5.0)
    c = calibrate(h, [1.0, 0.3, 0.1], floor_min=None)
    b = bound(c, Schedule(rounds=len(e), rank=2, sparsification=e))
    np.testing.assert_allclose(b.loss(), loss, rtol=0.02)
    w_fit = (1 + 1 / c.split) * c.product_smoothness * c.scaling**2
    assert w_fit == pytest.approx(5.0, rel=0.15)
    # the floor: a loss cannot go below floor_min
    assert calibrate(h, [1.0, 0.3, 0.1], floor_min=0.0).floor >= 0.0
    # no spectrum: no rank term, same fit
    assert calibrate(h).spectrum.sum() == 0.0
    with pytest.raises(ValueError, match="needs >= 3"):
        calibrate(type(h)(config=h.config, rounds=h.rounds[:2], meta=h.meta))


def test_plot_writes_a_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convergence import plot_bound_vs_empirical
    from fedloop.history import History

    T = 6
    h = History(config={"rank": 2}, rounds=[{"round": t + 1, "test_loss": 1.0 / (t + 1)} for t in range(T)],
                meta={"initial_test_loss": 1.5})
    ax = plot_bound_vs_empirical([h, h], bound(constants(), Schedule(rounds=T, rank=2)))
    path = tmp_path / "b.png"
    ax.figure.savefig(path)
    plt.close(ax.figure)
    assert path.stat().st_size > 10_000
