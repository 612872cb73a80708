"""tsfa: solvers for communication-efficient wireless federated LoRA fine-tuning.

`tsfa` imports neither torch nor pyomo (nor cvxpy) at import time; backends import their
solvers lazily.

Layout: the system model (model.py), the rate and its inverses (rate.py), the bandwidth
split and the one least-latency kernel (bandwidth.py), the per-round problem and its search
(online.py, oracles.py, knapsack.py), the online policies (allocator.py), the offline stage
(offline.py: ``OfflineProblem`` and ``design_offline``; saa.py, choice.py, plan.py), the
allocation-only simulator and V sweep (simulate.py), one result contract (status.py).
Section references (spec §N) are to docs/spec.md, the project's statement of its model.
"""

from tsfa._version import __version__
from tsfa.allocator import DensePolicy, FixedPolicy, OnlineAllocator
from tsfa.bandwidth import (
    BandwidthAllocation,
    BandwidthProblem,
    BatchLatency,
    min_latency_bandwidth,
    min_latency_bandwidth_batch,
)
from tsfa.model import (
    LLAMA2_7B_CONFIG,
    MINILM_L6_CONFIG,
    Cell,
    Clients,
    LoraShape,
    ModuleShape,
    keep_from_ratio,
    llama_7b_qv,
    minilm_l6_qv,
    participation_divergence,
    sent_share,
    training_flops_per_sample,
)
from tsfa.online import Allocation, RoundProblem, allocate
from tsfa.rate import bandwidth_for_deadline, bandwidth_for_rate, min_bandwidth, rate_bps, rate_cap_bps
from tsfa.status import InfeasibleError, SolverError, Status

__all__ = [
    "__version__",
    "participation_divergence",
    "sent_share",
    "Status",
    "SolverError",
    "InfeasibleError",
    "ModuleShape",
    "LoraShape",
    "MINILM_L6_CONFIG",
    "LLAMA2_7B_CONFIG",
    "minilm_l6_qv",
    "llama_7b_qv",
    "Cell",
    "Clients",
    "rate_bps",
    "rate_cap_bps",
    "bandwidth_for_rate",
    "bandwidth_for_deadline",
    "min_bandwidth",
    "keep_from_ratio",
    "training_flops_per_sample",
    "BandwidthProblem",
    "BandwidthAllocation",
    "BatchLatency",
    "min_latency_bandwidth",
    "min_latency_bandwidth_batch",
    "RoundProblem",
    "Allocation",
    "allocate",
    "OnlineAllocator",
    "FixedPolicy",
    "DensePolicy",
]

from tsfa.offline import (  # noqa: E402  (TSFA stage 1, spec §6)
    DEFAULT_V_GRID,
    Budgets,
    Candidate,
    CandidateGrid,
    LatencyEstimate,
    OfflinePlan,
    OfflineProblem,
    OnlinePoint,
    SaaSettings,
    SystemSpec,
    VPoint,
    VSweepSettings,
    design_offline,
    expected_latency,
)

__all__ += [
    "OfflineProblem",
    "SystemSpec",
    "CandidateGrid",
    "Budgets",
    "SaaSettings",
    "VSweepSettings",
    "design_offline",
    "expected_latency",
    "OfflinePlan",
    "Candidate",
    "OnlinePoint",
    "LatencyEstimate",
    "VPoint",
    "DEFAULT_V_GRID",
]
