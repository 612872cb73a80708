"""Offline design for a fedloop task (TSFA stage 1 wired to the calibrated bound).

``plan_for(config)`` builds exactly the system ``fedloop.run(config)`` would face (adapter
shape with the dense head in the header, the cell, the clients' large-scale gains and
compute times, the downlink, τ̄ and the per-round cap), takes ε(r)'s spectrum from the task
(exact on ``linear``; a pilot gradient of each adapted module on ``rt-minilm``), calibrates
the bound on a short pilot run (``convergence.calibrate``), and calls
:func:`tsfa.design_offline` with that predictor.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedloop.config import RunConfig

__all__ = ["plan_for", "task_spectrum", "pilot_config", "DEFAULT_RANKS", "DEFAULT_KEEP_RATIOS"]

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
             **design_kw):
    """The offline plan for ``cfg``'s system.

    Args:
        cfg: the run configuration (task, clients, seed, wireless settings, τ̄ …).
        pilot: a :class:`fedloop.History` to calibrate on (None: run a ``pilot_rounds`` pilot
            of ``cfg`` first).
        ranks, keep_ratios: the candidate grid (ranks above the task's module size are dropped).
        rounds: rounds to plan for (default ``cfg.rounds``).
        max_latency_factor: the SAA's per-round cap as a multiple of τ̄ ("config": the config's
            ``cap_factor``; None: no cap).
        draws: the SAA's fading draws.
        method: passed to :func:`tsfa.design_offline`.
        design_kw: other settings of the :class:`tsfa.OfflineProblem`, by their field names
            (e.g. ``v_rounds=40``, ``choose_v=False``; see ``OfflineProblem.replace``).

    Returns:
        (plan, pilot history, calibrated constants).
    """
    from convergence import calibrate, make_predictor
    from fedloop.loop import run
    from fedloop.server import DOWNLINK_RATE_BPS, Server
    from tsfa import Budgets, CandidateGrid, OfflineProblem, SaaSettings, SystemSpec, VSweepSettings, design_offline

    system = Server(cfg)
    spectrum = task_spectrum(system.task)
    if pilot is None:
        pilot = run(pilot_config(cfg, pilot_rounds), progress=progress)
    constants = calibrate(pilot, spectrum)
    max_rank = min(min(m.in_features, m.out_features) for m in system.shape.modules)
    ranks = [int(r) for r in ranks if int(r) <= min(max_rank, spectrum.shape[-1])]
    if not ranks:
        raise ValueError(f"no candidate rank fits the task's modules (largest rank {max_rank})")
    factor = cfg.cap_factor if max_latency_factor == "config" else max_latency_factor
    cap = None if factor is None else factor * system.tau_bar  # the SAA's per-round cap: clients that miss it skip
    problem = OfflineProblem(
        system=SystemSpec(system.shape, system.cell, system.clients, system.compute_s,
                          downlink_rate_bps=DOWNLINK_RATE_BPS),
        grid=CandidateGrid(ranks=ranks, keep_ratios=keep_ratios, rounds=cfg.rounds if rounds is None else rounds),
        budgets=Budgets(system.tau_bar, max_latency_s=cap),
        saa=SaaSettings(draws=draws),
        vsweep=VSweepSettings(online_drift=cfg.drift),
    )
    if design_kw:
        problem = problem.replace(**design_kw)
    plan = design_offline(problem, make_predictor(constants, pilot), method=method, rng=cfg.seed)
    return plan, pilot, constants
