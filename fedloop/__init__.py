"""fedloop: the compact federated LoRA loop on a real pre-trained transformer.

``fedloop.run(RunConfig(...)) -> History`` fine-tunes LoRA factors over K simulated
clients that share one base model, with every bit and second of simulated air time in the
ledger. Tasks: ``rt-minilm`` (all-MiniLM-L6-v2 on Rotten Tomatoes, offline), ``rt-distill``
(the same model and text distilling a realisable teacher: only the adapter learns) and
``linear`` (teacher–student). Strategies: tsfa, ideal, fedit, ffa, topk, random, svd, fixed,
and the baselines head (adapter frozen) and lowrank (a smaller dense rank at the same bits).
``fedloop.benchmark`` compares strategies on paired seeds.
"""

from fedloop.config import STRATEGIES, TASKS, RunConfig
from fedloop.history import History

__all__ = ["RunConfig", "History", "run", "RunFailed", "STRATEGIES", "TASKS"]


def __getattr__(name):  # torch is imported only when the loop is used
    if name in ("run", "RunFailed"):
        from fedloop import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'fedloop' has no attribute {name!r}")
