import numpy as np
import pytest

torch = pytest.importorskip("torch")

from convergence import covariance_weighted_spectrum, rank_term  # noqa: E402
from convergence.spectrum import estimate_spectrum  # noqa: E402


def test_pilot_gradient_spectrum_is_exact_on_a_linear_layer():
    g = torch.Generator().manual_seed(0)
    m, n, N = 10, 8, 500
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    D = torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g, dtype=torch.float64)
    layer = torch.nn.Linear(n, m, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(W0)
    layer.weight.requires_grad_(False)
    X = torch.randn(N, n, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    Y = X @ (W0 + D).T
    est = estimate_spectrum(lambda: 0.5 * ((layer(X) - Y) ** 2).sum(1).mean(), {"q": layer}, ridge=0.0)["q"]
    exact = covariance_weighted_spectrum(D.numpy(), (X.T @ X / N).numpy())
    np.testing.assert_allclose(est, exact, rtol=1e-8, atol=1e-10 * exact[0])
    for r in range(4):
        assert rank_term(est, r) == pytest.approx(rank_term(exact, r), rel=1e-8, abs=1e-12)
    assert not layer.weight.requires_grad  # flags restored


def test_linear_task_modules():
    from fedloop import RunConfig
    from fedloop.tasks import LinearTask

    task = LinearTask(RunConfig(task="linear", clients=2, rank=4, linear={"dim": 12, "true_rank": 3, "noise": 0.0}))
    x, y = task.x_test, task.y_test
    est = estimate_spectrum(lambda: task.loss((x, y)), dict(task.model.items()))
    S = (x.double().T @ x.double() / len(x)).numpy()
    for name in task.model:
        exact = covariance_weighted_spectrum(task.target_delta[name].double().numpy(), S)
        np.testing.assert_allclose(est[name][:3], exact[:3], rtol=1e-4)  # float32 model
        assert est[name][3:].max() < 1e-4 * exact[0]


def test_bad_input():
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not called"):
        estimate_spectrum(lambda: (torch.nn.Linear(3, 2)(torch.ones(1, 3)) ** 2).sum(), {"x": layer})
    with pytest.raises(ValueError, match="at least one"):
        estimate_spectrum(lambda: torch.tensor(0.0), {})
