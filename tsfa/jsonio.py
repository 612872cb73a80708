"""One round's allocation as JSON in and JSON out, for FL systems not written in Python.

Input (``schema = "tsfa.round/1"``; see docs/allocate_json.md)::

    {"schema": "tsfa.round/1",
     "shape": {"preset": "minilm_l6_qv", "rank": 8}            # or
              {"modules": [{"name": ..., "out_features": m, "in_features": n}, ...],
               "rank": r, "bits_per_value": 32, "header_bits": 128},
     "snr_hz": [...], "compute_s": [...], "error_profile": [[e_k(0), ..., e_k(r)], ...],
     "data_weight": [...]            (optional, default 1/K each),
     "queue": Q, "weight_v": V, "total_bandwidth_hz": B,
     "downlink_s": 0.0, "max_latency_s": null, "min_keep": 1, "allow_skip": false,
     "backend": "fast", "latency_budget_s": null,
     "value_bits": [32, 16, 8, 4]    (optional: each client also chooses its precision),
     "rounding_profile": [[[v_k(s, q) for q in value_bits] for s in 0..r], ...]  (with value_bits)}

Output (``schema = "tsfa.allocation/1"``): status, message, keep, keep_ratio,
bandwidth_hz, latency_s, upload_time_s, payload_bits, dropped_energy, objective,
lower_bound, gap, solve_time_s, backend, value_bits (q_k), rounding_energy, and ``next_queue`` = max(Q + τ − τ̄, 0) when
``latency_budget_s`` is given. Non-finite numbers are written as null.

Every problem with the input raises :class:`JsonInputError` (a ValueError) whose message
names the field: malformed JSON (with line and column), a missing field, a wrong type,
NaN or Infinity (not JSON, rejected even though Python's parser accepts them), a bad value.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["JsonInputError", "parse_round", "allocation_to_json", "allocate_json", "INPUT_SCHEMA", "OUTPUT_SCHEMA"]

INPUT_SCHEMA = "tsfa.round/1"
OUTPUT_SCHEMA = "tsfa.allocation/1"
_PRESETS = ("minilm_l6_qv", "llama_7b_qv")
_REQUIRED = ("shape", "snr_hz", "compute_s", "error_profile", "queue", "weight_v", "total_bandwidth_hz")
_OPTIONAL = ("schema", "data_weight", "downlink_s", "max_latency_s", "min_keep", "allow_skip", "backend",
             "latency_budget_s", "value_bits", "rounding_profile")


class JsonInputError(ValueError):
    """Bad JSON input for ``tsfa allocate``; the message names the field."""


def _reject_constant(name):
    raise JsonInputError(f"{name} is not valid JSON (numbers must be finite)")


def _number(field: str, v, *, allow_null=False) -> float | None:
    if v is None and allow_null:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise JsonInputError(f"{field} must be a number; got {_short(v)}")
    try:
        f = float(v)
    except OverflowError:  # a JSON integer beyond the float range
        f = math.inf
    if not math.isfinite(f):
        raise JsonInputError(f"{field} must be finite; got {_short(v)}")
    return f


def _short(v) -> str:
    try:
        text = json.dumps(v)
    except (ValueError, TypeError, OverflowError, RecursionError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(field: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise JsonInputError(f"{field} must be an integer; got {_short(v)}")
    if abs(v) > 2**53:
        raise JsonInputError(f"{field} must be an integer of at most 2**53 in magnitude; got {_short(v)}")
    return v


def _numbers(field: str, v, depth: int = 1):
    if not isinstance(v, list):
        raise JsonInputError(f"{field} must be a {'list' if depth == 1 else 'list of lists'} of numbers; "
                             f"got {type(v).__name__}")
    if depth == 2:
        return [_numbers(f"{field}[{i}]", row) for i, row in enumerate(v)]
    for i, x in enumerate(v):
        _number(f"{field}[{i}]", x)
    return v


def _shape(v):
    import tsfa

    if not isinstance(v, dict):
        raise JsonInputError(f"shape must be an object; got {type(v).__name__}")
    unknown = sorted(set(v) - {"preset", "modules", "rank", "bits_per_value", "header_bits"})
    if unknown:
        raise JsonInputError(f"unknown fields in shape: {unknown} (allowed: preset or modules, rank, "
                             "bits_per_value, header_bits)")
    if "preset" in v and "modules" in v:
        raise JsonInputError("shape takes either preset or modules, not both")
    if "rank" not in v:
        raise JsonInputError("shape.rank is missing")
    rank = _int("shape.rank", v["rank"])
    kw = {}
    for key in ("bits_per_value", "header_bits"):
        if key in v:
            kw[key] = _int(f"shape.{key}", v[key])
    if "preset" in v:
        if not isinstance(v["preset"], str) or v["preset"] not in _PRESETS:
            raise JsonInputError(f"shape.preset must be one of {list(_PRESETS)}; got {_short(v['preset'])}")
        try:
            return getattr(tsfa, v["preset"])(rank, **kw)
        except ValueError as exc:
            raise JsonInputError(f"shape: {exc}") from None
    if "modules" not in v or not isinstance(v["modules"], list):
        raise JsonInputError("shape needs either preset or a list of modules")
    mods = []
    for i, m in enumerate(v["modules"]):
        if not isinstance(m, dict):
            raise JsonInputError(f"shape.modules[{i}] must be an object")
        extra = sorted(set(m) - {"name", "out_features", "in_features"})
        if extra:
            raise JsonInputError(f"unknown fields in shape.modules[{i}]: {extra}")
        for key in ("name", "out_features", "in_features"):
            if key not in m:
                raise JsonInputError(f"shape.modules[{i}].{key} is missing")
        if not isinstance(m["name"], str):
            raise JsonInputError(f"shape.modules[{i}].name must be a string")
        try:
            mods.append(tsfa.ModuleShape(m["name"], _int(f"shape.modules[{i}].out_features", m["out_features"]),
                                         _int(f"shape.modules[{i}].in_features", m["in_features"])))
        except JsonInputError:
            raise
        except ValueError as exc:
            raise JsonInputError(f"shape.modules[{i}]: {exc}") from None
    try:
        return tsfa.LoraShape(tuple(mods), rank, **kw)
    except ValueError as exc:
        raise JsonInputError(f"shape: {exc}") from None


def parse_round(text: str):
    """(RoundProblem, backend, latency_budget_s or None) from the JSON text."""
    from tsfa.online import ALLOCATION_BACKENDS, RoundProblem

    try:
        d = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise JsonInputError("the JSON input is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        if isinstance(exc, JsonInputError):
            raise
        raise JsonInputError(f"the JSON input cannot be read: {exc}") from None
    if not isinstance(d, dict):
        raise JsonInputError(f"the input must be a JSON object; got {type(d).__name__}")
    schema = d.get("schema", INPUT_SCHEMA)
    if schema != INPUT_SCHEMA:
        raise JsonInputError(f"schema must be {INPUT_SCHEMA!r}; got {_short(schema)}")
    for key in _REQUIRED:
        if key not in d:
            raise JsonInputError(f"{key} is missing (required: {', '.join(_REQUIRED)})")
    unknown = sorted(set(d) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise JsonInputError(f"unknown fields {unknown}")
    shape = _shape(d["shape"])
    snr = _numbers("snr_hz", d["snr_hz"])
    comp = _numbers("compute_s", d["compute_s"])
    prof = _numbers("error_profile", d["error_profile"], depth=2)
    k = len(snr)
    weight = _numbers("data_weight", d["data_weight"]) if d.get("data_weight") is not None else [1.0 / max(k, 1)] * k
    backend = d.get("backend", "fast")
    if not isinstance(backend, str) or backend not in ALLOCATION_BACKENDS:
        raise JsonInputError(f"backend must be one of {sorted(ALLOCATION_BACKENDS)}; got {_short(backend)}")
    allow_skip = d.get("allow_skip", False)
    if not isinstance(allow_skip, bool):
        raise JsonInputError(f"allow_skip must be true or false; got {_short(allow_skip)}")
    budget = _number("latency_budget_s", d.get("latency_budget_s"), allow_null=True)
    menu = {}
    if d.get("value_bits") is not None or d.get("rounding_profile") is not None:
        qs = d.get("value_bits")
        if not isinstance(qs, list) or not qs:
            raise JsonInputError(f"value_bits must be a non-empty list of integers; got {_short(qs)}")
        menu["value_bits"] = tuple(_int(f"value_bits[{i}]", q) for i, q in enumerate(qs))
        rp = d.get("rounding_profile")
        if not isinstance(rp, list):
            raise JsonInputError(f"rounding_profile must be a list (per client) of lists (per s) of lists (per q) "
                                 f"of numbers, required with value_bits; got {_short(rp)}")
        rows = [_numbers(f"rounding_profile[{k}]", row, depth=2) for k, row in enumerate(rp)]
        if len({(len(row), *map(len, row)) for row in rows}) > 1:
            raise JsonInputError("rounding_profile must be K × (r+1) × len(value_bits); its rows differ in length")
        menu["rounding_profile"] = rows
    try:
        prob = RoundProblem(
            shape=shape, snr_hz=np.asarray(snr, float), compute_s=np.asarray(comp, float),
            data_weight=np.asarray(weight, float), error_profile=np.asarray(prof, float),
            queue=_number("queue", d["queue"]), weight_v=_number("weight_v", d["weight_v"]),
            total_bandwidth_hz=_number("total_bandwidth_hz", d["total_bandwidth_hz"]),
            downlink_s=_number("downlink_s", d.get("downlink_s", 0.0)),
            max_latency_s=_number("max_latency_s", d.get("max_latency_s"), allow_null=True),
            min_keep=_int("min_keep", d.get("min_keep", 1)), allow_skip=allow_skip, **menu)
    except JsonInputError:
        raise
    except ValueError as exc:
        raise JsonInputError(str(exc)) from None
    if budget is not None and not budget > 0:
        raise JsonInputError(f"latency_budget_s must be > 0; got {budget}")
    return prob, backend, budget


def _clean(v: Any):
    if isinstance(v, np.ndarray):
        return [_clean(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


def allocation_to_json(alloc, queue: float, budget: float | None) -> dict:
    out = {"schema": OUTPUT_SCHEMA, "status": alloc.status.value, "message": alloc.message}
    for key in ("keep", "keep_ratio", "bandwidth_hz", "latency_s", "upload_time_s", "payload_bits", "dropped_energy",
                "objective", "lower_bound", "gap", "solve_time_s", "backend", "value_bits", "rounding_energy"):
        out[key] = _clean(getattr(alloc, key))
    if budget is not None and math.isfinite(alloc.latency_s):
        out["next_queue"] = max(queue + alloc.latency_s - budget, 0.0)
    return out


def allocate_json(text: str) -> dict:
    """Parse, allocate, and return the output object (see the module docstring)."""
    from tsfa.online import allocate

    prob, backend, budget = parse_round(text)
    return allocation_to_json(allocate(prob, backend=backend), prob.queue, budget)
