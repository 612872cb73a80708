import numpy as np
import pytest

from convergence.rank import covariance_weighted_spectrum, rank_term


def best_rank_r_loss(D, S, r):
    """½ E‖(D − Δ) x‖² minimised over rank-r Δ, computed independently: Δ Σ^{1/2} is the SVD truncation."""
    w, V = np.linalg.eigh(S)
    half = V @ np.diag(np.sqrt(w)) @ V.T
    ihalf = V @ np.diag(1 / np.sqrt(w)) @ V.T
    U, s, Wt = np.linalg.svd(D @ half)
    delta = (U[:, :r] * s[:r]) @ Wt[:r] @ ihalf
    E = D - delta
    return 0.5 * np.trace(E @ S @ E.T)


@pytest.mark.parametrize("seed", range(5))
def test_rank_term_equals_best_rank_r_loss_on_a_linear_layer(seed):
    rng = np.random.default_rng(seed)
    m, n = 12, 10
    D = rng.normal(size=(m, 6)) @ rng.normal(size=(6, n))  # a rank-6 target update
    A = rng.normal(size=(n, n))
    S = A @ A.T / n + 0.1 * np.eye(n)  # an input covariance
    lam = covariance_weighted_spectrum(D, S)
    for r in range(0, 8):
        assert rank_term(lam, r) == pytest.approx(best_rank_r_loss(D, S, r), rel=1e-6, abs=1e-12)
    np.testing.assert_allclose(rank_term(lam, np.arange(4)), [rank_term(lam, r) for r in range(4)])


def test_rank_term_with_the_linear_task_population():
    pytest.importorskip("torch")
    from fedloop import RunConfig
    from fedloop.tasks import LinearTask

    task = LinearTask(RunConfig(task="linear", clients=4, rank=4, linear={"dim": 16, "true_rank": 6}))
    S = np.diag(task.client_scales.mean(0).numpy().astype(float))  # the test inputs' covariance
    for name in task.model:
        D = task.target_delta[name].double().numpy()
        lam = covariance_weighted_spectrum(D, S)
        for r in (0, 2, 4, 6):
            assert rank_term(lam, r) == pytest.approx(best_rank_r_loss(D, S, r), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("spectrum,rank,match", [
    ([1.0, 2.0], 1, "sorted"),
    ([1.0, -0.1], 1, "non-negative"),
    ([1.0, float("nan")], 1, "finite"),
    ([], 0, "non-empty"),
    ([2.0, 1.0], 3, "rank must lie in 0..2"),
    ([2.0, 1.0], 1.5, "rank must be integers"),
])
def test_bad_input(spectrum, rank, match):
    with pytest.raises(ValueError, match=match):
        rank_term(spectrum, rank)
