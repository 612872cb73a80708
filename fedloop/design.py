"""Offline design for a fedloop task (TSFA stage 1 wired to the calibrated bound).

``plan_for(config)`` builds exactly the system ``fedloop.run(config)`` would face (adapter
shape with the dense head in the header, the cell, the clients' large-scale gains and
compute times, the downlink, τ̄ and the per-round cap), takes ε(r)'s spectrum from the task
(exact on ``linear``; a pilot gradient of each adapted module on ``rt-minilm``), calibrates
its predictions on a short pilot run (``convergence.fit_curve``: calibrated curves with a
band; or ``convergence.calibrate``: the calibrated bound), models the simulator's error
profiles on the pilot's measured profile, and calls :func:`tsfa.design_offline` with the
online stage simulated per candidate rank (the nominal SAA as a screen).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedloop.config import RunConfig

__all__ = ["plan_for", "task_spectrum", "pilot_config", "linear_floor", "DEFAULT_RANKS", "DEFAULT_KEEP_RATIOS"]

DEFAULT_RANKS = (1, 2, 4, 8, 16)
DEFAULT_KEEP_RATIOS = (0.25, 0.5, 1.0)


def task_spectrum(task, *, batch: int = 64) -> np.ndarray:
    """ε(r)'s spectrum, one row per adapted module: exact on the linear task, from a pilot
    gradient of every adapted module's frozen weight otherwise (convergence.estimate_spectrum)."""
    from convergence import estimate_spectrum, stack_spectra

    if task.name == "linear":
        from convergence import linear_optimum

        return linear_optimum(task)["spectrum"]
    layers = {name: mod.base_layer for name, mod in task._lora_modules()}
    per = max(1, batch // len(task.client_indices))
    idx = np.concatenate([c[:per] for c in task.client_indices])[:batch]
    b = task.batch(idx)
    return stack_spectra(estimate_spectrum(lambda: task.loss(b), layers, num_samples=len(idx)))


def pilot_config(cfg: RunConfig, rounds: int = 8) -> RunConfig:
    """The pilot: the same configuration, fewer rounds, its own folder."""
    return cfg.replace(rounds=min(rounds, cfg.rounds), out=str(Path(cfg.out) / "pilot"))


def plan_for(cfg: RunConfig, *, pilot=None, ranks: Sequence[int] = DEFAULT_RANKS,
             keep_ratios: Sequence[float] = DEFAULT_KEEP_RATIOS, rounds=None, pilot_rounds: int = 8,
             draws: int = 200, method: str = "milp", progress: bool = False, max_latency_factor="config",
             predictor: str = "curve", calibration=None, latency_model: str = "online", online_pilot=None,
             **design_kw):
    """The offline plan for ``cfg``'s system.

    Args:
        cfg: the run configuration (task, clients, seed, wireless settings, τ̄ …).
        pilot: a :class:`fedloop.History` (or a list of them, e.g. two ranks of one seed) to
            calibrate on (None: run a ``pilot_rounds`` pilot of ``cfg`` first).
        ranks, keep_ratios: the candidate grid (ranks above the task's module size are dropped).
        rounds: rounds to plan for (default ``cfg.rounds``).
        max_latency_factor: the SAA's per-round cap as a multiple of τ̄ ("config": the config's
            ``cap_factor``; None: no cap).
        draws: the SAA's fading draws.
        method: passed to :func:`tsfa.design_offline`.
        predictor: "curve" (calibrated curves with a band, :func:`convergence.fit_curve`; the
            default) or "bound" (the calibrated bound, :func:`convergence.calibrate`).
        calibration: an already calibrated :class:`convergence.Calibration` (or
            :class:`convergence.BoundConstants`) to predict with instead.
        latency_model: "online" (the online stage simulated per candidate rank and V, the
            nominal SAA as a screen; the default) or "nominal" (``tsfa.VSweepSettings``).
        online_pilot: a ``tsfa`` run (History), or a list of its seeds, whose skipping
            identifies the participation cost ψ of the curve predictor (docs/theory.md §6,
            Proposition 4; None: ψ = 0).
        design_kw: other settings of the :class:`tsfa.OfflineProblem`, by their field names
            (e.g. ``v_rounds=40``, ``choose_v=False``; see ``OfflineProblem.replace``).

    Returns:
        (plan, pilot history or list, the calibration predictions came from).
    """
    from convergence import calibrate, fit_curve, make_predictor
    from fedloop.loop import run
    from fedloop.server import DOWNLINK_RATE_BPS, Server
    from tsfa import Budgets, CandidateGrid, OfflineProblem, SaaSettings, SystemSpec, VSweepSettings, design_offline
    from tsfa.simulate import ErrorModel

    if predictor not in ("curve", "bound"):
        raise ValueError(f"predictor must be 'curve' or 'bound'; got predictor = {predictor!r}")
    system = Server(cfg)
    spectrum = task_spectrum(system.task)
    if pilot is None:
        pilot = run(pilot_config(cfg, pilot_rounds), progress=progress)
    pilots = list(pilot) if isinstance(pilot, (list, tuple)) else [pilot]
    if calibration is None:
        floor = 0.0  # squared error and cross-entropy
        if system.task.name == "linear":
            floor = float(linear_floor(system.task))
        calibration = fit_curve(pilots, spectrum, floor=floor, rng=cfg.seed, online_pilot=online_pilot,
                                data_weight=system.weights) if predictor == "curve" \
            else calibrate(pilots[-1], spectrum)
    max_rank = min(min(m.in_features, m.out_features) for m in system.shape.modules)
    ranks = [int(r) for r in ranks if int(r) <= min(max_rank, spectrum.shape[-1])]
    if not ranks:
        raise ValueError(f"no candidate rank fits the task's modules (largest rank {max_rank})")
    factor = cfg.cap_factor if max_latency_factor == "config" else max_latency_factor
    cap = None if factor is None else factor * system.tau_bar  # the SAA's per-round cap: clients that miss it skip
    error_model = _error_model(pilots[-1], ErrorModel)
    problem = OfflineProblem(
        system=SystemSpec(system.shape, system.cell, system.clients, system.compute_s,
                          downlink_rate_bps=DOWNLINK_RATE_BPS),
        grid=CandidateGrid(ranks=ranks, keep_ratios=keep_ratios, rounds=cfg.rounds if rounds is None else rounds),
        budgets=Budgets(system.tau_bar, max_latency_s=cap),
        saa=SaaSettings(draws=draws),
        vsweep=VSweepSettings(online_drift=cfg.drift, latency_model=latency_model, error_model=error_model,
                              online_initial_queue=cfg.initial_queue),
    )
    if design_kw:
        problem = problem.replace(**design_kw)
    plan = design_offline(problem, make_predictor(calibration, pilots[-1]), method=method, rng=cfg.seed)
    return plan, pilot, calibration


def linear_floor(task) -> float:
    """F* of the linear task (its exact optimum), what the curve calibration floors at."""
    from convergence import linear_optimum

    return float(linear_optimum(task)["floor"])


def _error_model(pilot, error_model_cls):
    """The simulator's error profiles from the pilot's measured mean profile (its decay), or the
    default model when the pilot recorded none."""
    profiles = [row["profile"] for row in pilot.rounds if isinstance(row.get("profile"), list)]
    if not profiles or len({len(p) for p in profiles}) != 1:
        return None
    try:
        return error_model_cls.from_profile(np.mean(np.asarray(profiles, dtype=float), axis=0))
    except ValueError:  # e.g. all energy in one component: the default model
        return None
