"""Hostile input for convergence: the bound in closed form (no per-round Python loop), overflow
reported as ValueError naming the constant, and a validated calibration."""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convergence import BoundConstants, Schedule, bound
from convergence.calibration import calibrate, make_predictor

SETTINGS = settings(derandomize=True, deadline=None, max_examples=40, suppress_health_check=list(HealthCheck))


def constants(**kw):
    base = dict(step_size=0.05, local_steps=4, smoothness=10.0, product_smoothness=2.0, noise=1.0, gradient_bound=1.0,
                pl=0.1, initial_gap=2.0, spectrum=[1.0, 0.5, 0.25, 0.1], scaling=1.0)
    base.update(kw)
    return BoundConstants(**base)


def pilot(T=12, overrides=None):
    from fedloop.history import History

    rng = np.random.default_rng(0)
    loss = 2.0 * 0.9 ** np.arange(T + 1) + 0.1
    rounds = [{"round": t + 1, "test_loss": loss[t + 1], "dropped_energy": float(rng.uniform(0, 0.01)),
               "covariance_sq": 0.0, "update_energy": 0.05, "grad_sq_mean": 1.0, "grad_mean_sq": 0.5}
              for t in range(T)]
    for (t, key), v in (overrides or {}).items():
        rounds[t][key] = v
    return History(config={"rank": 2, "keep": 1, "lr": 0.01, "local_steps": 2, "alpha": None, "strategy": "tsfa"},
                   rounds=rounds, meta={"initial_test_loss": loss[0]})


# -- finding 2: the hang ---------------------------------------------------------------------------
def test_bound_at_ten_million_rounds_returns():
    # old: 2e5 rounds took 53 s (27 β × T Python iterations), 1e7 never returned; the speed itself
    # is measured in benchmarks/bound.py
    c = constants()
    b = bound(c, Schedule(rounds=200_000, rank=2, sparsification=0.01, covariance=1e-4))
    assert b.total.shape == (200_001,) and np.all(np.isfinite(b.total))
    big = bound(c, Schedule(rounds=10**7, rank=2, sparsification=0.01))
    assert big.total[-1] == pytest.approx(b.total[-1] - b.covariance[-1], rel=1e-9)


def test_predictor_at_ten_million_rounds_returns():
    c = constants()
    predict = make_predictor(c, {"update_energy": np.linspace(0.1, 0.01, 8), "covariance_sq": 0.0})
    out = predict(np.array([1, 2, 4]), np.array([0.5, 0.5, 0.25]), np.array([10**7, 10**7, 10**7]))
    assert np.all(np.isfinite(out["total"]))


def test_predictor_matches_the_full_bound():
    from convergence.calibration import predict_final_loss

    c = constants(floor=0.2)
    p = {"update_energy": np.linspace(0.1, 0.01, 8), "covariance_sq": np.full(8, 1e-4)}
    ranks, kr, T = np.array([1, 2, 4, 4]), np.array([1.0, 0.5, 0.25, 0.75]), np.array([3, 30, 8, 30])
    out = make_predictor(c, p)(ranks, kr, T)
    full = predict_final_loss(c, p, ranks, kr, 30)
    for i in range(4):
        assert out["total"][i] == pytest.approx(full.total[i, T[i]] + c.floor, rel=1e-12)


# -- overflow is an error naming the constant ----------------------------------------------------
@pytest.mark.parametrize("kw,rounds,match", [
    ({"step_size": 1e200}, 5, "step_size"),
    ({"split": 5.0, "pl": 0.0}, 10**6, "rho"),
    ({"product_smoothness": 1e308, "split": 1e-300}, 3, "product_smoothness|split"),
])
def test_bound_overflow_names_the_constant(kw, rounds, match):
    # old: nan/inf returned silently (or OverflowError from step_size**2)
    with pytest.raises(ValueError, match=match):
        bound(constants(**kw), Schedule(rounds=rounds, rank=2, sparsification=0.01))


@pytest.mark.parametrize("field,value", [("split", True), ("floor", True), ("noise", True), ("pl", 1j)])
def test_constants_reject_booleans_and_complex(field, value):
    with pytest.raises(ValueError, match=field):
        constants(**{field: value})


# -- finding 3: calibrate validates what it reads ---------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"skip": -1}, "skip"), ({"skip": True}, "skip"), ({"skip": 1.5}, "skip"),
    ({"floor_min": math.nan}, "floor_min"), ({"floor_min": math.inf}, "floor_min"),
])
def test_calibrate_rejects_bad_arguments(kwargs, match):
    # old: skip=-1 and floor_min=nan were accepted
    with pytest.raises(ValueError, match=match):
        calibrate(pilot(), **kwargs)


@pytest.mark.parametrize("column", ["dropped_energy", "covariance_sq", "update_energy"])
def test_calibrate_rejects_negative_energies(column):
    with pytest.raises(ValueError, match=f"{column}.*round 3"):
        calibrate(pilot(overrides={(3, column): -0.5}))


def test_calibrate_rejects_malformed_rounds():
    h = pilot()
    h.rounds = [1, 2, 3]
    with pytest.raises(ValueError, match="rounds must be a list of dicts"):
        calibrate(h)


# -- property: every call is a valid result or a ValueError naming the argument ----------------------
finite = st.floats(min_value=0.0, max_value=1e300, allow_nan=False)


@SETTINGS
@given(eta=st.floats(1e-300, 1e300), L=finite, noise=finite, G=finite, pl=finite, gap=finite, LW=finite,
       split=st.one_of(st.none(), st.floats(1e-300, 1e300)), T=st.integers(0, 5000),
       e=st.one_of(finite, st.lists(finite, min_size=1, max_size=1)))
def test_property_bound(eta, L, noise, G, pl, gap, LW, split, T, e):
    c = BoundConstants(step_size=eta, local_steps=2, smoothness=L, product_smoothness=LW, noise=noise,
                       gradient_bound=G, pl=pl, initial_gap=gap, spectrum=[1.0, 0.5], split=split)
    sched = Schedule(rounds=T, rank=1, sparsification=np.full(T, e[0]) if isinstance(e, list) else e)
    try:
        b = bound(c, sched)
    except ValueError as exc:
        assert any(name in str(exc) for name in ("step_size", "smoothness", "noise", "gradient_bound", "pl",
                                                 "initial_gap", "product_smoothness", "split", "scaling",
                                                 "rounds", "total"))
        return
    for v in b.as_dict().values():
        assert v.shape == (T + 1,) and np.all(np.isfinite(v))


@SETTINGS
@given(skip=st.one_of(st.integers(-3, 20), st.booleans(), st.floats()),
       floor_min=st.one_of(st.none(), st.floats()), bad=st.one_of(st.none(), st.floats(), st.text(max_size=2)))
def test_property_calibrate(skip, floor_min, bad):
    h = pilot() if bad is None else pilot(overrides={(2, "dropped_energy"): bad})
    try:
        c = calibrate(h, skip=skip, floor_min=floor_min)
    except ValueError as exc:
        assert any(n in str(exc) for n in ("skip", "floor_min", "dropped_energy", "calibrate needs"))
        return
    assert isinstance(c, BoundConstants)
    out = make_predictor(c, h)(np.array([1, 2]), np.array([0.5, 1.0]), np.array([5, 50]))
    assert np.all(np.isfinite(out["total"]))


@pytest.mark.parametrize("doc", [None, [], {"x": 1}, {}])
def test_constants_from_a_bad_document_are_a_value_error(doc):
    from convergence import BoundConstants

    with pytest.raises(ValueError):
        BoundConstants.from_dict(doc)
