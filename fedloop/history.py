"""The run ledger: one row per round and one per (round, client), saved as JSON + CSV."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["History", "write_csv", "REQUIRED_ROUND_COLUMNS"]

#: Columns every round row of a ledger has (the plots, comparisons and the protocol read them).
REQUIRED_ROUND_COLUMNS = ("round", "latency_s", "wallclock_s", "uplink_bits", "downlink_bits", "test_loss",
                          "accuracy")


#: Ledger columns that hold text; every other column holds numbers (or null / NaN).
TEXT_COLUMNS = ("fallback", "status")
#: Ledger columns that hold a list of numbers.
LIST_COLUMNS = ("profile",)
#: Meta entries that are numbers when present.
NUMERIC_META = ("latency_budget_s", "dense_median_latency_s", "downlink_s", "head_bits", "lora_parameters",
                "model_parameters", "payload_bits_dense", "initial_test_loss", "initial_accuracy", "initial_objective")
#: Config entries read from a ledger, and their types.
TYPED_CONFIG = {"task": str, "strategy": str, "rank": int, "keep": int, "rounds": int, "clients": int, "seed": int,
                "local_steps": int, "lr": (int, float)}


def _number(v) -> bool:
    """A ledger number: a bool-free int within ±2⁶³, or a float that is finite or NaN (a missing value)."""
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return abs(v) < 2**63
    return isinstance(v, float) and not math.isinf(v)


def _check_row(part: str, i: int, row) -> None:
    if not isinstance(row, dict):
        raise ValueError(f"{part}[{i}] must be an object; got {row!r:.60}")
    for k, v in row.items():
        if v is None:
            continue
        if k in TEXT_COLUMNS:
            ok = isinstance(v, str)
        elif k in LIST_COLUMNS:
            ok = isinstance(v, list) and all(x is None or _number(x) for x in v)
        else:
            ok = _number(v)
        if not ok:
            kind = "text" if k in TEXT_COLUMNS else "a list of numbers" if k in LIST_COLUMNS else "a finite number"
            raise ValueError(f"{part}[{i}].{k} must be {kind} or null; got {v!r:.60}")


def _clean(v):
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return None if math.isnan(v) else v
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


@dataclass
class History:
    """What a run measured.

    Attributes:
        config: the resolved run configuration (a dict).
        rounds: one row per round; the columns and their meaning are
            :data:`fedloop.measure.ROUND_COLUMNS`.
        clients: one row per round and client; :data:`fedloop.measure.CLIENT_COLUMNS`.
        meta: anything else (e.g. τ̄, parameter counts, timings).
    """

    config: dict = field(default_factory=dict)
    rounds: list = field(default_factory=list)
    clients: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def column(self, key: str) -> np.ndarray:
        """The per-round series ``key`` (a :data:`~fedloop.measure.ROUND_COLUMNS` name), NaN where
        a round did not measure it."""
        from fedloop.measure import ROUND_COLUMNS

        if key not in ROUND_COLUMNS:
            raise KeyError(f"unknown ledger column {key!r}; the round columns are {sorted(ROUND_COLUMNS)}")
        return np.array([np.nan if r.get(key) is None else r[key] for r in self.rounds], dtype=float)

    @property
    def final_accuracy(self) -> float:
        acc = self.column("accuracy")
        acc = acc[np.isfinite(acc)]
        return float(acc[-1]) if len(acc) else math.nan

    @property
    def total_uplink_bits(self) -> int:
        return int(sum(r["uplink_bits"] for r in self.rounds))

    def to_dict(self) -> dict:
        return {"config": self.config, "meta": {k: _clean(v) for k, v in self.meta.items()},
                "rounds": [{k: _clean(v) for k, v in r.items()} for r in self.rounds],
                "clients": [{k: _clean(v) for k, v in r.items()} for r in self.clients]}

    def save(self, folder) -> Path:
        """Write history.json, rounds.csv and clients.csv into ``folder``; returns it."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "history.json.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(out / "history.json")
        for name, rows in (("rounds", self.rounds), ("clients", self.clients)):
            if rows:
                write_csv(out / f"{name}.csv", [{k: _clean(v) for k, v in r.items()} for r in rows])
        return out

    @classmethod
    def load(cls, folder) -> History:
        """Read ``folder/history.json``, validated (:meth:`from_dict`); a file that is not a ledger
        is a ValueError naming it."""
        p = Path(folder) / "history.json"
        if not p.is_file():
            raise FileNotFoundError(f"no history.json in {folder}")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{p}: not a run ledger: {exc}") from None

    @classmethod
    def from_dict(cls, d: dict) -> History:
        """Inverse of :meth:`to_dict` (None back to NaN), validated: an object with a config and
        meta object and lists of round and client rows; every round row has the core columns
        (:data:`REQUIRED_ROUND_COLUMNS`); values are finite numbers or null (NaN), text only in
        :data:`TEXT_COLUMNS`, lists of numbers only in :data:`LIST_COLUMNS`; the numeric meta
        entries and the config's task, strategy and sizes have their types."""
        if not isinstance(d, dict):
            raise ValueError(f"a ledger is a JSON object; got {type(d).__name__}")
        config, meta = d.get("config", {}), d.get("meta", {})
        rounds, clients = d.get("rounds", []), d.get("clients", [])
        for name, value, typ in (("config", config, dict), ("meta", meta, dict), ("rounds", rounds, list),
                                 ("clients", clients, list)):
            if not isinstance(value, typ):
                raise ValueError(f"{name} must be a JSON {'object' if typ is dict else 'array'}; got {value!r:.60}")
        for part, rows in (("rounds", rounds), ("clients", clients)):
            for i, row in enumerate(rows):
                _check_row(part, i, row)
        for k in NUMERIC_META:
            if k in meta and meta[k] is not None and not _number(meta[k]):
                raise ValueError(f"meta.{k} must be a finite number or null; got {meta[k]!r:.60}")
        for k, typ in TYPED_CONFIG.items():
            v = config.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, typ)):
                raise ValueError(f"config.{k} must be {'text' if typ is str else 'a number'}; got {config[k]!r:.60}")
        for i, row in enumerate(rounds):
            missing = [k for k in REQUIRED_ROUND_COLUMNS if k not in row]
            if missing:
                raise ValueError(f"rounds[{i}] lacks the columns {missing}")
        nan = lambda rows: [{k: (math.nan if v is None else v) for k, v in r.items()} for r in rows]  # noqa: E731
        return cls(config, nan(rounds), nan(clients), meta)


def write_csv(path, rows) -> Path:
    """Write a list of dicts as CSV (columns: every key, in first-seen order); returns the path."""
    rows = list(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})
    return Path(path)
