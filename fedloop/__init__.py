"""fedloop: the compact federated LoRA loop on a real pre-trained transformer.

``fedloop.run(RunConfig(...)) -> History`` fine-tunes LoRA factors over K simulated
clients that share one base model, with every bit and second of simulated air time in the
ledger. Tasks: ``rt-minilm`` (all-MiniLM-L6-v2 on Rotten Tomatoes, offline), ``rt-distill``
(the same model and text distilling a realisable teacher: only the adapter learns),
``linear`` (teacher–student), ``hf-classification`` and ``hf-causal-lm`` (your own local
Hugging Face model and data files, :mod:`fedloop.hf`), and any task added with
``fedloop.register_task(name, factory)``. Strategies: tsfa, ideal, fedit, ffa, topk, random, svd, fixed,
and the baselines head (adapter frozen) and lowrank (a smaller dense rank at the same bits).
``fedloop.benchmark`` compares strategies on paired seeds.

Layout: ``run`` (loop.py) drives a :class:`Server` (server.py: one round as named steps)
against a client pool (client.py: :class:`LocalPool` here, or Flower nodes in flower.py);
each strategy is one record in strategies.py; measurements for the bound and the ledger's
schema are in measure.py; ``run(config, callbacks=[...])`` hands each round's ledger row to
callbacks (callbacks.py: a TensorBoard writer).

Section references (spec §N) are to docs/spec.md, the project's statement of its model.
"""

from fedloop.config import STRATEGIES, TASKS, RunConfig, register_task
from fedloop.history import History

__all__ = ["RunConfig", "History", "run", "RunFailed", "Server", "LocalPool", "STRATEGIES", "TASKS", "register_task",
           "TensorBoardWriter"]

_LAZY = {"run": "fedloop.loop", "RunFailed": "fedloop.client", "Server": "fedloop.server",
         "LocalPool": "fedloop.client", "TensorBoardWriter": "fedloop.callbacks"}


def __getattr__(name):  # torch is imported only when the loop is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedloop' has no attribute {name!r}")
