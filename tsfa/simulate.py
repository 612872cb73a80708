"""Allocation-only simulator (no training): the online stage over thousands of rounds.

Each round draws Rayleigh fading for every client (``Cell.sample_snr_hz``) and error
profiles from :class:`ErrorModel`, asks a policy for an allocation, and feeds back the
realised latency. It reports the time-average latency, the average dropped energy
Σ_k p_k e_k(s_k) and the queue trajectory, which shows the Lyapunov trade-off: larger V
drops less energy and lets the queue grow, while the time-average latency stays ≤ τ̄
(up to O(1/T) and the O(1/V) penalty-gap terms of drift-plus-penalty).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tsfa._validate import as_scalar
from tsfa.bandwidth import min_latency_bandwidth
from tsfa.model import Cell, Clients, LoraShape

__all__ = ["ErrorModel", "SimulationResult", "simulate_allocation", "dense_latency_s"]


@dataclass(frozen=True)
class ErrorModel:
    """Stated model of per-round error profiles.

    Client k's rank-component energies in round t are
    σ²_{k,i}(t) = a_k · u_{k,t} · i^(−decay), i = 1..r (sorted, decreasing), with a fixed
    client scale a_k ~ LogNormal(0, client_spread) and a round factor
    u_{k,t} ~ LogNormal(0, round_jitter). The profile is e_k(s) = Σ_{i>s} σ²_{k,i}, so
    e_k(r) = 0 and e_k is convex and decreasing in s.
    """

    decay: float = 1.0
    client_spread: float = 0.5
    round_jitter: float = 0.3

    def __post_init__(self):
        as_scalar("decay", self.decay, lower=0)
        as_scalar("client_spread", self.client_spread, lower=0)
        as_scalar("round_jitter", self.round_jitter, lower=0)

    def client_scales(self, num_clients: int, rng) -> np.ndarray:
        return np.random.default_rng(rng).lognormal(0.0, self.client_spread, num_clients)

    def sample(self, rank: int, scales: np.ndarray, rng) -> np.ndarray:
        """Error profiles, shape (K, rank + 1)."""
        rng = np.random.default_rng(rng)
        energy = scales[:, None] * rng.lognormal(0.0, self.round_jitter, (len(scales), 1))
        energy = energy * np.arange(1, rank + 1) ** (-self.decay)
        tail = np.cumsum(energy[:, ::-1], axis=1)[:, ::-1]  # e(s) = Σ_{i>s}
        return np.concatenate([tail, np.zeros((len(scales), 1))], axis=1)


@dataclass(frozen=True, eq=False)
class SimulationResult:
    """Per-round traces (length T) and their summaries."""

    latency_s: np.ndarray
    dropped_energy: np.ndarray
    queue: np.ndarray
    mean_keep: np.ndarray
    uplink_bits: np.ndarray
    fallbacks: int
    latency_budget_s: float | None

    @property
    def time_average_latency_s(self) -> float:
        return float(self.latency_s.mean())

    @property
    def average_dropped_energy(self) -> float:
        return float(self.dropped_energy.mean())

    @property
    def average_queue(self) -> float:
        return float(self.queue.mean())


def dense_latency_s(cell: Cell, clients: Clients, shape: LoraShape, compute_s, *, downlink_s=0.0,
                    rounds: int = 200, rng=None, statistic: str = "median") -> float:
    """Median (or mean) least round latency when every client uploads densely (Monte Carlo
    over fading). The mean is dominated by rare deep fades; the median is the typical round."""
    rng = np.random.default_rng(rng)
    bits = np.full(len(clients), shape.dense_payload_bits)
    lat = [min_latency_bandwidth(bits, snr, compute_s, cell.total_bandwidth_hz, downlink_s=downlink_s).latency_s
           for snr in cell.sample_snr_hz(clients, rng=rng, rounds=rounds)]
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean'; got {statistic!r}")
    return float(np.median(lat) if statistic == "median" else np.mean(lat))


def simulate_allocation(policy, cell: Cell, clients: Clients, *, rounds: int, compute_s,
                        error_model: ErrorModel | None = None, data_weight=None, rng=None,
                        progress: bool = False) -> SimulationResult:
    """Run ``policy`` (an OnlineAllocator or a baseline) for ``rounds`` rounds."""
    rounds = as_scalar("rounds", rounds, lower=1, integer=True)
    rng = np.random.default_rng(rng)
    em = error_model or ErrorModel()
    scales = em.client_scales(len(clients), rng)
    r = policy.shape.rank
    out = {k: np.zeros(rounds) for k in ("latency", "dropped", "queue", "keep", "bits")}
    fallbacks = 0
    it = range(rounds)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="rounds", leave=False)
    for t in it:
        snr = cell.sample_snr_hz(clients, rng=rng)
        profile = em.sample(r, scales, rng)
        alloc = policy.step(snr, compute_s, profile, data_weight).raise_for_status()
        fallbacks += bool(alloc.fallback)
        out["queue"][t] = getattr(policy, "queue", 0.0)
        policy.observe(alloc.latency_s)
        out["latency"][t] = alloc.latency_s
        out["dropped"][t] = alloc.dropped_energy
        out["keep"][t] = alloc.keep.mean()
        out["bits"][t] = alloc.payload_bits.sum()
    return SimulationResult(out["latency"], out["dropped"], out["queue"], out["keep"], out["bits"], fallbacks,
                            getattr(policy, "latency_budget_s", None))
