"""Callbacks for :func:`fedloop.run` (and the Flower server): each gets every round's ledger row.

A callback is any callable ``callback(row)``; ``row`` is the round's ledger row (a dict of the
columns in :data:`fedloop.measure.ROUND_COLUMNS`: round, latency, bits, test loss, accuracy,
...). One with a ``close()`` method is closed when the run ends.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["TensorBoardWriter"]


class TensorBoardWriter:
    """Write every numeric column of each round's row as a TensorBoard scalar, tagged
    ``ledger/<column>`` at step ``row["round"]`` (NaN entries, e.g. rounds not evaluated, are
    left out).

    Needs the ``tensorboard`` package (``pip install 'tsfa[tensorboard]'``); without it the
    constructor raises ImportError with that command. ``logdir`` is created if missing;
    view it with ``tensorboard --logdir <logdir>``.
    """

    def __init__(self, logdir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("TensorBoardWriter needs tensorboard: pip install 'tsfa[tensorboard]'") from None
        self.logdir = Path(logdir)
        self._writer = SummaryWriter(log_dir=str(self.logdir))

    def __call__(self, row: dict) -> None:
        step = int(row["round"])
        for key, value in row.items():
            if key == "round" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(value):
                self._writer.add_scalar(f"ledger/{key}", float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
