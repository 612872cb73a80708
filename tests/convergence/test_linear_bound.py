"""The bound with exact constants on the linear teacher–student task (spec §5(a))."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from convergence import bound, exact_constants, linear_optimum, rank_term  # noqa: E402
from convergence.calibration import loss_curve, schedule_from_history  # noqa: E402
from fedloop import RunConfig, run  # noqa: E402
from fedloop.tasks import LinearTask  # noqa: E402

BASE = dict(task="linear", strategy="fixed", clients=6, rounds=12, local_steps=3, batch_size=16, lr=0.05,
            optimizer="sgd", momentum=0.0, penalty=0.0, linear={"dim": 16, "true_rank": 4, "samples": 120})

#: (rank, keep): ranks below, at and above the target's rank; keep ratios ¼ to 1.
GRID = [(2, 1), (4, 1), (4, 2), (4, 4), (6, 3)]


def run_and_bound(tmp_path, seed, rank, keep):
    cfg = RunConfig(**BASE, seed=seed, rank=rank, keep=keep, out=str(tmp_path / f"s{seed}_r{rank}_k{keep}"))
    h = run(cfg, progress=False)
    c = exact_constants(LinearTask(cfg), h)
    terms = bound(c, schedule_from_history(h))
    emp = loss_curve(h)[0] - c.floor  # the loss gap F(θ_t) − F*, t = 0..T
    return h, c, terms, emp


@pytest.mark.slow
def test_bound_holds_at_every_round_over_seeds_and_grid(tmp_path):
    tight = []
    for seed in range(5):
        for rank, keep in GRID:
            h, c, terms, emp = run_and_bound(tmp_path, seed, rank, keep)
            assert np.all(emp >= -1e-6), "the gap to the full-rank optimum cannot be negative"
            slack = terms.total - emp
            assert np.all(slack >= -1e-6 * np.maximum(emp, 1.0)), (seed, rank, keep, int(np.argmin(slack)))
            tight.append(terms.total[-1] / emp[-1])
            assert terms.total[0] == pytest.approx(emp[0], rel=1e-5)  # t = 0: the bound is the initial gap
    assert np.isfinite(tight).all()


def test_rank_term_equals_the_best_rank_r_training_loss():
    cfg = RunConfig(**BASE, rank=4, keep=2)
    task = LinearTask(cfg)
    opt = linear_optimum(task)
    p = task.client_sizes / task.client_sizes.sum()
    for r in (0, 1, 2, 4, 6):
        # the best rank-r product in each module, found independently (SVD in the Ŝ^{1/2} metric) ...
        total = 0.0
        for name, m in task.model.items():
            W, S = opt["modules"][name]["W_opt"], opt["modules"][name]["S"]
            w, V = np.linalg.eigh(S)
            half, ihalf = V @ np.diag(np.sqrt(w)) @ V.T, V @ np.diag(1 / np.sqrt(w)) @ V.T
            U, s, Zt = np.linalg.svd(W @ half)
            Wr = (U[:, :r] * s[:r]) @ Zt[:r] @ ihalf
            # ... and its training loss computed from the data itself, minus the full-rank optimum's
            i = list(task.model).index(name)
            for pk, x, y in zip(p, task.xs, task.ys, strict=True):
                X, Y = x.double().numpy(), y.double().numpy()[:, 16 * i:16 * (i + 1)]
                base = X @ m.weight.double().numpy().T
                total += pk * 0.5 * (((base + X @ Wr.T - Y) ** 2).sum(1).mean() - ((base + X @ W.T - Y) ** 2).sum(1)
                                     .mean())
        assert rank_term(opt["spectrum"], r) == pytest.approx(total, rel=1e-6, abs=1e-12)


def test_exact_constants_refuse_an_algorithm_the_theorem_does_not_cover(tmp_path):
    cfg = RunConfig(**{**BASE, "optimizer": "adamw"}, rank=4, keep=2, out=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="optimizer='sgd', momentum=0, penalty=0"):
        exact_constants(LinearTask(cfg), radius=1.0, gradient_bound=1.0, noise=1.0, pl=0.1, sparsification_factor=1.0)
    cfg = RunConfig(**BASE, rank=4, keep=2, out=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="needs a run history"):
        exact_constants(LinearTask(cfg))


def test_loop_measurements_are_consistent(tmp_path):
    h, c, terms, emp = run_and_bound(tmp_path, 0, 4, 2)
    f0, f1 = h.column("objective"), h.column("objective_after")
    np.testing.assert_allclose(f0[1:], f1[:-1], rtol=1e-6)  # the next round starts where this one ended
    # fixed keep < r: something is dropped every round; the aggregate's error is measured
    assert np.all(h.column("dropped_energy") > 0) and np.all(h.column("sparsification_error") > 0)
    assert c.initial_gap == pytest.approx(emp[0], rel=1e-5)
