"""The driver: ``fedloop.run(config) -> History`` runs (or resumes) a federated LoRA fine-tuning.

The round itself is :meth:`fedloop.Server.step` (the server module's docstring lists its
steps); the clients are a :class:`fedloop.client.LocalPool` in this process, or Flower nodes
(:mod:`fedloop.flower`).
"""

from __future__ import annotations

import math

from fedloop.checkpoint import RunFolder, check_run_folder, load_checkpoint
from fedloop.client import LocalPool, RunFailed
from fedloop.config import RunConfig
from fedloop.history import History
from fedloop.server import DOWNLINK_RATE_BPS, Server

__all__ = ["run", "RunFailed", "DOWNLINK_RATE_BPS"]


def run(config: RunConfig, *, resume: bool = False, progress: bool = True, client_hook=None,
        callbacks=()) -> History:
    """Run (or resume) a federated LoRA fine-tuning with the wireless ledger.

    Args:
        config: the run's :class:`RunConfig`; results go to ``config.out``.
        resume: continue from the run folder's checkpoint (same config, possibly more rounds);
            a checkpoint that fails verification is refused (:mod:`fedloop.checkpoint`).
        progress: show a tqdm bar over rounds (accuracy, uplink bits so far, queue).
        client_hook: ``hook(round, client)`` called before each client trains; an exception
            raised there marks the client failed for that round (used to test faults).
        callbacks: callables ``callback(row)`` given each round's ledger row (a dict, the
            columns of :data:`fedloop.measure.ROUND_COLUMNS`) as the round ends, in order; e.g.
            :class:`fedloop.callbacks.TensorBoardWriter`. A callback's exception stops the run
            (the last checkpoint is kept). Those with a ``close()`` are closed when the run ends.

    Returns:
        The :class:`History` (also saved to ``config.out``).

    Raises:
        RunFailed: a non-finite loss; the last checkpoint in ``config.out`` is left intact.
        CheckpointError: ``resume`` with a missing, corrupt or foreign checkpoint.
        RunFolderBusy: another run holds ``config.out``.
        ValueError: ``config.out`` is empty or names a file.
    """
    from tqdm.auto import tqdm

    cfg = config
    callbacks = list(callbacks)
    if not all(callable(c) for c in callbacks):
        raise ValueError("callbacks must be callables taking a round's ledger row")
    out = check_run_folder(cfg.out)  # before any training
    if resume:  # verified before anything, even the lock file, is touched
        load_checkpoint(out)
    try:
        with RunFolder(out):  # a second run on this folder stops here
            server = Server(cfg)
            pool = LocalPool(server, client_hook)
            if resume:
                server.load_checkpoint(out)
            if server.round == 0 and "initial_test_loss" not in server.history.meta:
                server.evaluate_start()
            bar = tqdm(range(server.round, cfg.rounds), initial=server.round, total=cfg.rounds,
                       disable=not progress, desc=f"{cfg.strategy}/{cfg.task}", unit="round", leave=False)
            for _ in bar:
                row = server.step(pool)
                for callback in callbacks:
                    callback(dict(row))
                metric = {"acc": f"{row['accuracy']:.3f}"} if math.isfinite(row["accuracy"]) \
                    else {"loss": f"{row['test_loss']:.4f}"}
                bar.set_postfix(**metric, Mbit=f"{server.history.total_uplink_bits / 1e6:.1f}",
                                Q=f"{row['queue_s']:.2f}" if not math.isnan(row["queue_s"]) else "-")
                if server.round % cfg.checkpoint_every == 0 or server.round == cfg.rounds:
                    server.save_checkpoint(out)
                    server.history.save(out)
            bar.close()
            server.history.save(out)
    finally:
        for callback in callbacks:
            if callable(getattr(callback, "close", None)):
                callback.close()
    return server.history
